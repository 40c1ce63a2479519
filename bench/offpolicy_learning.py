"""Learning against samples consumed, off-policy: lpo_fwd with engine vs proximal behaviour log-probs,
and pg, at max_policy_lag 0, 1, 2, several seeds each (tiny Countdown config, real pipeline).

Writes bench/results/offpolicy_learning.json (every run's eval curve and final figures, and the
mean/std per setting) and offpolicy_learning.png (Pass@1 against samples consumed).
The JSON is rewritten after every run (``"complete": false`` until the last), and ``--resume`` skips
the (setting, lag, seed) runs it already holds, so a long sweep can be continued after an interruption.
Usage: python bench/offpolicy_learning.py [--steps N] [--seeds 0 1 2] [--lags 0 1 2] [--resume] [--replot]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from common import ASYNC_CORES, RESULTS, read_jsonl, run_coordinator, write_result

SETTINGS = {
    "lpo_fwd/engine": ["learner.objective=lpo_fwd", "learner.behavior_logprobs=engine"],
    "lpo_fwd/proximal": ["learner.objective=lpo_fwd", "learner.behavior_logprobs=proximal"],
    "pg": ["learner.objective=pg", "learner.behavior_logprobs=engine"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="a subset (the smoke)"
    )
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra override for every run (the smoke)"
    )
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings}
    out = RESULTS / "offpolicy_learning.json"
    if args.replot:
        _plot(json.loads(out.read_text())["runs"], RESULTS / "offpolicy_learning.png")
        return
    runs: list[dict] = []
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if previous["steps"] != args.steps:
            raise SystemExit(f"--resume: {out} holds {previous['steps']}-step runs, not {args.steps}")
        runs = previous["runs"]
    done = {(r["setting"], r["max_policy_lag"], r["seed"]) for r in runs}
    planned = len(args.lags) * len(settings) * len(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seed-major: an interrupted sweep still covers every setting and lag
            for lag in args.lags:
                for name, overrides in settings.items():
                    if (name, lag, seed) in done:
                        continue
                    run_name = f"{name.replace('/', '-')}-lag{lag}-s{seed}"
                    run_dir = run_coordinator(
                        [
                            *overrides,
                            f"coordinator.steps={args.steps}",
                            f"coordinator.eval_every={args.eval_every}",
                            f"coordinator.max_policy_lag={lag}",
                            f"generator.seed={seed}",
                            f"learner.seed={seed}",
                            *ASYNC_CORES,  # one core each once generation overlaps training
                            *args.extra,
                        ],
                        Path(tmp),
                        run_name,
                    )
                    summary = json.loads((run_dir / "summary.json").read_text())
                    steps = read_jsonl(run_dir / "metrics.jsonl")
                    group_size = yaml.safe_load((run_dir / "config.yaml").read_text())["coordinator"][
                        "group_size"
                    ]
                    per_step = steps[0]["groups"] * group_size
                    curve = [
                        {
                            "samples": e["step"] * per_step,
                            "pass_at_1": e["pass_at_1"],
                            "pass_at_k": e["pass_at_k"],
                        }
                        for e in read_jsonl(run_dir / "eval.jsonl")
                    ]
                    runs.append(
                        {
                            "wall_s": summary["wall_seconds"],
                            "setting": name,
                            "max_policy_lag": lag,
                            "seed": seed,
                            "curve": curve,
                            "final": summary["final_eval"],
                            "initial": summary["initial_eval"],
                            "dropped": summary["dropped_by_reason"],
                            "mean_abs_s_t_stale": statistics.mean(s.get("abs_s_t_stale", 0.0) for s in steps),
                        }
                    )
                    print(
                        f"{run_name}: Pass@1 {summary['initial_eval']['pass_at_1']:.3f} -> "
                        f"{summary['final_eval']['pass_at_1']:.3f}",
                        flush=True,
                    )
                    _save(args.steps, runs, planned)
    _save(args.steps, runs, planned)
    table = _table(runs)
    for row in table:
        print(row)


def _save(steps: int, runs: list[dict], planned: int) -> None:
    table = _table(runs)
    complete = len(runs) >= planned
    write_result("offpolicy_learning", {"steps": steps, "complete": complete, "runs": runs, "table": table})
    _plot(runs, RESULTS / "offpolicy_learning.png")


def _table(runs: list[dict]) -> list[dict]:
    rows = []
    for lag in sorted({r["max_policy_lag"] for r in runs}):
        for name in SETTINGS:
            sel = [r for r in runs if r["setting"] == name and r["max_policy_lag"] == lag]
            if not sel:
                continue
            p1 = [r["final"]["pass_at_1"] for r in sel]
            pk = [r["final"]["pass_at_k"] for r in sel]
            rows.append(
                {
                    "setting": name,
                    "max_policy_lag": lag,
                    "pass_at_1_mean": statistics.mean(p1),
                    "pass_at_1_std": statistics.pstdev(p1),
                    "pass_at_k_mean": statistics.mean(pk),
                    "pass_at_k_std": statistics.pstdev(pk),
                    "seeds": len(sel),
                }
            )
    return rows


def _plot(runs: list[dict], path: Path) -> None:
    """Pass@1 (top) and Pass@k (bottom) against samples consumed, one column per lag, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = sorted({r["max_policy_lag"] for r in runs})
    fig, axes = plt.subplots(2, len(lags), figsize=(4.5 * len(lags), 6.8), sharey="row", squeeze=False)
    k = runs[0]["final"]["k"]
    for row, (metric, label) in enumerate((("pass_at_1", "Pass@1"), ("pass_at_k", f"Pass@{k}"))):
        for ax, lag in zip(axes[row], lags, strict=True):
            for name, color in zip(SETTINGS, ("tab:blue", "tab:cyan", "tab:red"), strict=True):
                sel = [r for r in runs if r["setting"] == name and r["max_policy_lag"] == lag]
                if not sel:
                    continue
                xs = [p["samples"] for p in sel[0]["curve"]]
                ys = [statistics.mean(r["curve"][i][metric] for r in sel) for i in range(len(xs))]
                ax.plot(xs, ys, marker="o", color=color, label=f"{name} ({len(sel)} seeds)")
            ax.set_title(f"max_policy_lag = {lag}")
            ax.set_xlabel("samples consumed")
        axes[row][0].set_ylabel(f"held-out {label} (mean over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
