"""The GPU learner check of issue 8: the project's own learner step on one H100/H200.

A randomly initialised Qwen2-0.5B-shaped model (transformers ``Qwen2Config``, no download) in bf16,
8 sequences x 2048 tokens (128 prompt + 1920 response tokens each, groups of K = 8), through
``LearnerEngine`` (DeepSpeed ZeRO ``--zero`` with a torch AdamW, nccl, world size 1), timing
``train_step`` (proximal pass + one optimizer update) for:

- the log-prob path: ``chunked`` (the project's, 1024-token chunks recomputed in the backward),
  ``naive`` (full-vocab fp32 logits) and ``fused`` (a fused linear-cross-entropy kernel:
  ``liger-kernel`` or ``cut-cross-entropy``, whichever is importable and faster; CUDA only);
- the objective: ``lpo_fwd`` against ``pg`` on the chunked path.

Per variant: seconds per step (median of ``--steps`` after 2 warm-up steps), tokens/s, MFU
(6 x params x tokens / step time / the GPU's dense bf16 peak) and peak CUDA memory. Writes
``bench/results/gpu_learner.json`` with the GPU's name. Goal (issue 8): the chunked path's memory
(<= 25 GiB here) at a speed at or above the naive path, and MFU >= 30 %.

On the device machine (see docs/RESULTS.md, "GPU learner", for the carried wheels):
    PYTHONPATH=$PWD:$PWD/.gpu-site python bench/gpu_learner.py --out $OUT
Here, a CPU smoke run of the same code on a small shape:
    python bench/gpu_learner.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import REPO, synthetic_groups  # bench/common.py (puts the repository on sys.path)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def _fused_logprobs():
    """A fused linear + log-softmax gather, if a kernel package is importable (CUDA only): returns
    ``(fn(hidden (M,H), weight (V,H), targets (M,)) -> log p (M,), name)`` or None. The learner needs
    per-token gradients (each token's log-prob is weighted by its sequence's coefficient), so the
    kernel must back-propagate an unreduced loss: cut-cross-entropy does (``reduction="none"``); Liger's
    kernel folds the gradient into its forward for a scalar loss and is tried second."""
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(hidden, weight, targets):
            return -linear_cross_entropy(hidden, weight, targets, reduction="none")

        return cce, "cut-cross-entropy"
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(hidden, weight, targets):
            return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")

        return liger, "liger-kernel"
    except ImportError:
        return None


_LEARNER_HEADS: dict[str, object] = {}  # the learner's own head paths, kept to restore them


def _install_logprob_path(kind: str) -> str:
    """Replace the head step of the learner's ``response_logprobs`` (its ``fused_logprobs`` and
    ``checkpointed_logprobs``) with the variant; the decoder pass stays the learner's own, so the variants
    differ only in how the head's log-probs are computed. Returns the variant's name."""
    import torch
    import torch.nn.functional as F

    from services.learner import logprobs

    if not _LEARNER_HEADS:
        _LEARNER_HEADS.update(fused=logprobs.fused_logprobs, checkpointed=logprobs.checkpointed_logprobs)
    if kind == "chunked":
        logprobs.fused_logprobs = _LEARNER_HEADS["fused"]
        logprobs.checkpointed_logprobs = _LEARNER_HEADS["checkpointed"]
        return "the learner's default (FusedLinearLogprob: logits never kept, recomputed per vocab slice)"
    fused = _fused_logprobs() if kind == "fused" else None
    if kind == "fused" and fused is None:
        raise RuntimeError("no fused kernel importable: carry liger-kernel or cut-cross-entropy")

    def head_logprobs(project, weight, flat_h, flat_y, temperature, with_entropy):
        if kind == "naive":
            logits = project(flat_h).float() / temperature
            flat = logits.gather(-1, flat_y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        else:
            flat = fused[0](flat_h / temperature, weight, flat_y).float()
        return flat, (torch.zeros_like(flat) if with_entropy else None)  # entropy not measured here

    def linear_head(flat_h, flat_y, weight, bias, *, temperature=1.0, with_entropy=False, **_):
        project = lambda h: F.linear(h, weight, bias)  # noqa: E731
        return head_logprobs(project, weight, flat_h, flat_y, temperature, with_entropy)

    def module_head(flat_h, flat_y, head, *, temperature=1.0, with_entropy=False, **_):
        return head_logprobs(head, head.weight, flat_h, flat_y, temperature, with_entropy)

    logprobs.fused_logprobs, logprobs.checkpointed_logprobs = linear_head, module_head
    return "naive (full-vocab fp32 logits)" if kind == "naive" else f"fused ({fused[1]})"


def _model_dir(tmp: Path, smoke: bool) -> tuple[Path, int]:
    """A random Qwen2-0.5B-shaped model saved as an HF folder (the learner loads a folder)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if smoke:
        cfg = Qwen2Config(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
    else:  # Qwen2-0.5B's shape
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True, rope_theta=1_000_000.0)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the code runs)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--variants", nargs="+", default=["chunked/lpo_fwd", "naive/lpo_fwd", "fused/lpo_fwd",
                                                          "chunked/pg"])  # fmt: skip
    args = parser.parse_args()
    import tempfile

    import torch

    from services.common.config import build_config
    from services.learner.engine import LearnerEngine

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    seqs, prompt, response = (8, 16, 48) if args.smoke else (8, 128, 1920)
    dtype = "float32" if args.smoke else "bfloat16"
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n_params = _model_dir(Path(tmp), args.smoke)
        for variant in args.variants:
            path, objective = variant.split("/")
            if path == "fused" and (not cuda or _fused_logprobs() is None):
                rows.append(
                    {"variant": variant, "skipped": "no CUDA" if not cuda else "no fused kernel installed"}
                )
                print(rows[-1], flush=True)
                continue
            try:
                label = _install_logprob_path(path)
            except RuntimeError as exc:
                rows.append({"variant": variant, "skipped": str(exc)})
                continue
            cfg = build_config({}, [f"learner.objective={objective}", "learner.updates_per_batch=1",
                                    "learner.micro_batch_groups=1", f"learner.zero_stage={args.zero}",
                                    "learner.lr=1e-6"])  # fmt: skip
            engine = LearnerEngine(str(model_dir), cfg.learner, dtype=dtype)
            groups = synthetic_groups(seqs // 8, 8, prompt, response, engine.module.config.vocab_size)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            try:
                for i in range(args.steps + 2):
                    engine.version = 0
                    started = time.perf_counter()
                    engine.train_step(groups)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - started)
            except Exception as exc:  # a kernel that cannot back-propagate this loss: record, go on
                rows.append(
                    {"variant": variant, "logprob_path": label, "failed": f"{type(exc).__name__}: {exc}"}
                )
                print(rows[-1], flush=True)
                del engine
                continue
            step_s = statistics.median(times)
            tokens = seqs * (prompt + response)
            # Forward + backward of the update (6 N per token) plus the proximal forward (2 N per token).
            flops = 8 * n_params * tokens
            row = {
                "variant": variant,
                "logprob_path": label,
                "objective": objective,
                "step_s": round(step_s, 4),
                "tokens_per_s": round(tokens / step_s),
                "mfu": round(flops / step_s / (peak_tflops * 1e12), 4) if peak_tflops and cuda else None,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            }
            rows.append(row)
            print(row, flush=True)
            del engine
            if cuda:
                torch.cuda.empty_cache()
    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "model": "Qwen2-0.5B-shaped, random init" if not args.smoke else "smoke shape",
        "params": n_params,
        "dtype": dtype,
        "tokens_per_step": seqs * (prompt + response),
        "zero_stage": args.zero,
        "mfu_flops": "8 x params x tokens per step (proximal forward + update forward/backward)",
        "rows": rows,
    }
    name = "gpu_learner_smoke.json" if args.smoke else "gpu_learner.json"
    out = Path(args.out) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
