"""The Ray Serve deployment: the same FastAPI app behind Serve's HTTP proxy scores items in a replica
(with its own sandbox probe) and answers ``/healthz``."""

from __future__ import annotations

import httpx
import pytest

from services.common.config import VerifierConfig
from services.common.redis_server import free_port


@pytest.mark.slow
def test_serve_deployment_scores_items(ray_local: None) -> None:
    from ray import serve

    from services.verifier.serve import deploy

    port = free_port()
    deploy(VerifierConfig(max_concurrency=2), host="127.0.0.1", port=port, num_cpus=0.5)
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert health.status_code == 200 and health.json()["canary"]["available"] is True
        items = [
            {"id": "a", "task": "countdown", "response": "<answer>1+2</answer>", "nums": [1, 2], "target": 3},
            {
                "id": "b",
                "task": "code",
                "response": "print(input())",
                "tests": [{"stdin": "x", "expected_stdout": "x"}],
            },
        ]
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/verify", json={"items": items}, timeout=120)
        assert reply.status_code == 200, reply.text
        got = [(r["id"], r["status"], r["isolation"]) for r in reply.json()["results"]]
        assert got == [("a", "pass", "in_process"), ("b", "pass", health.json()["backend"])]
    finally:
        serve.shutdown()
