"""The log-prob memory bench (``bench/logprob_memory.py``) stays runnable: every path, two interleaved rounds
each in its own process, on a small vocab, with the ratios against the naive path and its same-sum check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_logprob_memory_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "logprob_memory.json"
    cmd = [sys.executable, "bench/logprob_memory.py", "--tokens", "300", "--vocab", "5000", "--hidden", "64",
           "--rounds", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["runs"]]
    assert modes[0] == "naive" and any(m.startswith("fused-") for m in modes)
    assert any(m.startswith("checkpointed-") for m in modes)
    for run in result["runs"]:
        assert len(run["seconds_rounds"]) == 2 and run["seconds"] > 0
        assert run["time_vs_naive"] == round(run["seconds"] / result["runs"][0]["seconds"], 3)
        # the floor: the head's weight gradient plus one chunk of fp32 logits, never above the full logits'
        assert result["head_weight_grad_mib"] < run["floor_mib"]
        assert run["floor_mib"] <= result["head_weight_grad_mib"] + result["fp32_logits_mib"] + 0.1
