"""Ray actor wrapper of one learner rank."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import ray

from services.common.config import RunConfig
from services.common.logs import setup_logging
from services.common.messages import ResponseGroup, WeightSnapshot, decode


@ray.remote
class LearnerRank:
    """A DeepSpeed rank; rank 0 also publishes weight snapshots."""

    def __init__(
        self, cfg: RunConfig, model_dir: str, redis_url: str, rank: int, world_size: int, rendezvous_key: str
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
            info=RankInfo(rank, world_size, store=_rendezvous(redis_url, rendezvous_key, rank, world_size)),
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


def _rendezvous(redis_url: str, key: str, rank: int, world_size: int, timeout_s: float = 600.0) -> Any:
    """The group's ``torch.distributed`` store (``None`` for a single rank): rank 0 listens on a port the
    kernel picks and posts ``host:port`` under ``key`` in Redis, one copy per other rank, who block on it
    (BLPOP).

    No port is chosen ahead of the bind, so none can be taken in between, and the address is the
    node rank 0 actually runs on (the ranks may sit on different nodes).
    """
    import torch.distributed as dist

    from services.common.redis_server import redis_client

    if world_size == 1:
        return None  # the engine opens its own store on a port the kernel picks
    timeout = timedelta(seconds=timeout_s)
    client = redis_client(redis_url, socket_timeout_s=timeout_s + 10)  # outlives the BLPOP
    try:
        if rank == 0:
            host = ray.util.get_node_ip_address()
            store = dist.TCPStore(host, 0, world_size, True, timeout, wait_for_workers=False)
            with client.pipeline() as pipe:
                pipe.rpush(key, *[f"{host}:{store.port}"] * (world_size - 1)).expire(key, 2 * int(timeout_s))
                pipe.execute()
            return store
        popped = client.blpop([key], timeout=timeout_s)
        if popped is None:
            raise TimeoutError(
                f"learner rank {rank}: rank 0 posted no address under {key} in {timeout_s:.0f} s"
            )
        host, port = popped[1].decode().rsplit(":", 1)
        return dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
    finally:
        client.close()
