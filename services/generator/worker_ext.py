"""Methods injected into every vLLM worker (``worker_extension_cls``) for in-place weight sync.

They run inside vLLM's worker process; the generator reaches them only through ``rpc.EngineRpc``.
Weights travel as a *path* to one contiguous payload file plus its manifest — never as partial
fused parameters: vLLM's own checkpoint loader (``is_checkpoint_format=True``) does the fusing
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) exactly as at start-up.
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def read_payload(
    path: str, manifest: list[tuple[str, str, tuple[int, ...], int, int]]
) -> dict[str, torch.Tensor]:
    """Tensors of a payload file: ``manifest`` rows are (name, dtype, shape, offset, nbytes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, dtype, shape, offset, nbytes in manifest:
        buf = raw[offset : offset + nbytes]
        out[name] = torch.frombuffer(bytearray(buf.tobytes()), dtype=_TORCH_DTYPES[dtype]).reshape(shape)
    return out


class WeightSyncExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's model runner."""

    def lpo_reload_weights(
        self, path: str, manifest: list[tuple[str, str, tuple[int, ...], int, int]]
    ) -> int:
        """Load a full checkpoint-format state in place; returns the number of tensors loaded."""
        tensors = read_payload(path, manifest)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)

    def lpo_weight_checksum(self) -> float:
        """Sum of all parameters as float64: a cheap fingerprint that a reload changed the weights."""
        model = self.model_runner.get_model()
        return float(sum(p.detach().double().sum() for p in model.parameters()))
