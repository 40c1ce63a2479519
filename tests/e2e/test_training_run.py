"""A short training run through the coordinator CLI, the way a user starts one, must learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Pass@1 gain (absolute) the short run must show. Calibration (128 held-out problems x 8, lr 1.5e-4-2e-4):
# +0.072, +0.089, +0.089 at step 40 in three runs; a no-op learner stays within eval noise (~0.01 on
# 256 x 8 samples) and a sign-flipped objective moves Pass@1 down (checked once, see the issue notes).
MIN_GAIN = 0.04
STEPS = 40


def test_short_run_learns(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "services.coordinator",
        "--config", "configs/countdown-tiny.yaml",
        "--set", f"coordinator.runs_dir={tmp_path}",
        "--set", "coordinator.run_name=e2e",
        "--set", "coordinator.eval_every=0",
        "--set", f"coordinator.steps={STEPS}",
        "--set", "coordinator.eval_problems=256",  # Pass@1 noise ~0.01 at 256 x 8 samples
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "checkpoints").rglob("*.safetensors"))
    steps = summary["steps"]
    assert summary["final_version"] == steps and summary["trained_groups"] == steps * 16
    gain = summary["final_eval"]["pass_at_1"] - summary["initial_eval"]["pass_at_1"]
    assert gain >= MIN_GAIN, summary
    assert "Pass@1" in proc.stderr  # the closing summary line
