"""The watchdog's decisions (pure logic: actor states, backlogs and the clock are given)."""

from __future__ import annotations

import pytest

from services.coordinator.watchdog import RunStalled, Watchdog


class _Backlog:
    def __init__(self, **depths: int) -> None:
        self.depths = depths

    def backlog(self, stream: str) -> int:
        return self.depths.get(stream, 0)


class _Clock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dog(
    queue: _Backlog,
    gens: list[str],
    vers: list[str],
    clock: _Clock,
    timeout_s: float = 60.0,
    every_s: float = 0.0,
) -> Watchdog:
    states = {"g": gens, "v": vers}
    return Watchdog(
        queue,  # type: ignore[arg-type]
        ["g"],
        ["v"],
        timeout_s,
        every_s=every_s,
        states=lambda actors: states[actors[0]],
        clock=clock,
    )


@pytest.mark.parametrize(
    ("depths", "stage"),
    [({"tasks": 16}, "generator"), ({"rollouts": 3}, "verifier"), ({}, "admission")],
)
def test_no_progress_names_the_stuck_stage(depths: dict[str, int], stage: str) -> None:
    clock = _Clock()
    dog = _dog(_Backlog(**depths), ["alive"], ["alive"], clock)
    clock.now += 59.5
    dog.check(3, 16)  # not yet past the 60 s timeout: nothing
    clock.now += 0.5
    with pytest.raises(RunStalled, match=f"the {stage} stage is stuck") as info:
        dog.check(3, 16)
    assert "no scored group for 60s" in str(info.value)
    assert "has 3 of the 16 groups" in str(info.value) and "generators 1 alive" in str(info.value)


def test_progress_resets_the_clock() -> None:
    clock = _Clock()
    dog = _dog(_Backlog(tasks=1), ["alive"], ["alive"], clock)
    clock.now += 50
    dog.progress()
    clock.now += 50
    dog.check(0, 1)  # 100 s since the start, 50 s since the last progress: under the timeout
    clock.now += 10
    with pytest.raises(RunStalled, match="no scored group for 60s"):
        dog.check(0, 1)


def test_checks_only_every_every_s() -> None:
    clock = _Clock()
    dog = _dog(_Backlog(), ["dead"], ["alive"], clock, timeout_s=3600, every_s=10)
    clock.now += 9.5
    dog.check(0, 16)  # within every_s of the start: states are not even asked
    clock.now += 0.5
    with pytest.raises(RunStalled, match="all 1 generator actors are dead"):
        dog.check(0, 16)


def test_a_whole_dead_stage_fails_at_once() -> None:
    clock = _Clock()
    dog = _dog(_Backlog(), ["dead", "dead"], ["alive"], clock, timeout_s=3600)
    with pytest.raises(RunStalled, match="all 2 generator actors are dead"):
        dog.check(0, 16)
    # One may be restarting: no failure while any of the stage is not dead.
    _dog(_Backlog(), ["dead", "unresponsive"], ["alive"], clock, timeout_s=3600).check(0, 16)


def test_a_loop_that_ended_with_an_error_fails_the_run_at_once() -> None:
    """A generator whose loop raised is still alive and answers: the watchdog names it at its first check,
    long before the stall timeout."""
    clock = _Clock()
    failures: list[str] = []
    dog = Watchdog(
        _Backlog(tasks=16),  # type: ignore[arg-type]
        ["g"],
        ["v"],
        600.0,
        every_s=0.0,
        states=lambda actors: ["alive"],
        clock=clock,
        loop_failures=lambda: failures,
    )
    dog.check(0, 16)  # every loop running: nothing
    failures.append("generator-0: SnapshotMissingError: no weight registry actor")
    with pytest.raises(RunStalled, match="generator-0: SnapshotMissingError"):
        dog.check(0, 16)
