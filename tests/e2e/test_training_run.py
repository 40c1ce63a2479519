"""Short training runs through the coordinator CLI, the way a user starts one, with faults injected.

1. Supervised actors and Redis: a generator actor's process is SIGKILLed early, the verifier worker's
   later, and then the Redis server (started by the test, AOF on) is restarted. Ray restarts the actors,
   they reclaim the entries the dead ones left pending, every Redis client retries through the restart.
2. Checkpoint and resume: the learner is SIGKILLed (the run exits 4 and says how to resume), the run is
   continued with ``--resume``, then the coordinator process itself is SIGKILLed (its Ray cluster dies
   with it, its embedded Redis is left orphaned on the run directory's AOF) and the run is resumed again.
   Each resume replays the steps trained since the last checkpoint with the same groups.

Each run ends with every admitted task accounted for in the ledger (0 lost, 0 duplicates), the final
weights version equal to the number of steps, and a Pass@1 gain beyond the evaluation's noise. A third
run with restarts disabled proves the watchdog turns a dead stage into a clear error and a non-zero exit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.common.redis_server import EmbeddedRedis

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EVAL_PROBLEMS = 256  # x 8 samples: the paired standard error of a Pass@1 gain is ~0.01
STEPS = 30
KILL_GENERATOR_AT, KILL_VERIFIER_AT, RESTART_REDIS_AT = 5, 13, 21  # learner steps done at each fault
RESUME_STEPS, CHECKPOINT_EVERY = 24, 4
KILL_LEARNER_AT, KILL_COORDINATOR_AT = 6, 15  # two steps past a checkpoint: those two are replayed


def _coordinator(run_dir: Path, marker: str, *args: str, log: str = "run") -> subprocess.Popen:
    """``python -m services.coordinator`` with ``args`` (``--set`` pairs or ``--resume``); its output goes
    to ``<run dir>.<log>.log`` (a pipe nobody reads would fill up and block the run)."""
    cmd = [sys.executable, "-m", "services.coordinator", *args]
    # The marker reaches every Ray worker of this run through the environment (and no other run's).
    env = {**os.environ, "LPO_TEST_RUN_MARKER": marker}
    out = open(run_dir.parent / f"{run_dir.name}.{log}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log_path = Path(out.name)  # type: ignore[attr-defined]
    out.close()  # the child holds its own copy
    return proc


def _fresh(run_dir: Path, marker: str, *overrides: str) -> subprocess.Popen:
    sets = [
        "--config", "configs/countdown-tiny.yaml",
        "--set", f"coordinator.runs_dir={run_dir.parent}", "--set", f"coordinator.run_name={run_dir.name}",
        "--set", "queue.claim_idle_ms=3000",  # a dead consumer's entries are reclaimed after 3 s
        "--set", "coordinator.eval_every=0", "--set", f"coordinator.eval_problems={EVAL_PROBLEMS}",
    ]  # fmt: skip
    for o in overrides:
        sets += ["--set", o]
    return _coordinator(run_dir, marker, *sets)


def _output(proc: subprocess.Popen, timeout_s: float = 1200) -> str:
    """Wait for the process; its whole output."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def _actor_pids(kind: str, marker: str) -> list[int]:
    """PIDs of this run's ``ray::<kind>`` worker processes."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "cmdline").read_bytes().startswith(f"ray::{kind}".encode()):
                continue
            if f"LPO_TEST_RUN_MARKER={marker}".encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _wait_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = proc.log_path.read_text(errors="replace")[-4000:]  # type: ignore[attr-defined]
            raise AssertionError(f"the run ended early ({proc.returncode}):\n{tail}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"the run did not reach step {n} within {timeout_s:.0f}s")


def _kill(kind: str, marker: str) -> int:
    [pid] = _actor_pids(kind, marker)
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_restarted(kind: str, marker: str, dead: int, timeout_s: float = 300) -> int:
    """The PID of the new ``kind`` process Ray started in place of ``dead``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p for p in _actor_pids(kind, marker) if p != dead]
        if pids:
            return pids[0]
        time.sleep(0.5)
    raise AssertionError(f"no new {kind} process within {timeout_s:.0f}s of killing {dead}")


def _significant_gain(summary: dict, run_dir: Path) -> float:
    """The Pass@1 gain from the first to the last evaluation, asserted to exceed twice its paired standard
    error (the same problems at both; per-problem success counts from ``eval.jsonl``)."""
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    name = evals[0]["eval_set"]
    first, last = evals[0]["sets"][name], evals[-1]["sets"][name]
    n = first["n_samples"]
    diffs = [(b - a) / n for a, b in zip(first["correct"], last["correct"], strict=True)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    assert math.isclose(mean, summary["final_eval"]["pass_at_1"] - summary["initial_eval"]["pass_at_1"])
    assert mean > 2 * se, f"Pass@1 gain {mean:+.4f} is within 2 standard errors ({se:.4f}) of none: {summary}"
    return mean


def _accounted(summary: dict, run_dir: Path, steps: int) -> None:
    """Every admitted task trained once or dropped for a reason; none lost, none trained twice."""
    ledger = summary["ledger"]
    assert summary["lost"] == 0 and summary["duplicates"] == 0, ledger
    assert ledger["trained"] == steps * 16 and ledger["in_flight"] == 0, ledger
    assert ledger["admitted"] == ledger["trained"] + ledger["dropped"] + ledger["dead_lettered"], ledger
    assert summary["final_version"] == steps and summary["trained_groups"] == steps * 16
    tasks = json.loads((run_dir / "ledger.json").read_text())["tasks"]
    assert {v.split(":")[0] for v in tasks.values()} <= {"trained", "dropped"}, set(tasks.values())
    versions = [int(v.split(":")[1]) for v in tasks.values() if v.startswith("trained:")]
    assert sorted(set(versions)) == list(range(1, steps + 1))  # every step trained groups
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # each step recorded once, in order


def test_run_learns_through_killed_actors_and_a_redis_restart(tmp_path: Path) -> None:
    marker, run_dir = uuid.uuid4().hex, tmp_path / "faults"
    server = EmbeddedRedis(appendonly=True).start()  # appendfsync everysec, as deploy/ recommends
    proc = _fresh(run_dir, marker, f"coordinator.steps={STEPS}", f"queue.redis_url={server.url}")
    try:
        _wait_steps(run_dir, KILL_GENERATOR_AT, proc)
        _wait_restarted("GeneratorActor", marker, _kill("GeneratorActor", marker))
        _wait_steps(run_dir, KILL_VERIFIER_AT, proc)  # the run goes on through the new generator
        _wait_restarted("VerifierActor", marker, _kill("VerifierActor", marker))
        _wait_steps(run_dir, RESTART_REDIS_AT, proc)
        server.restart()  # SIGTERM (the AOF is flushed), then the same port and data directory
        output = _output(proc)
    finally:
        server.stop()
    assert proc.returncode == 0, output[-4000:]
    assert "; retry 1 in" in output  # the Redis restart was felt, and retried through (Backoff's log line)

    summary = json.loads((run_dir / "summary.json").read_text())
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.jsonl",
        "curves.png",
        "ledger.json",
        "checkpoint.json",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "checkpoints").rglob("*.safetensors"))
    _accounted(summary, run_dir, STEPS)
    _significant_gain(summary, run_dir)
    assert "Pass@1" in output  # the closing summary line


def _wait_gone(marker: str, timeout_s: float = 90) -> None:
    """Every process of the run (Ray's and the actors') exits once its coordinator is SIGKILLed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [
            p
            for kind in ("GeneratorActor", "VerifierActor", "LearnerRank")
            for p in _actor_pids(kind, marker)
        ]
        if not left:
            return
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"actor processes {left} outlived their killed coordinator by {timeout_s:.0f}s")


def test_run_resumes_after_the_learner_and_then_the_coordinator_are_killed(tmp_path: Path) -> None:
    marker, run_dir = uuid.uuid4().hex, tmp_path / "resumed"
    # The default embedded Redis: it keeps its AOF in the run directory, which is what --resume reopens.
    proc = _fresh(
        run_dir, marker, f"coordinator.steps={RESUME_STEPS}", f"learner.checkpoint_every={CHECKPOINT_EVERY}"
    )
    _wait_steps(run_dir, KILL_LEARNER_AT, proc)
    _kill("LearnerRank", marker)
    output = _output(proc, timeout_s=120)
    assert proc.returncode == 4, output[-4000:]
    assert f"continue the run with: python -m services.coordinator --resume {run_dir}" in output

    proc = _coordinator(run_dir, marker, "--resume", str(run_dir), log="resume-1")
    try:
        _wait_steps(run_dir, KILL_COORDINATOR_AT, proc)
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_gone(marker)
    assert (run_dir / "redis" / "server.pid").is_file()  # its Redis is left running on the AOF

    proc = _coordinator(run_dir, marker, "--resume", str(run_dir), log="resume-2")
    output = _output(proc)
    assert proc.returncode == 0, output[-4000:]
    assert "left running on" in output  # the orphaned Redis was stopped (AOF flushed) before reopening

    summary = json.loads((run_dir / "summary.json").read_text())
    _accounted(summary, run_dir, RESUME_STEPS)
    first, second = summary["resumes"]
    for resume, killed_at in ((first, KILL_LEARNER_AT), (second, KILL_COORDINATOR_AT)):
        c = resume["from_step"]
        assert c % CHECKPOINT_EVERY == 0 and killed_at - CHECKPOINT_EVERY <= c <= killed_at + 1, resume
        assert resume["replayed_steps"] == list(range(c + 1, c + 1 + len(resume["replayed_steps"])))
        assert resume["ledger"]["lost"] == 0 and resume["ledger"]["duplicates"] == 0, resume
    assert first["replayed_steps"], first  # the learner died two steps past its checkpoint
    # A replayed step trains the same groups from the same checkpointed state: on CPU fp32 it re-makes the
    # lost learner's weights bit for bit (the sha256 it published before the kill).
    assert summary["replays"] and all(r["bit_identical"] for r in summary["replays"]), summary["replays"]
    _significant_gain(summary, run_dir)


def test_watchdog_fails_a_run_whose_verifier_stays_dead(tmp_path: Path) -> None:
    marker, run_dir = uuid.uuid4().hex, tmp_path / "stuck"
    proc = _fresh(
        run_dir, marker, "cluster.max_restarts=0", "coordinator.steps=200", "coordinator.eval_problems=16"
    )
    _wait_steps(run_dir, 2, proc)
    _kill("VerifierActor", marker)
    started = time.monotonic()
    output = _output(proc, timeout_s=300)
    assert proc.returncode == 3, output[-4000:]
    assert "run stalled: all 1 verifier actors are dead" in output, output[-4000:]
    assert time.monotonic() - started < 120  # found by the liveness check, long before stall_timeout_s
    deadline = time.monotonic() + 30  # everything the run started is stopped (ray.kill is asynchronous)
    while _actor_pids("GeneratorActor", marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _actor_pids("GeneratorActor", marker)
