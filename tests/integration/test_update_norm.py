"""``learner.log_update_norm``: the reported ``update_norm`` is the L2 distance between the weights
before and after the step, as the snapshot path (``state_items``) sees them (real DeepSpeed, tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.common import synthetic_groups
from services.common.config import LearnerConfig
from services.learner.engine import LearnerEngine


def _groups(vocab: int) -> list:
    return synthetic_groups(4, 4, 8, 12, vocab)  # the benches' seeded learner batch


@pytest.mark.parametrize("objective", ["lpo_fwd", "pg"])
def test_update_norm_is_the_distance_the_weights_moved(tiny_model_dir: str, objective: str) -> None:
    cfg = LearnerConfig(objective=objective, lr=1e-3, updates_per_batch=2, log_update_norm=True)
    engine = LearnerEngine(tiny_model_dir, cfg)
    groups = _groups(engine.module.config.vocab_size)
    before = {name: t.to(torch.float64).clone() for name, t in engine.state_items()}
    metrics = engine.train_step(groups)
    after = dict(engine.state_items())
    moved = math.sqrt(sum(float((after[n].to(torch.float64) - before[n]).pow(2).sum()) for n in before))
    assert moved > 0.0
    assert metrics["update_norm"] == pytest.approx(moved, rel=1e-9)


def test_without_the_option_no_update_norm_is_reported(tiny_model_dir: str) -> None:
    engine = LearnerEngine(tiny_model_dir, LearnerConfig(lr=1e-3))
    metrics = engine.train_step(_groups(engine.module.config.vocab_size))
    assert "update_norm" not in metrics and metrics["grad_norm"] > 0.0


@pytest.mark.parametrize(("clip", "share"), [(1e-6, 1.0), (1e9, 0.0)])
def test_grad_clip_fraction_counts_the_clipped_updates(
    tiny_model_dir: str, clip: float, share: float
) -> None:
    cfg = LearnerConfig(lr=1e-3, updates_per_batch=2, grad_clip=clip)
    engine = LearnerEngine(tiny_model_dir, cfg)
    metrics = engine.train_step(_groups(engine.module.config.vocab_size))
    assert metrics["grad_clip_fraction"] == share and metrics["grad_norm"] > 1e-6
