"""Score a sampled group with the rule registry: the verifier worker's pure logic."""

from __future__ import annotations

from services.common.messages import ResponseGroup
from services.verifier.rules import Verdict, get_rule


def score_verdicts(group: ResponseGroup) -> tuple[ResponseGroup, list[Verdict]]:
    """The group with one reward and one verdict status per rollout, and the rule's full verdicts (a code
    verdict also names the sandbox backend that ran the program).

    An unknown task kind raises (a configuration error, never a silent reward of 0).
    """
    rule = get_rule(group.task.task_kind)
    verdicts = [rule(r.text, group.task.reference) for r in group.rollouts]
    return group.with_rewards(tuple(v.reward for v in verdicts), tuple(v.status for v in verdicts)), verdicts


def score_group(group: ResponseGroup) -> ResponseGroup:
    """``score_verdicts`` without the verdicts."""
    return score_verdicts(group)[0]
