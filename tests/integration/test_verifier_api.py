"""The REST service as a user runs it: ``python -m services.verifier serve`` in a subprocess, spoken to over
HTTP. Auth (401/403, ``/healthz`` open), body/item/batch limits (413), schema errors (422 naming the
field), admission (429), background tasks in Redis (202, idempotent, 409, 404, private to the submitting
key), the SandboxFusion ``/run_code`` contract that verl's client relies on, metrics, docs (their assets
served by the service), and the loopback-only rule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.redis_server import free_port
from services.verifier.app import API_KEYS_ENV

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
AUTH_2 = {"Authorization": "Bearer test-key-2"}
SETTINGS = {
    "verifier.max_concurrency": 1,
    "verifier.max_waiting": 0,
    "verifier.max_body_bytes": 65536,
    "verifier.max_item_bytes": 8192,
    "verifier.max_items": 8,
    "verifier.timeout_s": 10,  # generous: the CI machine is shared
}


def _countdown(item_id: str, expression: str = "3*5-2") -> dict:
    response = f"<answer>{expression}</answer>"
    return {"id": item_id, "task": "countdown", "response": response, "nums": [3, 5, 2], "target": 13}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The CLI server on a free loopback port (API key from the environment, embedded Redis)."""
    port = free_port()
    argv = [sys.executable, "-m", "services.verifier", "serve", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in SETTINGS.items():
        argv += ["--set", f"{key}={value}"]
    env = {**os.environ, API_KEYS_ENV: f"{KEY},test-key-2", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 60 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_healthz_is_open_and_reports_the_backend(server: str) -> None:
    body = httpx.get(f"{server}/healthz").json()
    assert body["status"] == "ok" and body["backend"] == "zygote" and body["auth"] is True
    assert body["canary"]["available"] is True and body["free_slots"] == 1
    # the default path is the fast one where its probe passes, and /healthz says so
    assert body["sandbox"]["backend"] == "zygote" and body["sandbox"]["fast_path"] is True, body["sandbox"]


@pytest.mark.parametrize(
    "path",
    ["/v1/verify", "/openapi.json", "/docs", "/redoc", "/docs-static/swagger-ui.css", "/metrics",
     "/v1/tasks/" + "0" * 32],
)  # fmt: skip
def test_every_other_path_needs_a_key(server: str, path: str) -> None:
    missing = httpx.get(f"{server}{path}")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}{path}", headers={"Authorization": "Bearer nope"}).status_code == 403
    second_key = httpx.get(f"{server}{path}", headers=AUTH_2)
    assert second_key.status_code not in (401, 403)


def test_verify_scores_in_order(server: str) -> None:
    items = [_countdown("a"), _countdown("b", "3+5+2"), _countdown("c", "nope")]
    reply = httpx.post(f"{server}/v1/verify", json={"items": items}, headers=AUTH, timeout=30)
    assert reply.status_code == 200
    got = [(r["id"], r["status"], r["reward"]) for r in reply.json()["results"]]
    assert got == [("a", "pass", 1.0), ("b", "fail", 0.1), ("c", "parse_error", 0.0)]


def test_size_limits_return_413(server: str) -> None:
    big = httpx.post(
        f"{server}/v1/verify", content=b"x" * 70000, headers={**AUTH, "content-type": "application/json"}
    )
    assert big.status_code == 413 and "max_body_bytes" in big.json()["detail"]
    item = _countdown("big") | {"response": "<answer>1</answer>" + " " * 9000}
    assert httpx.post(f"{server}/v1/verify", json={"items": [item]}, headers=AUTH).status_code == 413
    many = [_countdown(f"i{i}") for i in range(9)]
    reply = httpx.post(f"{server}/v1/verify", json={"items": many}, headers=AUTH)
    assert reply.status_code == 413 and "max_items" in reply.json()["detail"]


def test_schema_errors_are_422_naming_the_field(server: str) -> None:
    bad = {"items": [{"id": "x", "task": "code", "response": "print(1)", "tests": [{"stdin": "1"}]}]}
    reply = httpx.post(f"{server}/v1/verify", json=bad, headers=AUTH)
    assert reply.status_code == 422
    locations = [err["loc"] for err in reply.json()["detail"]]
    assert ["body", "items", 0, "code", "tests", 0, "IoTest", "expected_stdout"] in locations


def test_a_full_wait_queue_answers_429(server: str) -> None:
    slow = {"id": "slow", "task": "code", "response": "import time\ntime.sleep(2)\nprint(1)",
            "tests": [{"stdin": "", "expected_stdout": "1"}]}  # fmt: skip
    first: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: first.update(
            r=httpx.post(f"{server}/v1/verify", json={"items": [slow]}, headers=AUTH, timeout=60)
        )  # fmt: skip
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{server}/healthz").json()["free_slots"] != 0:
            assert time.monotonic() < deadline, "the slow request never took the slot"
            time.sleep(0.05)
        rejected = httpx.post(f"{server}/v1/verify", json={"items": [_countdown("a")]}, headers=AUTH)
        assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
    finally:
        thread.join()
    assert first["r"].status_code == 200 and first["r"].json()["results"][0]["status"] == "pass"
    assert (
        httpx.post(f"{server}/v1/verify", json={"items": [_countdown("a")]}, headers=AUTH).status_code == 200
    )


def test_background_tasks_are_idempotent_and_kept_in_redis(server: str) -> None:
    items = [_countdown("a"), _countdown("b", "3+5+2")]
    submit = httpx.post(f"{server}/v1/tasks", json={"client_id": "batch-1", "items": items}, headers=AUTH)
    assert submit.status_code == 202
    task_id = submit.json()["task_id"]
    assert submit.headers["location"] == f"/v1/tasks/{task_id}"
    again = httpx.post(f"{server}/v1/tasks", json={"client_id": "batch-1", "items": items}, headers=AUTH)
    assert again.status_code == 202 and again.json()["task_id"] == task_id
    other = httpx.post(f"{server}/v1/tasks", json={"client_id": "batch-1", "items": items[:1]}, headers=AUTH)
    assert other.status_code == 409 and "batch-1" in other.json()["detail"]
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{server}/v1/tasks/{task_id}", headers=AUTH).json())["status"] != "done":
        assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
        time.sleep(0.1)
    assert [(r["id"], r["status"]) for r in state["results"]] == [("a", "pass"), ("b", "fail")]
    assert httpx.get(f"{server}/v1/tasks/{'f' * 32}", headers=AUTH).status_code == 404
    assert httpx.get(f"{server}/v1/tasks/not-an-id", headers=AUTH).status_code == 422


def _wait_done(server: str, task_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{server}/v1/tasks/{task_id}", headers=headers).json())["status"] != "done":
        assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def test_a_task_is_private_to_the_key_that_submitted_it(server: str) -> None:
    mine, theirs = [_countdown("a")], [_countdown("x", "nope")]
    first = httpx.post(f"{server}/v1/tasks", json={"client_id": "job-1", "items": mine}, headers=AUTH)
    assert first.status_code == 202
    task_a = first.json()["task_id"]
    # The second key picks the same client id for its own batch: a task of its own, not a 409 or A's task.
    second = httpx.post(f"{server}/v1/tasks", json={"client_id": "job-1", "items": theirs}, headers=AUTH_2)
    assert second.status_code == 202 and second.json()["task_id"] != task_a
    task_b = second.json()["task_id"]
    # B's "job-1" names B's task: reusing it with other items conflicts with that one, never with A's.
    reuse = httpx.post(f"{server}/v1/tasks", json={"client_id": "job-1", "items": mine}, headers=AUTH_2)
    assert reuse.status_code == 409 and task_b in reuse.text and task_a not in reuse.text
    assert [r["id"] for r in _wait_done(server, task_a, AUTH)["results"]] == ["a"]
    assert [(r["id"], r["status"]) for r in _wait_done(server, task_b, AUTH_2)["results"]] == [
        ("x", "parse_error")
    ]
    # Each key reads only its own task; the other's id is as unknown as a made-up one.
    for task_id, stranger in ((task_a, AUTH_2), (task_b, AUTH)):
        reply = httpx.get(f"{server}/v1/tasks/{task_id}", headers=stranger)
        assert reply.status_code == 404 and "results" not in reply.text, reply.text
    again = httpx.post(f"{server}/v1/tasks", json={"client_id": "job-1", "items": mine}, headers=AUTH)
    assert again.status_code == 202 and again.json()["task_id"] == task_a


def test_run_code_speaks_sandbox_fusion(server: str) -> None:
    # Exactly the payload verl's sandbox_fusion client sends, read the way it reads the reply.
    payload = {"compile_timeout": 10, "run_timeout": 10, "code": "print(int(input()) * 2)", "stdin": "21",
               "language": "python", "files": {}, "fetch_files": []}  # fmt: skip
    reply = httpx.post(f"{server}/run_code", json=payload, headers=AUTH, timeout=30)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "Success" and body["compile_result"] is None
    assert body["run_result"]["status"] == "Finished" and body["run_result"]["return_code"] == 0
    assert body["run_result"]["stdout"].rstrip("\n") == "42"
    failing = httpx.post(f"{server}/run_code", json=payload | {"code": "raise SystemExit(3)"}, headers=AUTH)
    assert failing.json()["status"] == "Failed" and failing.json()["run_result"]["return_code"] == 3
    slow = payload | {"code": "while True: pass", "run_timeout": 1}
    timed = httpx.post(f"{server}/run_code", json=slow, headers=AUTH, timeout=30).json()
    assert (timed["status"], timed["run_result"]["status"]) == ("Failed", "TimeLimitExceeded")
    assert (
        httpx.post(f"{server}/run_code", json=payload | {"language": "cpp"}, headers=AUTH).status_code == 422
    )


def test_metrics_and_docs(server: str) -> None:
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert "lpo_verifier_items_total" in text and 'lpo_verifier_rejected_total{code="401"}' in text
    spec = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    assert {"/v1/verify", "/v1/tasks", "/v1/tasks/{task_id}", "/run_code", "/healthz", "/metrics"} <= set(
        spec["paths"]
    )
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server}{page}", headers=AUTH)
        assert html.status_code == 200 and "/docs-static/" in html.text and "cdn." not in html.text
    js = httpx.get(f"{server}/docs-static/swagger-ui-bundle.js", headers=AUTH)
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text


def test_cli_refuses_a_public_bind_without_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != API_KEYS_ENV} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "services.verifier", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "refusing to bind '0.0.0.0' without an API key" in out.stderr
