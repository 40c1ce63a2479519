"""LPO and its paired baselines as pure functions of tensors — the contract is ../docs/OBJECTIVES.md.

No model, no ``self``, no ``torch.distributed``: every function maps tensors to tensors so the maths
can be pinned by unit tests with hand-worked numbers. Shapes: ``B`` groups, ``K`` responses per group,
``T`` response tokens (right-padded; ``mask`` says which are real). float32 and float64 are both
supported; outputs keep the input dtype.

Names follow the paper (Qu et al., arXiv:2605.06139): ``s_theta`` (Eq. 4), ``s_t`` (Eq. 7), target
``w*`` (Theorem 1, Eq. 8), coefficients (Eqs. 10, 11, 17), loss (Algorithm 1 + App. D.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

Temperature = Literal["grpo", "drgrpo", "maxrl", "fixed"]
Divergence = Literal["forward", "reverse"]
Aggregation = Literal["token-mean", "seq-mean-token-sum"]

GRPO_STD_EPS = 1e-6  # verl's epsilon in (R - mean) / (std + eps)
# exp() of a token log-ratio is taken after clamping it here: beyond it the ratio is outside any
# trust region anyway, and exp(1e3) would turn a finite loss into inf (verl clamps at 20 too).
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True, slots=True)
class ObjectiveConfig:
    """What ``policy_loss`` computes. Mirrors ``learner`` in the run config."""

    objective: str = "lpo_fwd"
    temperature: Temperature = "grpo"
    tau: float | None = None  # only for temperature == "fixed"
    clip_eps: float = 0.2
    is_cap: float = 2.0  # truncated importance weight cap for stale PG groups (LPO.md §6)
    aggregation: Aggregation = "token-mean"
    """The loss scale of every objective (LPO.md §5, OBJECTIVES.md §3): ``token-mean`` divides the
    summed token terms by the mini-batch's real tokens, ``seq-mean-token-sum`` by its responses (LPO:
    by its groups, the paper's Algorithm 1). Under either, on-policy LPO-rev's gradient equals PG's."""


@dataclass(frozen=True, slots=True)
class LossInputs:
    """Token tensors of one (micro-)batch. ``logp``, ``logp_proximal``, ``logp_behavior`` and ``mask``
    are all ``(B, K, T)`` and aligned token by token; ``rewards`` is ``(B, K)``; ``stale`` is ``(B,)``
    and true where the group's behaviour version is older than the proximal (learner) version.

    ``global_groups`` / ``global_tokens`` are the sizes of the whole optimizer mini-batch when this is
    one micro-batch of it, so that gradients of the parts add up to the gradient of the whole.
    """

    logp: torch.Tensor
    logp_proximal: torch.Tensor
    logp_behavior: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    stale: torch.Tensor | None = None
    global_groups: int | None = None
    global_tokens: int | None = None

    def __post_init__(self) -> None:
        shape = self.logp.shape
        if self.logp.dim() != 3:
            raise ValueError(f"logp must be (B, K, T), got shape {tuple(shape)}")
        for name in ("logp_proximal", "logp_behavior", "mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, logp has {tuple(shape)}"
                )
        if self.rewards.shape != shape[:2]:
            raise ValueError(f"rewards must be (B, K) = {tuple(shape[:2])}, got {tuple(self.rewards.shape)}")
        if self.stale is not None and self.stale.shape != shape[:1]:
            raise ValueError(f"stale must be (B,) = {tuple(shape[:1])}, got {tuple(self.stale.shape)}")


@dataclass(frozen=True, slots=True)
class LossOutputs:
    """``loss`` is the scalar to backpropagate (a surrogate: its gradient is the point, not its value);
    ``metrics`` are detached floats for logging."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LpoTerms:
    """Per-group LPO quantities, all detached. ``(B, K)``: ``coef``, ``target`` (w*), ``p_theta``,
    ``p_proximal`` (P_t), ``advantages``; ``(B,)``: ``kl_forward`` = KL(w*||P_theta),
    ``kl_reverse`` = KL(P_theta||w*)."""

    coef: torch.Tensor
    target: torch.Tensor
    p_theta: torch.Tensor
    p_proximal: torch.Tensor
    advantages: torch.Tensor
    kl_forward: torch.Tensor
    kl_reverse: torch.Tensor


def group_advantages(
    rewards: torch.Tensor, temperature: Temperature, tau: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paired baseline's advantage ``A`` (B, K) and its temperature ``tau`` (B,) — LPO.md §2.

    ``A = (R - mean) / tau`` in every case, so LPO's ``exp(R / tau)`` tilt (Eq. 8) and the PG
    baseline share one normalisation statistic:
      grpo:   tau = std_unbiased(R) + 1e-6 (the denominator actually used, verl's form)
      drgrpo: tau = 1
      maxrl:  tau = mean(R); a group with mean <= 0 gets A = 0 and tau = +inf
      fixed:  tau = the given value
    Zero-variance groups get A = 0 under every temperature (kept, not masked).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, K) with K >= 2, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    centred = rewards - mean  # (B, K)
    if temperature == "grpo":
        denom = rewards.std(dim=1, unbiased=True, keepdim=True) + GRPO_STD_EPS
        return centred / denom, denom.squeeze(1)
    if temperature == "drgrpo":
        return centred, torch.ones_like(mean.squeeze(1))
    if temperature == "maxrl":
        positive = mean > 0
        safe = torch.where(positive, mean, torch.ones_like(mean))
        adv = torch.where(positive, centred / safe, torch.zeros_like(centred))
        return adv, torch.where(positive, mean, torch.full_like(mean, math.inf)).squeeze(1)
    if temperature == "fixed":
        if tau is None or not tau > 0:
            raise ValueError(f"temperature 'fixed' needs tau > 0, got tau={tau!r}; set learner.tau")
        return centred / tau, torch.full_like(mean.squeeze(1), float(tau))
    raise ValueError(f"unknown temperature {temperature!r}; valid: grpo, drgrpo, maxrl, fixed")


def lpo_coefficients(
    rewards: torch.Tensor,
    seq_logp: torch.Tensor,
    seq_logp_behavior: torch.Tensor,
    seq_logp_proximal: torch.Tensor,
    *,
    divergence: Divergence,
    temperature: Temperature,
    tau: float | None = None,
) -> LpoTerms:
    """Target ``w*`` (Theorem 1) and projection coefficients ``c`` (Eqs. 10/11/17) for ``B`` groups.

    Inputs are ``(B, K)`` sequence log-probs (token sums, Eq. 3) under the current, behaviour and
    proximal policies. Everything returned is detached: ``c`` multiplies token log-ratios in the loss.
    """
    seq_logp = seq_logp.detach()
    s_theta = seq_logp - seq_logp_behavior  # (B, K) Eq. 4
    s_t = seq_logp_proximal - seq_logp_behavior  # (B, K) Eq. 7
    adv, _ = group_advantages(rewards, temperature, tau)
    phi = adv + s_t  # log of the unnormalised target; shift-invariant per group
    log_w = torch.log_softmax(phi, dim=1)
    log_p = torch.log_softmax(s_theta, dim=1)
    w_star, p_theta = log_w.exp(), log_p.exp()
    if divergence == "forward":
        coef = p_theta - w_star  # dKL(w*||P_theta)/ds_theta
    elif divergence == "reverse":
        d = s_theta - phi
        coef = p_theta * (d - (p_theta * d).sum(dim=1, keepdim=True))  # dKL(P_theta||w*)/ds_theta
    else:
        raise ValueError(f"unknown divergence {divergence!r}; valid: forward, reverse")
    return LpoTerms(
        coef=coef,
        target=w_star,
        p_theta=p_theta,
        p_proximal=torch.softmax(s_t, dim=1),
        advantages=adv,
        kl_forward=(w_star * (log_w - log_p)).sum(dim=1),
        kl_reverse=(p_theta * (log_p - log_w)).sum(dim=1),
    )


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of the real tokens; padding may hold anything (even NaN or -inf)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum(dim=-1)


def _listwise_loss(inputs: LossInputs, cfg: ObjectiveConfig, divergence: Divergence | None) -> LossOutputs:
    """LPO.md §5: ``sum_b sum_k c[b,k] sum_i m * clamp(logp - logp_t)`` over ``_listwise_scale`` (``B``
    in the paper's Algorithm 1); ``divergence=None`` is the pointwise ablation ``c = -w*`` (Eq. 52)."""
    mask = inputs.mask.bool()
    terms = lpo_coefficients(
        inputs.rewards,
        _masked_sum(inputs.logp, mask),
        _masked_sum(inputs.logp_behavior, mask),
        _masked_sum(inputs.logp_proximal, mask),
        divergence=divergence or "forward",
        temperature=cfg.temperature,
        tau=cfg.tau,
    )
    coef = -terms.target if divergence is None else terms.coef  # (B, K)
    delta = inputs.logp - inputs.logp_proximal  # (B, K, T) trust region against pi_t
    lo, hi = math.log(1.0 - cfg.clip_eps), math.log(1.0 + cfg.clip_eps)
    delta_c = delta.clamp(lo, hi)
    loss = (coef * _masked_sum(delta_c, mask)).sum() / _listwise_scale(inputs, mask, cfg.aggregation)
    with torch.no_grad():
        clipped = ((delta < lo) | (delta > hi)) & mask
        s_t = _masked_sum(inputs.logp_proximal - inputs.logp_behavior, mask)
        metrics = {
            "kl_forward": terms.kl_forward.mean().item(),
            "kl_reverse": terms.kl_reverse.mean().item(),
            "clip_fraction": (clipped.sum() / mask.sum().clamp(min=1)).item(),
            "ess": _ess(terms.p_proximal).mean().item(),
            "abs_s_t": s_t.abs().mean().item(),
            "coef_abs_max": coef.abs().max().item(),
            **_drift_metrics(inputs, mask),
        }
    return LossOutputs(loss=loss, metrics=metrics)


def _listwise_scale(inputs: LossInputs, mask: torch.Tensor, aggregation: Aggregation) -> float:
    """The divisor of the listwise loss ``sum_b sum_k c[b,k] sum_i delta``.

    The coefficients of a group sum to zero and are O(1/K) each, so dividing by the groups ``B`` puts
    the loss on the scale of PG's per-response mean (``seq-mean-token-sum``); dividing by
    ``tokens / K`` instead puts it on PG's per-token mean. On-policy, LPO-rev's ``c = -A / K`` then gives
    exactly PG's gradient under the same aggregation (Prop. 1; tests/unit/test_objectives.py).
    """
    groups = inputs.global_groups or inputs.logp.shape[0]
    if aggregation == "seq-mean-token-sum":
        return float(groups)
    if aggregation == "token-mean":
        tokens = inputs.global_tokens or int(mask.sum().item())
        return max(tokens, 1) / inputs.logp.shape[1]
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: token-mean, seq-mean-token-sum")


def _drift_metrics(inputs: LossInputs, mask: torch.Tensor) -> dict[str, float]:
    """How far the policy being updated has moved, per response: ``drift`` = mean ``|s_theta - s_t|``
    (from the proximal policy: the updates of this batch so far), ``abs_s_theta`` = mean ``|s_theta|``
    (from the behaviour policy: staleness plus those updates) and ``kl_proximal`` = mean
    ``KL(P_t || P_theta)`` over groups, the listwise view of the same drift. Detached."""
    seq_theta = _masked_sum(inputs.logp.detach(), mask)
    seq_t = _masked_sum(inputs.logp_proximal, mask)
    seq_b = _masked_sum(inputs.logp_behavior, mask)
    log_p_t = torch.log_softmax(seq_t - seq_b, dim=1)
    log_p_theta = torch.log_softmax(seq_theta - seq_b, dim=1)
    return {
        "drift": (seq_theta - seq_t).abs().mean().item(),
        "abs_s_theta": (seq_theta - seq_b).abs().mean().item(),
        "kl_proximal": (log_p_t.exp() * (log_p_t - log_p_theta)).sum(dim=1).mean().item(),
    }


def _ess(p: torch.Tensor) -> torch.Tensor:
    """Normalised effective sample size ``1 / (K sum p^2)`` per group, in (0, 1]; 1 = uniform."""
    return 1.0 / (p.shape[1] * (p * p).sum(dim=1))


def _pg_loss(inputs: LossInputs, cfg: ObjectiveConfig) -> LossOutputs:
    """LPO.md §6: PPO-clipped surrogate on token ratios to pi_t with the paired advantage, and a
    truncated importance weight ``min(pi_t / pi_b, cap)`` per token on stale groups."""
    mask = inputs.mask.bool()
    adv, _ = group_advantages(inputs.rewards, cfg.temperature, cfg.tau)
    adv_tok = adv.unsqueeze(-1)  # (B, K, 1)
    log_ratio = (inputs.logp - inputs.logp_proximal).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    surrogate = -torch.minimum(ratio * adv_tok, clipped_ratio * adv_tok)  # (B, K, T)
    if inputs.stale is not None and bool(inputs.stale.any()):
        log_is = (inputs.logp_proximal - inputs.logp_behavior).clamp(max=MAX_LOG_RATIO).detach()
        is_weight = log_is.exp().clamp(max=cfg.is_cap)
        surrogate = torch.where(inputs.stale.view(-1, 1, 1), surrogate * is_weight, surrogate)
    # The listwise scale times K: per response (seq-mean-token-sum) or per token (token-mean).
    loss = _masked_sum(surrogate, mask).sum() / (
        _listwise_scale(inputs, mask, cfg.aggregation) * adv.shape[1]
    )
    with torch.no_grad():
        clipped = (ratio != clipped_ratio) & mask
        s_t = _masked_sum(inputs.logp_proximal - inputs.logp_behavior, mask)
        metrics = {
            "clip_fraction": (clipped.sum() / mask.sum().clamp(min=1)).item(),
            "ess": _ess(torch.softmax(s_t, dim=1)).mean().item(),
            "abs_s_t": s_t.abs().mean().item(),
            **_drift_metrics(inputs, mask),
        }
    return LossOutputs(loss=loss, metrics=metrics)


LossFn = Callable[[LossInputs, ObjectiveConfig], LossOutputs]

OBJECTIVES: dict[str, LossFn] = {
    "lpo_fwd": lambda inputs, cfg: _listwise_loss(inputs, cfg, "forward"),
    "lpo_rev": lambda inputs, cfg: _listwise_loss(inputs, cfg, "reverse"),
    "pointwise": lambda inputs, cfg: _listwise_loss(inputs, cfg, None),
    "pg": _pg_loss,
}


def policy_loss(inputs: LossInputs, cfg: ObjectiveConfig) -> LossOutputs:
    """The configured objective's loss on one (micro-)batch; see ``OBJECTIVES`` for the names."""
    try:
        fn = OBJECTIVES[cfg.objective]
    except KeyError:
        raise ValueError(
            f"unknown objective {cfg.objective!r}; valid: {', '.join(sorted(OBJECTIVES))}"
        ) from None
    return fn(inputs, cfg)
