"""Assembles one engine process: storage, posting engine, gRPC server, health, reflection."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal

import grpc
import redis.asyncio as aioredis
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import limits
from engine.config import Settings
from engine.events.service import EventParts
from engine.gen.txengine.v1 import ledger_pb2, ledger_pb2_grpc
from engine.observability.metrics import MetricsServer
from engine.posting.engine import PostingEngine
from engine.security import policy as policy_module
from engine.security import tls
from engine.security.audit import AuditTrail
from engine.security.guard import Guard
from engine.security.interceptor import SecurityConfig, SecurityInterceptor
from engine.security.ratelimit import RateLimiter
from engine.security.tokens import TokenVerifier
from engine.server.interceptors import MetricsInterceptor
from engine.server.servicer import LedgerServicer, add_to_server
from engine.storage.embedded import EmbeddedPostgres, EmbeddedRedis
from engine.storage.store import Store

log = structlog.get_logger("engine.server")

LEDGER_SERVICE = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]
SERVICE_NAME = LEDGER_SERVICE.full_name
HEALTH_POLL_SECONDS = 0.5
# Redis is never on the commit path: a slow or paused one must not delay serving.
REDIS_TIMEOUT_SECONDS = 1.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def grpc_options() -> list[tuple[str, int]]:
    """The gRPC channel options of the server, derived from the limits in one place."""
    return [
        ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
        ("grpc.so_reuseport", 0),
    ]


def database_url(settings: Settings, embedded: list) -> str:
    if settings.database_url:
        return settings.database_url
    postgres = EmbeddedPostgres(settings.data_dir)
    embedded.append(postgres)
    return postgres.url


def redis_url(settings: Settings, embedded: list) -> str:
    if settings.redis_url:
        return settings.redis_url
    server = EmbeddedRedis(settings.data_dir)
    embedded.append(server)
    return server.url


@dataclasses.dataclass
class EngineApp:
    """A running engine: call `stop` to drain and shut down."""

    settings: Settings
    server: grpc.aio.Server
    engine: PostingEngine
    store: Store
    health: health.HealthServicer
    port: int
    redis: aioredis.Redis
    embedded: list
    events: EventParts
    _health_task: asyncio.Task | None = None
    metrics: MetricsServer | None = None
    audit: AuditTrail | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace_seconds: float | None = None) -> None:
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        log.info("draining", grace_s=grace)
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.stop(grace)
        await self.events.stop()
        if self.audit is not None:
            await self.audit.stop()
        await self.store.close()
        await self.redis.aclose()
        if self.metrics is not None:  # last, so a final scrape still sees the drain
            await asyncio.to_thread(self.metrics.close)
        for service in self.embedded:
            if isinstance(service, EmbeddedRedis):
                service.close()
        log.info("stopped")

    async def _watch_health(self) -> None:
        """NOT_SERVING while the engine cannot commit, so balancers route elsewhere."""
        serving = None
        while True:
            now = self.engine.available
            if now != serving:
                status = (health_pb2.HealthCheckResponse.SERVING if now
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                serving = now
            await asyncio.sleep(HEALTH_POLL_SECONDS)


async def start(settings: Settings) -> EngineApp:
    """Start every part of the engine and serve; returns once the port accepts RPCs."""
    limits.check_limits()
    embedded: list = []
    url = await asyncio.to_thread(database_url, settings, embedded)
    store = Store(url, pool_size=settings.database_pool_size,
                  allow_unsafe=settings.unsafe_no_durability,
                  migration_url=settings.migration_database_url)
    await store.open(settings.shards)
    engine = PostingEngine(store, settings)
    await engine.start()

    redis_client = aioredis.Redis.from_url(
        await asyncio.to_thread(redis_url, settings, embedded),
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS, socket_timeout=REDIS_TIMEOUT_SECONDS)
    try:
        await asyncio.wait_for(redis_client.ping(), REDIS_TIMEOUT_SECONDS)
    except Exception as error:  # the engine commits without Redis
        log.warning("redis unreachable; committing without it", error=str(error))

    security = security_config(settings, url, redis_client)
    interceptors = [MetricsInterceptor(services=[LEDGER_SERVICE])]
    guard = None
    if security is not None:
        interceptors.append(SecurityInterceptor(security))
        if security.policy is not None:
            guard = Guard(store, security.policy, security.limiter)
        if security.audit is not None:
            await security.audit.start()
    server = grpc.aio.server(options=grpc_options(),
                             maximum_concurrent_rpcs=settings.rpc_concurrency_max,
                             interceptors=interceptors)
    events = EventParts(store, redis_client, engine, settings)
    add_to_server(LedgerServicer(engine, store, events, guard), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = tls.server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    await server.start()
    app = EngineApp(settings, server, engine, store, health_servicer, port, redis_client, embedded,
                    events)
    app.audit = security.audit if security is not None else None
    events.start()
    app._health_task = asyncio.create_task(app._watch_health())
    # -- observability: the Prometheus endpoint, off unless metrics_listen is set
    if settings.metrics_listen is not None:
        try:
            app.metrics = MetricsServer(settings.metrics_listen, app)
        except OSError:  # e.g. the port is taken: stop what started, then fail the start
            await app.stop(0)
            raise
        log.info("metrics", listen=app.metrics.address, path="/metrics")
    host = settings.listen.rpartition(":")[0]
    transport = tls.transport(settings)
    if transport == "plaintext":
        if host not in LOOPBACK_HOSTS:
            log.warning("plaintext gRPC on a non-loopback address: anyone who reaches it can "
                        "move money", listen=app.address)
        else:
            log.info("plaintext gRPC on loopback only: no TLS; see README 'Security' to serve "
                     "with mutual TLS, tokens and a policy", listen=app.address)
    log.info("serving", listen=app.address, transport=transport, shards=store.shard_count,
             authentication=_authentication(settings), policy=settings.policy_file is not None,
             audit=settings.audits, embedded_postgres=settings.database_url is None,
             embedded_redis=settings.redis_url is None)
    return app


def _authentication(settings: Settings) -> str:
    methods = [name for name, on in (("client-certificate", settings.tls_client_ca is not None),
                                     ("bearer-token", settings.auth_jwt_keys is not None)) if on]
    return "+".join(methods) or "none"


def security_config(settings: Settings, url: str, redis_client) -> SecurityConfig | None:
    """What the security interceptor enforces, or None when nothing is configured."""
    if not (settings.authenticates or settings.policy_file or settings.audits):
        return None
    verifier = None
    if settings.auth_jwt_keys is not None:
        verifier = TokenVerifier(settings.auth_jwt_keys, settings.auth_jwt_algorithm,
                                 settings.auth_jwt_issuer, settings.auth_jwt_audience)
    return SecurityConfig(
        verifier=verifier,
        client_certificates=settings.tls_client_ca is not None,
        policy=policy_module.load(settings.policy_file) if settings.policy_file else None,
        limiter=RateLimiter(redis_client),
        audit=AuditTrail(url) if settings.audits else None,
    )


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then drain and stop."""
    app = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await app.stop()
