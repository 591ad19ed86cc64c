"""The grpc.aio server interceptor: conventional gRPC metrics and a correlation id per RPC.

Written here rather than taken from py-grpc-prometheus, whose aio interceptor does not count
RPCs ended by ``context.abort()`` (that raises ``grpc.aio.AbortError``, not ``grpc.RpcError``),
and every status this engine returns besides OK is an abort.

For each RPC the interceptor
* counts ``grpc_server_started_total`` and ``grpc_server_msg_received_total`` /
  ``grpc_server_msg_sent_total``, and on completion ``grpc_server_handled_total{grpc_code}``
  and ``grpc_server_handling_seconds``, for unary and streaming methods alike (messages that a
  coroutine handler sends with ``context.write()`` are not counted as sent);
* takes the caller's ``x-correlation-id`` metadata (or makes one), binds it with the method
  name and the authenticated principal (when the channel has one) to the structlog context of
  the RPC, so every log line the RPC causes carries them, and returns it in the response's
  trailing metadata (a streaming response also has it in its initial metadata, at once: a
  separate send that a unary call, answered in one go, is spared); at debug level each RPC
  also logs one line with its status and duration.

Only methods the server serves are counted, so a caller cannot grow the label sets by calling
made-up method names.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import re
import time
import uuid
from collections.abc import Iterator

import grpc
import structlog

from engine.observability import metrics
from engine.observability.correlation import CORRELATION_ID

log = structlog.get_logger("engine.rpc")

CORRELATION_ID_KEY = "x-correlation-id"
# A caller's correlation id is echoed into every log line of the RPC: short and printable only.
CORRELATION_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# Statuses that mean the server is at fault; logged as warnings (the others at debug).
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.DATA_LOSS})


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The go-grpc-prometheus ``grpc_type`` label."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


@dataclasses.dataclass
class _Method:
    """One served method: its shape and its metric label children, resolved once."""

    name: str
    request_streaming: bool
    started: object
    received: object
    sent: object
    seconds: object
    handled: dict

    @classmethod
    def of(cls, full_method: str, request_streaming: bool, response_streaming: bool) -> _Method:
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (grpc_type(request_streaming, response_streaming), service, method)
        return cls(
            name=method,
            request_streaming=request_streaming,
            started=metrics.GRPC_STARTED.labels(*labels),
            received=metrics.GRPC_MSG_RECEIVED.labels(*labels),
            sent=metrics.GRPC_MSG_SENT.labels(*labels),
            seconds=metrics.GRPC_HANDLING_SECONDS.labels(*labels),
            handled={code: metrics.GRPC_HANDLED.labels(*labels, label)
                     for code, label in metrics.GRPC_CODE_LABEL.items()},
        )

    def requests(self, request_or_iterator):
        """The request (counted now) or the request stream (counted as it is read)."""
        if self.request_streaming:
            return _counted(request_or_iterator, self.received)
        self.received.inc()
        return request_or_iterator


async def _counted(iterator, counter):
    async for message in iterator:
        counter.inc()
        yield message


def correlation_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CORRELATION_ID_KEY and isinstance(value, str) and CORRELATION_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


def principal(context: grpc.aio.ServicerContext) -> str | None:
    """The authenticated peer (its TLS certificate identity); None on a plaintext channel."""
    identities = context.peer_identities()
    return identities[0].decode(errors="replace") if identities else None


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client receives: what abort() or set_code() set, else what grpc derives
    from how the handler ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # the aio context may hold the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    # A streaming handler whose client went away is closed (GeneratorExit) or cancelled.
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Call:
    """One RPC in flight: started on creation, finished exactly once."""

    __slots__ = ("method", "context", "began", "correlation_id", "_tokens", "_cid_token")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext):
        method.started.inc()
        self.method = method
        self.context = context
        self.began = time.perf_counter()
        self.correlation_id = correlation_id(context)
        context.set_trailing_metadata(((CORRELATION_ID_KEY, self.correlation_id),))
        self._cid_token = CORRELATION_ID.set(self.correlation_id)
        bound = {"correlation_id": self.correlation_id, "rpc": method.name}
        peer = principal(context)
        if peer is not None:
            bound["principal"] = peer
        self._tokens = structlog.contextvars.bind_contextvars(**bound)

    async def send_correlation_id(self) -> None:
        """The correlation id in the initial metadata too, for a response stream."""
        await self.context.send_initial_metadata(((CORRELATION_ID_KEY, self.correlation_id),))

    def finish(self, error: BaseException | None) -> None:
        code = final_code(self.context, error)
        elapsed = time.perf_counter() - self.began
        self.method.handled[code].inc()
        self.method.seconds.observe(elapsed)
        if code in SERVER_ERROR_CODES:
            log.warning("rpc failed", code=code.name, seconds=round(elapsed, 6))
        else:
            log.debug("rpc", code=code.name, seconds=round(elapsed, 6))
        try:
            structlog.contextvars.reset_contextvars(**self._tokens)
            CORRELATION_ID.reset(self._cid_token)
        except ValueError:
            # A stream whose client went away is finalised later, in another context, where
            # these bindings were never made: there is nothing to reset there.
            pass


@contextlib.contextmanager
def _observed(method: _Method, context: grpc.aio.ServicerContext) -> Iterator[_Call]:
    """One RPC from start to finish, however its handler ends."""
    call = _Call(method, context)
    error = None
    try:
        yield call
    except BaseException as raised:
        error = raised
        raise
    finally:
        call.finish(error)


def _unary_response(behavior, method: _Method):
    async def handle(request_or_iterator, context):
        with _observed(method, context):
            response = await behavior(method.requests(request_or_iterator), context)
            method.sent.inc()
            return response

    return handle


def _stream_response_generator(behavior, method: _Method):
    async def handle(request_or_iterator, context):
        with _observed(method, context) as call:
            await call.send_correlation_id()
            async for response in behavior(method.requests(request_or_iterator), context):
                method.sent.inc()
                yield response

    return handle


def _stream_response_writer(behavior, method: _Method):
    async def handle(request_or_iterator, context):
        with _observed(method, context) as call:
            await call.send_correlation_id()
            return await behavior(method.requests(request_or_iterator), context)

    return handle


_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def instrument(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
    """The same handler, counted, timed and carrying a correlation id.

    grpc.aio picks how to drive a handler from its kind (coroutine, async generator), so each
    wrapper is of the same kind as the behavior it wraps.
    """
    shape = (bool(handler.request_streaming), bool(handler.response_streaming))
    attribute, factory = _FACTORIES[shape]
    behavior = getattr(handler, attribute)
    if inspect.isasyncgenfunction(behavior):
        wrap = _stream_response_generator
    elif inspect.iscoroutinefunction(behavior):
        wrap = _stream_response_writer if shape[1] else _unary_response
    else:
        return handler  # synchronous handlers run in a thread pool; this server has none
    method = _Method.of(full_method, *shape)
    return factory(wrap(behavior, method), request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every served RPC and binds its correlation id (see module docstring)."""

    def __init__(self, services=()):
        """`services`: protobuf ServiceDescriptors whose methods get their series at zero
        before the first call, so that rate() and the alerts work from the start."""
        self._instrumented: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        for service in services:
            for method in service.methods:
                _Method.of(f"/{service.full_name}/{method.name}",
                           method.client_streaming, method.server_streaming)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: grpc answers UNIMPLEMENTED, nothing is counted
        full_method = handler_call_details.method
        cached = self._instrumented.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        instrumented = instrument(handler, full_method)
        self._instrumented[full_method] = (handler, instrumented)
        return instrumented
