"""Where prompts come from: the training problems, tokenized into ``RolloutTask``s in a fixed order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.config import RunConfig
from services.common.data.countdown import (
    CountdownProblem,
    format_prompt,
    generate_problems,
    load_countdown_tasks,
)
from services.common.messages import RolloutTask, SamplingParams


def _key(p: CountdownProblem) -> tuple[tuple[int, ...], int]:
    return tuple(sorted(p.nums)), p.target


def training_problems(cfg: RunConfig, exclude: Sequence[CountdownProblem] = ()) -> list[CountdownProblem]:
    """The run's training set, minus any problem of ``exclude`` (the held-out evaluation set)."""
    data = cfg.data
    if data.train_path:
        problems = load_countdown_tasks(Path(data.train_path))
    else:
        problems = generate_problems(
            data.train_size,
            data.seed,
            min_nums=data.min_nums,
            max_nums=data.max_nums,
            max_num=data.max_num,
            max_target=data.max_target,
        )
    held = {_key(p) for p in exclude}
    kept = [p for p in problems if _key(p) not in held]
    if not kept:
        raise ValueError(f"no training problems left after removing {len(held)} held-out ones; check data.*")
    return kept


def rl_exclusions(cfg: RunConfig, heldout: Sequence[CountdownProblem]) -> list[CountdownProblem]:
    """Problems the RL set must not contain: the held-out ones, and (``data.exclude_sft_problems``) the
    shipped tiny model's fine-tuning problems, which it has memorised and would only teach it to repeat."""
    out = list(heldout)
    if cfg.data.exclude_sft_problems and cfg.model.path == "tiny:countdown":
        from services.common.tiny import TinySpec, train_problems

        out += train_problems(TinySpec())
    return out


class TaskSource:
    """Deterministic stream of tasks: task ``i`` is the same on every run with the same config.

    Epochs cycle through the problems, each in a fresh seeded order; ``position`` is the cursor a
    resumed coordinator restores.
    """

    def __init__(self, cfg: RunConfig, problems: Sequence[CountdownProblem], tokenizer: Any) -> None:
        self.cfg, self.problems, self.tokenizer = cfg, list(problems), tokenizer
        self.position = 0
        self._order: list[int] = []
        self._epoch = -1

    def _problem(self, i: int) -> CountdownProblem:
        epoch, j = divmod(i, len(self.problems))
        if epoch != self._epoch:
            self._order = list(range(len(self.problems)))
            random.Random(self.cfg.data.seed * 7919 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.problems[self._order[j]]

    def next(self, admit_version: int) -> RolloutTask:
        i = self.position
        self.position += 1
        p = self._problem(i)
        prompt = format_prompt(p.nums, p.target)
        gen = self.cfg.generator
        return RolloutTask(
            task_id=f"{self.cfg.coordinator.run_name}-t{i}",
            prompt_token_ids=self.tokenizer(prompt)["input_ids"],
            prompt_text=prompt,
            task_kind=self.cfg.data.task,
            reference={"nums": list(p.nums), "target": p.target},
            group_size=self.cfg.coordinator.group_size,
            sampling=SamplingParams(
                temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_tokens, seed=gen.seed
            ),
            admit_version=admit_version,
        )
