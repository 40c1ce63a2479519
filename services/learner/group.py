"""The learner group as the coordinator sees it: N ranks that train on the same batch of groups.

A rank that dies (its process killed, its node lost) takes the group's in-memory optimizer state with it:
every call then raises :class:`LearnerDied`, and the run is continued with ``--resume`` from the last
checkpoint (the coordinator replays the steps trained since).
"""

from __future__ import annotations

import uuid
from typing import Any

import ray

from services.common.config import RunConfig
from services.common.messages import LearnerStepMetrics, ResponseGroup, WeightSnapshot, encode
from services.learner.actor import LearnerRank


class LearnerDied(RuntimeError):
    """A learner rank died; its state since the last checkpoint is gone."""


class LearnerGroup:
    """Creates the ranks, fans a batch out to all of them, returns rank 0's metrics."""

    def __init__(self, cfg: RunConfig, model_dir: str, redis_url: str) -> None:
        n = cfg.learner.world_size
        rendezvous = f"lpo:{cfg.coordinator.run_name}:learner-rendezvous:{uuid.uuid4().hex}"  # one per group
        res = cfg.cluster.learner
        self.ranks = [
            LearnerRank.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources).remote(
                cfg, model_dir, redis_url, rank, n, rendezvous
            )
            for rank in range(n)
        ]
        self._ready = [r.version.remote() for r in self.ranks]  # constructors run while other actors start

    def wait_ready(self) -> None:
        self._all("start", self._ready)

    def _all(self, what: str, refs: list[Any]) -> list[Any]:
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise LearnerDied(f"a learner rank died during {what}: {exc}") from exc

    def train(self, groups: list[ResponseGroup]) -> LearnerStepMetrics:
        ref = ray.put([encode(g) for g in groups])  # one copy in the object store for all ranks
        return LearnerStepMetrics.from_flat(
            self._all("train", [r.train_step.remote(ref) for r in self.ranks])[0]
        )

    def publish(self) -> WeightSnapshot:
        snapshot = self._all("publish", [r.publish.remote() for r in self.ranks])[0]
        assert snapshot is not None  # rank 0 always publishes
        return snapshot

    def save_checkpoint(self, root: str, tag: str) -> None:
        self._all("checkpoint", [r.save_checkpoint.remote(root, tag) for r in self.ranks])

    def load_checkpoint(self, root: str, tag: str) -> int:
        versions = self._all("checkpoint load", [r.load_checkpoint.remote(root, tag) for r in self.ranks])
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner ranks restored different versions {versions} from {root}/{tag}")
        return versions[0]

    def save_hf(self, out_dir: str) -> str:
        return self._all("HF export", [r.save_hf.remote(out_dir) for r in self.ranks])[0]

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
