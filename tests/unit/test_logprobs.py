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


def _groups(k: int, prompt_lens: list[int], seed: int = 2):
    """Scored groups of random tokens: one prompt per group (lengths ``prompt_lens``), K responses of mixed
    lengths, one of them empty (a response that ended at once)."""
    from services.common.messages import ResponseGroup, Rollout, RolloutTask

    gen = torch.Generator().manual_seed(seed)
    out = []
    for g, p in enumerate(prompt_lens):
        prompt = torch.randint(1, 50, (p,), generator=gen).tolist()
        task = RolloutTask(f"t{g}", prompt, "p", "countdown", {"nums": [1, 2], "target": 3}, k)
        rollouts = []
        for j in range(k):
            r = 0 if (g, j) == (1, 2) else int(torch.randint(1, 9, (1,), generator=gen))
            rollouts.append(Rollout(torch.randint(1, 50, (r,), generator=gen).tolist(), [-0.5] * r, "length"))
        out.append(ResponseGroup(task, tuple(rollouts), 0, "0" * 64).with_rewards((1.0,) * k, ("pass",) * k))
    return out


@pytest.mark.parametrize(("family", "kv_heads"), [("llama", 2), ("llama", 1), ("qwen2", 1)])
def test_shared_prefix_equals_whole_rows(family: str, kv_heads: int) -> None:
    """Each prompt computed once for its group (the key/value cache repeated per response) is the same
    function as the whole prompt + response rows: log-probs, entropies and every parameter's gradient agree
    to round-off (the decoder in float64, the head's logits in fp32), with prompts of different lengths in
    one batch and an empty response."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from services.learner.batch import pack_groups

    torch.manual_seed(0)
    config, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    cfg = config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=kv_heads, max_position_embeddings=64,
    )  # fmt: skip
    model = model_class(cfg).to(torch.float64)
    k = 4
    b = pack_groups(_groups(k, [3, 7, 5]), pad_id=0)
    weights = torch.randn(b.mask.shape, dtype=torch.float32)
    results = []
    for shared in (False, True):
        model.zero_grad()
        logp, ent = response_logprobs(
            model, b.input_ids, b.attention_mask, b.positions, b.mask, temperature=0.7, with_entropy=True,
            prompt_lens=b.prompt_lens if shared else None, group_size=k,
        )  # fmt: skip
        (logp * weights).sum().backward()
        results.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (whole, ent_w, g_w), (shared, ent_s, g_s) = results
    assert b.mask.sum() > 0 and not b.mask[1 * k + 2].any()  # the empty response is in the batch
    assert torch.allclose(shared, whole, rtol=0, atol=1e-6) and (shared[~b.mask] == 0).all()
    assert torch.allclose(ent_s, ent_w, rtol=0, atol=1e-6)
    for a, w in zip(g_s, g_w, strict=True):
        assert w.abs().sum() > 0 and torch.allclose(a, w, rtol=1e-6, atol=1e-6)


def test_shared_prefix_refuses_rows_that_are_not_groups() -> None:
    from services.learner.batch import pack_groups

    model = _model()
    b = pack_groups(_groups(4, [3, 5]), pad_id=0)
    lens = b.prompt_lens.clone()
    lens[1] += 1  # one row of group 0 claims another prompt length: not one shared prompt
    with pytest.raises(ValueError, match="different prompt lengths"):
        response_logprobs(
            model, b.input_ids, b.attention_mask, b.positions, b.mask, prompt_lens=lens, group_size=4
        )
    with pytest.raises(ValueError, match="not whole groups of 3"):
        response_logprobs(
            model, b.input_ids, b.attention_mask, b.positions, b.mask, prompt_lens=b.prompt_lens, group_size=3
        )
