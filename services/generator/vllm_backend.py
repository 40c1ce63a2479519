"""vLLM backend: build an engine that starts fast on CPU, and sample responses with per-token log-probs.

Why :func:`build_llm` sets what it sets:

* ``logprobs_mode="processed_logprobs"``: log-probs after temperature and top-p, i.e. of the distribution
  the token was drawn from, which is the behaviour policy the off-policy correction needs.
* an explicit ``kv_cache_memory_bytes``: on CPU, ``gpu_memory_utilization`` is a share of host RAM that must
  be free at start-up; an explicit size skips that check (and, with ``enforce_eager``, the warm-up pass).
* ``enforce_eager``: no TorchInductor compilation, which takes minutes on a small CPU.
* ``enable_chunked_prefill=False``: a chunked prefill rewinds the request's random generator, which CPU
  generators cannot do, so per-request seeds need whole-prompt prefills.
* ``in_process=True``: the engine in this process starts and samples faster than in child processes (each
  re-imports vLLM), but binds this process's OMP threads and leaves torch at one thread for good: only for
  a process that does nothing else CPU-heavy with torch (a generator actor, a CLI, a test subprocess).

The CPU attention backend takes head sizes 32, 64, 80, ..., 256, 512 only.
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
    max_num_seqs: int | None = None,
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
    """vLLM ``SamplingParams`` for ``n`` samples that also return each sampled token's own log-prob.

    The engine does no per-token text work: no incremental detokenization (``completions`` decodes each
    response once, from its token ids) and the log-probs in vLLM's flat lists rather than a dict of
    ``Logprob`` objects (each with its decoded token) per sampled token."""
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
        detokenize=False,
        flat_logprobs=True,
    )


def completions(out, tokenizer) -> list[tuple[list[int], list[float], str, str]]:
    """``(token_ids, sampled-token log-probs, text, finish_reason)`` of each child of a ``RequestOutput``,
    in child order; the text is ``tokenizer``'s decoding of the token ids (special tokens skipped, as
    vLLM's own detokenizer does). Log-probs are clamped to <= 0 (fp rounding can give +1e-7)."""
    children = sorted(out.outputs, key=lambda c: c.index)
    texts = tokenizer.batch_decode([list(c.token_ids) for c in children], skip_special_tokens=True)
    result = []
    for comp, text in zip(children, texts, strict=True):
        flat = comp.logprobs
        if flat is None:
            raise RuntimeError("vLLM returned no logprobs although SamplingParams.logprobs=0 was set")
        # logprobs=0: each position holds one entry, the sampled token's own
        sampled = [flat.token_ids[i] for i in flat.start_indices]
        if sampled != list(comp.token_ids) or len(flat.logprobs) != len(sampled):
            raise RuntimeError(
                "vLLM's flat logprobs do not hold exactly the sampled tokens, one per position"
            )
        lps = [min(float(x), 0.0) for x in flat.logprobs]
        result.append((list(comp.token_ids), lps, text, str(comp.finish_reason)))
    return result
