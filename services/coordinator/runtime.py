"""Bring a run's services up and down: Redis, Ray, the model, the actors."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import ConfigError, RunConfig
from services.common.paths import project_cache_dir, set_cache_env
from services.coordinator.reaper import mark_and_watch

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_model(path: str) -> str:
    """``tiny:countdown`` / ``tiny:code`` -> the tiny model (built if missing); a directory as is; else a
    hub id."""
    if path == "tiny:countdown":
        from services.common.tiny import build_tiny

        return str(build_tiny())
    if path == "tiny:code":
        from services.common.tiny import build_tiny
        from services.common.tiny_code import CodeTinySpec

        return str(build_tiny(spec=CodeTinySpec()))
    if Path(path).is_dir():
        return str(Path(path).resolve())
    from huggingface_hub import snapshot_download  # real hub loading for cluster runs

    return snapshot_download(repo_id=path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def snapshot_nbytes(model_dir: str | Path, dtype: str) -> int:
    """Bytes of one weight snapshot of the checkpoint in ``model_dir`` published in ``dtype``: every tensor
    of its safetensors files (headers only), as the learner sends them."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; the learner needs a HF checkpoint")
    elements = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                elements += math.prod(handle.get_slice(name).get_shape())
    return elements * _DTYPE_BYTES[dtype]


def check_weight_budget(cfg: RunConfig, nbytes: int) -> None:
    """Refuse a ``redis`` transport whose kept snapshots would exceed ``weights.redis_budget_mb``."""
    w = cfg.weights
    held_mb = nbytes * w.keep_versions / 2**20
    if w.transport == "redis" and held_mb > w.redis_budget_mb:
        raise ConfigError(
            f"weights.transport=redis would hold {held_mb:,.0f} MiB of snapshots in Redis "
            f"({nbytes / 2**20:,.0f} MiB per snapshot x weights.keep_versions={w.keep_versions}), over "
            "weights.redis_budget_mb="
            f"{w.redis_budget_mb:g}: set weights.transport=object_store (snapshots through the Ray object "
            "store, never in Redis or its append-only file), or lower keep_versions / raise the budget"
        )


def _job_env_vars() -> set[str]:
    """Names of the environment variables the submitted job's runtime env sets (none outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def reserved_cpus(cfg: RunConfig) -> float:
    """Logical CPUs the run's actors reserve (``cluster.*.num_cpus`` times their counts)."""
    c = cfg.cluster
    return (
        cfg.generator.num_actors * c.generator.num_cpus
        + cfg.verifier.num_workers * c.verifier.num_cpus
        + cfg.learner.world_size * c.learner.num_cpus
    )


def warn_if_short(cfg: RunConfig) -> None:
    """On a joined cluster, say at once (not after the actors' start-up timeout) when its CPUs cannot hold
    the run's reservations; only a warning, since an autoscaling cluster may still grow."""
    import ray

    total, needed = ray.cluster_resources().get("CPU", 0.0), reserved_cpus(cfg)
    if total < needed:
        logger.warning(
            "the cluster has %g CPUs, the run's actors reserve %g (cluster.generator/verifier/learner"
            ".num_cpus x generator.num_actors/verifier.num_workers/learner.world_size): actors will wait "
            "for CPUs; lower those num_cpus or add nodes",
            total,
            needed,
        )


def init_ray(cfg: RunConfig) -> bool:
    """Join the cluster (``ray job submit`` / ``RAY_ADDRESS`` / ``cluster.address``) or start a local one.
    Returns whether this call started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():  # an embedding process (a test, a notebook) already connected
        return False
    env = {k: os.environ[k] for k in ("LPO_CACHE_DIR", "LPO_LOG_LEVEL") if k in os.environ}
    env.setdefault("LPO_CACHE_DIR", str(project_cache_dir()))
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` Ray merges this runtime env into the job's and refuses a variable both set.
        env = {k: v for k, v in env.items() if k not in _job_env_vars()}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True
    needed = reserved_cpus(cfg)
    # Ray's agents outlive a coordinator killed before ray.shutdown(): a watcher ends them (reaper.py).
    mark_and_watch()
    # Logical CPUs: on a small machine the stages take turns (sync) or share cores (async).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
        include_dashboard=False,
        _metrics_export_port=cfg.metrics.export_port,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return True


def _wait_ready(actors: list[Any], timeout_s: float) -> None:
    """Wait for the actors' constructors; a clear error instead of a silent hang when the cluster cannot
    place them (not enough CPUs/GPUs for ``cluster.*`` resources)."""
    import ray

    refs = [a.ready.remote() for a in actors]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise RuntimeError(
            f"{len(pending)} of {len(refs)} generator/verifier actors did not start within {timeout_s:.0f}s; "
            f"the cluster may lack the resources of cluster.* (available: {ray.available_resources()})"
        )
    ray.get(done)


def poll_stats(actors: list[Any], timeout_s: float = 5.0) -> list[tuple[str, Any]]:
    """Each actor's ``stats()`` answer (``GeneratorStats`` / ``VerifierStats``) within ``timeout_s``, with its
    state: ``alive`` (answered), ``dead`` (Ray gave up restarting it) or ``unresponsive`` (restarting, or
    busy past the timeout); the stats are None unless alive."""
    import ray

    refs = [a.stats.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out: list[tuple[str, Any]] = []
    for ref in refs:
        if ref not in done:
            out.append(("unresponsive", None))
            continue
        try:
            out.append(("alive", ray.get(ref)))
        except ray.exceptions.ActorDiedError:
            out.append(("dead", None))
        except ray.exceptions.RayError:  # the call failed on a live actor (e.g. while it restarts)
            out.append(("unresponsive", None))
    return out


def actor_states(actors: list[Any], timeout_s: float = 5.0) -> list[str]:
    """``alive``, ``dead`` or ``unresponsive`` for each actor (``poll_stats``)."""
    return [state for state, _ in poll_stats(actors, timeout_s)]


@dataclass
class Runtime:
    """Handles to everything a run started; ``stop()`` ends exactly those."""

    cfg: RunConfig
    redis_url: str
    model_dir: str
    redis_server: Any = None
    generators: list[Any] = field(default_factory=list)
    verifiers: list[Any] = field(default_factory=list)
    learner: Any = None
    owns_ray: bool = False
    loops: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, cfg: RunConfig, redis_dir: Path | None = None) -> Runtime:
        """Start everything; an embedded Redis keeps its AOF in ``redis_dir`` (the run directory's)."""
        from services.common.redis_server import connect
        from services.generator.actor import GeneratorActor
        from services.learner.group import LearnerGroup
        from services.verifier.actor import VerifierActor

        set_cache_env()
        model_dir = resolve_model(cfg.model.path)
        check_weight_budget(cfg, snapshot_nbytes(model_dir, cfg.model.dtype))
        redis_url, server = connect(cfg.queue.redis_url, data_dir=redis_dir)
        rt = cls(cfg=cfg, redis_url=redis_url, model_dir=model_dir, redis_server=server)
        try:
            rt.owns_ray = init_ray(cfg)
            warn_if_short(cfg)
            c = cfg.cluster
            rt.learner = LearnerGroup(cfg, model_dir, redis_url)
            # A crashed generator or verifier is restarted by Ray, and its running loop (and any control
            # call) is retried on the new instance, which rejoins at the latest snapshot.
            supervised = {"max_restarts": c.max_restarts, "max_task_retries": -1 if c.max_restarts else 0}
            rt.generators = [
                GeneratorActor.options(
                    num_cpus=c.generator.num_cpus,
                    num_gpus=c.generator.num_gpus,
                    resources=c.generator.resources,
                    **supervised,
                ).remote(cfg, model_dir, redis_url, i)
                for i in range(cfg.generator.num_actors)
            ]
            rt.verifiers = [
                VerifierActor.options(
                    num_cpus=c.verifier.num_cpus, resources=c.verifier.resources, **supervised
                ).remote(cfg, redis_url, i)
                for i in range(cfg.verifier.num_workers)
            ]
            _wait_ready(rt.generators + rt.verifiers, timeout_s=600.0)
            rt.learner.wait_ready()
        except BaseException:
            rt.stop()
            raise
        return rt

    def start_loops(self) -> list[Any]:
        """Start the generator and verifier loops; returns their refs (they end on ``stop``). The refs are
        kept: Ray retries a loop on a restarted actor only while its caller still holds the ref."""
        self.loops = [a.run.remote() for a in self.generators + self.verifiers]
        return self.loops

    def loop_failures(self) -> list[str]:
        """``"generator-0: <error>"`` for each live actor whose loop has ended with an error (a loop only
        ends on ``stop``)."""
        import ray

        if not self.loops:
            return []
        names = [f"generator-{i}" for i in range(len(self.generators))]
        names += [f"verifier-{i}" for i in range(len(self.verifiers))]
        ended, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        failures = []
        for name, ref in zip(names, self.loops, strict=True):
            if ref not in ended:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:
                continue  # Ray gave up restarting it: the watchdog's states cover a dead stage
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                last = (str(cause).strip().splitlines() or [""])[-1][:500]
                failures.append(f"{name}: {type(cause).__name__}: {last}")
        return failures

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.generators + self.verifiers:
                try:
                    ray.get(actor.stop.remote(), timeout=10)
                except Exception:  # an actor that is already dead has nothing to stop
                    logger.debug("actor stop failed", exc_info=True)
                ray.kill(actor)
            if self.learner is not None:
                self.learner.shutdown()
            if self.owns_ray:
                ray.shutdown()
        if self.redis_server is not None:
            self.redis_server.stop()
