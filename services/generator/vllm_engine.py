"""The vLLM ``RolloutEngine``: sample groups with behaviour log-probs, swap weights in place.

The same code drives CUDA vLLM: only the engine arguments differ (see ``build_llm``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from services.common.config import GeneratorConfig, ModelConfig
from services.common.messages import Rollout, RolloutTask, TensorEntry
from services.generator.rpc import WORKER_EXTENSION, EngineRpc
from services.generator.vllm_backend import build_llm, completions, sampling_params

logger = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length"}
# safetensors' header dtype codes -> the torch dtype names a manifest records (``weights.dtype_name``)
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class WeightMismatchError(ValueError):
    """A snapshot whose tensors do not match the served model's checkpoint (names, dtypes, shapes)."""


def checkpoint_manifest(model_dir: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a HF safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; the generator needs a HF checkpoint")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = handle.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                out[name] = (dtype, tuple(sl.get_shape()))
    return out


def validate_manifest(
    manifest: Sequence[TensorEntry], expected: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Refuse a snapshot that is not exactly the served model's tensors; a bad reload kills vLLM."""
    got = {e.name: (e.dtype, tuple(e.shape)) for e in manifest}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
    if missing or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {extra[:5]}" if extra else "",
                ", ".join(f"{n}: got {got[n]}, served {expected[n]}" for n in wrong[:5]),
            )
            if part
        )
        raise WeightMismatchError(f"snapshot does not match the served checkpoint: {detail}")


class VllmRolloutEngine:
    """A ``vllm.LLM`` with the weight-sync worker extension."""

    def __init__(
        self,
        model_dir: str | Path,
        model: ModelConfig,
        gen: GeneratorConfig,
        *,
        seed: int = 0,
        in_process: bool = True,
    ) -> None:
        # In-process vLLM starts and samples faster on CPU but pins this process's torch to one thread:
        # right for a generator actor, which does nothing else.
        self.model_dir, self.model_cfg, self.gen, self.seed = str(model_dir), model, gen, seed
        self.in_process = in_process
        self.expected = checkpoint_manifest(self.model_dir)
        self.restarts = 0
        self._build()

    def _build(self) -> None:
        self.llm = build_llm(
            self.model_dir,
            seed=self.seed,
            dtype=self.model_cfg.dtype,
            max_model_len=self.model_cfg.max_model_len,
            kv_cache_memory_bytes=int(self.gen.kv_cache_gib * 1024**3),
            enforce_eager=self.gen.enforce_eager,
            max_num_seqs=self.gen.max_num_seqs,
            worker_extension_cls=WORKER_EXTENSION,
            in_process=self.in_process,
        )
        self.rpc = EngineRpc(self.llm)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, tasks: Sequence[RolloutTask]) -> list[list[Rollout]]:
        """``task.group_size`` samples per task, all with the weights currently loaded."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=t.prompt_token_ids.tolist()) for t in tasks]
        params = [
            sampling_params(
                t.group_size,
                t.sampling.temperature,
                t.sampling.top_p,
                t.sampling.max_tokens,
                t.sampling_seed(self.seed),
            )
            for t in tasks
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Rollout(token_ids=tokens, logprobs=lps, finish_reason=_FINISH.get(finish, "abort"), text=text)
                for tokens, lps, text, finish in completions(out, self.tokenizer)
            ]
            for out in outputs
        ]

    def load_weights(self, payload_path: Path, manifest: tuple[TensorEntry, ...]) -> None:
        """Validate, then reload in place; if vLLM dies in the reload, recreate it and retry once."""
        validate_manifest(manifest, self.expected)
        try:
            self.rpc.reload_weights(str(payload_path), manifest)
        except Exception:  # a failed reload leaves the engine unusable: rebuild it
            logger.exception("in-place reload failed; recreating the vLLM engine")
            self.restarts += 1
            self.shutdown()
            self._build()
            self.rpc.reload_weights(str(payload_path), manifest)
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            try:
                engine.llm_engine.engine_core.shutdown()
            except Exception:  # best effort at teardown; the process may already be gone
                logger.warning("vLLM engine shutdown raised", exc_info=True)
            self.llm = None
