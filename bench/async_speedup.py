"""Wall time of the same number of learner steps at max_policy_lag 0, 1, 2 on the tiny config.

The lag-0 run measures the phase times: T_gen (waiting for scored groups = generation + scoring,
since nothing overlaps at lag 0) and T_train (train + publish). Overlapping the two can at best
give (T_gen + T_train) / max(T_gen, T_train); the goal is a speedup of at least 0.8 x that bound.
Writes bench/results/async_speedup.json and .png. Usage: python bench/async_speedup.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import ASYNC_CORES, RESULTS, read_jsonl, run_coordinator, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra override for every run (the smoke)"
    )
    args = parser.parse_args()
    base = [
        f"coordinator.steps={args.steps}",
        "coordinator.eval_every=0",
        "coordinator.eval_problems=16",
        # one core each for the learner and the generator: the overlap the bound describes (the default
        # sync config gives both two cores, which would oversubscribe them once phases overlap)
        *ASYNC_CORES,
    ]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for lag in args.lags:
            overrides = [*base, f"coordinator.max_policy_lag={lag}", *args.extra]
            run_dir = run_coordinator(overrides, Path(tmp), f"lag{lag}")
            steps = read_jsonl(run_dir / "metrics.jsonl")
            summary = json.loads((run_dir / "summary.json").read_text())
            skip = steps[2:]  # the first steps include warm-up (first reloads, allocator growth)
            runs.append(
                {
                    "max_policy_lag": lag,
                    "wall_s": sum(s["step_s"] for s in skip),
                    "steps_timed": len(skip),
                    "t_collect_s": statistics.mean(s["phase_s"]["collect"] for s in skip),
                    "t_train_s": statistics.mean(
                        s["phase_s"]["train"] + s["phase_s"]["publish"] for s in skip
                    ),
                    "lag_histogram": _merge(s["lag_histogram"] for s in steps),
                    "dropped": summary["dropped_by_reason"],
                    "final_pass_at_1": summary["final_eval"]["pass_at_1"],
                }
            )
    sync = runs[0]
    t_gen, t_train = sync["t_collect_s"], sync["t_train_s"]
    bound = (t_gen + t_train) / max(t_gen, t_train)
    for r in runs:
        r["speedup"] = sync["wall_s"] / r["wall_s"]
        r["fraction_of_bound"] = r["speedup"] / bound
    result = {"t_gen_s": t_gen, "t_train_s": t_train, "bound": bound, "steps": args.steps, "runs": runs}
    out = write_result("async_speedup", result)
    _plot(result, RESULTS / "async_speedup.png")
    print(f"T_gen {t_gen:.2f}s  T_train {t_train:.2f}s  bound {bound:.2f}x")
    for r in runs:
        print(
            f"lag {r['max_policy_lag']}: {r['wall_s']:.1f}s  speedup {r['speedup']:.2f}x  "
            f"({r['fraction_of_bound']:.0%} of bound)  lags {r['lag_histogram']}"
        )
    print(f"wrote {out}")


def _merge(hists) -> dict[str, int]:
    total: dict[str, int] = {}
    for h in hists:
        for k, v in h.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = [r["max_policy_lag"] for r in result["runs"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(
        [str(lag) for lag in lags], [r["speedup"] for r in result["runs"]], color="tab:blue", label="measured"
    )
    ax.axhline(result["bound"], color="tab:red", ls="--", label=f"overlap bound {result['bound']:.2f}x")
    ax.axhline(0.8 * result["bound"], color="tab:orange", ls=":", label="goal 0.8 x bound")
    ax.set_xlabel("max_policy_lag")
    ax.set_ylabel("speedup vs lag 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
