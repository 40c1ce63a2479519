"""Spreading one call's items over a pool of actors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """``items`` in at most ``parts`` contiguous slices of near-equal size (no empty slice), in order."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        if end > start:
            out.append(items[start:end])
        start = end
    return out
