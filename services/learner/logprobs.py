"""Token log-probs of sampled responses under a causal LM, without materialising full logits.

The vocab projection is the memory hog of an RL learner: ``tokens x vocab`` fp32 logits are 2.5 GB
for 4k tokens of a 151k vocab, and a naive forward + backward keeps about four such tensors alive. Here
only *response* positions are projected, by :class:`FusedLinearLogprob`: the forward walks chunks of
``chunk_tokens`` rows and keeps one number per token (its log-sum-exp); the backward recomputes the
logits in slices of the vocab and writes each slice's rows of the head's weight gradient directly. One
buffer of ``chunk_tokens x vocab`` fp32 logits is alive at a time (two when the entropy is asked for),
next to the head's weight gradient, which any path must produce. The price is one more matmul of the
hidden rows with the head (the backward's recompute): four instead of the naive path's three.

ZeRO-3 partitions the head's weight and gathers it only inside the head module's own call, which the
fused function bypasses: there the head is called as a module per chunk under activation checkpointing
(:func:`checkpointed_logprobs`), same maths, more memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256  # ~150 MiB of fp32 logits per chunk at a 151,936-token vocab


class _Scratch:
    """One chunk's logits buffer, reused by every chunk (and, for a non-fp32 head, one in the head's dtype
    for the matmul): on a CPU each fresh tensor of hundreds of MB costs its page faults again."""

    def __init__(self, numel: int, weight: torch.Tensor) -> None:
        self.fp32 = torch.empty(numel, dtype=torch.float32, device=weight.device)
        same = weight.dtype == torch.float32
        self.raw = self.fp32 if same else torch.empty(numel, dtype=weight.dtype, device=weight.device)

    def logits(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
    ) -> torch.Tensor:
        """fp32 ``(M, V')`` logits of ``(M, H)`` rows over ``V'`` head rows, divided by the temperature: the
        operations of ``head(h).float() / temperature`` (``F.linear`` is this ``mm`` / ``addmm``)."""
        shape = (hidden.shape[0], weight.shape[0])
        z = self.fp32[: shape[0] * shape[1]].view(shape)
        raw = self.raw[: z.numel()].view(shape)
        if bias is None:
            torch.mm(hidden, weight.t(), out=raw)
        else:
            torch.addmm(bias, hidden, weight.t(), out=raw)
        if raw is not z:
            z.copy_(raw)
        return z.div_(temperature) if temperature != 1.0 else z

    def in_weight_dtype(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` cast to the head's dtype (what autograd does at the ``.float()`` of half logits)."""
        return z if self.raw is self.fp32 else self.raw[: z.numel()].view(z.shape).copy_(z)


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(z, -1)`` (the same max-shifted sum) without its full-size temporary: ``z`` is
    overwritten."""
    top = z.amax(-1, keepdim=True)
    return z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


class FusedLinearLogprob(torch.autograd.Function):
    """``log_softmax((hidden @ weight.T + bias) / T)[targets]`` and its gradients, never holding more than
    one chunk of logits.

    Forward: ``(M, H)`` hidden rows in chunks of ``chunk_tokens`` rows; per chunk the fp32 logits, their
    log-sum-exp (saved, ``(M,)``) and the target's logit; optionally the entropy (no grad). Backward, for
    an upstream ``g (M,)``: ``d logp_i / d z_ij = (onehot_ij - softmax_ij) / T``, recomputed over slices of
    the vocab sized so that a slice holds ``chunk_tokens x V`` logits. Slicing the vocab rather than the
    tokens lets each slice's rows of ``grad_weight`` (and ``grad_bias``) be one matmul over all tokens,
    written in place, with no ``V x H`` accumulator; only ``grad_hidden (M, H)`` is summed over slices.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (M, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        targets: torch.Tensor,  # (M,) int64
        temperature: float,
        chunk_tokens: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, v = hidden.shape[0], weight.shape[0]
        logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        scratch = _Scratch(min(chunk_tokens, m) * v, weight)
        for start in range(0, m, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            z = scratch.logits(hidden[rows], weight, bias, temperature)  # (c, V) fp32
            target = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            if with_entropy:  # H = lse - sum_j p_j z_j; needs z next to exp(z): one more (c, V) tensor
                top = z.amax(-1, keepdim=True)
                e = (z - top).exp_()
                total = e.sum(-1)
                lse[rows] = total.log() + top.squeeze(-1)
                entropy[rows] = lse[rows] - e.mul_(z).sum(-1) / total
            else:
                lse[rows] = _logsumexp_(z)
            logp[rows] = target - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (m, h), v, temp = hidden.shape, weight.shape[0], ctx.temperature
        g = grad_logp.float() / temp  # (M,) the 1/T of d z / d logits, folded in once
        acc = torch.promote_types(hidden.dtype, torch.float32)  # grad_hidden's running sum over slices
        grad_h = torch.zeros((m, h), dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        step = max(1, min(v, ctx.chunk_tokens * v // max(m, 1)))  # vocab slice: ~chunk_tokens x V logits
        scratch = _Scratch(m * step, weight)
        for v0 in range(0, v, step):
            v1 = min(v, v0 + step)
            w = weight[v0:v1]
            z = scratch.logits(hidden, w, None if bias is None else bias[v0:v1], temp)  # (M, v1 - v0)
            grad_z = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # -g * softmax
            # + g * onehot, for the rows whose target is in this slice (no host sync on a GPU)
            hit = (targets >= v0) & (targets < v1)
            cols = (targets - v0).clamp_(0, v1 - v0 - 1).unsqueeze(-1)
            grad_z.scatter_add_(1, cols, torch.where(hit, g, 0.0).unsqueeze(-1))
            grad_z = scratch.in_weight_dtype(grad_z)
            if grad_w is not None:
                torch.mm(grad_z.t(), hidden, out=grad_w[v0:v1])
            if grad_b is not None:
                grad_b[v0:v1] = grad_z.sum(0)
            if grad_h is not None and grad_z.dtype == acc:
                grad_h.addmm_(grad_z, w)
            elif grad_h is not None:
                grad_h += grad_z @ w  # half-precision partial products, summed over slices in fp32
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(M,)`` fp32 log p(target) of ``(M, H)`` hidden rows under the head ``(weight (V, H), bias (V,))``
    at ``temperature``, and, if asked, the ``(M,)`` entropy of each row's distribution (no grad)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}; learner.logprob_chunk_tokens")
    logp, entropy = FusedLinearLogprob.apply(
        hidden, weight, bias, targets, float(temperature), int(chunk_tokens), with_entropy
    )
    return logp, entropy if with_entropy else None


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


def checkpointed_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`fused_logprobs` returns, through ``head`` called as a module per chunk under activation
    checkpointing: the path for a ZeRO-3-partitioned head. Each chunk's backward produces a whole
    ``V x H`` weight gradient that autograd then adds up, so it needs more memory and time."""
    pieces, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logp, h, y, head, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logp(h, y, head, temperature))
        if with_entropy:
            with torch.no_grad():
                entropies.append(_chunk_entropy(h, head, temperature))
    empty = hidden.new_zeros((0,), dtype=torch.float32)
    logp = torch.cat(pieces) if pieces else empty
    return logp, (torch.cat(entropies) if entropies else empty) if with_entropy else None


def _partitioned(weight: torch.Tensor) -> bool:
    """ZeRO-3 tags the parameters it partitions (``ds_id``); their ``.data`` is empty outside a gather."""
    return hasattr(weight, "ds_id")


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


def shared_prefix_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`response_rows` for group-major rows whose ``group_size`` responses share one prompt: each prompt
    runs through the decoder once, and its key/value cache, repeated per response, is the prefix every
    response of the group attends to (shared-prefix forward, as in Prefix Grouper for GRPO). The same
    function of the weights as the whole rows (causal attention over prompt + response, the same RoPE
    positions), with the prompt's layers computed once per group instead of K times; the gradients of the K
    responses meet in the repeated cache.

    Prompts are right-padded to the longest (``P``); the response pass masks the pad columns between a
    short prompt and its responses, and puts response token ``t`` at position ``prompt_len + t``. Token 0
    of a response is predicted by the prompt's last state, token ``t > 0`` by the response's state ``t-1``.
    """
    from transformers import DynamicCache

    n, t = positions.shape
    k = group_size
    if n % k:
        raise ValueError(f"{n} rows are not whole groups of {k}")
    lens = prompt_lens.view(-1, k)
    if bool((lens != lens[:, :1]).any()):
        raise ValueError("shared_prefix_rows: rows of one group have different prompt lengths")
    lens = lens[:, 0]
    b, p = lens.shape[0], int(lens.max())
    cols = torch.arange(p, device=input_ids.device)
    prompt_mask = (cols < lens.unsqueeze(1)).long()  # (B, P)
    prompt_ids = input_ids[::k, :p] * prompt_mask  # pad columns: token 0 (masked; any id would do)
    rows = torch.arange(n, device=input_ids.device).unsqueeze(1)
    resp_ids = input_ids[rows, positions]  # (N, T); masked entries hold a real id of the row, never read
    decoder = model.get_decoder()
    cache = DynamicCache(config=model.config)
    prompt_hidden = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=cols.unsqueeze(0).expand(b, p),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B, P, H)
    cache.batch_repeat_interleave(k)
    hidden = decoder(
        input_ids=resp_ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), mask.long()], 1),
        position_ids=prompt_lens.unsqueeze(1) + torch.arange(t, device=input_ids.device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (N, T, H)
    last = prompt_hidden[torch.arange(b, device=input_ids.device), lens - 1].repeat_interleave(k, 0)
    predicting = torch.cat([last.unsqueeze(1), hidden[:, :-1]], 1)  # row t predicts response token t
    return hidden, predicting[mask], resp_ids[mask]


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    with_entropy: bool = False,
    prompt_lens: torch.Tensor | None = None,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the tokens at ``positions`` of each sequence, given everything before them.

    ``input_ids``/``attention_mask``: ``(N, L)`` right-padded sequences (prompt + response).
    ``positions``/``mask``: ``(N, T)`` — position in the sequence of each response token, and which
    entries are real. Returns ``(N, T)`` log-probs (0 where ``mask`` is false) and, if asked, the
    entropy of the full next-token distribution at those positions (no grad).
    ``temperature`` divides the logits, matching an engine that reports sampling-time log-probs.
    The head is the model's output embedding (tied to the input embedding or not; with or without bias).
    With ``prompt_lens`` (``(N,)``) and ``group_size`` K > 1, rows are group-major groups of K responses to
    one prompt, and each prompt is computed once (:func:`shared_prefix_rows`).
    """
    head = model.get_output_embeddings()
    if prompt_lens is not None and group_size > 1:
        hidden, flat_h, flat_y = shared_prefix_rows(
            model, input_ids, prompt_lens, positions, mask, group_size
        )
    else:
        hidden, flat_h, flat_y = response_rows(model, input_ids, attention_mask, positions, mask)
    opts = {"chunk_tokens": chunk_tokens, "temperature": temperature, "with_entropy": with_entropy}
    if isinstance(head, torch.nn.Linear) and not _partitioned(head.weight):
        flat, flat_ent = fused_logprobs(flat_h, flat_y, head.weight, head.bias, **opts)
    else:
        flat, flat_ent = checkpointed_logprobs(flat_h, flat_y, head, **opts)
    n, t = positions.shape
    out = hidden.new_zeros((n, t), dtype=torch.float32).masked_scatter(mask, flat)
    entropy = None
    if flat_ent is not None:
        entropy = torch.zeros((n, t), dtype=torch.float32, device=input_ids.device)
        entropy = entropy.masked_scatter(mask, flat_ent)
    return out, entropy
