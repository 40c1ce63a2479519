"""At max_policy_lag 0 the asynchronous machinery (Redis streams, admission control, actor loops)
reproduces a plain synchronous loop exactly: same weights (snapshot sha256) and same metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from transformers import AutoTokenizer

from services.common.config import build_config
from services.common.messages import ResponseGroup, decode, encode
from services.coordinator.driver import run
from services.coordinator.evaluation import eval_tasks
from services.coordinator.runtime import Runtime
from services.coordinator.tasks import TaskSource, eval_sets, rl_exclusions, training_problems
from services.generator.client import GeneratorPool
from services.verifier.scoring import score_group

pytestmark = pytest.mark.slow

COMPARED = ("reward_mean", "loss", "grad_norm", "kl_forward", "kl_reverse", "entropy", "ess", "clip_fraction")


def _config(tmp_path: Path, name: str):
    return build_config(
        {},
        [
            "coordinator.steps=3",
            "coordinator.prompts_per_step=4",
            "coordinator.group_size=4",
            "coordinator.eval_every=0",
            "coordinator.eval_problems=8",
            "coordinator.max_policy_lag=0",
            "learner.lr=1e-4",
            f"coordinator.runs_dir={tmp_path}",
            f"coordinator.run_name={name}",
        ],
    )


def _synchronous_reference(cfg) -> tuple[str, list[dict]]:
    """generate -> score -> train -> publish, called directly on the same kind of actors; no queue."""
    rt = Runtime.start(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(rt.model_dir)
        (held,) = eval_sets(cfg)
        source = TaskSource(cfg, training_problems(cfg, exclude=rl_exclusions(cfg, held.problems)), tokenizer)
        c = cfg.coordinator
        gen = rt.generators[0]
        snapshot = rt.learner.publish()
        prompts = [tokenizer(p.prompt)["input_ids"] for p in held.problems]
        GeneratorPool(rt.generators).sample(eval_tasks(cfg, held, prompts, 0, snapshot.version))
        records = []
        for _ in range(c.steps):
            tasks = [source.next(admit_version=snapshot.version) for _ in range(c.prompts_per_step)]
            sampled = [
                decode(p, ResponseGroup) for p in ray.get(gen.sample.remote([encode(t) for t in tasks]))
            ]
            groups = [score_group(g) for g in sampled]
            metrics = rt.learner.train(groups)
            snapshot = rt.learner.publish()
            rewards = [r for g in groups for r in g.rewards]
            records.append({**metrics.as_json(), "reward_mean": sum(rewards) / len(rewards)})
        return snapshot.sha256, records
    finally:
        rt.stop()


def test_lag_zero_pipeline_reproduces_the_synchronous_loop(tiny_model_dir: str, tmp_path: Path) -> None:
    # Different run names and run directories: samples derive from the seed and config, not the name.
    summary = run(_config(tmp_path / "pipeline", "eq"))
    lines = (tmp_path / "pipeline" / "eq" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    ref_sha, ref_metrics = _synchronous_reference(_config(tmp_path / "reference", "eq-reference"))

    assert summary["final_version"] == 3 and summary["dropped_groups"] == 0
    assert all(m["lag_histogram"] == {"0": 4} for m in metrics)
    for got, want in zip(metrics, ref_metrics, strict=True):
        for key in COMPARED:
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
    assert summary["final_sha256"] == ref_sha  # bit-identical weights
