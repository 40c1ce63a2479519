"""With max_policy_lag 1 generation runs ahead of the learner: stale groups reach the objective with a
non-zero s_t, the lag histogram records them, and nothing beyond the bound is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.config import build_config
from services.coordinator.driver import run

pytestmark = pytest.mark.slow


def test_lag_one_trains_stale_groups_with_their_behaviour_policy(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = build_config(
        {},
        [
            "coordinator.steps=5",
            "coordinator.prompts_per_step=4",
            "coordinator.group_size=4",
            "coordinator.eval_every=0",
            "coordinator.eval_problems=8",
            "coordinator.max_policy_lag=1",
            "learner.lr=1e-3",  # large steps: a stale group's s_t is far above the train/inference gap
            f"coordinator.runs_dir={tmp_path}",
            "coordinator.run_name=lag1",
        ],
    )
    summary = run(cfg)
    steps = [json.loads(line) for line in (tmp_path / "lag1" / "metrics.jsonl").read_text().splitlines()]
    lags = {int(k) for s in steps for k in s["lag_histogram"]}
    assert lags <= {0, 1}  # the bound holds
    stale_steps = [s for s in steps if s["lag_histogram"].get("1")]
    assert stale_steps, [s["lag_histogram"] for s in steps]
    for s in stale_steps:
        assert s["stale_groups"] == s["lag_histogram"]["1"]
        # s_t of a stale group measures how far pi_t moved from pi_b: far above the mismatch of
        # groups sampled by the current version (~1e-5 per sequence in fp32).
        assert s["abs_s_t_stale"] > 100 * max(s["mismatch_mean"], 1e-6)
    assert summary["trained_groups"] == 20 and summary["final_version"] == 5
