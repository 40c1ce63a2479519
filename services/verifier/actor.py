"""Ray actor wrapper of a verifier worker."""

from __future__ import annotations

import dataclasses
import threading

import ray

from services.common.config import RunConfig
from services.common.logs import setup_logging


@ray.remote(max_concurrency=2)
class VerifierActor:
    """Scores ``:rollouts`` into ``:groups`` until ``stop()``."""

    def __init__(self, cfg: RunConfig, redis_url: str, index: int) -> None:
        setup_logging(f"verifier-{index}")
        from services.common.metrics import Metrics
        from services.common.queue import StreamQueue
        from services.verifier.worker import VerifierWorker

        if cfg.data.task != "countdown":  # only code / math runs need the sandbox and the math pool
            from services.verifier.rules import configure_rules
            from services.verifier.sandbox.probe import select_sandbox

            sandbox, _ = select_sandbox(
                cfg.verifier.sandbox, fallback=cfg.verifier.sandbox_fallback, python=cfg.verifier.python
            )
            configure_rules(cfg.verifier, sandbox)
        queue = StreamQueue(redis_url, cfg.coordinator.run_name, block_ms=cfg.queue.block_ms)
        queue.ensure_groups()
        run = cfg.coordinator.run_name
        self.worker = VerifierWorker(
            queue,
            consumer=f"verifier-{index}",
            task_kind=cfg.data.task,
            claim_idle_ms=cfg.queue.claim_idle_ms,
            metrics=Metrics(run, enabled=cfg.metrics.enabled),
        )
        self.block_ms = min(cfg.queue.block_ms, 200)
        self._stop = threading.Event()

    def ready(self) -> bool:
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            self.worker.step(block_ms=self.block_ms)

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return dataclasses.asdict(self.worker.stats)
