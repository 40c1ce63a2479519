"""The paper's Section 5.2 at small scale: LPO against PG on the tiny Countdown task, real pipeline.

``--study main``: objectives ``pg``, ``lpo_fwd``, ``lpo_rev`` at each of the ``grpo``, ``drgrpo`` and
``maxrl`` temperatures, synchronous (max_policy_lag 0), the same samples budget for every run
(``--steps`` x 16 prompts x 8 responses), several seeds (generator and learner seeds; the data and the
held-out set are fixed). ``--study ablation``: ``lpo_fwd`` against ``pointwise`` (listwise vs
pointwise target) and ``lpo_fwd`` against ``pg`` at K = 4, 8, 16 (same prompts per step, so the samples
budget grows with K), at the GRPO temperature. ``--study norms``: ``pg`` and ``lpo_fwd`` (GRPO
temperature) with the gradient clip of the main study (1.0) and without one, logging the norm of each
step's weight change (``learner.log_update_norm``): whether the two objectives' very different gradient
norms reach the weights through Adam as different step sizes, and whether the clip changes the outcome.

Per run it keeps the eval curve (expected Pass@1 and Pass@8 on 128 held-out problems x 8 samples at
temperature 0.6) and the per-step sampled-token entropy, gradient norm and response length. The JSON
holds the mean +- std per setting, the samples to reach ``base + --threshold`` Pass@1, and the win table
in the paper's form: for each temperature, the LPO variant against the PG run of the same temperature
and seed. Runs already in the JSON are kept with ``--resume``, so a long sweep continues after a stop.

    python bench/reproduction.py --study main [--steps 30] [--seeds 0 1 2] [--resume] [--replot]

writes ``bench/results/reproduction_<study>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import RESULTS, read_jsonl, run_coordinator, write_result

TEMPERATURES = ("grpo", "drgrpo", "maxrl")
MAIN = {f"{obj}/{t}": [f"learner.objective={obj}", f"learner.temperature={t}"]
        for t in TEMPERATURES for obj in ("pg", "lpo_fwd", "lpo_rev")}  # fmt: skip
ABLATION = {
    "pointwise/grpo": ["learner.objective=pointwise"],
    **{
        f"{obj}/K={k}": [f"learner.objective={obj}", f"coordinator.group_size={k}"]
        for k in (4, 8, 16)
        for obj in ("lpo_fwd", "pg")
    },  # fmt: skip
}
NORMS = {
    f"{obj}/{clip}": [f"learner.objective={obj}", "learner.log_update_norm=true",
                      *(["learner.grad_clip=1e9"] if clip == "noclip" else [])]
    for clip in ("clip1", "noclip")
    for obj in ("pg", "lpo_fwd")
}  # fmt: skip
STUDIES = {"main": MAIN, "ablation": ABLATION, "norms": NORMS}
CURVES = ("entropy", "grad_norm", "response_length_mean")
OPTIONAL_CURVES = ("update_norm", "grad_clip_fraction")  # where the run logged them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="main")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threshold", type=float, default=0.05, help="Pass@1 gain for samples-to-threshold")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--replot", action="store_true", help="only redo the tables and PNG from the JSON")
    parser.add_argument("--markdown", action="store_true", help="print the JSON's tables as markdown (docs)")
    args = parser.parse_args()
    settings = STUDIES[args.study]
    name = f"reproduction_{args.study}"
    out = RESULTS / f"{name}.json"
    runs: list[dict] = []
    if (args.resume or args.replot) and out.is_file():
        previous = json.loads(out.read_text())
        if previous["steps"] != args.steps:
            raise SystemExit(f"{out} holds {previous['steps']}-step runs, not {args.steps}")
        runs = previous["runs"]
    planned = len(settings) * len(args.seeds)
    if args.markdown:
        print(_markdown(json.loads(out.read_text())))
        return
    if not args.replot:
        done = {(r["setting"], r["seed"]) for r in runs}
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:  # seed-major: an interrupted sweep still covers every setting
                for setting, overrides in settings.items():
                    if (setting, seed) in done:
                        continue
                    runs.append(_run(setting, overrides, seed, args, Path(tmp)))
                    _save(name, args, runs, planned)
    _save(name, args, runs, planned)
    for row in _table(runs, args.threshold):
        print(row)


def _run(setting: str, overrides: list[str], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    run_name = setting.replace("/", "-").replace("=", "") + f"-s{seed}"
    run_dir = run_coordinator(
        [
            *overrides,
            f"coordinator.steps={args.steps}",
            f"coordinator.eval_every={args.eval_every}",
            "coordinator.max_policy_lag=0",
            f"generator.seed={seed}",
            f"learner.seed={seed}",
            "learner.checkpoint_every=0",  # a study run is never resumed; skip the checkpoint writes
        ],
        tmp,
        run_name,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = read_jsonl(run_dir / "metrics.jsonl")
    keys = CURVES + tuple(k for k in OPTIONAL_CURVES if k in steps[0])
    per_step = steps[0]["groups"] * int(_group_size(setting))
    curve = [
        {"samples": e["step"] * per_step, "pass_at_1": e["pass_at_1"], "pass_at_k": e["pass_at_k"]}
        for e in read_jsonl(run_dir / "eval.jsonl")
    ]
    print(f"{run_name}: Pass@1 {curve[0]['pass_at_1']:.3f} -> {curve[-1]['pass_at_1']:.3f}", flush=True)
    return {
        "setting": setting,
        "seed": seed,
        "wall_s": summary["wall_seconds"],
        "samples_per_step": per_step,
        "curve": curve,
        "per_step": {key: [s[key] for s in steps] for key in keys},
        "final": summary["final_eval"],
        "initial": summary["initial_eval"],
    }


def _group_size(setting: str) -> int:
    return int(setting.split("K=")[1]) if "K=" in setting else 8


def _last(run: dict, key: str, n: int = 10) -> list[float]:
    return run["per_step"][key][-n:]


def _samples_to(curve: list[dict], target: float) -> int | None:
    return next((c["samples"] for c in curve if c["pass_at_1"] >= target), None)


def _table(runs: list[dict], threshold: float) -> list[dict]:
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        sel = [r for r in runs if r["setting"] == setting]
        p1 = [r["final"]["pass_at_1"] for r in sel]
        pk = [r["final"]["pass_at_k"] for r in sel]
        reached = [_samples_to(r["curve"], r["initial"]["pass_at_1"] + threshold) for r in sel]
        hit = [s for s in reached if s is not None]
        rows.append({
            "setting": setting,
            "seeds": len(sel),
            "pass_at_1_mean": round(statistics.mean(p1), 4),
            "pass_at_1_std": round(statistics.pstdev(p1), 4),
            "pass_at_8_mean": round(statistics.mean(pk), 4),
            "pass_at_8_std": round(statistics.pstdev(pk), 4),
            "samples_to_threshold_median": statistics.median(hit) if hit else None,
            "runs_reaching_threshold": len(hit),
            "entropy_last10_mean": round(statistics.mean(x for r in sel for x in _last(r, "entropy")), 4),
            "grad_norm_mean": round(statistics.mean(x for r in sel for x in r["per_step"]["grad_norm"]), 3),
        })  # fmt: skip
        if all("grad_clip_fraction" in r["per_step"] for r in sel):
            clipped = [x for r in sel for x in r["per_step"]["grad_clip_fraction"]]
            rows[-1]["updates_clipped_share"] = round(statistics.mean(clipped), 3)
        if all("update_norm" in r["per_step"] for r in sel):
            ups = [x for r in sel for x in r["per_step"]["update_norm"]]
            rows[-1]["update_norm_mean"] = round(statistics.mean(ups), 5)
            rows[-1]["update_norm_cv"] = round(statistics.pstdev(ups) / statistics.mean(ups), 3)
    return rows


def _wins(runs: list[dict]) -> list[dict]:
    """The paper's win table: each LPO variant against PG at the same temperature, paired by seed."""
    by = {(r["setting"], r["seed"]): r for r in runs}
    rows = []
    for t in TEMPERATURES:
        for obj in ("lpo_fwd", "lpo_rev"):
            pairs = [
                (by[(f"{obj}/{t}", s)], by[(f"pg/{t}", s)])
                for (setting, s) in by
                if setting == f"{obj}/{t}" and (f"pg/{t}", s) in by
            ]
            if not pairs:
                continue
            for metric in ("pass_at_1", "pass_at_k"):
                diffs = [a["final"][metric] - b["final"][metric] for a, b in pairs]
                rows.append({
                    "temperature": t, "lpo": obj, "metric": "pass_at_8" if metric == "pass_at_k" else metric,
                    "seeds": len(pairs), "lpo_wins": sum(d > 0 for d in diffs),
                    "mean_difference": round(statistics.mean(diffs), 4),
                    "result": _outcome(statistics.mean(diffs)),
                })  # fmt: skip
    return rows


def _outcome(diff: float) -> str:
    return "win" if diff > 0 else ("loss" if diff < 0 else "tie")


def _save(name: str, args: argparse.Namespace, runs: list[dict], planned: int) -> None:
    payload = {
        "study": args.study,
        "steps": args.steps,
        "threshold": args.threshold,
        "complete": len(runs) >= planned,
        "planned_runs": planned,
        "table": _table(runs, args.threshold),
        "runs": runs,
    }
    if args.study == "main":
        payload["wins"] = _wins(runs)
    write_result(name, payload)
    _plot(runs, RESULTS / f"{name}.png")


def _markdown(result: dict) -> str:
    """The result's tables as markdown (what docs/RESULTS.md quotes)."""
    reach_header = f"samples to +{result['threshold']:.2f} Pass@1 (runs reaching it)"

    def every(key: str) -> bool:
        return bool(result["table"]) and all(key in r for r in result["table"])

    norms, clipped = every("update_norm_mean"), every("updates_clipped_share")
    extra = (" update norm (cv) |" if norms else "") + (" updates clipped |" if clipped else "")
    lines = [
        f"| setting | seeds | Pass@1 | Pass@8 | {reach_header} | entropy, last 10 steps | grad norm |{extra}",
        "|---|---|---|---|---|---|---|" + "---|" * (norms + clipped),
    ]
    for r in result["table"]:
        reach = r["samples_to_threshold_median"]
        cells = (f" {r['update_norm_mean']:.4f} ({r['update_norm_cv']:.2f}) |" if norms else "") + (
            f" {r['updates_clipped_share']:.0%} |" if clipped else ""
        )
        lines.append(
            f"| {r['setting']} | {r['seeds']} | {r['pass_at_1_mean']:.3f} +- {r['pass_at_1_std']:.3f} "
            f"| {r['pass_at_8_mean']:.3f} +- {r['pass_at_8_std']:.3f} "
            f"| {'-' if reach is None else int(reach)} ({r['runs_reaching_threshold']}/{r['seeds']}) "
            f"| {r['entropy_last10_mean']:.3f} | {r['grad_norm_mean']:.2f} |{cells}"
        )
    if result.get("wins"):
        lines += ["", "| temperature | LPO | metric | LPO better (seeds) | mean difference vs PG | result |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for w in result["wins"]:
            lines.append(
                f"| {w['temperature']} | {w['lpo']} | {w['metric']} | {w['lpo_wins']}/{w['seeds']} "
                f"| {w['mean_difference']:+.4f} | {w['result']} |"
            )
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    """Per setting (mean over seeds): Pass@1 and Pass@8 against samples; entropy, grad norm and response
    length against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    curves = CURVES + tuple(k for k in OPTIONAL_CURVES if all(k in r["per_step"] for r in runs))
    fig, axes = plt.subplots(1, 2 + len(curves), figsize=(4.4 * (2 + len(curves)), 4.2))
    for setting in settings:
        sel = [r for r in runs if r["setting"] == setting]
        xs = [c["samples"] for c in sel[0]["curve"]]
        style = "-" if setting.startswith("lpo") else ("--" if setting.startswith("pg") else ":")
        for ax, metric in zip(axes[:2], ("pass_at_1", "pass_at_k"), strict=True):
            ys = [statistics.mean(r["curve"][i][metric] for r in sel) for i in range(len(xs))]
            ax.plot(xs, ys, style, marker=".", label=setting)
        for ax, key in zip(axes[2:], curves, strict=True):
            n = min(len(r["per_step"][key]) for r in sel)
            ax.plot(
                range(1, n + 1),
                [statistics.mean(r["per_step"][key][i] for r in sel) for i in range(n)],
                style,
            )
    names = {"entropy": "sampled-token entropy", "grad_norm": "grad norm", "response_length_mean":
             "response length", "update_norm": "weight change per step", "grad_clip_fraction":
             "share of updates clipped"}  # fmt: skip
    titles = ("held-out Pass@1", "held-out Pass@8", *(names[k] for k in curves))
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("samples" if "Pass" in title else "learner step")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
