"""Processes the e2e tests start and stop themselves: free ports, a service run until a block ends, and
stopping by PID (never ``ray stop``, which would end every Ray process on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_for(what: str, ok: Callable[[], object], timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} not ready within {timeout_s:.0f}s\n{tail}")


def spawn(cmd: list[str], log: Path, **popen) -> subprocess.Popen:
    """``cmd`` in its own session (so its process group can be signalled), output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)


@contextlib.contextmanager
def service(
    what: str,
    cmd: list[str],
    log: Path,
    ready,
    timeout_s: float,
    marker: str | None = None,
    interrupt_first: bool = False,
    **popen,
) -> Iterator[None]:
    """Run ``cmd`` (output to ``log``) in its own session until the block ends; wait for ``ready()``."""
    proc = spawn(cmd, log, **popen)
    try:
        wait_for(what, ready, timeout_s, log)
        yield
    finally:
        stop_group(proc, marker, interrupt_first)


def stop_group(proc: subprocess.Popen, marker: str | None = None, interrupt_first: bool = False) -> None:
    """SIGTERM the process group, then SIGKILL it and any straggler whose command line holds ``marker``.

    ``interrupt_first``: SIGINT the leader alone first, for ``ray start --block``, which stops every Ray
    process it started within 2 s of a SIGINT but takes about 30 s over a SIGTERM."""
    if interrupt_first:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if marker:
        for pid in pids_with(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def pids_with(marker: str) -> list[int]:
    """PIDs (not this process) whose command line holds ``marker``."""
    return _pids(lambda d: marker.encode() in (d / "cmdline").read_bytes().replace(b"\0", b" "))


def pids_with_env(name: str, value: str) -> list[int]:
    """PIDs (not this process) whose environment has ``name=value``: what a process started with it and
    everything it started inherit, whatever they later call themselves (Ray renames its workers)."""
    entry = f"{name}={value}".encode()
    return _pids(lambda d: entry in (d / "environ").read_bytes().split(b"\0"))


def _pids(match: Callable[[Path], bool]) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if match(d):
                    out.append(int(d.name))
            except OSError:
                continue
    return out
