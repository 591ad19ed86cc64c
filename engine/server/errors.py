"""The one place that maps failures to gRPC status codes with rich error details.

Per-item business outcomes are results, never statuses. A malformed request is
INVALID_ARGUMENT with a google.rpc.BadRequest naming each bad field and index, overload is
RESOURCE_EXHAUSTED, an engine that cannot commit is UNAVAILABLE, and anything unexpected is
INTERNAL: UNKNOWN never leaves the server.
"""
from __future__ import annotations

import dataclasses
import functools

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from engine.posting.engine import STORAGE_ERRORS, Overloaded, Unavailable
from engine.security.audit import AuditUnavailable
from engine.security.guard import NotEntitled
from engine.security.ratelimit import RateLimited
from engine.security.tokens import Unauthenticated
from engine.storage.outbox import CursorExpired

log = structlog.get_logger("engine.server")

ERROR_DOMAIN = "txengine.dev"
# Field violations sent in one status: the details travel in a trailer, and clients drop
# trailers over 8 KiB by default (grpc.max_metadata_size), which would hide the status.
VIOLATIONS_REPORTED_MAX = 40


@dataclasses.dataclass(frozen=True)
class Violation:
    field: str
    description: str


class InvalidRequest(Exception):
    """The request is malformed; nothing was applied."""

    def __init__(self, violations: list[Violation]):
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations[:5]))
        self.violations = violations


class NotFound(Exception):
    """A named configuration object (a fee schedule) does not exist."""


class Unimplemented(Exception):
    """The RPC or flag is part of the contract but not served by this engine version."""


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(code: grpc.StatusCode, message: str, reason: str, details=()) -> tuple:
    status = status_pb2.Status(
        code=code.value[0], message=message,
        details=[_pack(d) for d in details]
        + [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))],
    )
    return code, message, (("grpc-status-details-bin", status.SerializeToString()),)


def classify(error: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """(status code, message, trailing metadata) for an exception raised by a handler."""
    if isinstance(error, InvalidRequest):
        violations = error.violations[:VIOLATIONS_REPORTED_MAX]
        if len(error.violations) > VIOLATIONS_REPORTED_MAX:
            violations.append(Violation(
                "request", f"{len(error.violations) - VIOLATIONS_REPORTED_MAX} more violations "
                "not listed; fix the ones above and send again"))
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ])
        return _status(grpc.StatusCode.INVALID_ARGUMENT, str(error), "INVALID_REQUEST", [bad_request])
    if isinstance(error, Overloaded):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(50)
        return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), "OVERLOADED", [retry])
    if isinstance(error, Unauthenticated):
        return _status(grpc.StatusCode.UNAUTHENTICATED, str(error), "UNAUTHENTICATED")
    if isinstance(error, NotEntitled):
        return _status(grpc.StatusCode.PERMISSION_DENIED, str(error), "NOT_ENTITLED")
    if isinstance(error, RateLimited):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(1_000_000, int(error.retry_after_seconds * 1e9)))
        return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), "RATE_LIMITED", [retry])
    if isinstance(error, (Unavailable, AuditUnavailable)):
        return _status(grpc.StatusCode.UNAVAILABLE, str(error), "UNAVAILABLE")
    if isinstance(error, STORAGE_ERRORS):
        return _status(grpc.StatusCode.UNAVAILABLE, f"storage unavailable: {type(error).__name__}",
                       "STORAGE_UNAVAILABLE")
    if isinstance(error, CursorExpired):
        return _status(grpc.StatusCode.OUT_OF_RANGE, str(error), "CURSOR_EXPIRED")
    if isinstance(error, NotFound):
        return _status(grpc.StatusCode.NOT_FOUND, str(error), "NOT_FOUND")
    if isinstance(error, Unimplemented):
        return _status(grpc.StatusCode.UNIMPLEMENTED, str(error), "UNIMPLEMENTED")
    return _status(grpc.StatusCode.INTERNAL, "internal error; the request may be retried with "
                   "the same ids", "INTERNAL")


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def handle_errors(method):
    """Decorate a servicer method so that every exception becomes a documented status."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the boundary that turns errors into statuses
            if classify(error)[0] == grpc.StatusCode.INTERNAL:
                log.exception("request failed", rpc=method.__name__)
            await abort(context, error)

    return wrapper


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End the RPC with the documented status of `error` (raises grpc.aio.AbortError), keeping
    the trailing metadata already set for it (the correlation id)."""
    code, message, trailers = classify(error)
    kept = tuple(context.trailing_metadata() or ())
    await context.abort(code, message, trailing_metadata=kept + tuple(trailers))
