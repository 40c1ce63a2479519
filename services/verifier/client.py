"""The coordinator's typed client of the verifier actors (beside the learner's ``LearnerGroup``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.fanout import split
from services.common.messages import ResponseGroup, decode, encode


class VerifierPool:
    """Queue-less scoring by the verifier actors, with the rules they were configured with (sandbox, math
    limits): the same ``score_group`` as their training loop. Training groups reach them through Redis."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    def score(self, groups: Sequence[ResponseGroup]) -> list[ResponseGroup]:
        """``groups`` with rewards and verdicts, spread over the actors, in order."""
        import ray

        chunks = split(groups, len(self.actors))
        refs = [
            actor.score.remote([encode(g) for g in chunk])
            for actor, chunk in zip(self.actors, chunks, strict=False)
        ]
        return [decode(p, ResponseGroup) for payloads in ray.get(refs) for p in payloads]
