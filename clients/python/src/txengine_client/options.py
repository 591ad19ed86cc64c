"""The one configuration object of a client, and where it becomes gRPC options.

`ClientOptions` is frozen and typed; `Client` and `AsyncClient` turn it into channel
credentials, channel arguments and call metadata here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import pathlib
import random

import grpc

from txengine_client.types import BATCH_ITEMS_MAX

PemSource = bytes | str | pathlib.Path
"""PEM given as bytes, or as the path (str or Path) of a file holding it."""

CORRELATION_ID_KEY = "x-correlation-id"
AUTHORIZATION_KEY = "authorization"

# gRPC's own reconnect backoff grows to 120 s; a ledger client wants to find a restarted
# server within seconds, so the cap is lowered (it only applies while the server is down).
RECONNECT_BACKOFF_INITIAL_MS = 100
MESSAGE_BYTES_MAX = 4 * 1024 * 1024  # the server's limit, both directions

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for statuses whose outcome is unknown.

    Every txengine RPC may be retried: creates are idempotent by id (a retried create that had
    committed reports EXISTS, see `CreateResult.is_ok_or_exists`) and the others only read.
    Attempt n (from 1) is followed by a pause drawn uniformly from
    [0, min(backoff_max_s, backoff_initial_s * backoff_multiplier**(n-1))], or the server's
    RetryInfo delay when that is longer. `attempts_max=1` turns retries off.
    """

    attempts_max: int = 5
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    backoff_multiplier: float = 2.0
    retry_codes: frozenset = RETRYABLE_CODES

    def __post_init__(self) -> None:
        if self.attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be at least 1")

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        return code in self.retry_codes and attempt < self.attempts_max

    def pause_s(self, attempt: int, server_delay_s: float | None = None) -> float:
        ceiling = min(self.backoff_max_s,
                      self.backoff_initial_s * self.backoff_multiplier ** (attempt - 1))
        return max(random.uniform(0, ceiling), server_delay_s or 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """Everything a client can be told. The defaults suit a service on a trusted network.

    * `deadline_s` — deadline of each attempt of a unary call (a retry gets a new one).
    * `retry` — see `RetryPolicy`.
    * TLS: on when `tls` is true or any PEM is given. `root_certificates` verifies the server
      (default: the system roots); `certificate_chain` + `private_key` are the client's
      certificate for mutual TLS; `server_name_override` checks the server certificate for
      another name than the address's host (tests, IP addresses).
    * `token` — sent as `authorization: Bearer <token>` on every call. Over a plaintext channel
      it travels in clear: use it with TLS outside loopback.
    * auto-batching (`AsyncClient.create_transfer`): concurrent single transfers are coalesced
      for up to `batch_window_s` or `batch_items_max` transfers, whichever comes first, with at
      most `batch_in_flight_max` CreateTransfers calls in flight (more callers wait and join
      the next, larger batch).
    * `stream_in_flight_max` — batches sent but not yet answered in `stream_transfers`.
    * `reconnect_backoff_max_s` — cap of the channel's reconnect backoff while the server is
      unreachable.
    * `channel_options` — extra gRPC channel arguments, appended last.
    """

    deadline_s: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    tls: bool = False
    root_certificates: PemSource | None = None
    certificate_chain: PemSource | None = None
    private_key: PemSource | None = None
    server_name_override: str | None = None
    token: str | None = None
    batch_window_s: float = 0.001
    batch_items_max: int = BATCH_ITEMS_MAX
    batch_in_flight_max: int = 8
    stream_in_flight_max: int = 4
    reconnect_backoff_max_s: float = 2.0
    channel_options: tuple = ()

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if not 1 <= self.batch_items_max <= BATCH_ITEMS_MAX:
            raise ValueError(f"batch_items_max must be within 1..{BATCH_ITEMS_MAX}")
        if self.batch_window_s < 0:
            raise ValueError("batch_window_s must not be negative")
        if self.batch_in_flight_max < 1 or self.stream_in_flight_max < 1:
            raise ValueError("in-flight limits must be at least 1")
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(pem is not None for pem in (
            self.root_certificates, self.certificate_chain, self.private_key))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )

    def grpc_channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", int(self.reconnect_backoff_max_s * 1000)),
            # The SDK retries itself, with backoff and its own bound: no second layer.
            ("grpc.enable_retries", 0),
        ]
        if self.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        options.extend(self.channel_options)
        return options

    def metadata(self, correlation_id: str) -> tuple[tuple[str, str], ...]:
        metadata: tuple[tuple[str, str], ...] = ((CORRELATION_ID_KEY, correlation_id),)
        if self.token:
            metadata += ((AUTHORIZATION_KEY, f"Bearer {self.token}"),)
        return metadata


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return pathlib.Path(source).read_bytes()
