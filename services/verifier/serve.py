"""Ray Serve deployment of the verifier: the same FastAPI app as ``python -m services.verifier serve``,
wrapped with ``serve.ingress``. Each replica probes its sandbox at start-up (the app's lifespan) and
refuses to start when no working backend is available, like the CLI.

    from services.verifier.serve import deploy
    deploy(cfg.verifier, host="127.0.0.1", port=8000, redis_url="redis://...")
"""

from __future__ import annotations

from typing import Any

from ray import serve

from services.common.config import VerifierConfig
from services.verifier.__main__ import check_bind
from services.verifier.app import create_app


def build_deployment(
    cfg: VerifierConfig, *, redis_url: str | None = None, num_replicas: int = 1, num_cpus: float = 1.0
) -> Any:
    """A bound Serve application: ``num_replicas`` replicas of the verifier app."""
    app = create_app(cfg, redis_url=redis_url)

    @serve.deployment(
        name="verifier",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=cfg.max_concurrency + cfg.max_waiting,
    )
    @serve.ingress(app)
    class VerifierDeployment:
        """Holds nothing of its own: the ingress app carries the state."""

    return VerifierDeployment.bind()


def deploy(
    cfg: VerifierConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    redis_url: str | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` (refused off loopback without API keys) and run the app
    at ``/``; returns the deployment handle."""
    check_bind(cfg, host)
    serve.start(http_options={"host": host, "port": port})
    bound = build_deployment(cfg, redis_url=redis_url, num_replicas=num_replicas, num_cpus=num_cpus)
    return serve.run(bound, name="verifier", route_prefix="/")
