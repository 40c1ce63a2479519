"""Where prompts come from: the training and held-out problems of the configured task, and the training
problems tokenized into ``RolloutTask``s in a fixed order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from services.common.config import RunConfig
from services.common.data.countdown import generate_problems, load_countdown_tasks
from services.common.data.math import load_math_problems
from services.common.data.problems import Problem, countdown_problem, math_problem
from services.common.messages import RolloutTask, SamplingParams


def load_problems(cfg: RunConfig, path: str) -> list[Problem]:
    """Every problem of a dataset file (local or ``hf://datasets/...``) of the run's task."""
    data = cfg.data
    if data.task == "math":
        return [math_problem(p, data.prompt_template) for p in load_math_problems(path)]
    return [countdown_problem(p, data.prompt_template) for p in load_countdown_tasks(path)]


def eval_problems(cfg: RunConfig) -> list[Problem]:
    """The held-out evaluation problems: the first ``coordinator.eval_problems`` of ``data.eval_path``,
    or (Countdown without a file) the tiny model's generated held-out set."""
    n = cfg.coordinator.eval_problems
    if cfg.data.eval_path:
        return load_problems(cfg, cfg.data.eval_path)[:n]
    from services.common.tiny import heldout_problems

    return [countdown_problem(p) for p in heldout_problems(n)]


def training_problems(cfg: RunConfig, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """The run's training set, minus any problem of ``exclude`` (the held-out evaluation set)."""
    data = cfg.data
    if data.train_path:
        problems = load_problems(cfg, data.train_path)
    else:
        generated = generate_problems(
            data.train_size,
            data.seed,
            min_nums=data.min_nums,
            max_nums=data.max_nums,
            max_num=data.max_num,
            max_target=data.max_target,
        )
        problems = [countdown_problem(p, data.prompt_template) for p in generated]
    held = {p.key for p in exclude}
    kept = [p for p in problems if p.key not in held]
    if not kept:
        raise ValueError(f"no training problems left after removing {len(held)} held-out ones; check data.*")
    return kept


def rl_exclusions(cfg: RunConfig, heldout: Sequence[Problem]) -> list[Problem]:
    """Problems the RL set must not contain: the held-out ones, and (``data.exclude_sft_problems``) the
    shipped tiny model's fine-tuning problems, which it has memorised and would only teach it to repeat."""
    out = list(heldout)
    if cfg.data.exclude_sft_problems and cfg.model.path == "tiny:countdown":
        from services.common.tiny import TinySpec, train_problems

        out += [countdown_problem(p) for p in train_problems(TinySpec())]
    return out


class TaskSource:
    """Deterministic stream of tasks: task ``i`` is the same on every run with the same config.

    Epochs cycle through the problems, each in a fresh seeded order; ``position`` is the cursor a
    resumed coordinator restores.
    """

    def __init__(self, cfg: RunConfig, problems: Sequence[Problem], tokenizer: Any) -> None:
        self.cfg, self.problems, self.tokenizer = cfg, list(problems), tokenizer
        self.position = 0
        self._order: list[int] = []
        self._epoch = -1

    def _problem(self, i: int) -> Problem:
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
        gen = self.cfg.generator
        return RolloutTask(
            task_id=f"{self.cfg.coordinator.run_name}-t{i}",
            prompt_token_ids=self.tokenizer(p.prompt)["input_ids"],
            prompt_text=p.prompt,
            task_kind=self.cfg.data.task,
            reference=p.reference,
            group_size=self.cfg.coordinator.group_size,
            sampling=SamplingParams(
                temperature=gen.temperature,
                top_p=gen.top_p,
                max_tokens=gen.max_tokens,
                seed=gen.seed,
                seed_key=f"t{i}",  # the stream position, not the task id: the run name stays out
            ),
            admit_version=admit_version,
        )
