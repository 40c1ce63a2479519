"""Ray actor wrapper of a verifier worker."""

from __future__ import annotations

import dataclasses
import threading

import ray

from services.common.config import RunConfig
from services.common.logs import setup_logging
from services.common.stats import VerifierStats


@ray.remote(max_concurrency=3)  # the loop, a scoring call (evaluation) and a control call
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

    def score(self, payloads: list[bytes]) -> list[bytes]:
        """Queue-less scoring of encoded groups (evaluation) with this worker's configured rules."""
        from services.common.messages import ResponseGroup, decode, encode
        from services.verifier.scoring import score_group

        return [encode(score_group(decode(p, ResponseGroup))) for p in payloads]

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> VerifierStats:
        return dataclasses.replace(self.worker.stats)
