"""Peak memory (and time) of the learner's token log-prob computation: the paths of
``services/learner/logprobs.py`` against a naive one that materialises the full fp32 logits.

Issue 8, system costs: vocab 151,936 (Qwen2/3) and 2,048 response tokens, forward + backward. The model
is a stand-in whose only large part is the real vocab projection (an embedding and one linear layer feed
``lm_head``), so the figure isolates what the paths differ in. Each measurement runs in a fresh
process: the peak resident set (VmHWM, reset through /proc/self/clear_refs after set-up) is what the
log-prob computation and its backward added. CPU only here; the GPU script measures CUDA memory.

Paths: ``naive`` (full fp32 logits, autograd); ``checkpointed-N`` (the head called per N-token chunk under
activation checkpointing, the ZeRO-3 path); ``fused-N`` (the learner's default, ``FusedLinearLogprob``:
logits recomputed in the backward by vocab slices, the head's weight gradient written in place). The
floor of any path is the head's weight gradient (vocab x hidden x 4 B) plus one chunk of fp32 logits
(N x vocab x 4 B), reported next to each run.

    python bench/logprob_memory.py [--tokens 2048] [--vocab 151936] [--hidden 896] [--rounds 3]

writes ``bench/results/logprob_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from common import REPO, RESULTS  # bench/common.py (puts the repository on sys.path)

from services.learner.logprobs import DEFAULT_CHUNK_TOKENS

MODES = ("naive", "checkpointed-1024", "checkpointed-256", f"fused-{DEFAULT_CHUNK_TOKENS}", "fused-1024")


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _measure(mode: str, tokens: int, vocab: int, hidden: int) -> dict:
    """One mode in this process: set up, reset the peak, forward + backward, read the peak."""
    import torch

    from services.learner.logprobs import checkpointed_logprobs, response_logprobs, response_rows

    torch.manual_seed(0)
    torch.set_num_threads(2)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.proj = torch.nn.Linear(hidden, hidden)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(last_hidden_state=torch.tanh(self.proj(self.embed(input_ids))))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder()
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

        def get_decoder(self) -> Decoder:
            return self.decoder

        def get_output_embeddings(self) -> torch.nn.Linear:
            return self.lm_head

    model = Model()

    def step(n: int) -> torch.Tensor:
        input_ids = torch.randint(0, vocab, (1, n + 1))  # one prompt token, then n response tokens
        if mode == "naive":
            h = model.get_decoder()(input_ids, torch.ones_like(input_ids)).last_hidden_state
            logits = model.lm_head(h[:, :-1]).float()  # (1, T, V) fp32: every position's full logits
            logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        else:
            path, chunk = mode.split("-")[0], int(mode.split("-")[1])
            positions = torch.arange(1, n + 1).unsqueeze(0)
            mask = torch.ones_like(positions, dtype=torch.bool)
            ones = torch.ones_like(input_ids)
            if path == "fused":  # the learner's entry point, as the engine calls it
                logp, _ = response_logprobs(model, input_ids, ones, positions, mask, chunk_tokens=chunk)
            else:
                _, flat_h, flat_y = response_rows(model, input_ids, ones, positions, mask)
                logp, _ = checkpointed_logprobs(flat_h, flat_y, model.lm_head, chunk_tokens=chunk)
        logp.sum().backward()
        return logp

    for p in model.parameters():  # allocate the gradients up front: they are not what is compared
        p.grad = torch.zeros_like(p)
    step(8)  # warm-up: lazy imports and first-call set-up are not the log-prob computation's memory
    torch.manual_seed(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _peak_kib()
    started, cpu_started = time.perf_counter(), time.process_time()
    logp = step(tokens)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "mode": mode,
        "peak_added_mib": round((_peak_kib() - base) / 1024, 1),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),  # all threads: less sensitive than wall time to a busy host
        "logp_sum": float(logp.detach().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode; the median is reported")
    parser.add_argument("--out", type=Path, default=RESULTS / "logprob_memory.json", help="the JSON written")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.tokens, args.vocab, args.hidden)))
        return
    # Rounds of every mode in turn, each in a fresh process: the machine's speed drifts over minutes, and
    # interleaving puts that drift on every mode alike; the median round is reported.
    samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode]
            cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            samples[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(samples[mode][-1], flush=True)
    runs = []
    for mode in MODES:
        rounds = samples[mode]
        runs.append(
            {
                "mode": mode,
                "peak_added_mib": statistics.median(r["peak_added_mib"] for r in rounds),
                "seconds": statistics.median(r["seconds"] for r in rounds),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rounds),
                "seconds_rounds": [r["seconds"] for r in rounds],
                "peak_added_mib_rounds": [r["peak_added_mib"] for r in rounds],
                "logp_sum": rounds[0]["logp_sum"],
            }
        )
    naive = runs[0]
    head_grad_mib = args.vocab * args.hidden * 4 / 2**20  # the head's fp32 weight gradient

    def floor_mib(mode: str) -> float:  # the weight gradient + one chunk of fp32 logits
        chunk = min(int(mode.split("-")[1]), args.tokens) if "-" in mode else args.tokens
        return head_grad_mib + chunk * args.vocab * 4 / 2**20

    for r in runs:
        r["memory_vs_naive"] = round(r["peak_added_mib"] / naive["peak_added_mib"], 3)
        r["time_vs_naive"] = round(r["seconds"] / naive["seconds"], 3)
        r["cpu_time_vs_naive"] = round(r["cpu_seconds"] / naive["cpu_seconds"], 3)
        r["floor_mib"] = round(floor_mib(r["mode"]), 1)
        r["floor_vs_naive"] = round(floor_mib(r["mode"]) / naive["peak_added_mib"], 3)
        # Same maths: the sums of log-probs agree to float32 rounding.
        assert abs(r["logp_sum"] - naive["logp_sum"]) <= 1e-4 * abs(naive["logp_sum"]), (r, naive)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    payload = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "device": "cpu",
        "fp32_logits_mib": round(logits_mib, 1),
        "head_weight_grad_mib": round(head_grad_mib, 1),
        "default_chunk_tokens": DEFAULT_CHUNK_TOKENS,
        "rounds": args.rounds,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
