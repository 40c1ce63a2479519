"""Stop what a run's embedded Ray cluster leaves behind when its coordinator dies without shutting it down.

A coordinator that starts its own Ray (no ``cluster.address``) is the parent of Ray's GCS and raylet, and
``ray.shutdown()`` stops them. A coordinator that is SIGKILLed, or SIGTERMed while it starts, never gets
there: the GCS and raylet exit on their own, but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) and sometimes workers keep running for good, one set per killed run.

Every process of the embedded cluster inherits the coordinator's environment, so the coordinator marks it
(``LPO_EMBEDDED_RAY=<token>``) before ``ray.init`` and starts this watcher in its own session (a signal to
the coordinator's process group does not reach it). The watcher waits on a pidfd for the coordinator to
exit, then ends every process carrying the token: SIGTERM, and SIGKILL for what is left after a grace
period. The run's Redis is not among them: it is started before the mark, because ``--resume`` reopens it.

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


def marked(token: str) -> list[int]:
    """PIDs of live processes whose environment carries ``token`` (zombies excluded: only their parent can
    reap them, and they hold no resources)."""
    entry = f"{TOKEN_VAR}={token}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            out.append(int(d.name))
    return out


def reap(token: str, grace_s: float = GRACE_S) -> int:
    """SIGTERM every process marked with ``token``, SIGKILL those still there after ``grace_s``; returns how
    many were signalled."""
    victims = marked(token)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while marked(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in marked(token):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` exits (a pidfd becomes readable then)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main() -> None:
    parent, token = int(sys.argv[1]), sys.argv[2]
    wait_for_exit(parent)
    reap(token)


if __name__ == "__main__":
    main()
