"""Evaluation: the unbiased pass@k estimator and a held-out evaluation over a vLLM engine.

A sample *passes* when the task's verifier rule gives it the full reward (1.0); partial rewards (Countdown's
0.1 for a well-formed wrong answer) count towards ``mean_reward`` but not towards pass@k.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.common.data.problems import Problem

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

# A rule's reward for a correct answer; anything below is a miss for pass@k.
_PASS_REWARD = 1.0


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


def evaluate_problems(
    llm: LLM,
    problems: Sequence[Problem],
    task_kind: str,
    n_samples: int,
    temperature: float,
    k: int,
    seed: int,
    *,
    top_p: float = 1.0,
    max_tokens: int = 64,
) -> dict[str, float | int | list[int]]:
    """Sample ``n_samples`` responses per problem and score them with the ``task_kind`` verifier rule.

    Returns ``pass_at_1`` (expected pass@1: the mean over problems of c/n), ``pass_at_k`` (the mean of
    the unbiased estimator), ``k``, ``mean_reward`` (over all samples), ``n_problems``,
    ``n_samples`` and ``correct`` (successes per problem, in order). Deterministic in ``seed`` for a
    given engine and model.
    """
    # Deferred: importing vLLM is slow and pass_at_k must stay importable without it.
    from services.generator.vllm_backend import sample
    from services.verifier.rules import get_rule

    if not problems:
        raise ValueError("evaluate_problems needs at least one problem")
    if not 1 <= k <= n_samples:
        raise ValueError(f"k must lie in 1..n_samples={n_samples}, got {k}")
    rule = get_rule(task_kind)
    started = time.perf_counter()
    groups = sample(
        llm,
        [p.prompt for p in problems],
        n=n_samples,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
    )
    pass1, passk, rewards, correct = [], [], [], []
    for problem, group in zip(problems, groups, strict=True):
        verdicts = [rule(r.text, problem.reference) for r in group]
        rewards.extend(v.reward for v in verdicts)
        c = sum(v.reward >= _PASS_REWARD for v in verdicts)
        correct.append(c)
        pass1.append(c / n_samples)
        passk.append(pass_at_k(n_samples, c, k))
    result: dict[str, float | int | list[int]] = {
        "pass_at_1": sum(pass1) / len(pass1),
        "pass_at_k": sum(passk) / len(passk),
        "k": k,
        "mean_reward": sum(rewards) / len(rewards),
        "n_problems": len(problems),
        "n_samples": n_samples,
        "correct": correct,  # per problem, in order: paired comparisons of two evaluations need them
    }
    brief = {key: value for key, value in result.items() if key != "correct"}
    logger.info("%s eval in %.1fs: %s", task_kind, time.perf_counter() - started, brief)
    return result
