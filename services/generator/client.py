"""The coordinator's typed client of the generator actors (beside the learner's ``LearnerGroup``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.fanout import split
from services.common.messages import ResponseGroup, RolloutTask, decode, encode


class GeneratorPool:
    """Queue-less calls to the generator actors: sampling outside the training stream (evaluation, the
    synchronous reference loop of the tests). Training tasks reach the generators through Redis."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    def sample(self, tasks: Sequence[RolloutTask], *, record: bool = False) -> list[ResponseGroup]:
        """Sample ``tasks`` spread over the actors, each through its ``RolloutEngine`` with a snapshot at
        least as new as every task's ``admit_version``; groups come back in task order. ``record`` counts
        them in the generators' training statistics (evaluation does not)."""
        import ray

        chunks = split(tasks, len(self.actors))
        refs = [
            actor.sample.remote([encode(t) for t in chunk], record=record)
            for actor, chunk in zip(self.actors, chunks, strict=False)
        ]
        return [decode(p, ResponseGroup) for payloads in ray.get(refs) for p in payloads]
