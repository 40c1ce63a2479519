"""The code verify-phase bench (``bench/code_verify.py``) stays runnable: two groups through one and two real
verifier workers (zygote sandbox, private Redis), and the same verdicts both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_code_verify_bench_smoke(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "bench/code_verify.py",
        "--groups",
        "2",
        "--workers",
        "1",
        "2",
        "--results-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "code_verify.json").read_text())
    rows = result["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    # the same 16 programs scored by one worker and by two: identical verdicts, every kind present
    assert rows[0]["verdicts"] == rows[1]["verdicts"]
    assert set(rows[0]["verdicts"]) == {"pass", "fail", "parse_error"}
    assert sum(rows[0]["verdicts"].values()) == 2 * result["k"]
    assert 0 < rows[0]["mean_reward"] < 1 and all(r["wall_s"] > 0 for r in rows)
    assert (tmp_path / "code_verify.png").is_file()
