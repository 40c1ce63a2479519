"""Admission control bounds the lag by construction; receipt checks drop what must not be trained."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import entry_order
from services.coordinator.admission import admission_limit, policy_lag, to_admit
from services.coordinator.intake import GroupIntake

SHA = {v: hashlib.sha256(f"v{v}".encode()).hexdigest() for v in range(16)}


def test_admission_limit_hand_worked() -> None:
    # P = 16: on-policy (lag 0) admits step v's tasks only once v is published
    assert admission_limit(0, 16, 0) == 16
    assert admission_limit(3, 16, 0) == 64
    # lag 2: two more steps in flight
    assert admission_limit(0, 16, 2) == 48
    assert to_admit(admitted=40, version=0, prompts_per_step=16, max_policy_lag=2, total=1000) == 8
    assert to_admit(admitted=50, version=0, prompts_per_step=16, max_policy_lag=2, total=1000) == 0
    assert to_admit(admitted=0, version=5, prompts_per_step=16, max_policy_lag=2, total=20) == 20  # capped
    with pytest.raises(ValueError, match="bad admission"):
        admission_limit(-1, 16, 0)


@given(st.integers(1, 64), st.integers(0, 8), st.integers(0, 5000))
def test_admitted_tasks_are_never_trained_beyond_the_lag(p: int, lag: int, i: int) -> None:
    # Task i is trained at step i // P (version i // P). It is admitted at the first version v with
    # i < admission_limit(v): the lag it can be trained at is then at most max_policy_lag.
    v = 0
    while admission_limit(v, p, lag) <= i:
        v += 1
    assert policy_lag(i // p, v) <= lag


def _group(
    gid: str, version: int, sha: str | None = None, verdicts: tuple[str, str] = ("pass", "parse_error")
) -> ResponseGroup:
    task = RolloutTask(gid, [1, 2], "p", "countdown", {"nums": [1, 2], "target": 3}, 2)
    rollouts = (Rollout([3, 4, 5], [-0.1, -0.2, -0.3], "stop"), Rollout([3], [-0.5], "length"))
    g = ResponseGroup(task, rollouts, version, sha or SHA[version])
    return g.with_rewards((1.0, 0.0), verdicts)


def test_a_group_with_a_sandbox_failure_is_dropped_not_trained_with_reward_0() -> None:
    intake = GroupIntake(max_policy_lag=0)
    intake.record_snapshot(0, SHA[0])
    assert intake.reason_to_drop(_group("a", 0, verdicts=("pass", "timeout")), learner_version=0) is None
    failed = _group("b", 0, verdicts=("pass", "sandbox_error"))
    assert intake.reason_to_drop(failed, learner_version=0) == "sandbox_error"
    intake.drop(failed, "sandbox_error", 0)
    assert intake.drops.by_reason == {"sandbox_error": 1}


def test_intake_drop_reasons() -> None:
    intake = GroupIntake(max_policy_lag=1)
    for v in range(4):
        intake.record_snapshot(v, SHA[v])
    assert intake.reason_to_drop(_group("a", 3), learner_version=3) is None
    assert intake.reason_to_drop(_group("a", 2), learner_version=3) is None  # lag 1 allowed
    assert intake.reason_to_drop(_group("a", 1), learner_version=3) == "stale"  # lag 2
    assert intake.reason_to_drop(_group("a", 7, SHA[7]), learner_version=3) == "unknown_version"
    assert intake.reason_to_drop(_group("a", 2, SHA[5]), learner_version=3) == "hash_mismatch"
    intake.mark_trained([_group("a", 3)])
    assert intake.reason_to_drop(_group("a", 3), learner_version=3) == "duplicate"
    intake.drop(_group("b", 1), "stale", 3)
    assert intake.drops.by_reason == {"stale": 1} and intake.drops.total == 1
    # lengths 3 and 1 fall in the [0, 8) bucket; rewards 1.0 and 0.0
    assert intake.drops.length_hist == {0: 2} and intake.drops.reward_hist == {1.0: 1, 0.0: 1}


def test_entry_order_is_numeric() -> None:
    ids = ["999-1", "1000-0", "999-10", "999-2"]
    assert sorted(ids, key=entry_order) == ["999-1", "999-2", "999-10", "1000-0"]


def test_after_a_resume_groups_of_the_earlier_lineage_are_recognised() -> None:
    intake = GroupIntake(max_policy_lag=1)
    for v in range(3):  # the resumed learner republished v0..v2 (v2 with other weights than before)
        intake.record_snapshot(v, SHA[v])
    intake.earlier = {(2, SHA[12]), (3, SHA[13])}  # published before the kill, beyond the checkpoint
    assert intake.reason_to_drop(_group("a", 2, SHA[12]), learner_version=2) is None  # a real policy
    assert intake.reason_to_drop(_group("b", 3, SHA[13]), learner_version=2) == "rolled_back"
    assert intake.reason_to_drop(_group("c", 3, SHA[13]), learner_version=3) is None
    assert (
        intake.reason_to_drop(_group("d", 2, SHA[5]), learner_version=2) == "hash_mismatch"
    )  # never published
    assert intake.reason_to_drop(_group("e", 1, SHA[12]), learner_version=3) == "hash_mismatch"
