"""Ray actor wrapper of one learner rank."""

from __future__ import annotations

import ray

from services.common.config import RunConfig
from services.common.logs import setup_logging
from services.common.messages import ResponseGroup, WeightSnapshot, decode


@ray.remote
class LearnerRank:
    """A DeepSpeed rank; rank 0 also publishes weight snapshots."""

    def __init__(
        self, cfg: RunConfig, model_dir: str, redis_url: str, rank: int, world_size: int, master_port: int
    ) -> None:
        setup_logging(f"learner-{rank}")
        from services.common.paths import set_cache_env

        set_cache_env()
        from services.common.weights import make_transport
        from services.learner.engine import LearnerEngine, RankInfo

        self.rank = rank
        self.engine = LearnerEngine(
            model_dir,
            cfg.learner,
            info=RankInfo(rank=rank, world_size=world_size, master_port=master_port),
            dtype=cfg.model.dtype,
            sampling_temperature=cfg.generator.temperature,
        )
        self.transport = (
            make_transport(cfg.weights, redis_url, cfg.coordinator.run_name) if rank == 0 else None
        )

    def version(self) -> int:
        return self.engine.version

    def train_step(self, payloads: list[bytes]) -> dict[str, float]:
        groups = [decode(p, ResponseGroup) for p in payloads]
        return self.engine.train_step(groups)

    def publish(self) -> WeightSnapshot | None:
        """Every rank takes part (ZeRO-3 gathers); rank 0 publishes and returns the announcement."""
        state = dict(self.engine.state_items())
        if self.transport is None:
            return None
        return self.transport.publish(self.engine.version, state)

    def save_checkpoint(self, root: str, tag: str) -> None:
        self.engine.save_checkpoint(root, tag)

    def load_checkpoint(self, root: str, tag: str) -> int:
        return self.engine.load_checkpoint(root, tag)

    def save_hf(self, out_dir: str) -> str:
        return str(self.engine.save_hf(out_dir))
