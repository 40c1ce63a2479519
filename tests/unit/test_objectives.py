"""The LPO maths of ../shared/docs/LPO.md, pinned with hand-worked numbers and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.learner.objectives import (
    GRPO_STD_EPS,
    LossInputs,
    ObjectiveConfig,
    group_advantages,
    lpo_coefficients,
    policy_loss,
)

F64 = torch.float64
TEMPERATURES = ("grpo", "drgrpo", "maxrl")


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- advantages and temperatures


def test_group_advantages_hand_worked() -> None:
    r = _t([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.57735; A = +-0.5 / (0.57735 + 1e-6)
    adv, tau = group_advantages(r, "grpo")
    std = math.sqrt(1.0 / 3.0)
    assert torch.allclose(adv, _t([[0.5, -0.5, -0.5, 0.5]]) / (std + GRPO_STD_EPS))
    assert tau.item() == pytest.approx(std + GRPO_STD_EPS)
    # drgrpo: A = R - mean, tau = 1
    adv, tau = group_advantages(r, "drgrpo")
    assert torch.allclose(adv, _t([[0.5, -0.5, -0.5, 0.5]])) and tau.item() == 1.0
    # maxrl: A = (R - mean) / mean = +-1, tau = mean = 0.5
    adv, tau = group_advantages(r, "maxrl")
    assert torch.allclose(adv, _t([[1.0, -1.0, -1.0, 1.0]])) and tau.item() == 0.5
    # fixed tau 0.25: A = +-2
    adv, tau = group_advantages(r, "fixed", tau=0.25)
    assert torch.allclose(adv, _t([[2.0, -2.0, -2.0, 2.0]])) and tau.item() == 0.25


def test_group_advantages_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="tau > 0"):
        group_advantages(_t([[1.0, 0.0]]), "fixed")
    with pytest.raises(ValueError, match="valid: grpo"):
        group_advantages(_t([[1.0, 0.0]]), "softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(_t([[1.0]]), "grpo")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("value", [0.0, 0.1, 1.0])
def test_zero_variance_groups_are_finite_and_target_is_proximal(temperature: str, value: float) -> None:
    # All rewards equal (incl. MaxRL with mean 0): A = 0, so w* = P_t exactly and nothing is NaN.
    rewards = torch.full((1, 4), value, dtype=F64)
    s_t = _t([[0.3, -0.2, 0.0, 1.0]])
    adv, tau = group_advantages(rewards, temperature)  # type: ignore[arg-type]
    assert torch.equal(adv, torch.zeros_like(adv))
    assert not torch.isnan(tau).any()
    terms = lpo_coefficients(
        rewards, s_t, torch.zeros_like(s_t), s_t, divergence="forward", temperature=temperature
    )
    assert torch.allclose(terms.target, torch.softmax(s_t, dim=1))
    for name in ("coef", "target", "p_theta", "kl_forward", "kl_reverse"):
        assert torch.isfinite(getattr(terms, name)).all(), name


# ---------------------------------------------------------------- Theorem 1


def test_theorem1_target_hand_worked() -> None:
    # drgrpo (tau = 1), K = 2, R = [1, 0]. On-policy P_t = [1/2, 1/2]:
    #   w* = [e, 1] / (e + 1) = [0.731059, 0.268941]
    r = _t([[1.0, 0.0]])
    zero = torch.zeros_like(r)
    terms = lpo_coefficients(r, zero, zero, zero, divergence="forward", temperature="drgrpo")
    assert terms.target[0].tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    # Off-policy: s_t = [log 2, 0] so P_t = [2/3, 1/3];
    # w* = [2e, 1] / (2e + 1) = [5.436564, 1] / 6.436564 = [0.844638, 0.155362]
    s_t = _t([[math.log(2.0), 0.0]])
    terms = lpo_coefficients(r, zero, zero, s_t, divergence="forward", temperature="drgrpo")
    assert terms.target[0].tolist() == pytest.approx([0.844638, 0.155362], abs=1e-6)
    assert terms.p_proximal[0].tolist() == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_theorem1_closed_form(temperature: str) -> None:
    # w* = P_t * exp(R / tau) / Z, with tau the baseline's statistic (Eq. 8).
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (6, 8), generator=gen).to(F64) * 0.9 + 0.1
    rewards[0] = 0.1  # one zero-variance group
    logp_b = torch.randn(6, 8, generator=gen, dtype=F64) * 3
    logp_t = logp_b + torch.randn(6, 8, generator=gen, dtype=F64)
    terms = lpo_coefficients(rewards, logp_t, logp_b, logp_t, divergence="forward", temperature=temperature)
    _, tau = group_advantages(rewards, temperature)  # type: ignore[arg-type]
    p_t = torch.softmax(logp_t - logp_b, dim=1)
    unnorm = p_t * torch.exp((rewards - rewards.mean(1, keepdim=True)) / tau.unsqueeze(1))
    expected = unnorm / unnorm.sum(1, keepdim=True)
    assert torch.allclose(terms.target, expected, atol=1e-12)


# ---------------------------------------------------------------- projection coefficients


def _kl_forward(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w * (w.log() - torch.log_softmax(s, 0))).sum()


def _kl_reverse(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(s, 0)
    return (log_p.exp() * (log_p - w.log())).sum()


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_coefficients_are_finite_difference_gradients(divergence: str) -> None:
    gen = torch.Generator().manual_seed(1)
    k = 5
    rewards = _t([[1.0, 0.1, 0.0, 1.0, 0.1]])
    logp_b = torch.randn(1, k, generator=gen, dtype=F64)
    logp_t = logp_b + 0.5 * torch.randn(1, k, generator=gen, dtype=F64)
    logp = logp_t + 0.5 * torch.randn(1, k, generator=gen, dtype=F64)
    terms = lpo_coefficients(rewards, logp, logp_b, logp_t, divergence=divergence, temperature="grpo")
    kl = _kl_forward if divergence == "forward" else _kl_reverse
    w = terms.target[0]
    s = (logp - logp_b)[0]
    h = 1e-6
    fd = []
    for j in range(k):
        e = torch.zeros(k, dtype=F64)
        e[j] = h
        fd.append(((kl(w, s + e) - kl(w, s - e)) / (2 * h)).item())
    assert terms.coef[0].tolist() == pytest.approx(fd, abs=1e-8)
    # and the reported KL values are those functions
    assert terms.kl_forward.item() == pytest.approx(_kl_forward(w, s).item(), abs=1e-12)
    assert terms.kl_reverse.item() == pytest.approx(_kl_reverse(w, s).item(), abs=1e-12)


_groups = st.integers(min_value=2, max_value=8).flatmap(
    lambda k: st.tuples(
        st.lists(st.sampled_from([0.0, 0.1, 1.0]), min_size=k, max_size=k),
        st.lists(st.floats(-30, 30), min_size=k, max_size=k),
        st.lists(st.floats(-30, 30), min_size=k, max_size=k),
    )
)


@settings(max_examples=200, deadline=None)
@given(_groups, st.sampled_from(TEMPERATURES), st.sampled_from(["forward", "reverse"]))
def test_coefficients_zero_sum_and_forward_bounded(group, temperature, divergence) -> None:
    rewards, s_theta, s_t = (_t([x]) for x in group)
    zero = torch.zeros_like(rewards)
    terms = lpo_coefficients(rewards, s_theta, zero, s_t, divergence=divergence, temperature=temperature)
    assert torch.isfinite(terms.coef).all()
    assert abs(terms.coef.sum().item()) <= 1e-9 * max(1.0, terms.coef.abs().max().item())
    if divergence == "forward":
        assert terms.coef.abs().max().item() <= 1.0


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_coefficients_vanish_at_the_target(divergence: str) -> None:
    # P_theta == w* (s_theta = phi up to a shift) -> c = 0.
    rewards = _t([[1.0, 0.0, 0.1]])
    s_t = _t([[0.2, -0.1, 0.4]])
    adv, _ = group_advantages(rewards, "drgrpo")
    zero = torch.zeros_like(rewards)
    terms = lpo_coefficients(rewards, adv + s_t + 7.0, zero, s_t, divergence=divergence, temperature="drgrpo")
    assert terms.coef.abs().max().item() < 1e-12
    assert terms.kl_forward.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_proposition1_reverse_coefficients_on_policy(temperature: str) -> None:
    # pi_theta = pi_t = pi_b: P_theta uniform, phi = A, d = -A, sum_j P_j d_j = -mean(A) = 0,
    # so c_rev = (1/K) * (-A) = -A / K.
    rewards = _t([[1.0, 0.1, 0.0, 1.0], [0.1, 0.1, 1.0, 0.0]])
    zero = torch.zeros_like(rewards)
    terms = lpo_coefficients(rewards, zero, zero, zero, divergence="reverse", temperature=temperature)
    adv, _ = group_advantages(rewards, temperature)  # type: ignore[arg-type]
    assert torch.allclose(terms.coef, -adv / 4, atol=1e-12)


# ---------------------------------------------------------------- token-level loss


def _batch(b: int = 4, k: int = 4, t: int = 6, seed: int = 0, on_policy: bool = True) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    logp_b = -torch.rand(b, k, t, generator=gen, dtype=F64) * 3
    logp_t = logp_b if on_policy else logp_b + 0.3 * torch.randn(b, k, t, generator=gen, dtype=F64)
    lengths = torch.randint(1, t + 1, (b, k), generator=gen)
    mask = torch.arange(t).view(1, 1, t) < lengths.unsqueeze(-1)
    rewards = torch.randint(0, 2, (b, k), generator=gen).to(F64)
    return LossInputs(
        logp=logp_t.clone().requires_grad_(True),
        logp_proximal=logp_t.clone(),
        logp_behavior=logp_b.clone(),
        mask=mask,
        rewards=rewards,
        stale=torch.full((b,), not on_policy),
    )


def _grad(inputs: LossInputs, cfg: ObjectiveConfig) -> torch.Tensor:
    out = policy_loss(inputs, cfg)
    (g,) = torch.autograd.grad(out.loss, inputs.logp)
    return g


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "token-mean"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_proposition1_lpo_rev_gradient_equals_pg_on_policy(temperature: str, aggregation: str) -> None:
    # At the on-policy point LPO_rev's coefficient is c = -A_k / K, so its gradient on every real token
    # is -A_k / (B K) per response (seq-mean-token-sum) or -A_k / N_tokens (token-mean): the PG
    # baseline's under the same aggregation, exactly, with ragged lengths (the mask of _batch).
    inputs = _batch()
    g_rev = _grad(inputs, ObjectiveConfig("lpo_rev", temperature, aggregation=aggregation))
    g_pg = _grad(inputs, ObjectiveConfig("pg", temperature, aggregation=aggregation))
    assert torch.allclose(g_rev, g_pg, atol=1e-12)
    adv, _ = group_advantages(inputs.rewards, temperature)  # type: ignore[arg-type]
    per_token = 4 * 4 if aggregation == "seq-mean-token-sum" else int(inputs.mask.sum())
    expected = torch.where(inputs.mask, (-adv / per_token).unsqueeze(-1), torch.zeros(()))
    assert torch.allclose(g_rev, expected, atol=1e-12)
    assert g_rev.abs().max() > 0  # a non-trivial batch: the equality is not 0 == 0


def test_aggregations_differ_by_the_mean_response_length() -> None:
    # The same LPO gradient on two scales: token-mean = seq-mean-token-sum * (B K) / N_tokens.
    inputs = _batch()
    g_seq = _grad(inputs, ObjectiveConfig("lpo_fwd", "grpo", aggregation="seq-mean-token-sum"))
    g_tok = _grad(inputs, ObjectiveConfig("lpo_fwd", "grpo", aggregation="token-mean"))
    responses, tokens = 4 * 4, int(inputs.mask.sum())
    assert tokens != responses
    assert torch.allclose(g_tok, g_seq * responses / tokens, atol=1e-12)


def _fields(inputs: LossInputs) -> dict:
    return {name: getattr(inputs, name) for name in LossInputs.__slots__}


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "token-mean"])
@pytest.mark.parametrize("objective", ["lpo_fwd", "lpo_rev", "pointwise"])
def test_gradient_is_coef_over_b_inside_clamp_band_and_zero_outside(objective: str, aggregation: str) -> None:
    inputs = _batch(on_policy=False, seed=3)
    b = inputs.logp.shape[0]
    # push some tokens outside the band [log 0.8, log 1.2] = [-0.223, 0.182]
    gen = torch.Generator().manual_seed(4)
    delta = (torch.rand(inputs.logp.shape, generator=gen, dtype=F64) - 0.5) * 0.8  # in [-0.4, 0.4]
    logp = (inputs.logp_proximal + delta).requires_grad_(True)
    moved = LossInputs(**{**_fields(inputs), "logp": logp})
    cfg = ObjectiveConfig(objective, "grpo", aggregation=aggregation)
    g = _grad(moved, cfg)
    seq = lambda x: torch.where(moved.mask, x, torch.zeros(())).sum(-1)  # noqa: E731
    divergence = {"lpo_fwd": "forward", "lpo_rev": "reverse", "pointwise": "forward"}[objective]
    terms = lpo_coefficients(
        moved.rewards,
        seq(logp.detach()),
        seq(moved.logp_behavior),
        seq(moved.logp_proximal),
        divergence=divergence,
        temperature="grpo",
    )
    coef = -terms.target if objective == "pointwise" else terms.coef
    inside = (delta >= math.log(0.8)) & (delta <= math.log(1.2)) & moved.mask
    # seq-mean-token-sum divides by the groups B; token-mean by the real tokens over K.
    scale = b if aggregation == "seq-mean-token-sum" else int(moved.mask.sum()) / delta.shape[1]
    expected = torch.where(inside, (coef / scale).unsqueeze(-1).expand_as(delta), torch.zeros(()))
    assert inside.any() and (~inside & moved.mask).any()  # both cases exercised
    assert torch.allclose(g, expected, atol=1e-12)


@pytest.mark.parametrize("objective", ["lpo_fwd", "lpo_rev", "pointwise", "pg"])
@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "token-mean"])
def test_split_batch_gives_the_same_gradient(objective: str, aggregation: str) -> None:
    inputs = _batch(b=6, on_policy=False, seed=5)
    cfg = ObjectiveConfig(objective, "grpo", aggregation=aggregation)
    whole = _grad(inputs, cfg)
    tokens = int(inputs.mask.sum())
    parts = []
    for sl in (slice(0, 2), slice(2, 6)):
        logp = inputs.logp.detach()[sl].clone().requires_grad_(True)
        part = LossInputs(
            logp=logp,
            logp_proximal=inputs.logp_proximal[sl],
            logp_behavior=inputs.logp_behavior[sl],
            mask=inputs.mask[sl],
            rewards=inputs.rewards[sl],
            stale=inputs.stale[sl],
            global_groups=6,
            global_tokens=tokens,
        )
        parts.append(_grad(part, cfg))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-14)


@pytest.mark.parametrize("objective", ["lpo_fwd", "lpo_rev", "pointwise", "pg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_ratios_stay_finite(objective: str, dtype: torch.dtype) -> None:
    inputs = _batch(on_policy=False, seed=6)
    gen = torch.Generator().manual_seed(7)
    sign = torch.where(torch.rand(inputs.logp.shape, generator=gen) > 0.5, 1.0, -1.0).to(F64)
    logp_t = inputs.logp_proximal
    extreme = LossInputs(
        logp=(logp_t + 1e3 * sign).to(dtype).requires_grad_(True),
        logp_proximal=logp_t.to(dtype),
        logp_behavior=(logp_t - 1e3 * sign.flip(-1)).to(dtype),
        mask=inputs.mask,
        rewards=inputs.rewards.to(dtype),
        stale=inputs.stale,
    )
    out = policy_loss(extreme, ObjectiveConfig(objective, "grpo"))
    (g,) = torch.autograd.grad(out.loss, extreme.logp)
    assert out.loss.dtype == dtype and torch.isfinite(out.loss)
    assert torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics


def test_stale_pg_uses_truncated_importance_weight() -> None:
    # One token, K = 2, drgrpo A = [+0.5, -0.5]; on-policy ratio 1 so surrogate grad = -A * w / N.
    # Response 0: pi_t / pi_b = e^2 = 7.39 -> capped at 2;  response 1: e^-1 = 0.3679.
    logp_t = _t([[[-1.0], [-2.0]]])
    logp_b = _t([[[-3.0], [-1.0]]])
    base = dict(
        logp_proximal=logp_t,
        logp_behavior=logp_b,
        mask=torch.ones(1, 2, 1, dtype=torch.bool),
        rewards=_t([[1.0, 0.0]]),
    )
    cfg = ObjectiveConfig("pg", "drgrpo")
    stale = LossInputs(logp=logp_t.clone().requires_grad_(True), stale=torch.tensor([True]), **base)
    fresh = LossInputs(logp=logp_t.clone().requires_grad_(True), stale=torch.tensor([False]), **base)
    assert _grad(stale, cfg).flatten().tolist() == pytest.approx([-0.5 * 2.0 / 2, 0.5 * math.exp(-1) / 2])
    assert _grad(fresh, cfg).flatten().tolist() == pytest.approx([-0.5 / 2, 0.5 / 2])


def test_unknown_objective_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="lpo_fwd, lpo_rev, pg, pointwise"):
        policy_loss(_batch(), ObjectiveConfig("ppo", "grpo"))


def test_shape_mismatch_is_rejected() -> None:
    inputs = _batch()
    with pytest.raises(ValueError, match="rewards must be"):
        LossInputs(**{**_fields(inputs), "rewards": inputs.rewards[:, :2]})
