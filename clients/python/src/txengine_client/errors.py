"""Exceptions for gRPC statuses, carrying the server's rich error details.

Per-item business outcomes (insufficient funds, unknown account, ...) are never exceptions: they
are results (`CreateResult`). An exception means the request as a whole was not served:

* `InvalidArgument` — the request is malformed and nothing of it was applied;
  `violations` names each bad field and index (`transfers[3].user_data`).
* `Unavailable`, `DeadlineExceeded` — the outcome is unknown. The SDK has already retried with
  the same ids as often as its `RetryPolicy` allows; retrying again later is always safe.
* `ResourceExhausted` — the server is overloaded; `retry_delay_s` says when to try again.
* everything else maps to the class named after its status code, all under `TxengineError`.
"""
from __future__ import annotations

import dataclasses

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TxengineError(Exception):
    """A request failed with a gRPC status other than OK."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 violations: tuple[FieldViolation, ...] = (), reason: str = "",
                 retry_delay_s: float | None = None, correlation_id: str = "",
                 attempts: int = 1):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.violations = violations
        self.reason = reason
        self.retry_delay_s = retry_delay_s
        self.correlation_id = correlation_id
        self.attempts = attempts

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.correlation_id:
            text += f" (correlation id {self.correlation_id}, {self.attempts} attempt(s))"
        return text


class InvalidArgument(TxengineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(TxengineError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TxengineError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(TxengineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(TxengineError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(TxengineError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TxengineError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(TxengineError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(TxengineError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(TxengineError):
    code = grpc.StatusCode.CANCELLED


class Internal(TxengineError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TxengineError]] = {
    cls.code: cls for cls in (InvalidArgument, Unavailable, DeadlineExceeded, ResourceExhausted,
                              Unimplemented, Unauthenticated, PermissionDenied, NotFound,
                              FailedPrecondition, Cancelled, Internal)
}


def _details(trailing_metadata) -> tuple[tuple[FieldViolation, ...], str, float | None]:
    """(field violations, ErrorInfo reason, RetryInfo delay) from grpc-status-details-bin."""
    raw = next((value for key, value in (trailing_metadata or ()) if key == STATUS_DETAILS_KEY),
               None)
    if raw is None:
        return (), "", None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - undecodable details must not hide the status itself
        return (), "", None
    violations: list[FieldViolation] = []
    reason = ""
    retry_delay_s = None
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        error_info = error_details_pb2.ErrorInfo()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            violations.extend(FieldViolation(v.field, v.description)
                              for v in bad_request.field_violations)
        elif detail.Unpack(error_info):
            reason = error_info.reason
        elif detail.Unpack(retry_info):
            retry_delay_s = retry_info.retry_delay.ToMilliseconds() / 1000
    return tuple(violations), reason, retry_delay_s


def from_rpc_error(error: grpc.RpcError, *, correlation_id: str = "",
                   attempts: int = 1) -> TxengineError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or str(code)
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    violations, reason, retry_delay_s = _details(trailing)
    cls = _BY_CODE.get(code, TxengineError)
    return cls(message, code=code, violations=violations, reason=reason,
               retry_delay_s=retry_delay_s, correlation_id=correlation_id, attempts=attempts)
