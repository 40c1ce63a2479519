"""Scored response groups -> the padded token tensors the learner trains on.

Layout: ``N = B * K`` sequences (group-major: rows ``b*K .. b*K+K-1`` are group ``b`` and share its
prompt, of ``prompt_lens[n]`` tokens), each ``prompt + response`` right-padded to ``L``; response token
``t`` of row ``n`` sits at ``positions[n, t]``. Everything per response token is ``(B, K, T)`` once
reshaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.common.messages import ResponseGroup


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """``input_ids``/``attention_mask`` (N, L); ``prompt_lens`` (N,); ``positions``/``mask``/``logp_behavior``
    (N, T); ``rewards`` (B, K); ``versions`` (B,) behaviour version of each group; ``group_ids`` length B."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    logp_behavior: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor
    group_ids: tuple[str, ...]

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def take(self, groups: Sequence[int]) -> PackedBatch:
        """The sub-batch of the given group indices, in that order (a group is never split)."""
        k = self.group_size
        g = torch.as_tensor(list(groups), dtype=torch.long)
        rows = (g.unsqueeze(1) * k + torch.arange(k)).flatten()
        return PackedBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            prompt_lens=self.prompt_lens[rows],
            positions=self.positions[rows],
            mask=self.mask[rows],
            logp_behavior=self.logp_behavior[rows],
            rewards=self.rewards[g],
            versions=self.versions[g],
            group_ids=tuple(self.group_ids[i] for i in groups),
        )


def pack_groups(groups: Sequence[ResponseGroup], pad_id: int) -> PackedBatch:
    """Pad ``groups`` (all scored, all with the same K) into one batch."""
    if not groups:
        raise ValueError("pack_groups needs at least one group")
    k = groups[0].task.group_size
    for g in groups:
        if g.rewards is None:
            raise ValueError(f"group {g.group_id} is not scored; the learner only takes verified groups")
        if g.task.group_size != k:
            raise ValueError(f"group {g.group_id} has K={g.task.group_size}, batch has K={k}")
    seqs, resp_lens, prompt_lens, behavior = [], [], [], []
    for g in groups:
        prompt = g.task.prompt_token_ids
        for r in g.rollouts:
            seqs.append(np.concatenate([prompt, r.token_ids]))
            prompt_lens.append(prompt.size)
            resp_lens.append(r.token_ids.size)
            behavior.append(r.logprobs)
    n, seq_len, t = len(seqs), max(s.size for s in seqs), max(max(resp_lens), 1)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    attention = np.zeros((n, seq_len), dtype=bool)
    positions = np.zeros((n, t), dtype=np.int64)
    mask = np.zeros((n, t), dtype=bool)
    logp_b = np.zeros((n, t), dtype=np.float32)
    for i, s in enumerate(seqs):
        input_ids[i, : s.size] = s
        attention[i, : s.size] = True
        r = resp_lens[i]
        positions[i, :r] = prompt_lens[i] + np.arange(r)
        mask[i, :r] = True
        logp_b[i, :r] = behavior[i]
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention).long(),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.long),
        positions=torch.from_numpy(positions),
        mask=torch.from_numpy(mask),
        logp_behavior=torch.from_numpy(logp_b),
        rewards=torch.tensor([list(g.rewards or ()) for g in groups], dtype=torch.float32),
        versions=torch.tensor([g.behavior_version for g in groups], dtype=torch.long),
        group_ids=tuple(g.group_id for g in groups),
    )
