"""Background tasks belong to the API key that submitted them, over a real Redis: a second key can neither
read the first key's tasks nor collide with its client ids, Redis holds a hash of each key (never the key),
and the keyless loopback mode keeps working as one scope. The CLI-level check with two keys is
``test_verifier_api.py::test_a_task_is_private_to_the_key_that_submitted_it``."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.common.config import VerifierConfig
from services.common.redis_server import EmbeddedRedis, redis_client
from services.verifier.app import API_KEYS_ENV, create_app
from services.verifier.tasks_store import OPEN_OWNER, RedisTaskStore, owner_of

KEY_A, KEY_B = "scope-key-alpha-1234", "scope-key-bravo-5678"
ITEMS = [{"id": "a", "task": "exact", "response": "Paris", "answer": "Paris"}]


def test_a_second_owner_can_neither_read_nor_collide(redis_server: EmbeddedRedis) -> None:
    store = RedisTaskStore(redis_client(redis_server.url), ttl_s=60)
    alice, bob = owner_of(KEY_A.encode()), owner_of(KEY_B.encode())
    mine, created = store.submit(alice, "job-1", ITEMS)
    assert created
    # Bob guesses Alice's client id *and* her exact items: he gets a fresh task, not hers.
    guessed, created = store.submit(bob, "job-1", ITEMS)
    assert created and guessed.task_id != mine.task_id
    store.finish(alice, mine.task_id, [{"id": "a", "reward": 1.0}])
    assert store.get(bob, mine.task_id) is None
    assert store.get(alice, guessed.task_id) is None
    record = store.get(alice, mine.task_id)
    assert record is not None and record.results == [{"id": "a", "reward": 1.0}]
    again, created = store.submit(alice, "job-1", ITEMS)  # idempotency within one owner is kept
    assert not created and again.task_id == mine.task_id
    keys = [k.decode() for k in store.client.scan_iter("*")]
    assert len(keys) == 4 and all(
        k.startswith((f"lpo:verifier:{alice}:", f"lpo:verifier:{bob}:")) for k in keys
    )
    assert not any(secret in k for k in keys for secret in (KEY_A, KEY_B))


def test_an_owner_must_be_a_digest_never_the_key(redis_server: EmbeddedRedis) -> None:
    store = RedisTaskStore(redis_client(redis_server.url), ttl_s=60)
    with pytest.raises(ValueError, match="owner_of") as info:
        store.submit(KEY_A, None, ITEMS)
    assert KEY_A not in str(info.value)  # the refusal does not echo a key into the logs
    assert owner_of(KEY_A.encode()) != owner_of(KEY_B.encode()) and len(owner_of(b"")) == 32


def _done(client: TestClient, task_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 30
    while (state := client.get(f"/v1/tasks/{task_id}", headers=headers).json())["status"] != "done":
        assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_the_app_scopes_tasks_by_key(redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    cfg = VerifierConfig(api_keys=(SecretStr(KEY_A), SecretStr(KEY_B)))
    a, b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    theirs = [{"id": "b", "task": "exact", "response": "Lyon", "answer": "Paris"}]
    with TestClient(create_app(cfg, redis_url=redis_server.url)) as client:
        task_a = client.post("/v1/tasks", json={"client_id": "job-1", "items": ITEMS}, headers=a).json()
        reply_b = client.post("/v1/tasks", json={"client_id": "job-1", "items": theirs}, headers=b)
        assert reply_b.status_code == 202 and reply_b.json()["task_id"] != task_a["task_id"]
        assert [r["status"] for r in _done(client, reply_b.json()["task_id"], b)["results"]] == ["fail"]
        assert [r["status"] for r in _done(client, task_a["task_id"], a)["results"]] == ["pass"]
        assert client.get(f"/v1/tasks/{task_a['task_id']}", headers=b).status_code == 404
        assert client.get(f"/v1/tasks/{reply_b.json()['task_id']}", headers=a).status_code == 404


def test_without_keys_every_caller_shares_one_scope(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    with TestClient(create_app(VerifierConfig(), redis_url=redis_server.url)) as client:
        first = client.post("/v1/tasks", json={"client_id": "job-1", "items": ITEMS})
        assert first.status_code == 202
        again = client.post("/v1/tasks", json={"client_id": "job-1", "items": ITEMS})
        assert again.json()["task_id"] == first.json()["task_id"]
        assert _done(client, first.json()["task_id"], {})["results"][0]["status"] == "pass"
    keys = [k.decode() for k in redis_client(redis_server.url).scan_iter("*")]
    assert keys and all(k.startswith(f"lpo:verifier:{OPEN_OWNER}:") for k in keys)
