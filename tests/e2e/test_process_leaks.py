"""A coordinator that dies without stopping its embedded Ray leaves nothing running but its Redis.

The coordinator is killed twice, the ways that skip its ``finally`` and ``ray.shutdown()``: SIGTERM while it
starts (Ray is up, the actors are not yet) and SIGKILL mid-run. Every process the run started inherits a
marker in its environment; within the grace period of the coordinator's watcher
(``services/coordinator/reaper.py``) the only one left must be the run's Redis, which is kept on purpose for
``--resume`` and is stopped here by its PID file. Without the watcher, a SIGKILL leaves `ray::DashboardAgent`
and `ray::RuntimeEnvAgent` running past the test's 20 s bound (checked by disabling it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.coordinator.reaper import marked
from tests.e2e.processes import pids_with_env, spawn, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MARK = "LPO_TEST_RUN_MARKER"


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _left(marker: str) -> dict[int, str]:
    """The run's live processes (the marker in their environment, or a marked ancestor) other than its
    Redis, by PID, with their command lines."""
    out = {}
    for pid in marked(marker, var=MARK):
        cmd = _cmdline(pid)
        if cmd and "redis-server" not in cmd:
            out[pid] = cmd[:120]
    return out


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGTERM, "start-up"), (signal.SIGKILL, "step 2")],
    ids=["sigterm-startup", "sigkill"],
)
def test_a_killed_coordinator_leaves_only_its_redis(tmp_path: Path, sig: signal.Signals, when: str) -> None:
    marker, run_dir = uuid.uuid4().hex, tmp_path / "killed"
    sets = [
        "--config", "configs/countdown-tiny.yaml", "--set", "coordinator.steps=50",
        "--set", "coordinator.eval_every=0", "--set", "coordinator.eval_problems=16",
        "--set", f"coordinator.runs_dir={tmp_path}", "--set", f"coordinator.run_name={run_dir.name}",
    ]  # fmt: skip
    log = tmp_path / "coordinator.log"
    proc = spawn(
        [sys.executable, "-m", "services.coordinator", *sets], log, cwd=REPO, env={**os.environ, MARK: marker}
    )
    try:
        if when == "start-up":
            # Ray is up (its raylet runs) and the actors are not: the coordinator is inside Runtime.start
            wait_for("the run's raylet", lambda: any("raylet" in c for c in _left(marker).values()), 300, log)
            assert not (run_dir / "metrics.jsonl").exists()
        else:
            metrics = run_dir / "metrics.jsonl"
            wait_for(
                "step 2", lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 600, log
            )
        if when != "start-up":
            assert any(c.startswith("ray::GeneratorActor") for c in _left(marker).values())
        proc.send_signal(sig)
        proc.wait(timeout=60)
        # the watcher acts at once and SIGKILLs after 5 s; without it the agents outlive the run (the issue)
        deadline = time.monotonic() + 20
        while _left(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _left(marker)
        assert not left, (
            f"{len(left)} of the run's processes outlived its coordinator ({when}, {sig.name}): {left}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _left(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pid_file = run_dir / "redis" / "server.pid"
        if pid_file.is_file():  # the Redis kept for --resume: stopped here, by its PID
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    wait_for("the run's Redis to stop", lambda: not pids_with_env(MARK, marker), 30)
