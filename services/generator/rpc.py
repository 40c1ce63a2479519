"""The one place that names vLLM ``collective_rpc`` methods (they live in ``worker_ext``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.messages import TensorEntry

if TYPE_CHECKING:
    from vllm import LLM

WORKER_EXTENSION = "services.generator.worker_ext.WeightSyncExtension"


class EngineRpc:
    """Typed wrappers over ``LLM.collective_rpc`` for the worker extension's methods."""

    def __init__(self, llm: LLM, timeout_s: float = 300.0) -> None:
        self.llm, self.timeout_s = llm, timeout_s

    def reload_weights(self, path: str, manifest: tuple[TensorEntry, ...]) -> int:
        rows = [(e.name, e.dtype, tuple(e.shape), e.offset, e.nbytes) for e in manifest]
        counts = self.llm.collective_rpc("lpo_reload_weights", timeout=self.timeout_s, args=(path, rows))
        return int(counts[0])
