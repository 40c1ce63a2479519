"""Admission and staleness control (pure logic).

Tasks are consumed in admission order, ``prompts_per_step`` per learner step, so task ``i`` (0-based)
is trained at step ``i // P``, when the learner is at version ``i // P``. A group sampled by version
``v_b >= admit_version`` then has lag ``i // P - v_b <= i // P - admit_version``. Admitting task ``i``
only once the published version ``v`` satisfies ``i // P - v <= max_policy_lag`` bounds the lag of
every group *by construction* — generators never run ahead of the bound — while keeping exactly
``(max_policy_lag + 1) * P`` tasks in flight, so they never idle on a full pipeline either.
``max_policy_lag = 0`` is the synchronous on-policy schedule: the tasks of step ``v`` are admitted
only after version ``v`` is published.
"""

from __future__ import annotations


def admission_limit(version: int, prompts_per_step: int, max_policy_lag: int) -> int:
    """Total number of tasks that may have been admitted once ``version`` is published."""
    if version < 0 or prompts_per_step < 1 or max_policy_lag < 0:
        raise ValueError(
            f"bad admission arguments: version={version} P={prompts_per_step} lag={max_policy_lag}"
        )
    return (version + max_policy_lag + 1) * prompts_per_step


def to_admit(admitted: int, version: int, prompts_per_step: int, max_policy_lag: int, total: int) -> int:
    """How many more tasks to admit now (never past ``total`` = steps * prompts_per_step)."""
    limit = min(admission_limit(version, prompts_per_step, max_policy_lag), total)
    return max(0, limit - admitted)


def policy_lag(learner_version: int, behavior_version: int) -> int:
    """How many learner updates the group's behaviour policy is behind."""
    return learner_version - behavior_version
