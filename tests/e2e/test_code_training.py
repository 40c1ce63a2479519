"""A short training run of the tiny code task, through ``bench/code_tiny.py`` (which drives the coordinator
CLI as a user would, and is kept runnable by this test): every sampled program is run against its tests in
the sandbox by the verifier actors, and the run reports it.

A test passes only if the program ran and printed the expected output: the expected outputs never enter
the sandbox (the harness returns digests of what the program printed), so a ``pass`` verdict is proof of
execution. The run's summary counts the programs each sandbox backend ran, and every step records how
long the verifiers spent on it beside how long the generators spent sampling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def test_code_rollouts_are_executed_in_the_sandbox_during_training(tmp_path: Path) -> None:
    overrides = [
        f"coordinator.steps={STEPS}",
        "coordinator.eval_every=0",
        "data.eval_sets=[{name: heldout, path: data/code-tiny/heldout.jsonl, problems: 16, samples: 8}]",
        "learner.checkpoint_every=0",
    ]
    cmd = [sys.executable, "bench/code_tiny.py", "--seeds", "0", "--results-dir", str(tmp_path)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = json.loads((tmp_path / "code_tiny.json").read_text())["runs"]

    verifier = run["verifier"]
    assert verifier["workers"] == 2  # configs/code-tiny.yaml
    statuses = verifier["by_status"]
    assert sum(statuses.values()) == verifier["responses"] >= STEPS * 16 * 8  # every trained response
    assert statuses.get("sandbox_error", 0) == 0 and run["dropped_by_reason"].get("sandbox_error", 0) == 0
    # passing programs are programs that ran: proof of execution, not of parsing
    assert statuses.get("pass", 0) > 0, statuses
    ran = sum(n for s, n in statuses.items() if s in ("pass", "fail", "timeout"))
    assert verifier["sandboxed"] == {"zygote": ran}, verifier
    assert verifier["busy_seconds"] > 0
    assert run["steps"] == STEPS and run["verify_s_mean"] > 0 and run["generate_s_mean"] > 0
    assert run["lost"] == 0
    assert set(run["sets"]["heldout"]["first"]) == {"1", "8"}
