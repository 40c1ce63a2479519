"""The tasks a run admits are seeded by ``generator.seed`` and their dataset position, not by the run
name: two runs of one config under different names admit the same prompts with the same sampling seeds,
a different ``generator.seed`` changes every seed, and no two positions share one (shipped tokenizer)."""

from __future__ import annotations

from transformers import AutoTokenizer

from services.common.config import build_config
from services.coordinator.tasks import TaskSource, eval_sets, rl_exclusions, training_problems


def _tasks(tiny_model_dir: str, name: str, seed: int, n: int = 64) -> list:
    cfg = build_config({}, [f"coordinator.run_name={name}", f"generator.seed={seed}"])
    held = [p for s in eval_sets(cfg) for p in s.problems]
    source = TaskSource(
        cfg,
        training_problems(cfg, exclude=rl_exclusions(cfg, held)),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    return [source.next(admit_version=0) for _ in range(n)]


def test_sampling_seeds_follow_the_seed_and_position_not_the_run_name(tiny_model_dir: str) -> None:
    a, b = _tasks(tiny_model_dir, "alpha", 0), _tasks(tiny_model_dir, "beta-run", 0)
    assert [t.task_id for t in a][:2] == ["alpha-t0", "alpha-t1"]  # ids stay unique per run ...
    assert [t.sampling_seed(99) for t in a] == [
        t.sampling_seed(99) for t in b
    ]  # ... the seeds do not follow them
    assert [t.prompt_text for t in a] == [t.prompt_text for t in b]
    assert len({t.sampling_seed(99) for t in a}) == len(a)
    other = _tasks(tiny_model_dir, "alpha", 1)
    assert all(x.sampling_seed(99) != y.sampling_seed(99) for x, y in zip(a, other, strict=True))
