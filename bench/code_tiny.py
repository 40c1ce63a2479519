"""The tiny code task end to end (``configs/code-tiny.yaml``), one run per seed: does LPO raise held-out
Pass@1, how long does it take, and does the verify phase keep up with generation?

Each seed sets ``generator.seed`` and ``learner.seed``; the data, the model and the evaluation problems are
the shipped ones. Per run: held-out and validation Pass@1 / Pass@8 at the first and the last evaluation,
wall seconds, the mean per-step ``generate_s`` and ``verify_s`` (actor seconds), the programs each sandbox
backend ran, and verdicts by status. The result is saved after every run; ``--resume`` skips the seeds
already in the file. Wall times are only comparable between runs on a quiet machine.
Writes bench/results/code_tiny.json.
Usage: python bench/code_tiny.py [--seeds 0 1 2] [--resume] [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, read_jsonl, run_coordinator

CONFIG = "configs/code-tiny.yaml"


def _run(seed: int, extra: list[str], tmp: Path) -> dict:
    started = time.time()
    overrides = [f"generator.seed={seed}", f"learner.seed={seed}", *extra]
    run_dir = run_coordinator(overrides, tmp, f"code-tiny-s{seed}", config=CONFIG)
    wall = time.time() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    sets = {
        name: {"first": evals[0]["sets"][name]["pass_at"], "last": evals[-1]["sets"][name]["pass_at"]}
        for name in evals[0]["sets"]
    }
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "sets": sets,
        "eval_steps": [e["step"] for e in evals],
        "generate_s_mean": round(statistics.mean(s["generate_s"] for s in steps), 3),
        "verify_s_mean": round(statistics.mean(s["verify_s"] for s in steps), 3),
        "step_s_mean": round(statistics.mean(s["step_s"] for s in steps), 3),
        "reward_first_last": [round(steps[0]["reward_mean"], 4), round(steps[-1]["reward_mean"], 4)],
        "verifier": summary["verifier"],
        "dropped_by_reason": summary["dropped_by_reason"],
        "lost": summary["lost"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="section.field=value")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = args.results_dir / "code_tiny.json"
    runs = json.loads(out.read_text())["runs"] if args.resume and out.is_file() else []
    done = {r["seed"] for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if seed in done:
                continue
            run = _run(seed, args.extra, Path(tmp))
            runs.append(run)
            h = run["sets"]["heldout"]
            line = (
                f"seed {seed}: heldout Pass@1 {h['first']['1']:.3f} -> {h['last']['1']:.3f}, Pass@8 "
                f"{h['first']['8']:.3f} -> {h['last']['8']:.3f}, {run['wall_s']:.0f} s, generate "
                f"{run['generate_s_mean']:.2f} s vs verify {run['verify_s_mean']:.2f} s per step"
            )
            print(line, flush=True)
            args.results_dir.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps({"config": CONFIG, "overrides": args.extra, "runs": runs}, indent=2) + "\n"
            )


if __name__ == "__main__":
    main()
