"""Helpers shared by the benchmarks: run the coordinator as a user would and read its run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the JSON and plots go: bench/results/ (committed); the CI smokes point it at a temp dir so that a
# smoke never overwrites a committed figure.
RESULTS = Path(os.environ.get("LPO_BENCH_RESULTS") or REPO / "bench" / "results")
if str(REPO) not in sys.path:  # the benchmarks run as `python bench/<name>.py` and import services.*
    sys.path.insert(0, str(REPO))


# One core each for the generator and the learner (OpenMP threads, which Ray sets from num_cpus) once
# generation overlaps training (max_policy_lag > 0); the tiny configs give both two for sync mode.
ASYNC_CORES = ["cluster.generator.num_cpus=1", "cluster.learner.num_cpus=1"]


def run_coordinator(
    overrides: list[str],
    runs_dir: Path,
    name: str,
    timeout_s: int = 3600,
    config: str = "configs/countdown-tiny.yaml",
) -> Path:
    """``python -m services.coordinator --config <config> --set ...``; returns the run directory (raises
    with the log tail on failure)."""
    cmd = [sys.executable, "-m", "services.coordinator", "--config", config]
    for o in [*overrides, f"coordinator.runs_dir={runs_dir}", f"coordinator.run_name={name}"]:
        cmd += ["--set", o]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return runs_dir / name


def cpu_model() -> str:
    """The CPU this runs on (model, and whether it has AVX-512). Kernels round differently on AVX-512 and
    AVX2 in the last bits, which a training run grows into a different trajectory: the same seed and code
    reproduce a run only on the same CPU kind, and the machines this project is measured on vary."""
    model, avx512 = "unknown", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                avx512 = avx512 or " avx512f" in line
    except OSError:
        pass
    return f"{model} ({'AVX-512' if avx512 else 'no AVX-512'})"


def head_commit() -> str:
    """The checkout's commit (short), with ``+dirty`` where tracked files other than results and docs
    differ from it (a bench writes its results while it runs)."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "-uno", "--", ".", ":!bench/results", ":!docs", ":!README.md"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return out


def synthetic_groups(groups: int, k: int, prompt_tokens: int, response_tokens: int, vocab: int) -> list:
    """Scored ``ResponseGroup``s of random tokens, behaviour log-probs and 0/1 rewards (seeded): a
    learner batch of a given shape, for the step-time benchmarks."""
    import numpy as np

    from services.common.messages import ResponseGroup, Rollout, RolloutTask

    rng = np.random.default_rng(0)
    out = []
    for g in range(groups):
        prompt = rng.integers(10, vocab, prompt_tokens).tolist()
        task = RolloutTask(f"t{g}", prompt, "p", "countdown", {"nums": [1, 2], "target": 3}, k)
        rollouts = tuple(
            Rollout(
                rng.integers(10, vocab, response_tokens).tolist(),
                (-rng.random(response_tokens)).tolist(),
                "length",
            )
            for _ in range(k)
        )
        rewards = tuple(float(x) for x in rng.integers(0, 2, k))
        out.append(ResponseGroup(task, rollouts, 0, "0" * 64).with_rewards(rewards, ("pass",) * k))
    return out
