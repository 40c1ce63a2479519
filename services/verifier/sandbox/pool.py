"""A small process pool whose tasks can be hard-killed: for pure-Python scorers that may not return.

``concurrent.futures.ProcessPoolExecutor`` cannot cancel a running task, and a C-level computation (a
big-integer power inside sympy) ignores Python signal handlers. Here each task runs in a worker process
of its own; when it overruns its deadline the worker is SIGKILLed, a replacement is started in the
background, and the caller gets ``TaskTimeout`` at once.

Workers are fresh interpreters (``python -m services.verifier.sandbox.pool``) that import ``preload``,
run an optional ``warmup`` call (so lazy imports do not eat the first task's deadline), report ready,
and then serve ``(module, function, args)`` calls over a socketpair. They are not forked from the
server: forking a multi-threaded process (uvicorn, Ray) is unsafe, and multiprocessing's spawn and
forkserver methods re-import the caller's ``__main__``, which differs between the CLI, pytest and Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parents[3])


class TaskTimeout(Exception):
    """The task overran its deadline; its worker was killed."""


class WorkerCrashed(Exception):
    """The worker died (e.g. the memory limit) before answering."""


Warmup = tuple[Callable[..., Any], tuple[Any, ...]]
_READY_TIMEOUT_S = 300.0  # a cold import of sympy on a loaded machine can take a while


class _Worker:
    """One worker interpreter and our end of its socketpair; the constructor waits until it is ready."""

    def __init__(self, preload: Sequence[str], memory_mb: int, warmup: Warmup | None) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "services.verifier.sandbox.pool", "--fd", str(theirs.fileno())]
        argv += ["--memory-mb", str(memory_mb), "--preload", ",".join(preload)]
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self.conn.send(
                None if warmup is None else (warmup[0].__module__, warmup[0].__qualname__, warmup[1])
            )
            if not self.conn.poll(_READY_TIMEOUT_S) or self.conn.recv() != "ready":
                raise WorkerCrashed(
                    f"pool worker pid {self.proc.pid} did not get ready in {_READY_TIMEOUT_S}s"
                )
        except (EOFError, OSError) as exc:
            self.kill()
            raise WorkerCrashed(f"pool worker pid {self.proc.pid} died while starting: {exc}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.conn.close()


class KillablePool:
    """``workers`` processes; ``call`` blocks until one is idle, runs ``fn(*args)`` there (``fn`` must be
    a module-level function), and kills the worker if no answer comes within ``timeout_s``. Thread-safe."""

    def __init__(
        self,
        workers: int,
        *,
        preload: Sequence[str] = (),
        warmup: Warmup | None = None,
        memory_mb: int = 4096,
    ) -> None:
        if workers < 1:
            raise ValueError(f"KillablePool(workers={workers}): need at least one worker")
        self._preload, self._memory_mb, self._warmup = tuple(preload), memory_mb, warmup
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        self.size = workers
        starters = [threading.Thread(target=self._add, daemon=True) for _ in range(workers)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if self._idle.qsize() < workers:
            self.close()
            raise WorkerCrashed(f"only {self._idle.qsize()} of {workers} pool workers started (see the log)")

    def _add(self) -> None:
        try:
            worker = _Worker(self._preload, self._memory_mb, self._warmup)
        except WorkerCrashed:
            log.exception("a pool worker failed to start")
            return
        with self._lock:
            if self._closed:
                worker.kill()
                return
            self._all.add(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` now and start its replacement in the background (an import takes ~1 s)."""
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            if self._closed:
                return
        threading.Thread(target=self._add, name="pool-respawn", daemon=True).start()

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
        """``fn(*args)`` in a worker; raises ``TaskTimeout``, ``WorkerCrashed``, or ``RuntimeError`` with
        the task's own exception message."""
        if self._closed:
            raise RuntimeError("KillablePool is closed")
        worker = self._idle.get()
        try:
            worker.conn.send((fn.__module__, fn.__qualname__, args))
            if not worker.conn.poll(timeout_s):
                log.warning(
                    "pool task %s overran %.1fs; killing pid %s", fn.__name__, timeout_s, worker.proc.pid
                )
                self._replace(worker)
                raise TaskTimeout(f"{fn.__name__} did not finish within {timeout_s}s")
            kind, value = worker.conn.recv()
        except (EOFError, OSError) as exc:
            code = worker.proc.poll()
            self._replace(worker)
            raise WorkerCrashed(f"{fn.__name__}: worker died (exit code {code}): {exc}") from None
        self._idle.put(worker)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn


def _serve(fd: int, preload: Sequence[str], memory_mb: int) -> None:
    """Worker main loop: answer ("ok", value) or ("error", message) per call, until the socket closes."""
    if memory_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    for name in preload:
        importlib.import_module(name)
    conn = Connection(fd)
    warmup = conn.recv()
    if warmup is not None:
        with contextlib.suppress(Exception):  # warm-up only loads lazy imports; its result is irrelevant
            _resolve(*warmup[:2])(*warmup[2])
    conn.send("ready")
    while True:
        try:
            module, qualname, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", _resolve(module, qualname)(*args)))
        except Exception as exc:  # reported to the caller, who decides
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="KillablePool worker (started by the pool, not by hand)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--preload", default="")
    ns = parser.parse_args()
    _serve(ns.fd, [m for m in ns.preload.split(",") if m], ns.memory_mb)
