"""The one config tree of a run: pydantic v2, ``extra="forbid"``, a docstring and bounds on every field.

Load order: defaults < YAML file < ``--set a.b=c`` overrides (``load_config``). Errors name the field,
the bad value and what is allowed. This module imports no torch / vllm / deepspeed (tested), so the
coordinator can validate a config before any heavy import and ``--dry-run`` stays instant.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field, the value and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    """The policy to train."""

    path: str = "tiny:countdown"
    """HF model directory or hub id; ``tiny:countdown`` / ``tiny:code`` build (or reuse) the shipped tiny
    Countdown / code base model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for learner and engine; CPU runs use float32 (bf16 only where the CPU supports it)."""
    max_model_len: int = Field(128, ge=16, le=131072)
    """Prompt + response tokens the engine must fit."""


class EvalSetConfig(_Section):
    """One named evaluation set, reported on its own (eval.jsonl, summary.json, Prometheus, curves.png)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Label of the set in every report (e.g. ``cd34``, ``math500``, ``val``)."""
    path: str | None = None
    """Problems file of the run's task (same formats as ``data.train_path``; local or ``hf://datasets/...``).
    None: generated held-out Countdown problems of the tiny model's distribution, disjoint from its
    fine-tuning problems and from every set listed before this one (countdown only)."""
    problems: int | None = Field(None, ge=1)
    """Problems used (the first ones of the file or of the generated stream); None:
    ``coordinator.eval_problems``."""
    samples: int | None = Field(None, ge=1, le=1024)
    """Samples per problem (n of the unbiased Pass@k); None: ``coordinator.eval_samples``."""
    nums: tuple[int, ...] = ()
    """Generated sets only: the allowed counts of numbers per problem (``[4]`` is the paper's CD4,
    ``[3, 4]`` its CD34); empty: any count of the tiny distribution."""
    report: bool = True
    """False marks a validation set: evaluated and logged like the others, but hyper-parameters are chosen
    on it and it is left out of the run's headline (the progress line and the final log line)."""
    evaluate: bool = True
    """False: the set is reserved (kept out of the training problems) but not evaluated in this run, e.g.
    the test sets while hyper-parameters are tuned on a validation set; the training pool stays the same."""

    @model_validator(mode="after")
    def _nums_only_generated(self) -> EvalSetConfig:
        if self.nums and self.path is not None:
            raise ValueError(
                f"eval set {self.name!r}: nums filters generated problems only; remove nums or path"
            )
        if any(not 2 <= n <= 6 for n in self.nums):
            raise ValueError(f"eval set {self.name!r}: nums must lie in 2..6, got {list(self.nums)}")
        return self


class DataConfig(_Section):
    """Where prompts come from."""

    task: Literal["countdown", "math", "code"] = "countdown"
    """Task kind; selects the dataset format and the verifier rule (``countdown``, ``math``, or ``code``:
    Python programs run against the problem's tests in the verifier's sandbox)."""
    train_path: str | None = None
    """Training problems, JSONL or Parquet, local or ``hf://datasets/<owner>/<name>/<file>``: Countdown-Tasks
    rows (``nums``, ``target``), MATH rows (``problem`` + ``answer`` or a ``solution`` with ``\\boxed``) or
    code rows (a prompt and tests: native, PRIME/verl ground truth, APPS/TACO; services/common/data/code.py).
    None generates Countdown problems (countdown only)."""
    eval_path: str | None = None
    """Held-out problems file (same formats; the first ``coordinator.eval_problems`` are used); None uses
    the tiny model's generated held-out set (countdown only). The one set named ``heldout`` when
    ``eval_sets`` is empty; use ``eval_sets`` for several."""
    eval_sets: tuple[EvalSetConfig, ...] = ()
    """Named evaluation sets, each reported separately; the first evaluated one with ``report: true`` (else
    the first evaluated one) is the headline.
    Empty: one set ``heldout`` from ``eval_path``. Every set is removed from the training problems."""
    train_pool: int | None = Field(None, ge=1)
    """Keep only the first N training problems (after removing evaluation and SFT problems): a fixed pool
    that the run revisits epoch after epoch, as the paper's 2,000-problem Countdown subset. None: all."""
    row_filter: dict[str, str | int | bool] = Field(default_factory=dict)
    """Read only the rows whose fields equal these values, from every dataset file of the run (training
    and evaluation): ``{ability: coding}`` keeps the code split of PRIME's mixed Eurus-2-RL-Data files.
    Empty: every row."""
    prompt_template: Literal["plain", "r1"] = "plain"
    """``plain``: the short prompt (the tiny model's for Countdown); ``r1``: the R1-Zero conversation
    prompt of the public base-model recipes (services/common/data/problems.py)."""
    seed: int = Field(1234, ge=0)
    """Seed of the problem generator and of the dataset shuffle."""
    train_size: int = Field(4096, ge=1, le=10_000_000)
    """Number of generated training problems (ignored with ``train_path``)."""
    min_nums: int = Field(2, ge=2, le=6)
    """Fewest numbers per generated problem."""
    max_nums: int = Field(4, ge=2, le=6)
    """Most numbers per generated problem."""
    max_num: int = Field(50, ge=1, le=1000)
    """Generated numbers are drawn from 1..max_num."""
    max_target: int = Field(100, ge=1, le=100_000)
    """Generated targets lie in 1..max_target."""
    exclude_sft_problems: bool = True
    """With ``model.path: tiny:countdown``, drop the problems the tiny model was fine-tuned on from the RL
    set, so RL trains on unseen problems from the held-out distribution (not on memorised ones)."""

    @model_validator(mode="after")
    def _nums_range(self) -> DataConfig:
        if self.max_nums < self.min_nums:
            raise ValueError(f"max_nums ({self.max_nums}) must be >= min_nums ({self.min_nums})")
        has_eval = self.eval_path is not None if not self.eval_sets else all(e.path for e in self.eval_sets)
        if self.task != "countdown" and (self.train_path is None or not has_eval):
            raise ValueError(
                f"task {self.task!r} needs data.train_path and an evaluation file (data.eval_path, or a path "
                "on every data.eval_sets entry; local or hf://datasets/... paths); only Countdown problems "
                "can be generated"
            )
        if self.eval_sets and self.eval_path is not None:
            raise ValueError(
                "data.eval_path and data.eval_sets are exclusive: put the file in an eval set's path"
            )
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval_sets names must be unique, got {names}")
        if self.eval_sets and not any(e.evaluate for e in self.eval_sets):
            raise ValueError("data.eval_sets needs at least one set with evaluate: true")
        return self


class GeneratorConfig(_Section):
    """vLLM rollout actors."""

    num_actors: int = Field(1, ge=1, le=1024)
    """Generator actors (one vLLM engine each)."""
    temperature: float = Field(1.0, gt=0.0, le=4.0)
    """Rollout sampling temperature (the paper samples at 1.0)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1.0 keeps behaviour log-probs those of the full softmax."""
    max_tokens: int = Field(48, ge=1, le=131072)
    """Most response tokens per sample."""
    seed: int = Field(0, ge=0)
    """Base sampling seed. Each task's samples are seeded from it and the task's position in the run's
    task stream (so a run's samples depend on its seed and config, not on its name or on which
    generator takes a task); each actor offsets its engine seed by its rank."""
    enforce_eager: bool = True
    """Skip graph capture / torch.compile (faster start on small CPU machines)."""
    kv_cache_gib: float = Field(1.0, gt=0.0, le=1024.0)
    """KV-cache memory per engine (VLLM_CPU_KVCACHE_SPACE on CPU)."""
    max_num_seqs: int | None = Field(None, ge=1, le=65536)
    """Most sequences vLLM schedules in one batch; None: vLLM's default for the device (256 on a CPU,
    1024 on an H100/H200). The KV cache (``kv_cache_gib``) must hold that many, or vLLM preempts them."""


class VerifierConfig(_Section):
    """Scoring workers and their sandbox."""

    num_workers: int = Field(1, ge=1, le=1024)
    """Verifier worker actors consuming the rollouts stream."""
    sandbox: Literal["zygote", "nsjail", "bwrap", "none"] = "zygote"
    """Isolation backend for code tasks: ``zygote`` (the fast path: a fresh jail per execution forked from
    a warm interpreter; needs root and pids + memory cgroups), ``nsjail``, ``bwrap``; ``none`` is rlimits
    only."""
    allow_unsandboxed_code: bool = False
    """Let the training loop run code tasks with ``sandbox: none`` (refused otherwise)."""
    timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    """Wall-clock limit per scored item."""
    sandbox_fallback: bool = False
    """If the configured backend fails its start-up probe, use the first isolating backend (nsjail, bwrap,
    zygote) that passes instead of refusing to start; never falls back to ``none``."""
    python: str = Field("/usr/bin/python3", pattern=r"^/\S+$")
    """Interpreter that runs code-task programs inside the sandbox (under the read-only system binds)."""
    memory_mb: int = Field(512, ge=32, le=65536)
    """Default and largest memory limit of one code execution (the whole process tree, MiB)."""
    pids_max: int = Field(64, ge=4, le=4096)
    """Most processes/threads one code execution may have at once."""
    fsize_mb: int = Field(16, ge=1, le=4096)
    """Largest file one code execution may write (MiB)."""
    output_bytes: int = Field(1 << 20, ge=1024, le=1 << 28)
    """Cap on the captured stdout and on the captured stderr of one execution (bytes; the rest is dropped)."""
    tmp_dir: str | None = None
    """Where per-execution temp dirs are made; None: /dev/shm when writable (counted against the run's
    memory cgroup), else the system temp dir."""
    math_workers: int = Field(2, ge=1, le=256)
    """Processes of the math-verify pool (each check runs in one, killed on overrun)."""
    math_timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    """Hard per-check limit of a math verification; the worker is killed past it."""
    code_short_circuit: bool = False
    """Default for code items: stop at the first failing test and give a binary reward (1 or 0)."""
    api_keys: tuple[SecretStr, ...] = ()
    """Bearer API keys of the REST service (plus ``LPO_VERIFIER_API_KEYS``, comma-separated); with none,
    the service only binds a loopback address."""
    max_concurrency: int = Field(4, ge=1, le=1024)
    """Items the REST service scores at once (sandbox slots)."""
    max_waiting: int = Field(32, ge=0, le=100_000)
    """Requests that may wait for a slot; past it the service answers 429."""
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 30)
    """Largest REST request body (413 past it)."""
    max_item_bytes: int = Field(1 << 20, ge=256, le=1 << 30)
    """Largest single item of a batch, as JSON (413 past it)."""
    max_items: int = Field(256, ge=1, le=100_000)
    """Most items in one REST batch."""
    task_ttl_s: int = Field(86_400, ge=60, le=30 * 86_400)
    """How long ``/v1/tasks`` results are kept in Redis."""


class LearnerConfig(_Section):
    """The DeepSpeed learner group and its objective (docs/OBJECTIVES.md)."""

    objective: Literal["lpo_fwd", "lpo_rev", "pg", "pointwise"] = "lpo_fwd"
    """Loss: LPO forward/reverse KL projection, the paired PG baseline, or the pointwise ablation."""
    temperature: Literal["grpo", "drgrpo", "maxrl", "fixed"] = "grpo"
    """Normalisation statistic shared by LPO's target and the paired PG advantage."""
    tau: float | None = Field(None, gt=0.0)
    """Temperature value; required with ``temperature: fixed`` and only then."""
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    """Trust-region half-width on token ratios to the proximal policy."""
    is_cap: float = Field(2.0, ge=1.0)
    """Cap of the truncated importance weight on stale PG groups."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum"] = "token-mean"
    """Loss scale of every objective: ``token-mean`` (per real token of the mini-batch, verl's default) or
    ``seq-mean-token-sum`` (per response; for LPO per group, the paper's Algorithm 1). One setting for all
    objectives keeps LPO and PG on the same gradient scale (on-policy LPO-rev == PG exactly, Prop. 1), so
    ``grad_clip`` and ``lr`` mean the same for both (docs/OBJECTIVES.md §5)."""
    behavior_logprobs: Literal["engine", "proximal"] = "engine"
    """``engine`` corrects for the sampling policy; ``proximal`` ignores staleness (ablation)."""
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    """Adam learning rate."""
    weight_decay: float = Field(0.1, ge=0.0, le=1.0)
    """AdamW weight decay."""
    adam_eps: float = Field(1e-8, gt=0.0, le=10.0)
    """AdamW epsilon. Far above the gradients' scale it turns the update into SGD with step ``lr / eps``
    (the world-size equivalence test uses that to compare gradients through the weights)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""
    updates_per_batch: int = Field(2, ge=1, le=64)
    """Optimizer updates per rollout batch (mini-batches per batch)."""
    micro_batch_groups: int = Field(4, ge=1, le=4096)
    """Groups per forward/backward micro-batch on one rank (memory knob, not a maths knob)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage, 0-3 (3 partitions parameters; snapshots gather them in buckets)."""
    world_size: int = Field(1, ge=1, le=4096)
    """Learner ranks (Ray actors, one DeepSpeed process each)."""
    logprob_chunk_tokens: int = Field(256, ge=16)
    """Response tokens per chunk of the vocab projection when computing token log-probs. The learner holds one
    ``chunk x vocab`` fp32 logits buffer at a time (4 B x vocab per token: 148 MiB for 256 tokens of a
    151,936 vocab) next to the head's weight gradient; the chunk size barely changes speed. Under ZeRO-3 the
    head is called per chunk under checkpointing, which also adds a vocab x hidden gradient per chunk. A
    memory knob, not a maths knob."""
    shared_prefix: bool = True
    """Run each group's prompt through the model once for its K responses (their key/value cache is the
    prefix every response attends to) instead of once per response: the same log-probs and gradients up
    to round-off, with the prompt's share of the forward/backward cut K-fold. ``false`` runs every
    prompt + response row whole (docs/ARCHITECTURE.md)."""
    checkpoint_every: int = Field(20, ge=0)
    """Checkpoint every N steps: the DeepSpeed state (weights, optimizer, RNG) and the run's position,
    which ``--resume`` continues from, plus an HF export. 0: none (a resume replays from the base model)."""
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    """DeepSpeed checkpoints kept on disk (the newest ones)."""
    seed: int = Field(0, ge=0)
    """Learner seed (data order within a batch, dropout if any)."""
    log_update_norm: bool = False
    """Also report ``update_norm``, the L2 norm of each step's parameter change. Holds a copy of the
    weights for the step (for studies on small models; not with ZeRO-3)."""

    @model_validator(mode="after")
    def _update_norm_needs_full_weights(self) -> LearnerConfig:
        if self.log_update_norm and self.zero_stage == 3:
            raise ValueError(
                "learner.log_update_norm needs the full weights on each rank; ZeRO-3 partitions them: "
                "set learner.zero_stage <= 2 or learner.log_update_norm=false"
            )
        return self

    @model_validator(mode="after")
    def _tau_only_when_fixed(self) -> LearnerConfig:
        if self.temperature == "fixed" and self.tau is None:
            raise ValueError("temperature 'fixed' needs learner.tau > 0; set e.g. --set learner.tau=0.5")
        if self.temperature != "fixed" and self.tau is not None:
            raise ValueError(
                f"learner.tau={self.tau} is only used with temperature 'fixed' (got {self.temperature!r}); "
                "remove tau or set temperature: fixed"
            )
        return self


class CoordinatorConfig(_Section):
    """The run loop: admission, staleness, evaluation."""

    group_size: int = Field(8, ge=2, le=1024)
    """K, responses per prompt (the paper uses 8)."""
    prompts_per_step: int = Field(16, ge=1, le=1_000_000)
    """Groups per learner step (rollout batch)."""
    max_policy_lag: int = Field(0, ge=0, le=64)
    """Largest learner-version lag a group may be trained at; 0 is synchronous on-policy."""
    steps: int = Field(20, ge=1, le=10_000_000)
    """Learner steps in the run."""
    eval_every: int = Field(10, ge=0)
    """Evaluate every N steps (0: only at start and end)."""
    eval_problems: int = Field(128, ge=1)
    """Held-out problems per evaluation."""
    eval_samples: int = Field(8, ge=1, le=1024)
    """Samples per held-out problem (n of Pass@k)."""
    eval_k: int = Field(8, ge=1)
    """k of the reported Pass@k (<= eval_samples)."""
    eval_temperature: float = Field(0.6, gt=0.0, le=4.0)
    """Sampling temperature of evaluation (the paper's 0.6)."""
    stall_timeout_s: float = Field(600.0, ge=1.0, le=7 * 86_400.0)
    """The watchdog: a run that gets no scored group for this long fails, naming the stuck stage."""
    run_name: str = Field("countdown-tiny", pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the run directory under ``runs_dir`` and of the Redis keys."""
    runs_dir: str = "runs"
    """Where run directories are written."""

    @model_validator(mode="after")
    def _k_within_n(self) -> CoordinatorConfig:
        if self.eval_k > self.eval_samples:
            raise ValueError(f"eval_k ({self.eval_k}) must be <= eval_samples ({self.eval_samples})")
        return self


class QueueConfig(_Section):
    """The Redis Streams queue."""

    redis_url: str = "embedded"
    """``redis://host:port/db`` or ``embedded`` (a private redis-server started for the run)."""
    block_ms: int = Field(1000, ge=1, le=600_000)
    """XREADGROUP blocking time."""
    claim_idle_ms: int = Field(60_000, ge=100)
    """Pending entries idle this long are reclaimed from a dead consumer."""

    @model_validator(mode="after")
    def _url(self) -> QueueConfig:
        if self.redis_url != "embedded" and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"queue.redis_url={self.redis_url!r} must be 'embedded' or a redis://, rediss://, unix:// URL"
            )
        return self


class WeightsConfig(_Section):
    """Weight snapshots from learner to generators."""

    transport: Literal["redis", "object_store"] = "redis"
    """Where snapshot payloads travel: chunked Redis keys or the Ray object store."""
    chunk_mb: float = Field(64.0, gt=0.0, le=512.0)
    """Largest Redis value per payload chunk (Redis caps values at 512 MB)."""
    keep_versions: int = Field(3, ge=1, le=1000)
    """Snapshots kept before garbage collection."""
    redis_budget_mb: float = Field(2048.0, gt=0.0)
    """Most snapshot bytes the ``redis`` transport may hold (snapshot size x ``keep_versions``, MiB). Redis
    keeps every value in memory and writes it to its append-only file, so a run whose model exceeds this
    is refused at start with the sizes: use ``transport: object_store`` for such models."""


class MetricsConfig(_Section):
    """Observability."""

    enabled: bool = True
    """Export metrics through ray.util.metrics (Prometheus via Ray's metrics agent)."""
    poll_s: float = Field(5.0, gt=0.0, le=3600.0)
    """Seconds between the coordinator's readings of queue depths and generator liveness."""
    export_port: int | None = Field(None, ge=1, le=65535)
    """Port of the Prometheus endpoint (``/metrics``) of a Ray that the run starts itself, so a scraper can
    be pointed at it (None: Ray picks one). A joined cluster's nodes export on the port their ``ray start
    --metrics-export-port`` gave them."""


class ActorResources(_Section):
    """Ray resources of one actor."""

    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs reserved per actor."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs reserved per actor (fractions allowed)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources reserved per actor, e.g. ``{rollout_node: 1}``: the actor is placed only on
    nodes that offer them (``ray start --resources='{"rollout_node": 8}'``), which is how a run puts its
    generators and verifiers on some nodes and its learner on others (docs/DEPLOY.md)."""

    @model_validator(mode="after")
    def _custom_resources(self) -> ActorResources:
        for name, amount in self.resources.items():
            if name.upper() in ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY") or amount < 0:
                raise ValueError(
                    f"resources: {name}={amount:g} is not a custom resource amount: give num_cpus/num_gpus "
                    "in their own fields and custom resources as name: amount >= 0"
                )
        return self


class ClusterConfig(_Section):
    """Where the actors run."""

    address: str | None = None
    """Ray address; None starts (or joins, under ``ray job submit``) the local/default cluster."""
    generator: ActorResources = ActorResources()
    """Resources per generator actor."""
    verifier: ActorResources = ActorResources(num_cpus=0.5)
    """Resources per verifier worker."""
    learner: ActorResources = ActorResources()
    """Resources per learner rank."""
    max_restarts: int = Field(4, ge=-1, le=10_000)
    """Times Ray restarts a crashed generator or verifier actor (-1: without limit); the restarted actor
    retries its loop and rejoins at the latest snapshot."""


class RunConfig(_Section):
    """A whole run."""

    model: ModelConfig = ModelConfig()
    """The policy to train."""
    data: DataConfig = DataConfig()
    """The prompts."""
    generator: GeneratorConfig = GeneratorConfig()
    """The vLLM rollout actors."""
    verifier: VerifierConfig = VerifierConfig()
    """The scoring workers."""
    learner: LearnerConfig = LearnerConfig()
    """The DeepSpeed learner group and objective."""
    coordinator: CoordinatorConfig = CoordinatorConfig()
    """The run loop."""
    queue: QueueConfig = QueueConfig()
    """The Redis queue."""
    weights: WeightsConfig = WeightsConfig()
    """Weight snapshot transport."""
    metrics: MetricsConfig = MetricsConfig()
    """Metrics export."""
    cluster: ClusterConfig = ClusterConfig()
    """Ray address and per-actor resources."""

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        if self.generator.max_tokens >= self.model.max_model_len:
            raise ValueError(
                f"generator.max_tokens ({self.generator.max_tokens}) must be < model.max_model_len "
                f"({self.model.max_model_len}) to leave room for the prompt"
            )
        if self.coordinator.prompts_per_step < self.learner.world_size:
            raise ValueError(
                f"coordinator.prompts_per_step ({self.coordinator.prompts_per_step}) must be >= "
                f"learner.world_size ({self.learner.world_size}): groups are never split across ranks"
            )
        tiny_task = {"tiny:countdown": "countdown", "tiny:code": "code"}.get(self.model.path)
        if tiny_task and (self.data.task, self.data.prompt_template) != (tiny_task, "plain"):
            raise ValueError(
                f"model.path {self.model.path!r} only knows data.task {tiny_task!r} with prompt_template "
                f"'plain'; got task {self.data.task!r}, prompt_template {self.data.prompt_template!r}"
            )
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> (``"a.b"``, YAML-parsed ``c``), so numbers, booleans and lists get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. --set learner.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    if isinstance(value, str):
        # YAML 1.1 reads "1e-5" (no dot) as a string; a user typing it means the number.
        with contextlib.suppress(ValueError):
            value = float(value) if _FLOAT.match(value) else value
    return key, value


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = ", ".join(_section_at(err["loc"][:-1]).model_fields)
            lines.append(f"{where}: unknown field; valid fields here: {valid}")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{where}: {err['msg']}{shown}")
    return "invalid run config:\n  " + "\n  ".join(lines)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model class at a path of field names (for listing valid fields)."""
    node: type[BaseModel] = RunConfig
    for name in loc:
        annotation = node.model_fields[str(name)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        node = annotation
    return node


def build_config(
    tree: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Validate a config tree after applying ``a.b=c`` overrides; raises ``ConfigError``."""
    merged: dict[str, Any] = _deep_copy(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(merged, key, value)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """defaults < YAML file at ``path`` < overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist; pass e.g. --config configs/countdown-tiny.yaml"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    return build_config(tree, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints and the run directory keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
