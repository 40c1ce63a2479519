"""Methods injected into every vLLM worker (``worker_extension_cls``) for in-place weight sync.

They run inside vLLM's worker process; the generator reaches them only through ``rpc.EngineRpc``.
Weights travel as a *path* to one contiguous payload file plus its manifest — never as partial
fused parameters: vLLM's own checkpoint loader (``is_checkpoint_format=True``) does the fusing
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) exactly as at start-up.
"""

from __future__ import annotations

import numpy as np

from services.common.messages import TensorEntry
from services.common.weights import unpack


class WeightSyncExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's model runner."""

    def lpo_reload_weights(
        self, path: str, manifest: list[tuple[str, str, tuple[int, ...], int, int]]
    ) -> int:
        """Load a full checkpoint-format state in place; ``manifest`` rows are ``TensorEntry`` fields
        (name, dtype, shape, offset, nbytes). Returns the number of tensors loaded."""
        entries = tuple(TensorEntry(*row) for row in manifest)
        tensors = unpack(np.fromfile(path, dtype=np.uint8), entries)  # views into one read of the file
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
