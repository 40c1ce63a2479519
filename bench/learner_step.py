"""Learner cost: step time of ``lpo_fwd`` / ``lpo_rev`` against ``pg`` on the same batch (the paper
claims the listwise target costs nothing extra).

One DeepSpeed rank in this process (gloo, ZeRO 0, fp32), the tiny model, the tiny config's batch shape:
16 groups x 8 responses x 48 tokens, ``updates_per_batch`` 2. Every objective starts from the same
weights on the same batch (fixed rewards and behaviour log-probs); one warm-up step, then ``--steps``
timed ``train_step`` calls (proximal pass + 2 optimizer updates). The objective's own arithmetic is
O(K) per group against O(tokens x model) for the forward/backward, so any gap should vanish here,
where the model is smallest relative to it.

    python bench/learner_step.py [--steps 8]

writes ``bench/results/learner_step.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import synthetic_groups, write_result

OBJECTIVES = ("pg", "lpo_fwd", "lpo_rev")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    from services.common.config import build_config
    from services.common.tiny import build_tiny
    from services.learner.engine import LearnerEngine

    model_dir = str(build_tiny())
    torch.set_num_threads(2)
    rows = []
    for objective in OBJECTIVES:
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
                "median_step_s": round(statistics.median(times), 4),
                "min_step_s": round(min(times), 4),
                "steps": args.steps,
                "proximal_s": round(metrics["proximal_s"], 4),
                "update_s": round(metrics["update_s"], 4),
            }
        )
        print(rows[-1])
        del engine
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
