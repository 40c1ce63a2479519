"""One learner rank: a DeepSpeed engine around the HF policy, and the LPO iteration of Algorithm 1.

Per rollout batch (``train_step``):
  1. proximal pass — no-grad log-probs of the responses under the weights at the start of the
     iteration (``pi_t``), plus sampled-token entropy, for every mini-batch but the first: the first
     update's own forward runs at those weights, so it gives ``pi_t`` for its groups at no extra cost;
  2. ``updates_per_batch`` optimizer updates, one per mini-batch of groups; each mini-batch is
     split across ranks by whole groups and into micro-batches of ``micro_batch_groups``;
  3. the version counter moves to v+1 (the caller publishes the snapshot).

Every rank receives the whole batch and takes its own share deterministically, so global counts
(groups, tokens) that normalise the loss are known to every rank without communication.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.config import LearnerConfig
from services.common.messages import ResponseGroup
from services.common.weights import torch_dtype
from services.learner.batch import PackedBatch, pack_groups
from services.learner.logprobs import response_logprobs
from services.learner.objectives import LossInputs, ObjectiveConfig, policy_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RankInfo:
    """Where this rank sits in the learner group and how it reaches the others.

    ``store`` is a connected ``torch.distributed.Store`` (the learner group's rendezvous makes one);
    without it a single rank opens its own on a port the kernel picks (``master_port`` 0), and
    several ranks meet at ``master_addr:master_port`` through ``env://``.
    """

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    store: Any = None


def init_distributed(info: RankInfo) -> None:
    """torch.distributed through DeepSpeed: gloo on CPU, nccl on CUDA (env vars DeepSpeed reads).

    A port chosen elsewhere and bound here later can be taken in between (by any outgoing connection:
    free ports come from the ephemeral range), so a store the rank itself listens on is preferred.
    """
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK="0" if not torch.cuda.is_available() else str(info.rank % torch.cuda.device_count()),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if torch.distributed.is_initialized():
        return
    store = info.store
    if store is None and info.master_port == 0:
        if info.world_size > 1:
            raise ValueError("RankInfo: several ranks need a store or a master_port they all know")
        store = torch.distributed.TCPStore(info.master_addr, 0, 1, is_master=True)
    if store is not None:
        os.environ["MASTER_PORT"] = str(store.port)  # DeepSpeed's C++ backends name shared memory by it
        torch.distributed.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size)
    deepspeed.init_distributed(dist_backend=backend)  # wraps the group made above, or makes it (env://)


def flush_denormals(enabled: bool = True) -> bool:
    """Treat subnormal floats as zero (x86 FTZ/DAZ) on this thread and its intra-op OpenMP threads
    (``enabled=False`` restores IEEE behaviour, for a benchmark's comparison).

    With a large ``|s_t|`` the listwise weights underflow far below 1e-38; CPU arithmetic on subnormals
    is orders of magnitude slower, and the backward spreads them over every token's gradient. Flushing
    changes only values that would have been subnormal. ``torch.set_flush_denormal`` sets the calling
    thread's flags only, and the OpenMP workers, started by earlier ops, keep their own: so it is run
    once inside each of them too. Returns whether every thread was reached.
    """
    runtime = _openmp_runtime()
    if not torch.set_flush_denormal(enabled) or runtime is None:
        return False
    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(enabled))
    parallel = ctypes.CDLL(runtime).GOMP_parallel  # libgomp's ABI, also exported by Intel's libiomp5
    parallel.argtypes = [type(callback), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel(callback, None, torch.get_num_threads(), 0)
    return True


@functools.cache
def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime torch's intra-op threads run on (Linux), torch's own copy first."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    paths = {fields[5] for fields in (line.split() for line in maps) if len(fields) >= 6}
    found = sorted(
        (p for p in paths if Path(p).name.startswith(("libgomp", "libiomp5"))),
        key=lambda p: not p.startswith(str(Path(torch.__file__).parent)),
    )
    if not torch.set_flush_denormal(True):
        logger.warning("this CPU cannot flush subnormal floats: a learner step may slow down on them")
    elif not found:
        logger.warning("no OpenMP runtime mapped: subnormals are flushed on the calling thread only")
    return found[0] if found else None


def deepspeed_config(cfg: LearnerConfig, dtype: str) -> dict:
    """Gradient accumulation is driven by hand (boundaries set per micro-batch), so GAS stays 1."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class ResponseLogprobModel(torch.nn.Module):
    """The policy as DeepSpeed sees it: ``forward`` returns response-token log-probs (never full logits).

    Every forward goes through ``DeepSpeedEngine.forward``, as DeepSpeed requires: ZeRO-2/3 do per-forward
    bookkeeping there (ZeRO-3 advances its gradient-accumulation micro-step there; without it a second
    micro-batch's gradients replace the first one's instead of adding to them).
    """

    def __init__(self, policy: torch.nn.Module, chunk_tokens: int, temperature: float) -> None:
        super().__init__()
        self.policy = policy
        self.chunk_tokens, self.temperature = chunk_tokens, temperature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        with_entropy: bool = False,
        prompt_lens: torch.Tensor | None = None,
        group_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            positions,
            mask,
            chunk_tokens=self.chunk_tokens,
            temperature=self.temperature,
            with_entropy=with_entropy,
            prompt_lens=prompt_lens,
            group_size=group_size,
        )


class LearnerEngine:
    """The policy under training on one rank. Not a Ray actor: ``actor.py`` wraps it."""

    def __init__(
        self,
        model_dir: str,
        cfg: LearnerConfig,
        *,
        info: RankInfo = RankInfo(),
        dtype: str = "float32",
        sampling_temperature: float = 1.0,
        initial_version: int = 0,
    ) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        flush_denormals()
        init_distributed(info)
        torch.manual_seed(cfg.seed)
        self.cfg, self.info, self.model_dir = cfg, info, model_dir
        self.temperature = sampling_temperature
        self.version = initial_version
        self.objective = ObjectiveConfig(
            objective=cfg.objective,
            temperature=cfg.temperature,
            tau=cfg.tau,
            clip_eps=cfg.clip_eps,
            is_cap=cfg.is_cap,
            aggregation=cfg.loss_aggregation,
        )
        ds_config = deepspeed_config(cfg, dtype)
        # ZeRO-3 partitions the parameters in deepspeed.initialize. Loading inside zero.Init instead
        # (what a model too big for one host's RAM needs) goes through transformers' HfDeepSpeedConfig,
        # which requires `accelerate`; not needed at the sizes this runs on CPU.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        model.config.use_cache = False
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        # A torch optimizer (not DeepSpeed's fused/CPU Adam) avoids JIT-building C++ ops at start-up.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps
        )
        wrapped = ResponseLogprobModel(model, cfg.logprob_chunk_tokens, sampling_temperature)
        self.engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=ds_config)

    @property
    def module(self) -> torch.nn.Module:
        """The HF policy (inside the DeepSpeed-wrapped :class:`ResponseLogprobModel`)."""
        return self.engine.module.policy

    # ------------------------------------------------------------------ log-probs

    def logprobs(self, batch: PackedBatch, *, grad: bool, with_entropy: bool = False):
        """``(N, T)`` log-probs of the batch's response tokens under the current weights."""
        with torch.set_grad_enabled(grad):
            shared = self.cfg.shared_prefix and batch.group_size > 1
            return self.engine(
                batch.input_ids,
                batch.attention_mask,
                batch.positions,
                batch.mask,
                with_entropy=with_entropy,
                prompt_lens=batch.prompt_lens if shared else None,
                group_size=batch.group_size,
            )

    # ------------------------------------------------------------------ the iteration

    def _shards(self, n_groups: int) -> list[tuple[list[int], list[int]]]:
        """Per optimizer update: (the mini-batch's global group indices, the ones this rank trains).

        Round-robin by whole groups, so a group is never split and every rank computes the same plan.
        """
        per_update = math.ceil(n_groups / self.cfg.updates_per_batch)
        plan = []
        for start in range(0, n_groups, per_update):
            ids = list(range(start, min(start + per_update, n_groups)))
            plan.append((ids, ids[self.info.rank :: self.info.world_size]))
        return plan

    def train_step(self, groups: Sequence[ResponseGroup]) -> dict[str, float]:
        """One rollout batch -> ``updates_per_batch`` optimizer updates -> version + 1."""
        t0 = time.perf_counter()
        flush_denormals()  # per step: the flags are per thread, and a caller may step from another one
        self.engine.train()
        full = pack_groups(groups, self.pad_id)
        plan = self._shards(full.num_groups)
        proximal, sums = self._proximal_pass(full, [i for _, own in plan[1:] for i in own])
        t_prox = time.perf_counter()
        before = self._weights_copy() if self.cfg.log_update_norm else None
        for n, (minibatch, own) in enumerate(plan):
            # the first update observes pi_t itself (into ``sums``): nothing has moved the weights yet
            for key, value in self._update(full, minibatch, own, proximal, sums if n == 0 else None).items():
                sums[key] = sums.get(key, 0.0) + value
        self.version += 1
        metrics = self._reduce(sums)
        metrics.update(proximal_s=t_prox - t0, update_s=time.perf_counter() - t_prox)
        if before is not None:
            metrics["update_norm"] = self._distance(before)
        return metrics

    def _weights_copy(self) -> list[torch.Tensor]:
        """The trainable weights before this step's updates (ZeRO <= 2: every rank holds them whole)."""
        return [p.detach().to("cpu", torch.float64, copy=True) for p in self._trainable()]

    def _distance(self, before: list[torch.Tensor]) -> float:
        """L2 norm of the change of the trainable weights since ``before`` (the whole step's update)."""
        total = torch.zeros((), dtype=torch.float64)
        for old, p in zip(before, self._trainable(), strict=True):
            total += (p.detach().to("cpu", torch.float64) - old).pow(2).sum()
        return float(total.sqrt())

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _proximal_pass(
        self, full: PackedBatch, groups: list[int]
    ) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
        """``pi_t`` log-probs (no grad) of ``groups`` (this rank's), before any update of this iteration,
        and what they say about the behaviour policy (``_observe``)."""
        proximal: dict[int, torch.Tensor] = {}
        sums = dict.fromkeys(
            ("entropy", "entropy_tokens", "mismatch_sum", "mismatch_tokens", "mismatch_max",
             "s_t_fresh", "fresh_groups", "s_t_stale", "stale_groups"),
            0.0,
        )  # fmt: skip
        step = self.cfg.micro_batch_groups
        for start in range(0, len(groups), step):  # micro-batches: one forward per chunk of groups
            ids = groups[start : start + step]
            chunk = full.take(ids)
            logp_t, ent = self.logprobs(chunk, grad=False, with_entropy=True)
            self._observe(sums, proximal, chunk, ids, logp_t, ent)
        return proximal, sums

    def _observe(
        self,
        sums: dict[str, float],
        proximal: dict[int, torch.Tensor],
        chunk: PackedBatch,
        ids: list[int],
        logp_t: torch.Tensor,
        ent: torch.Tensor,
    ) -> None:
        """Keep ``pi_t``'s log-probs of groups ``ids`` (``chunk``) and add their sampled-token entropy, the
        train/inference mismatch on groups sampled by the current version, and ``|s_t|`` on fresh vs
        stale groups to ``sums``."""
        sums["entropy"] += float(ent[chunk.mask].sum())
        sums["entropy_tokens"] += float(chunk.mask.sum())
        k = chunk.group_size
        for j, i in enumerate(ids):
            rows = slice(j * k, (j + 1) * k)
            proximal[i] = logp_t[rows]
            mask, gap = chunk.mask[rows], (logp_t[rows] - chunk.logp_behavior[rows])
            s_t = torch.where(mask, gap, 0.0).sum(-1).abs().mean()  # mean |s_t| over the K responses
            if int(chunk.versions[j]) == self.version:
                tokens = gap[mask].abs()
                sums["mismatch_sum"] += float(tokens.sum())
                sums["mismatch_tokens"] += float(tokens.numel())
                sums["mismatch_max"] = max(
                    sums["mismatch_max"], float(tokens.max()) if tokens.numel() else 0.0
                )
                sums["s_t_fresh"] += float(s_t)
                sums["fresh_groups"] += 1
            else:
                sums["s_t_stale"] += float(s_t)
                sums["stale_groups"] += 1

    def _update(
        self,
        full: PackedBatch,
        minibatch: list[int],
        own: list[int],
        proximal: dict[int, torch.Tensor],
        observe: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """One optimizer update over ``minibatch``; this rank back-propagates its ``own`` groups. With
        ``observe`` (the first update, at ``pi_t``'s weights) the forward's detached log-probs are ``pi_t``'s:
        they are kept in ``proximal`` and observed into ``observe`` instead of coming from a pass of
        their own."""
        k = full.group_size
        global_groups = len(minibatch)
        global_tokens = int(full.take(minibatch).mask.sum())
        per_rank = math.ceil(global_groups / self.info.world_size)
        n_micro = max(1, math.ceil(per_rank / self.cfg.micro_batch_groups))  # same count on every rank
        step = self.cfg.micro_batch_groups
        sums: dict[str, float] = {"groups": float(len(own)), "updates": 1.0 / self.info.world_size}
        for m in range(n_micro):
            ids = own[m * step : (m + 1) * step]
            self.engine.set_gradient_accumulation_boundary(m == n_micro - 1)
            if ids:
                batch = full.take(ids)
                logp, ent = self.logprobs(batch, grad=True, with_entropy=observe is not None)
                if observe is not None:
                    self._observe(observe, proximal, batch, ids, logp.detach(), ent)
                logp_t = torch.cat([proximal[i] for i in ids])
                logp_b = logp_t if self.cfg.behavior_logprobs == "proximal" else batch.logp_behavior
                shape = (len(ids), k, -1)
                out = policy_loss(
                    LossInputs(
                        logp=logp.view(shape),
                        logp_proximal=logp_t.view(shape),
                        logp_behavior=logp_b.view(shape),
                        mask=batch.mask.view(shape),
                        rewards=batch.rewards,
                        stale=batch.versions < self.version,
                        global_groups=global_groups,
                        global_tokens=global_tokens,
                    ),
                    self.objective,
                )
                loss = out.loss
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * len(ids)
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
            else:  # keep collectives in step with the other ranks: a zero-weight dummy forward
                pad = torch.full((1, 2), self.pad_id, dtype=torch.long)
                one = torch.ones((1, 1), dtype=torch.bool)
                logp, _ = self.engine(pad, torch.ones_like(pad), one.long(), one)
                loss = logp.sum() * 0.0
            # DeepSpeed averages gradients over ranks; the loss is normalised by global counts already.
            self.engine.backward(loss * self.info.world_size, scale_wrt_gas=False)
            norm = self._full_grad_norm() if m == n_micro - 1 and self.cfg.zero_stage == 0 else None
            self.engine.step()
            if m == n_micro - 1:
                norm = norm if norm is not None else float(self.engine.get_global_grad_norm() or 0.0)
                sums["grad_norm"] = norm / self.info.world_size  # identical on every rank
                sums["grad_clipped"] = float(norm > self.cfg.grad_clip) / self.info.world_size
        return sums

    def _full_grad_norm(self) -> float:
        """Gradient norm before clipping when every rank holds full gradients (ZeRO stage 0)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    _RATIOS = {  # reported metric: (numerator sum, denominator sum)
        "entropy": ("entropy", "entropy_tokens"),
        "mismatch_mean": ("mismatch_sum", "mismatch_tokens"),
        "abs_s_t_fresh": ("s_t_fresh", "fresh_groups"),
        "abs_s_t_stale": ("s_t_stale", "stale_groups"),
        "loss": ("loss", "updates"),
        "grad_norm": ("grad_norm", "updates"),
        "grad_clip_fraction": ("grad_clipped", "updates"),  # share of updates whose norm was clipped
    }

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum the per-rank sums across ranks (max for maxima), then form the reported means."""
        keys = sorted(k for k in sums if k != "mismatch_max")
        vec = torch.tensor([sums[key] for key in keys], dtype=torch.float64)
        peak = torch.tensor([sums.get("mismatch_max", 0.0)], dtype=torch.float64)
        if self.info.world_size > 1:
            torch.distributed.all_reduce(vec)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        total = dict(zip(keys, vec.tolist(), strict=True))
        out = {"mismatch_max": float(peak[0]), "stale_groups": total["stale_groups"]}
        for name, (num, den) in self._RATIOS.items():
            out[name] = total.pop(num, 0.0) / max(total[den], 1.0)
        groups = max(total["groups"], 1.0)
        skip = {"groups", *(den for _, den in self._RATIOS.values())}
        out.update({key: value / groups for key, value in total.items() if key not in skip})
        return out

    # ------------------------------------------------------------------ weights out

    def state_items(self, bucket_params: int = 64) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) pairs of the policy, for a snapshot or a checkpoint.

        ZeRO-3 holds parameter shards: gather ``bucket_params`` parameters at a time (every rank
        must iterate, only rank 0's tensors are meant to be used). Tied weights appear once.
        """
        seen: set[int] = set()
        named = list(self.module.named_parameters())
        if self.cfg.zero_stage < 3:
            for name, param in named:
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param.detach()
            return
        import deepspeed

        for start in range(0, len(named), bucket_params):
            bucket = named[start : start + bucket_params]
            with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
                for name, param in bucket:
                    if id(param) not in seen:
                        seen.add(id(param))
                        yield name, param.detach().clone()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, root: str | Path, tag: str) -> None:
        """A DeepSpeed checkpoint under ``root/tag`` (model, optimizer and scheduler states, on every rank)
        with the weights version and the torch RNG state; collective: every rank calls it."""
        client_state = {"lpo_version": self.version, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, root: str | Path, tag: str) -> int:
        """Restore ``save_checkpoint(root, tag)``; returns the restored weights version."""
        path, client_state = self.engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None or client_state is None or "lpo_version" not in client_state:
            raise FileNotFoundError(
                f"no complete learner checkpoint {tag!r} under {root}; resume from an earlier one "
                "(checkpoint.json names the last one written whole)"
            )
        self.version = int(client_state["lpo_version"])
        torch.set_rng_state(client_state["torch_rng"])
        return self.version

    def save_hf(self, out_dir: str | Path) -> Path:
        """A ``save_pretrained``-compatible checkpoint (config, safetensors, tokenizer) on rank 0."""
        from transformers import AutoTokenizer

        out = Path(out_dir)
        state = dict(self.state_items())
        if self.info.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(out, state_dict=state, safe_serialization=True)
            AutoTokenizer.from_pretrained(self.model_dir).save_pretrained(out)
        return out
