"""The watchdog's decisions (pure logic: actor states and backlogs are given)."""

from __future__ import annotations

import time

import pytest

from services.coordinator.watchdog import RunStalled, Watchdog


class _Backlog:
    def __init__(self, **depths: int) -> None:
        self.depths = depths

    def backlog(self, stream: str) -> int:
        return self.depths.get(stream, 0)


def _dog(queue: _Backlog, gens: list[str], vers: list[str], timeout_s: float = 0.05) -> Watchdog:
    states = {"g": gens, "v": vers}
    return Watchdog(queue, ["g"], ["v"], timeout_s, every_s=0.0, states=lambda actors: states[actors[0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("depths", "stage"),
    [({"tasks": 16}, "generator"), ({"rollouts": 3}, "verifier"), ({}, "admission")],
)
def test_no_progress_names_the_stuck_stage(depths: dict[str, int], stage: str) -> None:
    dog = _dog(_Backlog(**depths), ["alive"], ["alive"])
    dog.check(3, 16)  # not yet past the timeout: nothing
    time.sleep(0.06)
    with pytest.raises(RunStalled, match=f"the {stage} stage is stuck") as info:
        dog.check(3, 16)
    assert "has 3 of the 16 groups" in str(info.value) and "generators 1 alive" in str(info.value)


def test_progress_resets_the_clock() -> None:
    dog = _dog(_Backlog(tasks=1), ["alive"], ["alive"], timeout_s=0.2)
    time.sleep(0.12)
    dog.progress()
    time.sleep(0.12)
    dog.check(0, 1)  # 0.12 s since the last progress: under the timeout


def test_a_whole_dead_stage_fails_at_once() -> None:
    dog = _dog(_Backlog(), ["dead", "dead"], ["alive"], timeout_s=3600)
    with pytest.raises(RunStalled, match="all 2 generator actors are dead"):
        dog.check(0, 16)
    _dog(_Backlog(), ["dead", "unresponsive"], ["alive"], timeout_s=3600).check(
        0, 16
    )  # one may be restarting
