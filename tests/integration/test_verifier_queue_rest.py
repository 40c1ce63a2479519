"""The queue worker (``:rollouts`` -> ``:groups`` over a real Redis) and ``POST /v1/verify`` give identical
rewards, statuses and test counts for the same items, for every task kind."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient

from services.common.config import VerifierConfig
from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import StreamQueue
from services.common.redis_server import EmbeddedRedis
from services.verifier.app import create_app
from services.verifier.worker import VerifierWorker

SHA = hashlib.sha256(b"v0").hexdigest()

# group name -> (task kind, reference, responses): groups mix passing, failing and malformed responses.
CASES: dict[str, tuple[str, dict, list[str]]] = {
    "countdown": (
        "countdown",
        {"nums": [3, 5, 2], "target": 13},
        ["<answer>3*5-2</answer>", "<answer>3+5+2</answer>", "<answer>3**5</answer>", "no answer"],
    ),
    "math": ("math", {"answer": "\\frac{1}{2}"}, ["\\boxed{0.5}", "\\boxed{2}", "one half", "\\boxed{1/2}"]),
    "exact": ("exact", {"answer": "Paris", "case_sensitive": False}, [" paris ", "Lyon"]),
    "regex": ("regex", {"pattern": r"\d{3}", "mode": "search"}, ["code 123", "code 12"]),
    "code": (
        "code",
        {
            "language": "python",
            "tests": [
                {"stdin": "2 3\n", "expected_stdout": "5\n"},
                {"stdin": "1 1", "expected_stdout": "2"},
                {"assert": "assert add(2, 2) == 4"},
            ],
            "limits": {"wall_s": 10},  # generous: a shared CPU must not turn a pass into a timeout
        },  # fmt: skip
        [
            "```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n"
            "    print(add(*map(int, input().split())))\n```",
            "```python\ndef add(a, b):\n    return a * b\nif __name__ == '__main__':\n"
            "    print(add(*map(int, input().split())))\n```",
            "```python\ndef add(a, b) return\n```",
        ],
    ),
    "code-spin": (
        "code",
        {"tests": [{"assert": "assert True"}], "limits": {"wall_s": 1}},
        ["while True:\n    pass", "```python\nimport time\ntime.sleep(60)\n```"],
    ),
}


def _group(name: str, kind: str, reference: dict, responses: list[str]) -> ResponseGroup:
    task = RolloutTask(
        task_id=f"task-{name}", prompt_token_ids=[1, 2], prompt_text="p", task_kind=kind, reference=reference,
        group_size=len(responses),
    )  # fmt: skip
    rollouts = tuple(Rollout([7], [-0.5], "stop", text=text) for text in responses)
    return ResponseGroup(task=task, rollouts=rollouts, behavior_version=0, behavior_sha256=SHA)


def test_queue_worker_and_rest_agree(redis_server: EmbeddedRedis) -> None:
    queue = StreamQueue(redis_server.url, "verifier-eq")
    queue.ensure_groups()
    queue.put_many("rollouts", [_group(name, *case) for name, case in CASES.items()])
    worker = VerifierWorker(queue, consumer="verifier-0", batch=16)
    assert worker.step(block_ms=0) == len(CASES)
    entries = queue.read("groups", "learner", count=16, block_ms=0)
    scored = {e.message.task.task_id.removeprefix("task-"): e.message for e in entries}

    items = [
        {"id": f"{name}-{i}", "task": kind, "response": text, **ref}
        for name, (kind, ref, texts) in CASES.items()
        for i, text in enumerate(texts)
    ]
    with TestClient(create_app(VerifierConfig())) as client:
        reply = client.post("/v1/verify", json={"items": items})
    assert reply.status_code == 200, reply.text
    rest = {r["id"]: r for r in reply.json()["results"]}

    for name, (_, _, texts) in CASES.items():
        group = scored[name]
        for i in range(len(texts)):
            assert (group.rewards[i], group.verdicts[i]) == (
                rest[f"{name}-{i}"]["reward"],
                rest[f"{name}-{i}"]["status"],
            )
    # the cases cover every status a rule can give (the comparison above is not vacuous)
    assert {r["status"] for r in rest.values()} == {"pass", "fail", "parse_error", "timeout"}
    # a*b passes only add(2, 2) == 4 (2*2): 1 of 3 tests, reward 1/3 (Eq. 61) on both paths
    assert [rest[f"code-{i}"]["tests_passed"] for i in range(3)] == [3, 1, 0]
    assert scored["code"].rewards[1] == rest["code-1"]["reward"] == 1 / 3
