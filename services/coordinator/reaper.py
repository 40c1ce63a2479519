"""Stop what a run's embedded Ray cluster leaves behind when its coordinator dies without shutting it down.

A coordinator that starts its own Ray (no ``cluster.address``) is the parent of Ray's GCS and raylet, and
``ray.shutdown()`` stops them. A coordinator that is SIGKILLed, or SIGTERMed while it starts, never gets
there: the GCS and raylet exit on their own, but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) and sometimes workers keep running for good, one set per killed run.

Every process of the embedded cluster inherits the coordinator's environment, so the coordinator marks it
(``LPO_EMBEDDED_RAY=<token>``) before ``ray.init`` and starts this watcher in its own session (a signal to
the coordinator's process group does not reach it). The watcher waits on a pidfd for the coordinator to
exit, remembering meanwhile (every 2 s) which processes carry the token, then ends every process that
carries it or was remembered: SIGTERM, and SIGKILL for what is left after a grace period. The run's Redis
is not among them: it is started before the mark, because ``--resume`` reopens it.

    python -m services.coordinator.reaper <coordinator pid> <token>
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VAR = "LPO_EMBEDDED_RAY"
GRACE_S = 5.0
REFRESH_S = 2.0


def mark_and_watch() -> str:
    """Mark this process's environment (inherited by everything Ray starts from now on) and start the
    watcher; returns the token."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}  # the watcher is not its own target
    subprocess.Popen(
        [sys.executable, "-m", "services.coordinator.reaper", str(os.getpid()), token],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # never a pipe a caller waits on to close
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd=Path(__file__).resolve().parents[2],  # the repository root: where ``services`` imports from
    )
    os.environ[TOKEN_VAR] = token
    return token


def marked(token: str, var: str = TOKEN_VAR, zombies: bool = False) -> list[int]:
    """PIDs of the processes whose environment has ``var=token``, and of their descendants: a process that
    rewrites its title can overwrite what /proc shows of its environment, and Ray's agents sometimes do;
    their parent, the raylet, still shows it. Zombies are left out unless ``zombies``: only their parent
    can reap them, and they hold nothing else."""
    entry = f"{var}={token}".encode()
    parent: dict[int, int] = {}
    found: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z" and not zombies:
                continue
            parent[int(d.name)] = int(fields[1])
            if entry in (d / "environ").read_bytes().split(b"\0"):
                found.add(int(d.name))
    for pid in list(parent):
        chain, p = [], pid
        while p in parent and p not in found and len(chain) < 64:
            chain.append(p)
            p = parent[p]
        if p in found:
            found.update(chain)
    return sorted(found)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (with the PID, an identity that PID reuse cannot fake)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(known: dict[int, str | None], token: str) -> dict[int, str | None]:
    """Of ``known`` (pid -> start time), those still running as the same process, and whatever is marked
    with ``token`` now."""
    out = {pid: st for pid, st in known.items() if st is not None and _start_time(pid) == st}
    out.update({pid: _start_time(pid) for pid in marked(token)})
    return out


def reap(token: str, known: dict[int, str | None] | None = None, grace_s: float = GRACE_S) -> int:
    """SIGTERM every process marked with ``token`` (and those of ``known``, pid -> start time, still the same
    processes), SIGKILL what is left after ``grace_s``; returns how many were signalled."""
    victims = _alive(known or {}, token)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(victims, token) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _alive(victims, token):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def watch(parent: int, token: str, refresh_s: float = REFRESH_S) -> dict[int, str | None]:
    """Block until process ``parent`` exits (its pidfd becomes readable); meanwhile, every ``refresh_s``,
    remember the processes marked with ``token``. Ray's agents can lose the mark from /proc once their
    parent, the raylet, is gone (it dies with the coordinator): remembered, they are still found."""
    known: dict[int, str | None] = {}
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return known
    try:
        while not select.select([fd], [], [], refresh_s)[0]:
            known = _alive(known, token)
    finally:
        os.close(fd)
    return known


def main() -> None:
    parent, token = int(sys.argv[1]), sys.argv[2]
    log = os.environ.get("LPO_REAPER_LOG")  # a file to append what the watcher did to (debugging)
    known = watch(parent, token)
    n = reap(token, known)
    if log:
        with open(log, "a") as f:
            f.write(
                f"{time.time():.3f} coordinator {parent} gone: {n} processes signalled, {len(known)} known\n"
            )


if __name__ == "__main__":
    main()
