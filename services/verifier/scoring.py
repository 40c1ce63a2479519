"""Score a sampled group with the rule registry: the verifier worker's pure logic."""

from __future__ import annotations

from services.common.messages import ResponseGroup
from services.verifier.rules import get_rule


def score_group(group: ResponseGroup) -> ResponseGroup:
    """The group with one reward and one verdict status per rollout.

    An unknown task kind raises (a configuration error, never a silent reward of 0).
    """
    rule = get_rule(group.task.task_kind)
    verdicts = [rule(r.text, group.task.reference) for r in group.rollouts]
    return group.with_rewards(tuple(v.reward for v in verdicts), tuple(v.status for v in verdicts))
