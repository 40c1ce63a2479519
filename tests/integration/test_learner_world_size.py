"""Two DeepSpeed ranks (Ray actors, gloo) produce the weights one rank does on the same global batch."""

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
    assert snapshot.version == 1 and np.isfinite(metrics["loss"])
    transport = RedisWeightTransport(redis_url, cfg.coordinator.run_name)
    return transport.fetch(snapshot)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_world_size_two_matches_one(tiny_model_dir: str, redis_factory, ray_local, zero_stage: int) -> None:
    # 7 groups: uneven shards (4 + 3 per mini-batch split), micro-batches of 2 -> gradient accumulation.
    groups = _groups(7, 4, seed=zero_stage)
    base = [
        "learner.lr=1e-3",
        "learner.micro_batch_groups=2",
        "learner.updates_per_batch=2",
        f"learner.zero_stage={zero_stage}",
        "coordinator.prompts_per_step=8",
    ]
    results = {}
    for world in (1, 2):
        server = redis_factory()
        cfg = build_config({}, [*base, f"learner.world_size={world}", f"coordinator.run_name=ws{world}"])
        results[world] = _train_and_fetch(cfg, tiny_model_dir, server.url, groups)
    assert results[1].keys() == results[2].keys()
    worst = max((results[1][n] - results[2][n]).abs().max().item() for n in results[1])
    assert worst < 1e-5, worst
    # and the step really moved the weights (equality of two no-ops would prove nothing)
    initial = load_file(str(next(Path(tiny_model_dir).glob("*.safetensors"))))
    moved = max((results[1][n] - initial[n]).abs().max().item() for n in results[1])
    assert moved > 1e-4, moved
