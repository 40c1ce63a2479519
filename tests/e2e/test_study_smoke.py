"""The LPO-vs-PG study script (``bench/reproduction.py``) stays runnable: a two-run grid (PG and LPO-rev,
one seed, two steps) through the real pipeline, with every evaluation set defined and only ``val``
evaluated, then its report. The study itself runs for hours and never in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_grid_smoke_writes_runs_pairs_and_a_selection(tmp_path: Path) -> None:
    args = ["--study", "grid", "--steps", "2", "--eval-every", "1", "--seeds", "0", "--lrs", "1e-4",
            "--objectives", "pg", "lpo_rev", "--eval-size", "8", "8", "8", "--name", "smoke",
            "--results-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "bench/reproduction.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["complete"] and [r["setting"] for r in result["runs"]] == [
        "pg/lr=0.0001",
        "lpo_rev/lr=0.0001",
    ]
    for run in result["runs"]:
        assert list(run["curves"]) == ["val"]  # the test sets are reserved, not evaluated
        assert [p["step"] for p in run["curves"]["val"]] == [0, 1, 2]
        assert run["lost"] == 0 and run["duplicates"] == 0
        assert len(run["per_step"]["grad_norm"]) == 2 and len(run["per_step"]["grad_clip_fraction"]) == 2
    # Same seed, same base weights, same evaluation random numbers: the step-0 evaluations are identical.
    first = [r["curves"]["val"][0] for r in result["runs"]]
    assert first[0] == first[1]
    pair = result["paired"]["lpo_rev/lr=0.0001 - pg/lr=0.0001"]
    assert pair["val/pass@1"]["n"] == 1 and pair["val/pass@1"]["result"] == "n<2"
    assert result["selection"]["base_val_pass@8"] == first[0]["8"]
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert "lpo_rev/lr=0.0001 - pg/lr=0.0001" in proc.stdout  # the markdown report
