"""Two DeepSpeed ranks (Ray actors, gloo) produce the weights one rank does on the same global batch, at
ZeRO stages 0, 2 and 3 (stage 3 on CPU/gloo, snapshot gathered in buckets), and every stage's weights
equal stage 0's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.common.config import build_config
from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.weights import RedisWeightTransport
from services.learner.group import LearnerGroup

pytestmark = pytest.mark.slow
SHA = hashlib.sha256(b"v0").hexdigest()


def _groups(n: int, k: int, seed: int) -> list[ResponseGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task = RolloutTask(
            f"ws-{i}", rng.integers(3, 40, 10), "p", "countdown", {"nums": [1, 2], "target": 3}, k
        )
        rollouts = []
        for _ in range(k):
            length = int(rng.integers(2, 12))
            rollouts.append(Rollout(rng.integers(3, 40, length), -rng.random(length) * 4, "stop"))
        rewards = tuple(float(r) for r in rng.choice([0.0, 0.1, 1.0], size=k))
        out.append(ResponseGroup(task, tuple(rollouts), 0, SHA).with_rewards(rewards, ("fail",) * k))
    return out


def _train_and_fetch(cfg, model_dir: str, redis_url: str, groups) -> dict[str, torch.Tensor]:
    learner = LearnerGroup(cfg, model_dir, redis_url)
    try:
        metrics = learner.train(groups)
        snapshot = learner.publish()
    finally:
        learner.shutdown()
    assert snapshot.version == 1 and np.isfinite(metrics.loss)
    transport = RedisWeightTransport(redis_url, cfg.coordinator.run_name)
    return transport.fetch(snapshot)


def _run(tiny_model_dir: str, redis_factory, zero_stage: int, world: int) -> dict[str, torch.Tensor]:
    """One learner step on 7 groups: uneven shards (4 + 3 per mini-batch), micro-batches of 2 (gradient
    accumulation: ZeRO-3 once overwrote a micro-batch's gradients with the next one's), 2 updates.

    AdamW's epsilon (1.0) is far above the gradients, so each update is SGD with step ``lr`` and the weights
    carry the gradients linearly. With the default 1e-8, Adam divides near-cancelling moments on a few
    elements and blows fp32 reduction-order noise (ranks sum in another order) up to ~0.2 lr.
    """
    cfg = build_config(
        {},
        [
            "learner.lr=0.5",
            "learner.adam_eps=1.0",
            "learner.weight_decay=0.0",
            "learner.micro_batch_groups=2",
            "learner.updates_per_batch=2",
            f"learner.zero_stage={zero_stage}",
            f"learner.world_size={world}",
            "coordinator.prompts_per_step=8",
            f"coordinator.run_name=z{zero_stage}ws{world}",
        ],
    )
    return _train_and_fetch(cfg, tiny_model_dir, redis_factory().url, _groups(7, 4, seed=0))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_world_size_two_matches_one(tiny_model_dir: str, redis_factory, ray_local, zero_stage: int) -> None:
    results = {world: _run(tiny_model_dir, redis_factory, zero_stage, world) for world in (1, 2)}
    assert _max_diff(results[1], results[2]) < 1e-5
    if zero_stage:  # every stage computes what stage 0 does
        assert _max_diff(results[1], _run(tiny_model_dir, redis_factory, 0, 1)) < 1e-5
    # and the step really moved the weights (equality of two no-ops would prove nothing)
    initial = load_file(str(next(Path(tiny_model_dir).glob("*.safetensors"))))
    moved = max((results[1][n] - initial[n]).abs().max().item() for n in results[1])
    assert moved > 1e-3, moved
