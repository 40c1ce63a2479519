"""The coordinator's watchdog: a run that stops making progress fails with an error naming the stuck stage,
instead of hanging. Checked while the learner waits for scored groups (the only place a run can stall)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from services.common.queue import StreamQueue
from services.coordinator.runtime import actor_states

logger = logging.getLogger(__name__)


class RunStalled(RuntimeError):
    """No progress for ``coordinator.stall_timeout_s``, a whole stage's actors dead, or an actor's loop ended
    with an error."""


class Watchdog:
    """``progress()`` when a scored group arrives; ``check()`` while waiting raises ``RunStalled``."""

    def __init__(
        self,
        queue: StreamQueue,
        generators: list[Any],
        verifiers: list[Any],
        timeout_s: float,
        every_s: float = 10.0,
        states: Callable[[list[Any]], list[str]] = actor_states,
        clock: Callable[[], float] = time.monotonic,
        loop_failures: Callable[[], list[str]] = list,
    ) -> None:
        """``states`` gives each actor's state; ``clock`` (seconds) is what the timeouts are measured on;
        ``loop_failures`` names the actors whose loop has ended with an error (``Runtime.loop_failures``)."""
        self.queue, self.generators, self.verifiers = queue, generators, verifiers
        self.loop_failures = loop_failures
        self.timeout_s, self.every_s, self.states, self.clock = timeout_s, every_s, states, clock
        self._last_progress = self._last_check = clock()

    def progress(self) -> None:
        self._last_progress = self.clock()

    def check(self, have: int, want: int) -> None:
        now = self.clock()
        if now - self._last_check < min(self.every_s, self.timeout_s):
            return
        self._last_check = now
        # An exception in a loop ends it on a live actor (Ray restarts crashed processes, not raised
        # errors): the actor still answers, so without this the run would only stall, silently.
        failures = self.loop_failures()
        if failures:
            raise RunStalled("an actor's loop ended with an error: " + "; ".join(failures))
        gens, vers = self.states(self.generators), self.states(self.verifiers)
        for name, states in (("generator", gens), ("verifier", vers)):
            if states and all(s == "dead" for s in states):
                raise RunStalled(
                    f"all {len(states)} {name} actors are dead and Ray has stopped restarting them "
                    f"(cluster.max_restarts); the run cannot continue. See the {name} logs for the cause."
                )
        waited = now - self._last_progress
        if waited < self.timeout_s:
            return
        backlog = {s: self.queue.backlog(s) for s in ("tasks", "rollouts")}
        if backlog["tasks"]:
            stage = "generator"  # tasks wait for sampling
        elif backlog["rollouts"]:
            stage = "verifier"  # sampled groups wait for scoring
        else:
            stage = "admission"  # nothing queued: no task was admitted
        raise RunStalled(
            f"no scored group for {waited:.0f}s (coordinator.stall_timeout_s={self.timeout_s:g}; "
            f"the learner has {have} of the {want} groups of this step): the {stage} stage is stuck. "
            f"Backlog: tasks {backlog['tasks']}, rollouts {backlog['rollouts']}; generators "
            f"{_summary(gens)}, verifiers {_summary(vers)}"
        )


def _summary(states: list[str]) -> str:
    counts = {s: states.count(s) for s in ("alive", "unresponsive", "dead") if s in states}
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
