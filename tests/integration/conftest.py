"""Shared fixtures of the integration tests: private redis-servers and a local Ray instance.

Every Redis a test uses is its own ``redis-server`` on a free loopback port (never the machine's), stopped
by PID at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.paths import project_cache_dir
from services.common.redis_server import EmbeddedRedis

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The shipped tiny Countdown model (built on first use, then cached under .cache/models)."""
    from services.common.tiny import build_tiny

    return str(build_tiny())


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start servers with ``EmbeddedRedis`` options (``appendonly=True``, ``binary=...``); all are stopped
    at teardown."""
    servers: list[EmbeddedRedis] = []

    def make(**options: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(**options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    """A fresh non-persistent redis-server (``--save "" --appendonly no``)."""
    return redis_factory()


@pytest.fixture
def redis_server_aof(redis_factory: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    """A fresh redis-server with AOF (everysec) whose data survives ``restart()``."""
    return redis_factory(appendonly=True)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance for the session (8 logical CPUs, no dashboard); reused if one is already up."""
    import ray

    started = not ray.is_initialized()
    if started:
        # Workers import the project's packages: put the repo on their path as the coordinator does.
        env = {"PYTHONPATH": str(REPO_ROOT), "LPO_CACHE_DIR": str(project_cache_dir())}
        # Logical CPUs: whole runs (learner + generator + verifier actors) share this instance.
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    if started:
        ray.shutdown()
