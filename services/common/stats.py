"""What the generator and verifier actors report through ``stats()``: their counters since they started,
as dataclasses (they cross a Ray call; the coordinator reads them by name)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class GeneratorStats:
    """A generator's counters. ``version`` (-1 before the first snapshot) and ``engine_restarts`` are filled
    in by the actor when it reports."""

    groups: int = 0
    tokens: int = 0
    batches: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    weight_loads: int = 0
    weight_fetch_s: float = 0.0
    weight_load_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    version: int = -1
    engine_restarts: int = 0


@dataclass
class VerifierStats:
    """A verifier worker's counters: scored groups and responses, passing responses, groups it could not
        score (rejected to the dead-letter stream), seconds spent scoring (for code: running the programs in
        the sandbox), responses by verdict status, and programs that ran (passed, failed or timed out) in each
    sandbox backend (code only)."""

    groups: int = 0
    passed: int = 0
    responses: int = 0
    rejected: int = 0
    busy_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    sandboxed: dict[str, int] = field(default_factory=dict)
