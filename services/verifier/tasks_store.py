"""Redis-backed background tasks of the REST service (``POST /v1/tasks``, ``GET /v1/tasks/{id}``).

Tasks belong to the API key that submitted them: every Redis key of a task names its *owner*, a hash of
the API key (``owner_of``; never the key itself), so another API key can neither read the task by its id
nor collide with its client ids. Without API keys every caller is ``OPEN_OWNER``. Layout, every key with
the TTL ``verifier.task_ttl_s``:
- ``{prefix}:{owner}:task:{task_id}``: a hash with ``status`` (queued | running | done | failed),
  ``items`` (count), ``digest`` (sha256 of the submitted items), ``submitted_at``, ``finished_at``,
  ``results`` (JSON list) and ``error``;
- ``{prefix}:{owner}:client:{client_id}``: the task id a client id maps to. ``SET NX`` makes a
  resubmission with the same client id return the same task (idempotent); a resubmission with *different*
  items is a conflict, not a silent second task.

The replica that accepted a task runs it; if that replica dies the task stays ``running`` until its TTL
expires (the client resubmits under a new client id).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import redis

DEFAULT_PREFIX = "lpo:verifier"
# The owner of every task when the service runs without API keys (loopback only): one shared scope. It
# cannot clash with a key's owner, which is 32 hex digits.
OPEN_OWNER = "open"


def owner_of(api_key: bytes) -> str:
    """The owner id of an API key: a domain-separated sha256, so Redis never holds the key itself."""
    return hashlib.sha256(b"lpo-verifier-task-owner\0" + api_key).hexdigest()[:32]


class TaskConflictError(ValueError):
    """A client id was reused with different items."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as stored. ``results`` is the list of per-item result dicts once ``status`` is done."""

    task_id: str
    status: str
    items: int
    submitted_at: float
    finished_at: float | None
    results: list[dict[str, Any]] | None
    error: str | None


class TaskStore(Protocol):
    """Where background tasks live (Redis in the service, anything with these methods in tests)."""

    def submit(
        self, owner: str, client_id: str | None, items: list[dict[str, Any]]
    ) -> tuple[TaskRecord, bool]:
        """Store a new task of ``owner`` (or find the one ``client_id`` already names for that owner);
        returns (record, created)."""
        ...

    def get(self, owner: str, task_id: str) -> TaskRecord | None:
        """The task, or None when it is unknown, expired or another owner's."""
        ...

    def mark_running(self, owner: str, task_id: str) -> None: ...

    def finish(
        self, owner: str, task_id: str, results: list[dict[str, Any]] | None, error: str | None = None
    ) -> None:
        """Record the results (status done) or an error (status failed)."""
        ...


def items_digest(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


class RedisTaskStore:
    """``TaskStore`` on a redis-py client (bytes responses)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, prefix: str = DEFAULT_PREFIX) -> None:
        if ttl_s < 1:
            raise ValueError(f"RedisTaskStore ttl_s must be >= 1, got {ttl_s}")
        self.client, self.ttl_s, self.prefix = client, ttl_s, prefix

    def _task_key(self, owner: str, task_id: str) -> str:
        return f"{self.prefix}:{_checked(owner)}:task:{task_id}"

    def submit(
        self, owner: str, client_id: str | None, items: list[dict[str, Any]]
    ) -> tuple[TaskRecord, bool]:
        digest = items_digest(items)
        task_id = uuid.uuid4().hex
        if client_id is not None:
            client_key = f"{self.prefix}:{_checked(owner)}:client:{client_id}"
            if not self.client.set(client_key, task_id, nx=True, ex=self.ttl_s):
                existing = self.client.get(client_key)
                record = self.get(owner, existing.decode()) if existing else None
                if record is not None:
                    stored = self.client.hget(self._task_key(owner, record.task_id), "digest")
                    if stored is not None and stored.decode() != digest:
                        raise TaskConflictError(
                            f"client_id {client_id!r} was already used for task {record.task_id} with "
                            "different items; use a new client_id for a new batch"
                        )
                    return record, False
                self.client.set(client_key, task_id, ex=self.ttl_s)  # the old task expired: reuse the id
        now = time.time()
        fields = {"status": "queued", "items": len(items), "digest": digest, "submitted_at": repr(now)}
        key = self._task_key(owner, task_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.ttl_s)
        pipe.execute()
        return TaskRecord(task_id, "queued", len(items), now, None, None, None), True

    def get(self, owner: str, task_id: str) -> TaskRecord | None:
        raw = self.client.hgetall(self._task_key(owner, task_id))
        if not raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return TaskRecord(
            task_id=task_id,
            status=data["status"],
            items=int(data["items"]),
            submitted_at=float(data["submitted_at"]),
            finished_at=float(data["finished_at"]) if "finished_at" in data else None,
            results=json.loads(data["results"]) if "results" in data else None,
            error=data.get("error"),
        )

    def mark_running(self, owner: str, task_id: str) -> None:
        self.client.hset(self._task_key(owner, task_id), "status", "running")

    def finish(
        self, owner: str, task_id: str, results: list[dict[str, Any]] | None, error: str | None = None
    ) -> None:
        fields: dict[str, str] = {"finished_at": repr(time.time())}
        if error is None:
            fields |= {"status": "done", "results": json.dumps(results or [])}
        else:
            fields |= {"status": "failed", "error": error}
        key = self._task_key(owner, task_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.ttl_s)
        pipe.execute()


def _checked(owner: str) -> str:
    # An owner is OPEN_OWNER or an owner_of() digest: anything else (an empty string, a raw key with a
    # colon) would put tasks outside every scope, so it is a bug at the caller.
    if owner != OPEN_OWNER and not (len(owner) == 32 and all(c in "0123456789abcdef" for c in owner)):
        # The value is not echoed: a caller that passed the API key itself would log it.
        raise ValueError(
            f"task owner must be {OPEN_OWNER!r} or an owner_of(key) digest (32 hex digits), got a "
            f"{len(owner)}-character string; pass owner_of(key), never the key"
        )
    return owner
