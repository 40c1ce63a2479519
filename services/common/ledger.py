"""The run ledger: what became of every admitted task, kept in Redis next to the streams.

``lpo:{run}:ledger`` maps task id -> ``admitted`` | ``trained:<version>`` | ``dropped:<reason>``, written in
the same MULTI/EXEC as the admission (XADD to ``:tasks``) and as the acknowledgement of the trained or
dropped group (XACK of ``:groups``), so the ledger never disagrees with the streams. ``lpo:{run}:trained``
holds a ``<task>@<version>`` field for every training of a task (idempotent: a transaction re-sent after a
lost reply writes the same field): the learner refuses a group whose task the ledger says is trained
(durable state, not memory), and ``report()`` counts a task trained at two versions as a duplicate rather
than assuming none. A task still ``admitted`` is in flight if some stage has not acknowledged its entry,
dead-lettered if a stage rejected it to ``:dead`` (with the reason there), else lost.

Next to it, the durable state a resumed run continues from (written in the same transactions):
``lpo:{run}:state`` holds the dataset ``cursor`` (tasks admitted so far); ``lpo:{run}:steps`` maps each
learner step since the last checkpoint to the group entries it trained, in order, so a restarted learner
replays exactly those; ``lpo:{run}:published`` holds every ``<version>:<sha256>`` the learner published
(before a resume too), so a group sampled by a snapshot of an earlier lineage is still recognised.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.common.queue import STREAM_TYPES, Also, StreamQueue

ADMITTED = "admitted"


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """Counts over every admitted task. ``lost`` and ``duplicates`` must be 0 in a correct run."""

    admitted: int
    trained: int
    dropped: int
    dropped_by_reason: dict[str, int]
    in_flight: int
    dead_lettered: int
    lost: int
    duplicates: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunLedger:
    """Reads and writes the ledger of the queue's run (through the queue's connection and retries)."""

    def __init__(self, queue: StreamQueue) -> None:
        self.queue = queue
        self.key = f"lpo:{queue.run}:ledger"
        self.trained_key = f"lpo:{queue.run}:trained"
        self.state_key = f"lpo:{queue.run}:state"
        self.steps_key = f"lpo:{queue.run}:steps"
        self.published_key = f"lpo:{queue.run}:published"

    def admitting(self, task_ids: Sequence[str], cursor: int | None = None) -> Also:
        """Commands recording ``task_ids`` as admitted and the dataset ``cursor`` after them (for
        ``StreamQueue.put_many(..., also=)``)."""
        mapping = dict.fromkeys(task_ids, ADMITTED)

        def add(pipe: Any) -> None:
            if mapping:
                pipe.hset(self.key, mapping=mapping)
            if cursor is not None:
                pipe.hset(self.state_key, "cursor", cursor)

        return add

    def stepping(self, step: int, version: int, entry_ids: Sequence[str]) -> Also:
        """Commands recording that learner ``step`` (-> ``version``) trained ``entry_ids`` in this order."""
        body = json.dumps({"version": version, "entries": list(entry_ids)})

        def add(pipe: Any) -> None:
            pipe.hset(self.steps_key, str(step), body)

        return add

    def steps_after(self, step: int) -> list[tuple[int, int, list[str]]]:
        """``(step, version, entry ids)`` of every recorded step after ``step``, in step order."""
        raw = self.queue.transaction(f"HGETALL {self.steps_key}", lambda p: p.hgetall(self.steps_key))[0]
        out = []
        for k, v in raw.items():
            if int(_s(k)) > step:
                body = json.loads(_s(v))
                out.append((int(_s(k)), int(body["version"]), list(body["entries"])))
        return sorted(out)

    def forget_steps_through(self, step: int) -> int:
        """Drop the step records up to ``step`` (made durable by a checkpoint); returns how many."""
        keys = self.queue.transaction(f"HKEYS {self.steps_key}", lambda p: p.hkeys(self.steps_key))[0]
        old = [_s(k) for k in keys if int(_s(k)) <= step]
        if old:
            self.queue.transaction(f"HDEL {self.steps_key}", lambda p: p.hdel(self.steps_key, *old))
        return len(old)

    def exists(self) -> bool:
        """Whether Redis holds state of this run (a ledger or a cursor)."""
        return bool(self.queue.transaction("EXISTS", lambda p: p.exists(self.key, self.state_key))[0])

    def cursor(self) -> int:
        """Tasks admitted so far (the dataset position a resumed coordinator continues from)."""
        raw = self.queue.transaction(f"HGET {self.state_key}", lambda p: p.hget(self.state_key, "cursor"))[0]
        return int(_s(raw)) if raw is not None else 0

    def record_publication(self, version: int, sha256: str) -> None:
        self.queue.transaction(
            f"HSET {self.published_key}",
            lambda p: p.hset(self.published_key, f"{version}:{sha256}", f"{time.time():.3f}"),
        )

    def publications(self) -> set[tuple[int, str]]:
        """Every ``(version, sha256)`` the learner of this run has published, across resumes."""
        fields = self.queue.transaction(f"HKEYS {self.published_key}", lambda p: p.hkeys(self.published_key))[
            0
        ]
        out = set()
        for f in fields:
            version, _, sha = _s(f).partition(":")
            out.add((int(version), sha))
        return out

    def trained_tasks(self) -> set[str]:
        """Tasks the ledger records as trained."""
        return {t for t, v in self.states().items() if v.startswith("trained:")}

    def settling(
        self, dropped: Mapping[str, str] | None = None, trained: Iterable[str] = (), version: int = -1
    ) -> Also:
        """Commands recording ``dropped`` tasks (task -> reason) and the ``trained`` ones at ``version``
        (for ``StreamQueue.ack(..., also=)``)."""
        outcomes = {t: f"dropped:{reason}" for t, reason in (dropped or {}).items()}
        trained = list(trained)
        outcomes |= {t: f"trained:{version}" for t in trained}

        def add(pipe: Any) -> None:
            if outcomes:
                pipe.hset(self.key, mapping=outcomes)
            if trained:
                pipe.hset(self.trained_key, mapping={f"{t}@{version}": 1 for t in trained})

        return add

    def settled(self, task_ids: Sequence[str]) -> list[bool]:
        """Whether the ledger has each task trained or dropped already (one HMGET): a group of such a
        task is a second delivery."""
        if not task_ids:
            return []
        states = self.queue.transaction(f"HMGET {self.key}", lambda p: p.hmget(self.key, list(task_ids)))[0]
        return [s is not None and _s(s) != ADMITTED for s in states]

    def states(self) -> dict[str, str]:
        """The whole ledger, task id -> state (for the run directory's ``ledger.json``)."""
        raw = self.queue.transaction(f"HGETALL {self.key}", lambda p: p.hgetall(self.key))[0]
        return {_s(k): _s(v) for k, v in raw.items()}

    def report(self) -> LedgerReport:
        """Counts from the durable state: the ledger, the trained counts and the streams' unacked entries."""
        states = self.states()
        fields = self.queue.transaction(f"HKEYS {self.trained_key}", lambda p: p.hkeys(self.trained_key))[0]
        trainings = Counter(_s(f).rsplit("@", 1)[0] for f in fields)
        waiting = {s for s, v in states.items() if v == ADMITTED}
        unacked: set[str] = set()
        for stream in STREAM_TYPES:
            unacked |= self.queue.unacked_ids(stream)
        dead = waiting & self.queue.dead_letter_ids() - unacked
        reasons = Counter(v.split(":", 1)[1] for v in states.values() if v.startswith("dropped:"))
        return LedgerReport(
            admitted=len(states),
            trained=sum(v.startswith("trained:") for v in states.values()),
            dropped=sum(reasons.values()),
            dropped_by_reason=dict(sorted(reasons.items())),
            in_flight=len(waiting & unacked),
            dead_lettered=len(dead),
            lost=len(waiting - unacked - dead),
            duplicates=sum(n > 1 for n in trainings.values()),
        )


def both(*parts: Also | None) -> Also:
    """One ``also`` hook running each of ``parts`` (None skipped) in the same transaction."""

    def add(pipe: Any) -> None:
        for part in parts:
            if part is not None:
                part(pipe)

    return add


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
