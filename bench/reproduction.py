"""LPO against PG on the tiny Countdown task, real pipeline, with paired seeds and intervals.

Every run uses the same problems: a fixed training pool (``data.train_pool``) revisited over epochs and
four generated evaluation sets, disjoint from it and from each other: ``cd234`` (the tiny model's 2-4
number distribution), ``cd34`` and ``cd4`` (the paper's three-four and four-number splits) and ``val``,
the validation split on which hyper-parameters are chosen and which is never reported as a result.
Objectives share one loss scale (``learner.loss_aggregation: token-mean``). Seeds are paired: seed ``s``
of every setting samples with the same random numbers (``generator.seed`` and ``learner.seed`` = s), so
the LPO-minus-PG difference of seed ``s`` is a common-random-number comparison.

Studies (``--study``):

``grid``      the validation grid that chooses the default run and the study's learning rates: each
              objective at each learning rate of ``--lrs``, 3 seeds, evaluated on ``val`` only every
              ``--eval-every`` steps. The rule, fixed before the runs: per objective, the (lr, step) with
              the highest mean ``val`` Pass@1 among those whose mean ``val`` Pass@8 is at least the base
              model's; the default run is the best of those over objectives.
``powered``   ``pg``, ``lpo_fwd``, ``lpo_rev`` at the GRPO temperature, each at its ``grid`` learning
              rate (``--lr-from``, one or more grid files), >= 10 seeds, evaluated on ``cd234``, ``cd34``,
              ``cd4`` (512 problems x 16 samples each). Reports for each metric the paired LPO-minus-PG
              mean difference with a 95 % t interval and a bootstrap interval over seeds: "win"/"loss"
              only where the interval excludes 0, "tie" otherwise; also the area under the Pass@1 curve.
``drift``     dose-response on policy drift: the three objectives at ``updates_per_batch`` 1 and 4 and
              ``max_policy_lag`` 0 and 2, >= 5 seeds, with the drift the learner measures per update
              (mean |s_theta - s_t|, mean |s_theta|, KL(P_t || P_theta)); the LPO-minus-PG gap against it.

Every run is saved as soon as it ends; ``--resume`` keeps the runs already in the JSON, so a long study
continues after a stop. Writes ``bench/results/reproduction_<study>.json`` and ``.png``.

    python bench/reproduction.py --study grid [--seeds 0 1 2] [--resume]
    python bench/reproduction.py --study powered --seeds 0 1 2 3 4 5 6 7 8 9 --resume
    python bench/reproduction.py --study drift --seeds 0 1 2 3 4 --resume
    python bench/reproduction.py --study <name> --report     # tables from the JSON (markdown)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from common import ASYNC_CORES, REPO, RESULTS, cpu_model, read_jsonl, run_coordinator

OBJECTIVES = ("pg", "lpo_fwd", "lpo_rev")
PER_STEP = ("entropy", "grad_norm", "grad_clip_fraction", "drift", "abs_s_theta", "kl_proximal",
            "abs_s_t_stale", "response_length_mean", "reward_mean")  # fmt: skip
# Two-sided 95 % Student t quantiles by degrees of freedom (no SciPy in the runtime stack).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def eval_sets(evaluate: set[str], problems: int = 512, samples: int = 16, val_problems: int = 256) -> str:
    """The ``data.eval_sets`` override: all four sets defined in every run (so every run trains on the
    same pool), only those in ``evaluate`` evaluated."""
    specs = {
        "cd234": f"name: cd234, problems: {problems}, samples: {samples}",
        "cd34": f"name: cd34, nums: [3, 4], problems: {problems}, samples: {samples}",
        "cd4": f"name: cd4, nums: [4], problems: {problems}, samples: {samples}",
        "val": f"name: val, problems: {val_problems}, samples: {samples}, report: false",
    }
    items = [f"{{{spec}, evaluate: {str(name in evaluate).lower()}}}" for name, spec in specs.items()]
    return "data.eval_sets=[" + ", ".join(items) + "]"


COMMON = [
    "learner.loss_aggregation=token-mean",
    "learner.temperature=grpo",
    "data.train_pool=2000",
    "learner.checkpoint_every=0",  # a study run is never resumed; skip the checkpoint writes
]


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """Setting name -> its overrides (besides ``COMMON``, the seed and the steps)."""
    size = {"problems": args.eval_size[0], "samples": args.eval_size[1], "val_problems": args.eval_size[2]}
    if args.study == "grid":
        return {
            f"{obj}/lr={lr:g}": [f"learner.objective={obj}", f"learner.lr={lr:g}", eval_sets({"val"}, **size)]
            for obj in args.objectives
            for lr in args.lrs
        }
    lrs = dict.fromkeys(OBJECTIVES, args.lrs[0])
    if args.lr_from:
        lrs = _chosen_lrs(args.lr_from, args.objectives)
    if args.study == "powered":
        sets = eval_sets({"cd234", "cd34", "cd4"}, **size)
        return {
            obj: [f"learner.objective={obj}", f"learner.lr={lrs[obj]:g}", sets] for obj in args.objectives
        }
    sets = eval_sets({"cd234"}, **size)
    out = {}
    for updates in (1, 4):
        for lag in (0, 2):
            for obj in args.objectives:
                out[f"{obj}/u{updates}/lag{lag}"] = [
                    f"learner.objective={obj}",
                    f"learner.lr={lrs[obj]:g}",
                    sets,
                    f"learner.updates_per_batch={updates}",
                    f"coordinator.max_policy_lag={lag}",
                    # async runs overlap generation and training: one core each
                    *(ASYNC_CORES if lag else []),
                ]
    return out


def _chosen_lrs(paths: list[str], wanted: list[str]) -> dict[str, float]:
    """Each objective's learning rate from the grids' selections. An objective may have its own grid file
    (a grid extended to a new objective later runs at later code and cannot resume the first file); one
    chosen by two files, or by none, is an error."""
    lrs: dict[str, float] = {}
    for path in paths:
        chosen = json.loads(Path(path).read_text())["selection"]["per_objective"]
        for obj, row in chosen.items():
            if obj in lrs:
                raise SystemExit(f"--lr-from: {obj} is chosen by more than one grid file ({path})")
            lrs[obj] = row["lr"]
    missing = [obj for obj in wanted if obj not in lrs]
    if missing:
        raise SystemExit(
            f"--lr-from: no grid file chooses a learning rate for {missing}; run "
            f"`bench/reproduction.py --study grid --objectives {' '.join(missing)} --name <file>` first"
        )
    return lrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("grid", "powered", "drift"), required=True)
    parser.add_argument("--steps", type=int, default=None, help="learner steps per run (study default)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4])
    parser.add_argument(
        "--lr-from", nargs="+", default=None, help="grid JSONs whose selections give each objective's lr"
    )
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument(
        "--eval-size",
        type=int,
        nargs=3,
        default=[512, 16, 256],
        metavar=("PROBLEMS", "SAMPLES", "VAL_PROBLEMS"),
        help="problems per set, samples per problem, validation problems",
    )
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override (smoke)")
    parser.add_argument("--name", default=None, help="result name (default reproduction_<study>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--report", action="store_true", help="print the JSON's tables as markdown")
    args = parser.parse_args()
    defaults = {"grid": (120, 20), "powered": (250, 50), "drift": (120, 0)}[args.study]
    args.steps = args.steps or defaults[0]
    args.eval_every = defaults[1] if args.eval_every is None else args.eval_every
    name = args.name or f"reproduction_{args.study}"
    out = args.results_dir / f"{name}.json"
    if args.report:
        print(markdown(json.loads(out.read_text())))
        return
    runs: list[dict] = []
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if previous["steps"] != args.steps:
            raise SystemExit(f"{out} holds {previous['steps']}-step runs, not {args.steps}")
        runs = previous["runs"]
    plan = settings(args)
    done = {(r["setting"], r["seed"]) for r in runs}
    todo = [(seed, setting) for seed in args.seeds for setting in plan if (setting, seed) not in done]
    commits = {r.get("commit") for r in runs}
    if todo and runs and commits != {_commit()}:
        # A complete study is only reported again; one with runs left must add them at the same code.
        raise SystemExit(
            f"{out} holds runs of code {sorted(map(str, commits))}, this checkout's is {_commit()}: "
            "paired runs must share the code; resume from a commit with that code or start afresh"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for seed, setting in todo:  # seed-major: an interrupted study still has complete pairs
            runs.append(_run(setting, [*COMMON, *plan[setting], *args.extra], seed, args, Path(tmp)))
            _save(name, args, runs, len(plan) * len(args.seeds))
    _save(name, args, runs, len(plan) * len(args.seeds))
    print(markdown(json.loads(out.read_text())))


def _run(setting: str, overrides: list[str], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    run_name = setting.replace("/", "-").replace("=", "") + f"-s{seed}"
    started = time.time()
    run_dir = run_coordinator(
        [
            *overrides,
            f"coordinator.steps={args.steps}",
            f"coordinator.eval_every={args.eval_every}",
            f"generator.seed={seed}",
            f"learner.seed={seed}",
        ],
        tmp,
        run_name,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    curves = {
        name: [{"step": e["step"], **e["sets"][name]["pass_at"]} for e in evals] for name in evals[0]["sets"]
    }
    correct = {name: [e["sets"][name]["correct"] for e in (evals[0], evals[-1])] for name in evals[0]["sets"]}
    print(f"{run_name}: {json.dumps({n: (c[0]['1'], c[-1]['1']) for n, c in curves.items()})}", flush=True)
    return {
        "setting": setting,
        "seed": seed,
        "commit": _commit(),
        "cpu": cpu_model(),
        "wall_s": round(time.time() - started, 1),
        "curves": curves,
        "correct_first_last": correct,
        "per_step": {k: [s.get(k, float("nan")) for s in steps] for k in PER_STEP},
        "dropped": summary["dropped_by_reason"],
        "lost": summary["lost"],
        "duplicates": summary["duplicates"],
    }


# Everything a Countdown training run executes or loads (the verifier's REST app and sandboxes are not).
CODE = ("services/common", "services/coordinator", "services/generator", "services/learner",
        "services/verifier/rules", "services/verifier/scoring.py", "services/verifier/worker.py",
        "configs/countdown-tiny.yaml", "models")  # fmt: skip


def _commit() -> str:
    """The code a run used: git's hashes of everything a run executes or loads (``CODE``). Paired runs must
    share it (a float-level change of the learner grows into a different trajectory, which breaks the
    common random numbers); a commit that changes only docs, benches or the verifier service keeps it."""
    import subprocess

    repo = REPO
    parts = []
    for path in CODE:
        tree = subprocess.run(["git", "rev-parse", f"HEAD:{path}"], cwd=repo, capture_output=True, text=True)
        parts.append(tree.stdout.strip()[:12])
    dirty = subprocess.run(["git", "status", "--porcelain", *CODE], cwd=repo, capture_output=True, text=True)
    return "-".join(parts) + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------- analysis


def interval(diffs: list[float], seed: int = 0, resamples: int = 10_000, outcome: bool = True) -> dict:
    """Mean of paired differences with a 95 % t interval and a 95 % percentile-bootstrap interval, and the
    verdict: ``win``/``loss`` where the t interval excludes 0, ``tie`` otherwise. A diagnostic (``outcome``
    False: drift, gradient norm, entropy, ...) is neither good nor bad: ``higher``/``lower``/``tie``."""
    import numpy as np

    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "t95": None, "boot95": None, "result": "n<2"}
    se = statistics.stdev(diffs) / math.sqrt(n)
    t = T95.get(n - 1) or T95[max(k for k in T95 if k <= n - 1)]
    lo, hi = mean - t * se, mean + t * se
    rng = np.random.default_rng(seed)
    boot = rng.choice(np.asarray(diffs), size=(resamples, n), replace=True).mean(axis=1)
    b_lo, b_hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    up, down = ("win", "loss") if outcome else ("higher", "lower")
    result = up if lo > 0 else (down if hi < 0 else "tie")
    return {"n": n, "mean": mean, "t95": [lo, hi], "boot95": [b_lo, b_hi], "result": result}


def _auc(curve: list[dict], k: str = "1") -> float:
    """Area under the Pass@k curve over the steps, divided by the steps (the mean Pass@k over training)."""
    xs, ys = [c["step"] for c in curve], [c[k] for c in curve]
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / max(xs[-1] - xs[0], 1)


def _metrics(run: dict) -> dict[str, float]:
    """The reported figures of one run: final Pass@k per set, AUC of Pass@1, mean per-step statistics."""
    out = {}
    for name, curve in run["curves"].items():
        for k, v in curve[-1].items():
            if k != "step":
                out[f"{name}/pass@{k}"] = v
        out[f"{name}/auc_pass@1"] = _auc(curve)
    for key, values in run["per_step"].items():
        finite = [v for v in values if v == v]
        if finite:
            out[f"mean_{key}"] = statistics.mean(finite)
    return out


def _baseline(setting: str) -> str:
    obj, _, rest = setting.partition("/")
    return "pg" + ("/" + rest if rest else "")


def analyse(runs: list[dict]) -> dict:
    by = {(r["setting"], r["seed"]): _metrics(r) for r in runs}
    table = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        rows = [m for (s, _), m in by.items() if s == setting]
        table[setting] = {
            k: {
                "mean": statistics.mean(m[k] for m in rows),
                "std": statistics.stdev(m[k] for m in rows) if len(rows) > 1 else 0.0,
                "n": len(rows),
            }
            for k in rows[0]
            if all(k in m for m in rows)
        }
    paired = {}
    for setting in table:
        base = _baseline(setting)
        if setting == base or base not in table:
            continue
        seeds = sorted(s for (name, s) in by if name == setting and (base, s) in by)
        if not seeds:
            continue
        metrics = [k for k in by[(setting, seeds[0])] if k in by[(base, seeds[0])]]
        paired[f"{setting} - {base}"] = {
            k: interval([by[(setting, s)][k] - by[(base, s)][k] for s in seeds], outcome="pass@" in k)
            for k in metrics
        }
    return {"table": table, "paired": paired}


def select(runs: list[dict]) -> dict:
    """The grid's rule: per objective, the (lr, step) with the best mean ``val`` Pass@1 among those whose
    mean ``val`` Pass@8 is at least the base model's (step 0, mean over seeds)."""
    k = (
        "8"
        if "8" in runs[0]["curves"]["val"][0]
        else max((x for x in runs[0]["curves"]["val"][0] if x != "step"), key=int)
    )
    base8 = statistics.mean(r["curves"]["val"][0][k] for r in runs)
    candidates = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        sel = [r for r in runs if r["setting"] == setting]
        obj, lr = setting.split("/lr=")
        for i, point in enumerate(sel[0]["curves"]["val"]):
            if point["step"] == 0:
                continue
            p1 = statistics.mean(r["curves"]["val"][i]["1"] for r in sel)
            p8 = statistics.mean(r["curves"]["val"][i][k] for r in sel)
            candidates.append(
                {
                    "objective": obj,
                    "lr": float(lr),
                    "steps": point["step"],
                    "seeds": len(sel),
                    "val_pass@1": p1,
                    "val_pass@8": p8,
                    "eligible": p8 >= base8,
                }
            )
    per_objective = {}
    for obj in OBJECTIVES:
        ok = [c for c in candidates if c["objective"] == obj and c["eligible"]]
        if ok:
            per_objective[obj] = max(ok, key=lambda c: c["val_pass@1"])
    best = max(per_objective.values(), key=lambda c: c["val_pass@1"]) if per_objective else None
    base1 = statistics.mean(r["curves"]["val"][0]["1"] for r in runs)
    return {
        "base_val_pass@1": base1,
        "base_val_pass@8": base8,
        "per_objective": per_objective,
        "default": best,
        "candidates": candidates,
    }


def _save(name: str, args: argparse.Namespace, runs: list[dict], planned: int) -> None:
    payload = {
        "study": args.study,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "common_overrides": COMMON,
        "settings": settings(args),
        "complete": len(runs) >= planned,
        "planned_runs": planned,
        "runs": runs,
        **analyse(runs),
    }
    if args.study == "grid" and runs:
        payload["selection"] = select(runs)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    _plot(payload, args.results_dir / f"{name}.png")


# ---------------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [
        f"{result['study']}: {len(result['runs'])} of {result['planned_runs']} runs, {result['steps']} steps"
    ]
    cpus: dict[int, set[str]] = {}  # seed -> the CPUs its runs ran on (one, for an exact pairing)
    for r in result["runs"]:
        cpus.setdefault(r["seed"], set()).add(r.get("cpu", "not recorded"))
    kinds = sorted(set().union(*cpus.values())) if cpus else []
    mixed = sorted(s for s, c in cpus.items() if len(c) > 1)
    lines.append(
        "CPUs: "
        + "; ".join(f"{k}: seeds {sorted(s for s, c in cpus.items() if k in c)}" for k in kinds)
        + (f" (seeds whose runs span CPUs: {mixed})" if mixed else "")
    )
    if result.get("selection"):
        sel = result["selection"]
        lines += [
            "",
            f"base val Pass@1 {sel['base_val_pass@1']:.3f}, Pass@8 {sel['base_val_pass@8']:.3f}",
            "",
            "| objective | lr | steps | val Pass@1 | val Pass@8 |",
            "|---|---|---|---|---|",
        ]
        for obj, c in sel["per_objective"].items():
            lines.append(
                f"| {obj} | {c['lr']:g} | {c['steps']} | {c['val_pass@1']:.3f} | {c['val_pass@8']:.3f} |"
            )
        if sel["default"]:
            d = sel["default"]
            lines.append(f"\ndefault run: {d['objective']} lr {d['lr']:g}, {d['steps']} steps")
    keys = [k for k in next(iter(result["table"].values()), {}) if "pass@" in k or k.startswith("mean_grad")]
    lines += ["", "| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for setting, row in result["table"].items():
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" if k in row else "-" for k in keys]
        lines.append(f"| {setting} (n={next(iter(row.values()))['n']}) | " + " | ".join(cells) + " |")
    for pair, metrics in result["paired"].items():
        lines += [
            "",
            f"**{pair}** (paired by seed)",
            "",
            "| metric | n | mean diff | 95 % t | 95 % bootstrap | result |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in metrics.items():
            if "pass@" not in k and not k.startswith(("mean_grad", "mean_drift", "mean_abs_s_theta")):
                continue
            t = "-" if v["t95"] is None else f"[{v['t95'][0]:+.3f}, {v['t95'][1]:+.3f}]"
            b = "-" if v["boot95"] is None else f"[{v['boot95'][0]:+.3f}, {v['boot95'][1]:+.3f}]"
            lines.append(f"| {k} | {v['n']} | {v['mean']:+.4f} | {t} | {b} | {v['result']} |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    """Mean Pass@1 and Pass@8 curves per setting for each evaluated set; for ``drift``, the LPO-minus-PG
    gap in final Pass@1 against the measured drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    if not runs:
        return
    sets = list(runs[0]["curves"])
    extra = result["study"] == "drift"
    fig, axes = plt.subplots(
        1, 2 * len(sets) + extra, figsize=(4.2 * (2 * len(sets) + extra), 4), squeeze=False
    )
    axes = axes[0]
    for i, setting in enumerate(dict.fromkeys(r["setting"] for r in runs)):
        sel = [r for r in runs if r["setting"] == setting]
        style = "--" if setting.startswith("pg") else "-"
        for j, name in enumerate(sets):
            xs = [c["step"] for c in sel[0]["curves"][name]]
            for col, k in enumerate(("1", "8")):
                ys = [statistics.mean(r["curves"][name][n][k] for r in sel) for n in range(len(xs))]
                axes[2 * j + col].plot(xs, ys, style, color=f"C{i % 10}", marker=".", label=setting)
                axes[2 * j + col].set_title(f"{name} Pass@{k}")
                axes[2 * j + col].set_xlabel("learner step")
    if extra:
        ax = axes[-1]
        for pair, metrics in result["paired"].items():
            setting = pair.split(" - ")[0]
            drift = result["table"][setting].get("mean_abs_s_theta", {}).get("mean")
            gap = metrics.get("cd234/pass@1")
            if drift is None or gap is None or gap["t95"] is None:
                continue
            ax.errorbar(
                [drift],
                [gap["mean"]],
                yerr=[[gap["mean"] - gap["t95"][0]], [gap["t95"][1] - gap["mean"]]],
                marker="o",
                capsize=3,
                label=setting,
            )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("mean |s_theta| per response (drift from the sampling policy)")
        ax.set_title("LPO - PG, final cd234 Pass@1 (95 % t)")
        ax.legend(fontsize=6)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
