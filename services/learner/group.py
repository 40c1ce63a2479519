"""The learner group as the coordinator sees it: N ranks that train on the same batch of groups."""

from __future__ import annotations

import socket

import ray

from services.common.config import RunConfig
from services.common.messages import ResponseGroup, WeightSnapshot, encode
from services.learner.actor import LearnerRank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    """Creates the ranks, fans a batch out to all of them, returns rank 0's metrics."""

    def __init__(self, cfg: RunConfig, model_dir: str, redis_url: str) -> None:
        n = cfg.learner.world_size
        port = _free_port()
        res = cfg.cluster.learner
        self.ranks = [
            LearnerRank.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
                cfg, model_dir, redis_url, rank, n, port
            )
            for rank in range(n)
        ]
        ray.get([r.version.remote() for r in self.ranks])

    def train(self, groups: list[ResponseGroup]) -> dict[str, float]:
        ref = ray.put([encode(g) for g in groups])  # one copy in the object store for all ranks
        return ray.get([r.train_step.remote(ref) for r in self.ranks])[0]

    def publish(self) -> WeightSnapshot:
        snapshot = ray.get([r.publish.remote() for r in self.ranks])[0]
        assert snapshot is not None  # rank 0 always publishes
        return snapshot

    def save_hf(self, out_dir: str) -> str:
        return ray.get([r.save_hf.remote(out_dir) for r in self.ranks])[0]

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
