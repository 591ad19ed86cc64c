"""The one settings object of the engine.

Every field reads an environment variable ``TXENGINE_<FIELD>``; the CLI flags override them.
Library options (asyncpg, grpc) are derived from this object in exactly one place each.
"""
from __future__ import annotations

import pathlib

from pydantic import Field, ValidationInfo, field_validator
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

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{info.field_name} must be HOST:PORT, got {value!r}")
        return value
