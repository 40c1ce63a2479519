"""The learner's first update of an iteration runs at ``pi_t``'s weights, so its forward pass doubles as the
proximal pass for its groups: one no-grad forward fewer per iteration, and exactly the step of computing
``pi_t`` for every group first (real DeepSpeed, the tiny model, two updates per batch)."""

from __future__ import annotations

import pytest
import torch

from bench.common import synthetic_groups
from services.common.config import LearnerConfig
from services.learner.batch import pack_groups
from services.learner.engine import LearnerEngine


def _separate_proximal_pass(engine: LearnerEngine, groups: list) -> dict[str, float]:
    """The iteration with a proximal pass over every group before the first update."""
    full = pack_groups(groups, engine.pad_id)
    plan = engine._shards(full.num_groups)
    proximal, sums = engine._proximal_pass(full, [i for _, own in plan for i in own])
    for minibatch, own in plan:
        for key, value in engine._update(full, minibatch, own, proximal).items():
            sums[key] = sums.get(key, 0.0) + value
    engine.version += 1
    return engine._reduce(sums)


@pytest.mark.parametrize("objective", ["lpo_fwd", "pg"])
def test_the_first_update_is_its_own_proximal_pass(tiny_model_dir: str, objective: str) -> None:
    cfg = LearnerConfig(objective=objective, lr=1e-3, updates_per_batch=2, micro_batch_groups=2)
    reused = LearnerEngine(tiny_model_dir, cfg)
    separate = LearnerEngine(tiny_model_dir, cfg)
    groups = synthetic_groups(8, 4, 8, 12, reused.module.config.vocab_size)
    no_grad_forwards = []
    real = reused.logprobs

    def counting(batch, *, grad, with_entropy=False):
        if not grad:
            no_grad_forwards.append(batch.input_ids.shape[0])
        return real(batch, grad=grad, with_entropy=with_entropy)

    reused.logprobs = counting  # type: ignore[method-assign]
    got = reused.train_step(groups)
    want = _separate_proximal_pass(separate, groups)
    # the proximal pass covered only the second mini-batch: 4 groups x K=4 responses, in 2 micro-batches
    assert no_grad_forwards == [8, 8]
    for (name, a), (_, b) in zip(reused.state_items(), separate.state_items(), strict=True):
        assert torch.equal(a, b), name
    for key in (
        "entropy",
        "mismatch_mean",
        "mismatch_max",
        "kl_forward",
        "loss",
        "grad_norm",
        "abs_s_t_fresh",
    ):
        if key in want:  # PG reports no KL
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key
    assert set(got) - {"proximal_s", "update_s"} == set(want)
    assert got["entropy"] > 0 and got["mismatch_mean"] > 0
