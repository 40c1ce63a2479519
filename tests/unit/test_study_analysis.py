"""The statistics of bench/reproduction.py: paired intervals, the verdict rule, the area under a curve and
the grid's selection rule, on hand-made runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import reproduction  # noqa: E402


def test_interval_is_the_t_interval_and_calls_a_win_only_when_it_excludes_zero() -> None:
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, se 0.01/sqrt(3); t(2) = 4.303 -> +-0.02484.
    out = reproduction.interval([0.01, 0.02, 0.03])
    assert out["mean"] == pytest.approx(0.02)
    assert out["t95"] == pytest.approx([0.02 - 0.024844, 0.02 + 0.024844], abs=1e-5)
    assert out["result"] == "tie"  # the interval crosses 0
    win = reproduction.interval([0.02, 0.021, 0.019, 0.02])
    assert win["result"] == "win" and win["t95"][0] > 0 and win["boot95"][0] > 0
    assert reproduction.interval([-0.02, -0.021, -0.019])["result"] == "loss"
    assert reproduction.interval([0.5])["result"] == "n<2"
    # a diagnostic (drift, gradient norm) that differs is neither a win nor a loss
    assert reproduction.interval([-0.02, -0.021, -0.019], outcome=False)["result"] == "lower"
    assert reproduction.interval([0.02, 0.021, 0.019], outcome=False)["result"] == "higher"


def test_auc_is_the_mean_of_the_curve_over_steps() -> None:
    curve = [{"step": 0, "1": 0.2}, {"step": 10, "1": 0.4}, {"step": 30, "1": 0.4}]
    # trapezoids: 10 * 0.3 + 20 * 0.4 = 11, over 30 steps
    assert reproduction._auc(curve) == pytest.approx(11 / 30)


def _run(setting: str, seed: int, val: list[tuple[float, float]]) -> dict:
    curve = [{"step": 20 * i, "1": p1, "8": p8} for i, (p1, p8) in enumerate(val)]
    return {"setting": setting, "seed": seed, "curves": {"val": curve}, "per_step": {"grad_norm": [1.0]}}


def test_selection_takes_the_best_pass1_whose_pass8_keeps_the_base() -> None:
    runs = [
        # base Pass@8 0.6; lr 2e-4 reaches the best Pass@1 at step 40 but loses Pass@8 there
        _run("pg/lr=0.0002", 0, [(0.3, 0.6), (0.36, 0.62), (0.40, 0.55)]),
        _run("pg/lr=0.0001", 0, [(0.3, 0.6), (0.33, 0.63), (0.37, 0.61)]),
        _run("lpo_fwd/lr=0.0001", 0, [(0.3, 0.6), (0.34, 0.64), (0.38, 0.62)]),
    ]
    sel = reproduction.select(runs)
    assert sel["base_val_pass@8"] == pytest.approx(0.6)
    assert sel["per_objective"]["pg"]["lr"] == 0.0001 and sel["per_objective"]["pg"]["steps"] == 40
    assert sel["default"]["objective"] == "lpo_fwd" and sel["default"]["val_pass@1"] == pytest.approx(0.38)


def test_analyse_pairs_each_setting_with_pg_of_the_same_seed_and_conditions() -> None:
    runs = [
        {"setting": s, "seed": seed, "curves": {"cd234": [{"step": 0, "1": 0.3}, {"step": 10, "1": p}]},
         "per_step": {"drift": [0.1]}}
        for s, seed, p in [("pg/u1/lag0", 0, 0.40), ("lpo_fwd/u1/lag0", 0, 0.42), ("pg/u1/lag0", 1, 0.35),
                           ("lpo_fwd/u1/lag0", 1, 0.38), ("lpo_fwd/u4/lag2", 0, 0.5)]
    ]  # fmt: skip
    for run, drift in zip(runs, [0.1, 0.2, 0.1, 0.3, 0.1], strict=True):
        run["per_step"] = {"drift": [drift]}
    out = reproduction.analyse(runs)
    pair = out["paired"]["lpo_fwd/u1/lag0 - pg/u1/lag0"]["cd234/pass@1"]
    assert pair["n"] == 2 and pair["mean"] == pytest.approx(0.025)
    assert "lpo_fwd/u4/lag2 - pg/u4/lag2" not in out["paired"]  # no PG run of those conditions
    assert out["table"]["pg/u1/lag0"]["cd234/pass@1"]["mean"] == pytest.approx(0.375)
    drift = out["paired"]["lpo_fwd/u1/lag0 - pg/u1/lag0"]["mean_drift"]
    assert drift["mean"] == pytest.approx(0.15) and drift["result"] == "tie"  # 0.1 and 0.2: t interval wide


def test_the_default_run_check_needs_both_the_pass1_gain_and_no_pass8_loss() -> None:
    import seed_runs

    base = {"1": 0.230, "8": 0.566}
    assert seed_runs._check(base, {"1": 0.327, "8": 0.580})["meets"]
    lost_pass8 = seed_runs._check(base, {"1": 0.327, "8": 0.562})
    assert not lost_pass8["meets"] and lost_pass8["pass8_gain"] == pytest.approx(-0.004)
    assert not seed_runs._check(base, {"1": 0.270, "8": 0.600})["meets"]  # Pass@1 gain 0.04 < 0.05


def test_learning_rates_come_from_several_grid_files_each_objective_once(tmp_path: Path) -> None:
    import json

    def grid(name: str, chosen: dict[str, float]) -> str:
        path = tmp_path / name
        per = {obj: {"lr": lr, "objective": obj} for obj, lr in chosen.items()}
        path.write_text(json.dumps({"selection": {"per_objective": per}}))
        return str(path)

    first, rev = grid("a.json", {"pg": 5e-5, "lpo_fwd": 1e-4}), grid("b.json", {"lpo_rev": 2e-4})
    assert reproduction._chosen_lrs([first, rev], ["pg", "lpo_fwd", "lpo_rev"]) == {
        "pg": 5e-5, "lpo_fwd": 1e-4, "lpo_rev": 2e-4
    }  # fmt: skip
    with pytest.raises(SystemExit, match=r"no grid file chooses a learning rate for \['lpo_rev'\]"):
        reproduction._chosen_lrs([first], ["pg", "lpo_rev"])
    with pytest.raises(SystemExit, match="pg is chosen by more than one grid file"):
        reproduction._chosen_lrs([first, grid("c.json", {"pg": 1e-4})], ["pg"])
