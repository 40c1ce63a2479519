"""The fused log-prob path (``FusedLinearLogprob``) equals the naive full-logits computation: values within
1e-5, gradients w.r.t. the hidden states, the head's weight and bias within 1e-5 relative; on ragged,
padded batches through a real (tiny) Llama, tied and untied, with sampling temperature, entropy, bf16."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.learner.logprobs import (
    FusedLinearLogprob,
    checkpointed_logprobs,
    fused_logprobs,
    response_logprobs,
)


def _rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Close relative to the tensor's scale: max |got - want| <= rel * max |want|."""
    return float((got - want).abs().max()) <= rel * float(want.abs().max())


def _naive(hidden, weight, bias, targets, temperature=1.0):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # (M, V) all at once
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_hand_worked_two_token_vocab() -> None:
    # H = 1, V = 2, W = [[1], [0]], h = ln 3: logits (ln 3, 0), softmax (3/4, 1/4), target 0.
    # log p = ln(3/4); d/dh = W_0 - sum_j p_j W_j = 1 - 3/4 = 1/4;
    # d/dW_j = (onehot_j - p_j) h = (+1/4 ln 3, -1/4 ln 3); d/db = (1/4, -1/4) with a zero bias.
    h = torch.tensor([[math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    logp, ent = fused_logprobs(h, torch.tensor([0]), w, b, with_entropy=True)
    logp.sum().backward()
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-7)
    # entropy of (3/4, 1/4): -(3/4 ln 3/4 + 1/4 ln 1/4)
    assert ent is not None and ent.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert h.grad.item() == pytest.approx(0.25, abs=1e-7)
    assert w.grad.flatten().tolist() == pytest.approx([math.log(3) / 4, -math.log(3) / 4], abs=1e-7)
    assert b.grad.tolist() == pytest.approx([0.25, -0.25], abs=1e-7)


def test_hand_worked_temperature() -> None:
    # Same head at T = 2: logits (ln 3 / 2, 0) = (ln sqrt 3, 0), p_0 = sqrt3 / (sqrt3 + 1), target 1.
    # log p_1 = -ln(sqrt3 + 1); d/dh = (W_1 - sum_j p_j W_j) / T = (0 - p_0) / 2.
    h = torch.tensor([[math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    logp, _ = fused_logprobs(h, torch.tensor([1]), w, temperature=2.0)
    logp.sum().backward()
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    assert logp.item() == pytest.approx(-math.log(math.sqrt(3) + 1), abs=1e-7)
    assert h.grad.item() == pytest.approx(-p0 / 2, abs=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 16, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_equals_naive_fp32(chunk: int, temperature: float, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(chunk)
    m, h, v = 37, 24, 301  # 37 rows: no chunk size divides it
    hidden = torch.randn(m, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.5).requires_grad_()
    bias = (torch.randn(v, generator=gen) if with_bias else torch.zeros(0)).requires_grad_()
    b = bias if with_bias else None
    targets = torch.randint(0, v, (m,), generator=gen)
    targets[:4] = torch.tensor([0, v - 1, v - 1, 0])  # the vocab's ends, and repeats
    g = torch.randn(m, generator=gen)
    g[::3] = 0.0  # padded tokens carry a zero upstream gradient

    got, _ = fused_logprobs(hidden, targets, weight, b, chunk_tokens=chunk, temperature=temperature)
    grads_got = torch.autograd.grad((got * g).sum(), [hidden, weight, *([bias] if with_bias else [])])
    want = _naive(hidden, weight, b, targets, temperature)
    grads_want = torch.autograd.grad((want * g).sum(), [hidden, weight, *([bias] if with_bias else [])])

    assert (got - want).abs().max() <= 1e-5
    for a, e in zip(grads_got, grads_want, strict=True):
        assert _rel_close(a, e), float((a - e).abs().max())


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3, 5, 1])

    def f(hh, ww, bb):  # logits are fp32 inside, as in the learner: check against a fp64 input
        return FusedLinearLogprob.apply(hh, ww, bb, targets, 0.8, 2, False)[0].double()

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def _ragged_batch():
    """Three right-padded sequences (L = 10): prompts of 2, 4 and 3 tokens, responses of 5, 1 and 0
    tokens (the third is all padding), so T = 5 with ragged masks."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 97, (3, 10), generator=gen)
    lengths = [7, 5, 3]
    attn = torch.zeros(3, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        ids[i, n:] = 0  # pad id
    positions = torch.tensor([[2, 3, 4, 5, 6], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 5, [True] + [False] * 4, [False] * 5])
    return ids, attn, positions, mask


def _naive_model(model, ids, attn, positions, mask, temperature):
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, -1)
    prev = (positions - 1).clamp(min=0)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(positions)
    out = logp[rows, prev, ids[rows, positions]]
    ent = -(logp.exp() * logp).sum(-1)[rows, prev]
    zero = torch.zeros_like(out)
    return torch.where(mask, out, zero), torch.where(mask, ent, zero)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_ragged_batch_matches_naive(tied: bool, temperature: float) -> None:
    model = _llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, attn, positions, mask = _ragged_batch()
    coef = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    got, ent = response_logprobs(
        model, ids, attn, positions, mask, chunk_tokens=4, temperature=temperature, with_entropy=True
    )
    (got * coef).sum().backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, want_ent = _naive_model(model, ids, attn, positions, mask, temperature)
    (want * coef).sum().backward()

    assert (got - want).abs().max() <= 1e-5
    assert (got[~mask] == 0).all() and ent is not None and (ent[~mask] == 0).all()
    assert (ent - want_ent).abs().max() <= 1e-5 and (ent[mask] > 0).all()
    for name, p in model.named_parameters():
        assert _rel_close(g_fused[name], p.grad), name


def test_bf16_inputs_keep_their_dtype_and_match_naive() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 64, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(500, 64, generator=gen) * 0.3).bfloat16().requires_grad_()
    targets = torch.randint(0, 500, (40,), generator=gen)
    g = torch.randn(40, generator=gen)
    got, _ = fused_logprobs(hidden, targets, weight, chunk_tokens=8)
    gh, gw = torch.autograd.grad((got * g).sum(), [hidden, weight])
    want = _naive(hidden, weight, None, targets)
    wh, ww = torch.autograd.grad((want * g).sum(), [hidden, weight])
    assert got.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # bf16 logits round to 3 significant digits; the two paths may round a product differently
    assert (got - want).abs().max() <= 2e-2
    assert _rel_close(gh.float(), wh.float(), rel=2e-2) and _rel_close(gw.float(), ww.float(), rel=2e-2)


def test_checkpointed_path_agrees_with_fused() -> None:
    """The ZeRO-3 path (head called as a module) computes the same numbers as the fused default."""
    gen = torch.Generator().manual_seed(9)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(21, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (21,), generator=gen)
    a, ea = fused_logprobs(hidden, targets, head.weight, head.bias, chunk_tokens=4, with_entropy=True)
    ga = torch.autograd.grad(a.sum(), [hidden, head.weight, head.bias])
    b, eb = checkpointed_logprobs(hidden, targets, head, chunk_tokens=4, with_entropy=True)
    gb = torch.autograd.grad(b.sum(), [hidden, head.weight, head.bias])
    assert (a - b).abs().max() <= 1e-5 and (ea - eb).abs().max() <= 1e-5
    for x, y in zip(ga, gb, strict=True):
        assert _rel_close(x, y)


def test_no_response_tokens() -> None:
    weight = torch.randn(11, 4, requires_grad=True)
    hidden = torch.randn(0, 4, requires_grad=True)
    logp, _ = fused_logprobs(hidden, torch.zeros(0, dtype=torch.long), weight)
    (gw,) = torch.autograd.grad(logp.sum() + (weight * 0).sum(), [weight])
    assert logp.shape == (0,) and (gw == 0).all()
