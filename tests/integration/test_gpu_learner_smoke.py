"""The GPU learner check (``bench/gpu_learner.py``) is kept runnable without a GPU: its CPU smoke mode runs
the same code (the project's LearnerEngine step with its objectives and log-prob paths) on a small shape
and writes the JSON the device run would, with the fused path reported as skipped off CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_learner_smoke_runs_every_variant(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/gpu_learner.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_learner_smoke.json").read_text())
    assert result["gpu"] == "cpu (smoke)" and result["tokens_per_step"] > 0
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"chunked/lpo_fwd", "naive/lpo_fwd", "fused/lpo_fwd", "chunked/pg"}
    assert rows["fused/lpo_fwd"] == {"variant": "fused/lpo_fwd", "skipped": "no CUDA"}
    for name in ("chunked/lpo_fwd", "naive/lpo_fwd", "chunked/pg"):
        assert rows[name]["step_s"] > 0 and rows[name]["tokens_per_s"] > 0, rows[name]
