"""Ray actor wrapper of the generator: wires vLLM, the queue and the weight transport, runs the loop."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from services.common.config import RunConfig
from services.common.logs import setup_logging
from services.common.paths import set_cache_env
from services.common.stats import GeneratorStats


class EngineThread:
    """The engine ``build()`` returns, built on a thread of its own and called only there.

    This actor's methods run on Ray's pool threads (it takes control calls while ``run()`` loops), and from
    one of those an in-process vLLM CPU engine sampled a 16 x 8 batch in 0.50 s against 0.34 s from the
    thread that built it (two CPUs, the tiny model; the same thread count and affinity in both, so most
    likely the OpenMP state vLLM's worker sets up on its building thread). Calls are serialised: one at a
    time, in the order they come."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self._engine = self._thread.submit(build).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._engine, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._thread.submit(attr, *args, **kwargs).result()


@ray.remote(max_concurrency=4)
class GeneratorActor:
    """One vLLM engine. ``run()`` loops until ``stop()``; the other methods are control calls."""

    def __init__(self, cfg: RunConfig, model_dir: str, redis_url: str, index: int) -> None:
        set_cache_env()
        setup_logging(f"generator-{index}")
        from services.common.metrics import Metrics
        from services.common.queue import StreamQueue
        from services.common.weights import make_transport
        from services.generator.vllm_engine import VllmRolloutEngine
        from services.generator.worker import Generator

        self.cfg = cfg
        run = cfg.coordinator.run_name
        self.engine = EngineThread(
            lambda: VllmRolloutEngine(model_dir, cfg.model, cfg.generator, seed=cfg.generator.seed + index)
        )
        queue = StreamQueue(redis_url, run, block_ms=cfg.queue.block_ms)
        queue.ensure_groups()
        self.gen = Generator(
            self.engine,
            queue,
            make_transport(cfg.weights, redis_url, run),
            consumer=f"gen-{index}",
            batch_tasks=cfg.coordinator.prompts_per_step,
            claim_idle_ms=cfg.queue.claim_idle_ms,
            metrics=Metrics(run, enabled=cfg.metrics.enabled, generator=f"gen-{index}"),
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()  # vLLM's LLM is not thread-safe: one batch or one eval at a time

    def ready(self) -> int:
        return self.gen.version

    def run(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not self._stop.is_set():
            with self._lock:
                try:
                    self.gen.step(block_ms=min(self.cfg.queue.block_ms, 200))
                except EngineDeadError:
                    # A dead engine cannot recover in this process: exit so Ray restarts the actor (its
                    # loop is retried on the new one) instead of leaving it wedged. Its tasks stay pending.
                    logging.getLogger(__name__).critical(
                        "vLLM engine died; exiting for a restart", exc_info=True
                    )
                    os._exit(1)

    def sample(self, payloads: list[bytes], record: bool = True) -> list[bytes]:
        """Queue-less sampling of encoded tasks (evaluation; the synchronous reference loop of the tests);
        ``record`` counts them in the training statistics."""
        from services.common.messages import RolloutTask, decode, encode

        with self._lock:
            groups = self.gen.sample([decode(p, RolloutTask) for p in payloads], record=record)
        return [encode(g) for g in groups]

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> GeneratorStats:
        return dataclasses.replace(
            self.gen.stats, version=self.gen.version, engine_restarts=self.engine.restarts
        )
