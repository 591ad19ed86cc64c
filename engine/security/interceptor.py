"""The security interceptor of LedgerService: identity, RPC entitlement, per-principal
concurrency and request rate, and the audit trail.

For every LedgerService RPC (health and reflection pass through) it
* establishes the principal: the subject of a verified bearer token (``authorization: Bearer
  <jwt>``), else the identity of the verified client certificate (its first subject
  alternative name, else its common name); none, or a bad token, is UNAUTHENTICATED;
* refuses an RPC the policy does not grant the principal (PERMISSION_DENIED), then one beyond
  the principal's concurrent RPCs or request rate (RESOURCE_EXHAUSTED with RetryInfo);
* puts the caller in ``guard.CALLER`` for the servicer's per-item checks, and the principal in
  every log line of the RPC;
* writes an audit record for each mutating request (each message of a stream) and for every
  authentication or authorization failure. A mutating request is acknowledged only once its
  record is committed; if that fails the caller gets UNAVAILABLE and retries with the same ids.

It runs inside the metrics interceptor, so refused RPCs are counted and carry a correlation id.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect

import grpc
import structlog

from engine.observability import metrics
from engine.security import guard
from engine.security.audit import AuditRecord, AuditTrail, AuditUnavailable, digest
from engine.security.policy import MUTATING_RPCS, Policy
from engine.security.ratelimit import Rate, RateLimited, RateLimiter
from engine.security.tokens import TokenVerifier, Unauthenticated
from engine.server.errors import abort, classify
from engine.observability.correlation import CORRELATION_ID
from engine.server.interceptors import final_code

log = structlog.get_logger("engine.security")

SERVICE_PREFIX = "/txengine.v1.LedgerService/"
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "
# The principal of callers on a server that authenticates nobody (a policy may still name it).
ANONYMOUS = "anonymous"
AUDITED_FAILURES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class ConcurrencyExceeded(RateLimited):
    """The principal has its maximum of RPCs in flight."""

    def __init__(self, limit: int):
        Exception.__init__(self, f"at most {limit} concurrent RPCs per principal; retry later")
        self.retry_after_seconds = 0.05


@dataclasses.dataclass
class SecurityConfig:
    """What the interceptor enforces; every part optional."""

    verifier: TokenVerifier | None
    client_certificates: bool
    policy: Policy | None
    limiter: RateLimiter
    audit: AuditTrail | None


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, config: SecurityConfig):
        self.config = config
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method.removeprefix(SERVICE_PREFIX))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # -- identity and admission ------------------------------------------------------------

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY and isinstance(value, str):
                token = value
        if self.config.verifier is not None and token is not None:
            if not token.lower().startswith(BEARER_PREFIX):
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return self.config.verifier.principal(token[len(BEARER_PREFIX):].strip())
        identities = context.peer_identities()
        if self.config.client_certificates and identities:
            return identities[0].decode(errors="replace")
        if self.config.verifier is not None or self.config.client_certificates:
            raise Unauthenticated("no credentials: send a client certificate or a bearer token")
        return ANONYMOUS

    def admit(self, principal: str, rpc: str) -> guard.Caller:
        policy = self.config.policy
        if policy is None:
            return guard.Caller(principal, None)
        entitlement = policy.entitlement(principal)
        if entitlement is None or rpc not in entitlement.rpcs:
            raise guard.NotEntitled([rpc], f"principal may not call {rpc}")
        return guard.Caller(principal, entitlement)

    async def _enter(self, principal: str, rpc: str) -> list:
        """Admit an authenticated principal; returns the context tokens to reset.

        The principal stays bound in the log context until the metrics interceptor around
        this one resets it, so that the RPC's closing log line names it too."""
        structlog.contextvars.bind_contextvars(principal=principal)
        tokens = [guard.CALLER.set(self.admit(principal, rpc))]
        policy = self.config.policy
        if policy is not None:
            limits = policy.limits(principal)
            if limits.concurrent_rpcs_max and \
                    self._in_flight[principal] >= limits.concurrent_rpcs_max:
                raise ConcurrencyExceeded(limits.concurrent_rpcs_max)
            await self.config.limiter.acquire("request", [Rate(
                f"{principal}:requests", limits.requests_per_second, limits.burst_seconds, 1)])
        return tokens

    def _leave(self, principal: str) -> None:
        self._in_flight[principal] -= 1
        if not self._in_flight[principal]:
            del self._in_flight[principal]  # one entry per principal with RPCs in flight

    # -- audit -----------------------------------------------------------------------------

    async def audit(self, principal: str, rpc: str, raw: bytes, code: grpc.StatusCode,
                    detail: str = "") -> None:
        """Append the record of one request (`raw`: its wire bytes, digested here)."""
        if self.config.audit is None:
            return
        await self.config.audit.record(AuditRecord(
            principal=principal, rpc=rpc, correlation_id=CORRELATION_ID.get(),
            request_digest=digest(raw), outcome=code.name, detail=detail))

    async def _refuse(self, error: Exception, principal: str, rpc: str, raw: bytes,
                      context) -> None:
        """Answer a refused RPC; `principal` is empty when authentication failed, and the
        record then names the peer's certificate identity, if any."""
        code = classify(error)[0]
        metrics.SECURITY_REFUSALS.labels(refusal=_refusal_reason(error)).inc()
        log.info("rpc refused", code=code.name, reason=str(error))
        if code in AUDITED_FAILURES:
            identities = context.peer_identities()
            principal = principal or (identities[0].decode(errors="replace") if identities
                                      else "unauthenticated")
            try:
                await self.audit(principal, rpc, raw, code, str(error))
            except AuditUnavailable:
                log.warning("audit record of a refusal not written")
        await abort(context, error)

    # -- wrapping --------------------------------------------------------------------------

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        mutating = rpc in MUTATING_RPCS
        if handler.request_streaming:
            behavior = handler.stream_stream
            assert inspect.isasyncgenfunction(behavior)
            return grpc.stream_stream_rpc_method_handler(
                self._stream(behavior, rpc, mutating),
                response_serializer=handler.response_serializer)
        if handler.response_streaming:
            assert inspect.isasyncgenfunction(handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, rpc),
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, rpc, mutating),
            response_serializer=handler.response_serializer)

    def _unary(self, behavior, rpc: str, mutating: bool):
        async def handle(raw: bytes, context):
            tokens: list = []
            try:
                principal, tokens = await self._admit(rpc, raw, context)
                try:
                    response, error = None, None
                    try:
                        response = await behavior(raw, context)
                    except BaseException as raised:
                        error = raised
                    code = final_code(context, error)
                    if mutating or code in AUDITED_FAILURES:
                        await self._audit_or_fail(principal, rpc, raw, code, error, context)
                    if error is not None:
                        raise error
                    return response
                finally:
                    self._leave(principal)
            finally:
                _reset(tokens)

        return handle

    def _server_stream(self, behavior, rpc: str):
        """A read whose answer is a stream (SubscribeEvents): authenticated, entitled and
        limited like any call; a refusal or an authorization failure on the way is audited."""
        async def handle(raw: bytes, context):
            tokens: list = []
            try:
                principal, tokens = await self._admit(rpc, raw, context)
                error = None
                try:
                    async for response in behavior(raw, context):
                        yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    self._leave(principal)
                    code = final_code(context, error)
                    if code in AUDITED_FAILURES:
                        await self._audit_failure(principal, rpc, raw, code, context)
            finally:
                _reset(tokens)

        return handle

    def _stream(self, behavior, rpc: str, mutating: bool):
        async def handle(raw_iterator, context):
            tokens: list = []
            try:
                principal, tokens = await self._admit(rpc, b"", context)
                # Requests read and not yet answered, in order (their bytes, for the audit).
                unanswered: collections.deque[bytes] = collections.deque()
                limits = self.config.policy.limits(principal) if self.config.policy else None

                async def messages():
                    async for raw in raw_iterator:
                        unanswered.append(raw if mutating else b"")
                        if limits is not None:  # every message of a stream is a request
                            await self.config.limiter.acquire("request", [Rate(
                                f"{principal}:requests", limits.requests_per_second,
                                limits.burst_seconds, 1)])
                        yield raw

                error = None
                try:
                    async for response in behavior(messages(), context):
                        if mutating:
                            await self._audit_or_fail(principal, rpc, unanswered.popleft(),
                                                      grpc.StatusCode.OK, None, context)
                        yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    self._leave(principal)
                    code = final_code(context, error)
                    # Requests of the stream left without a response end with its status.
                    if code != grpc.StatusCode.OK and (mutating or code in AUDITED_FAILURES):
                        for raw in list(unanswered) or [b""]:
                            await self._audit_failure(principal, rpc, raw, code, context)
            finally:
                _reset(tokens)

        return handle

    async def _admit(self, rpc: str, raw: bytes, context) -> tuple[str, list]:
        """Authenticate, entitle and limit one RPC: its principal and the context tokens to
        reset at its end; a refusal ends the RPC (audited when it is an auth failure)."""
        principal = ""
        try:
            principal = self.principal(context)
            tokens = await self._enter(principal, rpc)
        except (Unauthenticated, guard.NotEntitled, RateLimited) as error:
            await self._refuse(error, principal, rpc, raw, context)
        self._in_flight[principal] += 1
        return principal, tokens

    async def _audit_failure(self, principal, rpc, raw, code, context) -> None:
        """The audit record of a stream that ended with a failure (best effort: the status
        is already decided)."""
        try:
            await self.audit(principal, rpc, raw, code, str(context.details() or ""))
        except AuditUnavailable:
            log.warning("audit record of a failed stream not written")

    async def _audit_or_fail(self, principal, rpc, raw, code, error, context) -> None:
        detail = "" if error is None or code == grpc.StatusCode.OK else (context.details() or "")
        try:
            await self.audit(principal, rpc, raw, code, str(detail))
        except AuditUnavailable as failure:
            if error is None:
                await abort(context, failure)
            log.warning("audit record of a failed request not written")


def _refusal_reason(error: Exception) -> str:
    if isinstance(error, Unauthenticated):
        return "unauthenticated"
    if isinstance(error, ConcurrencyExceeded):
        return "concurrency"
    if isinstance(error, RateLimited):
        return "rate_limited"
    return "not_entitled"


def _reset(tokens: list) -> None:
    for token in reversed(tokens):
        try:
            token.var.reset(token)
        except ValueError:
            pass  # a stream finalised in another context; nothing was bound there
