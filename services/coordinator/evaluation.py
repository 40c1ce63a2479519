"""Evaluation: named held-out sets, their sampling tasks, and the unbiased pass@k arithmetic.

Evaluation goes through the same services as training: the coordinator turns each set's problems into
``RolloutTask``s (``eval_tasks``), a generator samples them with its ``RolloutEngine`` (one sampling path,
one seeding rule) and a verifier scores them with its configured rules (the training worker's
``score_group``). Only the arithmetic below runs here. A sample *passes* when its verdict is ``pass``
(reward 1.0); partial rewards (Countdown's 0.1 for a well-formed wrong answer) count towards
``mean_reward`` but not towards pass@k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.config import RunConfig
from services.common.data.problems import Problem
from services.common.messages import ResponseGroup, RolloutTask, SamplingParams


@dataclass(frozen=True, slots=True)
class EvalSet:
    """One named evaluation set: its problems, samples per problem, whether it is reported (a validation
    set is evaluated alike but kept out of the run's headline) and whether this run evaluates it (a
    reserved set is only kept out of training)."""

    name: str
    problems: tuple[Problem, ...]
    samples: int
    report: bool = True
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not self.problems:
            raise ValueError(f"eval set {self.name!r} has no problems")
        if self.samples < 1:
            raise ValueError(f"eval set {self.name!r}: samples must be >= 1, got {self.samples}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which
    never forms the (huge) binomials and so stays exact-ish in floating point for any ``n``.
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset of the samples holds at least one success
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def reported_ks(n: int, extra: int | None = None) -> tuple[int, ...]:
    """The k of Pass@k reported for ``n`` samples: 1, 8, the largest power of two <= n, and ``extra``
    (``coordinator.eval_k``), each only where it is <= n."""
    largest = 1 << (n.bit_length() - 1)
    return tuple(sorted({k for k in (1, 8, largest, extra or 1) if k <= n}))


def eval_tasks(cfg: RunConfig, eval_set: EvalSet, prompts: Sequence[Sequence[int]], step: int, version: int):
    """The sampling tasks of one evaluation of ``eval_set`` at ``step``: ``samples`` responses per problem
    at ``coordinator.eval_temperature``, sampled by a snapshot >= ``version``.

    Seeds come from ``generator.seed``, the set and the problem, never from the run name or the step:
    two runs that differ only in their objective evaluate with the same random numbers, and so do two
    evaluations of one run, so a run's gain over its base model (the step-0 evaluation) and the
    LPO-minus-PG difference are both common-random-number comparisons (``step`` names the tasks only).
    """
    gen, c = cfg.generator, cfg.coordinator
    return [
        RolloutTask(
            task_id=f"{c.run_name}-eval-{eval_set.name}-s{step}-p{i}",
            prompt_token_ids=list(ids),
            prompt_text=problem.prompt,
            task_kind=cfg.data.task,
            reference=problem.reference,
            group_size=eval_set.samples,
            sampling=SamplingParams(
                temperature=c.eval_temperature,
                top_p=gen.top_p,
                max_tokens=gen.max_tokens,
                seed=gen.seed,
                seed_key=f"eval/{eval_set.name}/{i}",
            ),
            admit_version=version,
        )
        for i, (problem, ids) in enumerate(zip(eval_set.problems, prompts, strict=True))
    ]


def summarize(groups: Sequence[ResponseGroup], ks: Sequence[int]) -> dict[str, Any]:
    """Pass@k of scored groups (one per problem, in order): ``pass_at`` maps each k of ``ks`` to the mean
    unbiased estimate over problems (k=1 is the expected Pass@1, the mean of c/n); also ``mean_reward``
    (over all samples), ``n_problems``, ``n_samples`` and ``correct`` (passes per problem, in order:
    paired comparisons of two evaluations need them)."""
    if not groups:
        raise ValueError("summarize needs at least one scored group")
    n = len(groups[0].rollouts)
    correct, rewards = [], []
    for g in groups:
        if g.verdicts is None or g.rewards is None:
            raise ValueError(f"group {g.group_id} is not scored")
        if len(g.rollouts) != n:
            raise ValueError(f"group {g.group_id} has {len(g.rollouts)} samples, the first group {n}")
        correct.append(sum(v == "pass" for v in g.verdicts))
        rewards.extend(g.rewards)
    return {
        "pass_at": {str(k): sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks},
        "mean_reward": sum(rewards) / len(rewards),
        "n_problems": len(groups),
        "n_samples": n,
        "correct": correct,
    }


def headline(sets: dict[str, dict[str, Any]], reported: Sequence[str], k: int) -> dict[str, Any]:
    """The run's headline figures: Pass@1 and Pass@``k`` of the first reported set (also at the top level
    of every eval record, where earlier readers of eval.jsonl find them)."""
    first = sets[reported[0]]["pass_at"]
    k = k if str(k) in first else max(int(x) for x in first)  # the set has fewer samples than k
    return {"eval_set": reported[0], "pass_at_1": first["1"], "pass_at_k": first[str(k)], "k": k}
