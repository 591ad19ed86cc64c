"""The one settings object of the engine.

Every field reads an environment variable ``TXENGINE_<FIELD>``; the CLI flags override them.
Library options (asyncpg, grpc) are derived from this object in exactly one place each.
"""
from __future__ import annotations

import pathlib

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine import limits


class Settings(BaseSettings):
    """Configuration of one engine process."""

    model_config = SettingsConfigDict(env_prefix="TXENGINE_", frozen=True, extra="forbid")

    listen: str = Field("127.0.0.1:50051", description="gRPC address HOST:PORT (port 0 picks one)")
    database_url: str | None = Field(
        None, description="Postgres URL; unset starts an embedded Postgres under data_dir"
    )
    redis_url: str | None = Field(
        None, description="Redis URL; unset starts an embedded Redis under data_dir"
    )
    metrics_listen: str | None = Field(
        None, description="Prometheus /metrics address HOST:PORT (port 0 picks one); unset: off"
    )
    data_dir: pathlib.Path = Field(pathlib.Path(".data"), description="embedded services' data")
    shards: int | None = Field(
        None, ge=1, le=limits.SHARDS_MAX,
        description="shards of a new database (8 if unset); an existing database keeps its own",
    )
    database_pool_size: int = Field(8, ge=2, le=64, description="Postgres connections for reads")
    commit_items_max: int = Field(limits.COMMIT_ITEMS_MAX, ge=limits.BATCH_ITEMS_MAX)
    shard_queue_items_max: int = Field(limits.SHARD_QUEUE_ITEMS_MAX, ge=limits.BATCH_ITEMS_MAX)
    rpc_concurrency_max: int = Field(limits.RPC_CONCURRENCY_MAX, ge=1)
    shutdown_grace_seconds: float = Field(limits.SHUTDOWN_GRACE_SECONDS, ge=0)
    lease_wait_seconds: float = Field(
        30.0, ge=0, description="how long to wait for another process to release the shards"
    )
    unsafe_no_durability: bool = Field(
        False, description="allow fsync=off or synchronous_commit=off; for storage benchmarks only"
    )
    # -- security (engine.security): all off by default, for a plaintext loopback server
    tls_cert: pathlib.Path | None = Field(None, description="PEM server certificate chain; with tls_key: TLS")
    tls_key: pathlib.Path | None = Field(None, description="PEM server private key")
    tls_client_ca: pathlib.Path | None = Field(
        None, description="PEM CA bundle; set: client certificates are required and verified")
    auth_jwt_keys: pathlib.Path | None = Field(
        None, description="PEM public key, or a JWKS document (JSON), that verifies bearer tokens")
    auth_jwt_algorithm: str = Field("RS256", description="the one JWT algorithm accepted")
    auth_jwt_issuer: str | None = Field(None, description="required `iss` of bearer tokens")
    auth_jwt_audience: str | None = Field(None, description="required `aud` of bearer tokens")
    policy_file: pathlib.Path | None = Field(
        None, description="entitlements and rate limits per principal (TOML); unset: no checks")
    audit: bool | None = Field(
        None, description="write the audit trail; unset: on whenever a client must authenticate")
    migration_database_url: str | None = Field(
        None, description="Postgres URL of the role that applies migrations; unset: database_url")
    events_stream_maxlen: int = Field(
        1_000_000, ge=1, description="approximate entries kept per Redis event stream (shard)"
    )
    events_retention_seconds: float = Field(
        3600.0, ge=0,
        description="keep published outbox rows this long (SubscribeEvents can resume within it)",
    )
    webhook_attempts_max: int = Field(8, ge=1, description="attempts before a delivery is dead")
    webhook_backoff_base_seconds: float = Field(
        1.0, gt=0, description="first retry delay bound; doubles per attempt, full jitter"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="per webhook HTTP request")
    log_level: str = Field("info")
    log_format: str = Field("auto", description="json, console, or auto (console on a terminal)")

    @property
    def authenticates(self) -> bool:
        """Whether callers must prove an identity (client certificate or bearer token)."""
        return self.tls_client_ca is not None or self.auth_jwt_keys is not None

    @property
    def audits(self) -> bool:
        return self.authenticates if self.audit is None else self.audit

    @model_validator(mode="after")
    def _check_security(self) -> "Settings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.auth_jwt_algorithm.lower() == "none":
            raise ValueError("auth_jwt_algorithm must name a signing algorithm, not 'none'")
        if self.auth_jwt_keys is not None and not (self.auth_jwt_issuer and self.auth_jwt_audience):
            raise ValueError("bearer tokens need auth_jwt_issuer and auth_jwt_audience")
        return self

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{info.field_name} must be HOST:PORT, got {value!r}")
        return value
