"""Chunked response log-probs equal the naive full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.learner.logprobs import response_logprobs


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(torch.float64)


def _batch():
    # two sequences: prompt lengths 3 and 5, responses of 4 and 2 tokens, right-padded to L = 7
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 7), generator=gen)
    attn = torch.tensor([[1] * 7, [1] * 7], dtype=torch.long)
    attn[0, 7:] = 0
    positions = torch.tensor([[3, 4, 5, 6], [5, 6, 0, 0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    return ids, attn, positions, mask


def _naive(model, ids, attn, positions, mask, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, -1)
    prev = (positions - 1).clamp(min=0)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(positions)
    out = logp[rows, prev, ids[rows, positions]]
    return torch.where(mask, out, torch.zeros_like(out))


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive_values_and_grads(chunk: int, temperature: float) -> None:
    model = _model()
    ids, attn, positions, mask = _batch()
    weights = torch.randn(mask.shape, dtype=torch.float32)
    got, ent = response_logprobs(
        model, ids, attn, positions, mask, chunk_tokens=chunk, temperature=temperature, with_entropy=True
    )
    (got * weights).sum().backward()
    g_chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = _naive(model, ids, attn, positions, mask, temperature)
    (want * weights).sum().backward()
    g_naive = [p.grad.clone() for p in model.parameters()]
    assert torch.allclose(got, want, atol=1e-6)
    assert got[1, 2:].abs().sum() == 0  # padding stays zero
    for a, b in zip(g_chunked, g_naive, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert ent is not None and (ent[mask] > 0).all() and (ent[~mask] == 0).all()
