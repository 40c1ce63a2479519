"""Learner cost: step time of ``lpo_fwd`` / ``lpo_rev`` against ``pg`` on the same batch (the paper
claims the listwise target costs nothing extra).

One DeepSpeed rank in this process (gloo, ZeRO 0, fp32), the tiny model, the tiny config's batch shape:
16 groups x 8 responses x 48 tokens, ``updates_per_batch`` 2. Every objective starts from the same
weights on the same batch (fixed rewards and behaviour log-probs); one warm-up step, then ``--steps``
timed ``train_step`` calls (proximal pass + 2 optimizer updates). The objective's own arithmetic is
O(K) per group against O(tokens x model) for the forward/backward, so any gap should vanish here,
where the model is smallest relative to it.

Subnormal regression rows: ``lpo_fwd`` on the same batch with its behaviour log-probs lowered per response
(``large_s_t_groups``) so that ``|s_t|`` is large and 7 of each group's 8 listwise weights are about
exp(-95) = 5e-42, below float32's normal range, and so are their tokens' gradients. Subnormal arithmetic
is slow on CPUs; the learner flushes subnormals to zero (``flush_denormals``), and the ``no-flush`` row
turns that off to show what it prevents.

    python bench/learner_step.py [--steps 8]

writes ``bench/results/learner_step.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from common import synthetic_groups, write_result

# (objective, batch, flush subnormals): the three objectives, then the subnormal regression rows
ROWS = (
    ("pg", "synthetic", True),
    ("lpo_fwd", "synthetic", True),
    ("lpo_rev", "synthetic", True),
    ("lpo_fwd", "large-s_t", True),
    ("lpo_fwd", "large-s_t", False),
)


def large_s_t_groups(engine, groups: list, gap: float = 95.0) -> list:
    """``groups`` with their behaviour log-probs lowered so that, under ``engine``'s current weights, each
    group's responses 1..K-1 sit ``gap`` nats of ``s_t`` (sequence log-ratio to the behaviour policy)
    below its response 0: float32's normal range ends at exp(-87.3), so their listwise weights, their
    coefficients and their tokens' gradients are subnormal (exp(-95) = 5e-42)."""
    import numpy as np
    import torch

    from services.learner.batch import pack_groups

    with torch.no_grad():
        logp, _ = engine.logprobs(pack_groups(groups, engine.pad_id), grad=False)  # (N, T), 0 on padding
    out, row = [], 0
    for group in groups:
        k = len(group.rollouts)
        s_t = [float(logp[row + j].sum()) - float(r.logprobs.sum()) for j, r in enumerate(group.rollouts)]
        row += k
        # lowering response j's behaviour log-probs by shift_j in total raises its s_t by shift_j; every
        # shift >= 0 keeps the log-probs <= 0
        need = [gap - (s_t[0] - s) for s in s_t[1:]]  # shift_0 - shift_j for the gap
        shift0 = max([0.0, *need])
        shifts = [shift0] + [shift0 - n for n in need]
        rollouts = tuple(
            dataclasses.replace(r, logprobs=r.logprobs - np.float32(shift / r.logprobs.size))
            for r, shift in zip(group.rollouts, shifts, strict=True)
        )
        out.append(dataclasses.replace(group, rollouts=rollouts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    import services.learner.engine as engine_mod
    from services.common.config import build_config
    from services.common.tiny import build_tiny
    from services.learner.engine import LearnerEngine

    model_dir = str(build_tiny())
    torch.set_num_threads(2)
    flush = engine_mod.flush_denormals
    rows = []
    for objective, batch, flushed in ROWS:
        # the no-flush row: the engine's flush calls switch the flags off instead
        engine_mod.flush_denormals = flush if flushed else (lambda enabled=True: flush(False))
        cfg = build_config(
            {},
            [
                f"learner.objective={objective}",
                "learner.updates_per_batch=2",
                "learner.micro_batch_groups=8",
                "learner.lr=1e-4",
            ],
        )
        engine = LearnerEngine(model_dir, cfg.learner)
        vocab = engine.module.config.vocab_size
        groups = synthetic_groups(16, 8, 24, 48, vocab)
        if batch == "large-s_t":
            groups = large_s_t_groups(engine, groups)
        engine.train_step(groups)  # warm-up
        times, metrics = [], {}
        for _ in range(args.steps):
            engine.version = 0  # the same batch stays fresh (lag 0) every step
            started = time.perf_counter()
            metrics = engine.train_step(groups)
            times.append(time.perf_counter() - started)
        rows.append(
            {
                "objective": objective,
                "batch": batch,
                "flush_subnormals": flushed,
                "abs_s_t": round(metrics["abs_s_t_fresh"], 1),
                "median_step_s": round(statistics.median(times), 4),
                "min_step_s": round(min(times), 4),
                "steps": args.steps,
                "proximal_s": round(metrics["proximal_s"], 4),
                "update_s": round(metrics["update_s"], 4),
            }
        )
        print(rows[-1])
        del engine
    engine_mod.flush_denormals = flush
    pg = rows[0]["median_step_s"]
    for r in rows:
        r["time_vs_pg"] = round(r["median_step_s"] / pg, 3)
    out = write_result(
        "learner_step",
        {
            "model": "tiny countdown (1.07M params, fp32)",
            "batch": "16 groups x 8 x 48 tokens",
            "device": "cpu (2 threads), DeepSpeed ZeRO 0, gloo",
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
