"""The learner flushes subnormal floats to zero on every CPU thread it computes on (real DeepSpeed, tiny
model): a batch with a large ``|s_t|`` makes LPO's listwise weights subnormal, and without the flush the
backward carries them into every token's gradient, where CPU arithmetic on them is slow.

Runs in a fresh interpreter: the flush flags are per thread, and this test must see intra-op threads that
were started (unflushed) before the learner engine was built, as in any process that used torch first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
sys.path.insert(0, "bench")
import torch
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-39)  # subnormal
a = torch.full((256, 256), 1e-20)  # normal, but each product 1e-40 is subnormal

def survivors():  # on 2 threads: an elementwise op (OpenMP) and a matmul (BLAS on the same workers)
    return int((x * 0.5).count_nonzero()), int((a @ a).count_nonzero())

before = survivors()  # the intra-op workers exist now, with IEEE subnormals
import services.learner.engine as E
from common import synthetic_groups
from learner_step import large_s_t_groups
from services.common.config import LearnerConfig

cfg = LearnerConfig(objective="lpo_fwd", updates_per_batch=2, micro_batch_groups=8, lr=1e-4)
engine = E.LearnerEngine(sys.argv[1], cfg)
after_init = survivors()
tiny = torch.finfo(torch.float32).tiny
counts = {}

def spy(inputs, objective):  # d loss / d token log-prob: where the listwise weights enter the backward
    def hook(g):
        counts[flag] = counts.get(flag, 0) + int(((g != 0) & (g.abs() < tiny)).sum())
    inputs.logp.register_hook(hook)
    return real(inputs, objective)

real, E.policy_loss = E.policy_loss, spy
groups = large_s_t_groups(engine, synthetic_groups(4, 8, 8, 24, engine.module.config.vocab_size))
flush = E.flush_denormals
for flag in ("off", "on"):  # "off": the engine's flush calls switched to IEEE, the control
    E.flush_denormals = flush if flag == "on" else (lambda enabled=True: flush(False))
    engine.version = 0  # the batch stays fresh (lag 0): the same |s_t| both times
    metrics = engine.train_step(groups)
print(json.dumps({"before": before, "after_init": after_init, "after_step": survivors(),
                  "subnormal_grads": counts, "abs_s_t": metrics["abs_s_t_fresh"]}))
"""


def test_learner_flushes_subnormals_on_every_thread(tiny_model_dir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_model_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Before the engine: subnormals survive (at least on the worker threads), so the checks below can fail.
    assert out["before"][0] > 0 and out["before"][1] > 0, out
    assert out["after_init"] == [0, 0] and out["after_step"] == [0, 0], out
    # The batch does make subnormal token gradients under IEEE arithmetic, and none under the learner's.
    assert out["abs_s_t"] > 100.0, out
    assert out["subnormal_grads"]["off"] > 0, out
    assert out["subnormal_grads"].get("on", 0) == 0, out
