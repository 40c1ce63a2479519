"""Where prompts come from: the training and held-out problems of the configured task, and the training
problems tokenized into ``RolloutTask``s in a fixed order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from services.common.config import EvalSetConfig, RunConfig
from services.common.data.code import load_code_problems
from services.common.data.countdown import CountdownProblem, generate_problems, load_countdown_tasks
from services.common.data.math import load_math_problems
from services.common.data.problems import Problem, code_problem, countdown_problem, math_problem
from services.common.messages import RolloutTask, SamplingParams
from services.coordinator.evaluation import EvalSet


def load_problems(cfg: RunConfig, path: str) -> list[Problem]:
    """Every problem of a dataset file (local or ``hf://datasets/...``) of the run's task."""
    data, where = cfg.data, cfg.data.row_filter
    if data.task == "math":
        return [math_problem(p, data.prompt_template) for p in load_math_problems(path, where)]
    if data.task == "code":
        return [code_problem(p, data.prompt_template) for p in load_code_problems(path, where)]
    return [countdown_problem(p, data.prompt_template) for p in load_countdown_tasks(path, where)]


def eval_sets(cfg: RunConfig) -> list[EvalSet]:
    """The run's evaluation sets (``data.eval_sets``; or one set ``heldout``: the first
    ``coordinator.eval_problems`` of ``data.eval_path``, or the tiny model's generated held-out set).

    Generated sets are held-out Countdown problems (never a fine-tuning problem of the tiny model), disjoint
    from each other; sets with the same ``nums`` filter are random parts of one sample (``_draw_generated``).
    """
    c, data = cfg.coordinator, cfg.data
    if not data.eval_sets:
        if data.eval_path:
            problems = load_problems(cfg, data.eval_path)[: c.eval_problems]
        else:
            from services.common.tiny import heldout_problems

            problems = [countdown_problem(p) for p in heldout_problems(c.eval_problems)]
        return [EvalSet("heldout", tuple(problems), c.eval_samples)]
    generated = [e for e in data.eval_sets if e.path is None]
    if generated and data.task != "countdown":
        raise ValueError(
            f"data.eval_sets {[e.name for e in generated]}: only Countdown problems can be generated; "
            "give each set a path"
        )
    drawn = _draw_generated(generated, c.eval_problems)
    out = []
    for e in data.eval_sets:
        n = e.problems or c.eval_problems
        if e.path is not None:
            problems = load_problems(cfg, e.path)[:n]
        else:
            problems = [countdown_problem(p) for p in drawn[e.name]]
        out.append(EvalSet(e.name, tuple(problems), e.samples or c.eval_samples, e.report, e.evaluate))
    return out


def _draw_generated(sets: Sequence[EvalSetConfig], default_n: int) -> dict[str, list[CountdownProblem]]:
    """Generated sets with the same ``nums`` filter are one pool cut at random: the first problems of a seeded
    held-out stream that the filter allows and no set of an earlier filter holds, shuffled and dealt out in
    the listed order. So a validation set and the test set beside it are random halves of one sample
    (the held-out stream is not stationary: its later stretches hold fewer of the easy problems, which
    fine-tuning and earlier draws use up, so sets cut one after another would differ in difficulty)."""
    import random

    from services.common.tiny import TinySpec, heldout_problems

    groups: dict[tuple[int, ...], list[EvalSetConfig]] = {}
    for e in sets:
        groups.setdefault(tuple(sorted(e.nums)), []).append(e)
    drawn: dict[str, list[CountdownProblem]] = {}
    taken: set = set()
    for g, (nums, members) in enumerate(groups.items()):
        want, pool, pos = sum(e.problems or default_n for e in members), [], 0
        seed = TinySpec().heldout_seed + 101 * g
        n = 2 * want
        while len(pool) < want:
            stream = heldout_problems(n, seed=seed)  # prefix-stable in n; raises when the space runs out
            for p in stream[pos:]:
                key = countdown_problem(p).key
                if len(pool) < want and (not nums or len(p.nums) in nums) and key not in taken:
                    pool.append(p)
                    taken.add(key)
            pos, n = len(stream), 2 * n
        random.Random(seed).shuffle(pool)
        for e in members:
            k = e.problems or default_n
            drawn[e.name], pool = pool[:k], pool[k:]
    return drawn


def training_problems(cfg: RunConfig, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """The run's training set, minus any problem of ``exclude`` (the evaluation sets), cut to
    ``data.train_pool`` problems if set."""
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
    if data.train_pool is not None:
        if len(kept) < data.train_pool:
            raise ValueError(
                f"data.train_pool={data.train_pool} but only {len(kept)} training problems remain after "
                f"removing {len(held)} evaluation/SFT ones; raise data.train_size or lower data.train_pool"
            )
        kept = kept[: data.train_pool]
    return kept


def rl_exclusions(cfg: RunConfig, heldout: Sequence[Problem]) -> list[Problem]:
    """Problems the RL set must not contain: the held-out ones, and (``data.exclude_sft_problems``) the
    shipped tiny model's fine-tuning problems, which it has memorised and would only teach it to repeat."""
    out = list(heldout)
    if cfg.data.exclude_sft_problems and cfg.model.path == "tiny:countdown":
        from services.common.tiny import TinySpec, train_problems

        out += [countdown_problem(p) for p in train_problems(TinySpec())]
    return out


def task_id(run_name: str, index: int) -> str:
    """The id of the run's ``index``-th admitted training task."""
    return f"{run_name}-t{index}"


def admission_index(tid: str) -> int | None:
    """The admission index of a training task id made by :func:`task_id` (None for any other id)."""
    head, sep, tail = tid.rpartition("-t")
    return int(tail) if sep and head and tail.isdigit() else None


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
            task_id=task_id(self.cfg.coordinator.run_name, i),
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
