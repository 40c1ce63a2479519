"""Token log-probs of sampled responses under a causal LM, without materialising full logits.

The vocab projection is the memory hog of an RL learner: ``tokens x vocab`` fp32 logits are 2.5 GB
for 4k tokens of a 151k vocab. Here only *response* positions are projected, in chunks of
``chunk_tokens`` rows, and each chunk is wrapped in activation checkpointing, so at most one chunk of
fp32 logits is alive at a time in the forward *and* in the backward (it is recomputed there).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logp(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float
) -> torch.Tensor:
    """log p(target) for ``(M, H)`` hidden rows: fp32 log-softmax of one chunk of logits.

    The head is called as a module (not ``F.linear`` on its weight) so that ZeRO-3's hooks gather its
    partitioned weight for the call, and again when checkpointing recomputes it in the backward.
    """
    logits = head(hidden).float()  # (M, V) fp32: the only full-vocab tensor
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_entropy(hidden: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's ``(N, L, H)`` hidden states, and for the response tokens only: the ``(M, H)`` hidden
    rows that predict them (the token at position p is predicted by the state at p - 1) and the ``(M,)``
    token ids."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    n, t = positions.shape
    prev = (positions - 1).clamp(min=0)
    rows = torch.arange(n, device=input_ids.device).unsqueeze(1).expand(n, t)
    return hidden, hidden[rows[mask], prev[mask]], input_ids[rows[mask], positions[mask]]


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the tokens at ``positions`` of each sequence, given everything before them.

    ``input_ids``/``attention_mask``: ``(N, L)`` right-padded sequences (prompt + response).
    ``positions``/``mask``: ``(N, T)`` — position in the sequence of each response token, and which
    entries are real. Returns ``(N, T)`` log-probs (0 where ``mask`` is false) and, if asked, the
    entropy of the full next-token distribution at those positions (no grad).
    ``temperature`` divides the logits, matching an engine that reports sampling-time log-probs.
    """
    head = model.get_output_embeddings()
    hidden, flat_h, flat_y = response_rows(model, input_ids, attention_mask, positions, mask)
    n, t = positions.shape
    pieces, entropies = [], []
    for start in range(0, flat_h.shape[0], chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logp, h, y, head, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logp(h, y, head, temperature))
        if with_entropy:
            with torch.no_grad():
                entropies.append(_chunk_entropy(h, head, temperature))
    out = hidden.new_zeros((n, t), dtype=torch.float32)
    flat = torch.cat(pieces) if pieces else hidden.new_zeros((0,), dtype=torch.float32)
    out = out.masked_scatter(mask, flat)
    entropy = None
    if with_entropy:
        entropy = torch.zeros((n, t), dtype=torch.float32, device=input_ids.device)
        if entropies:
            entropy = entropy.masked_scatter(mask, torch.cat(entropies))
    return out, entropy
