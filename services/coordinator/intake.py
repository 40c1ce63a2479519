"""What is checked on receipt of a scored group, before the learner may train it (pure logic; the coordinator
runs it as it hands groups to the learner).

A group is trained only if the policy that sampled it is one the learner published (version in the
snapshot history *and* the same sha256: behaviour tracking is verified, not assumed), its lag is
within ``max_policy_lag``, its id was never trained in this run, and every response was scored (a
``sandbox_error`` verdict means the sandbox failed, not the program: its 0 is not a reward, and LPO's
listwise target needs all K rewards of the group). Anything else is dropped, counted by reason and
logged — never trained silently — and its task replaced.

After a resume the history is the resumed lineage's; ``earlier`` holds every ``(version, sha256)`` the
learner published before (read from the ledger). A group sampled by such a snapshot is a real policy of
this run with recorded behaviour log-probs, so it is trained as any other; only one whose version the
resumed learner has not reached yet (``rolled_back``: sampled after the checkpoint it resumed from) is
dropped, and its task replaced.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from services.common.messages import ResponseGroup

logger = logging.getLogger(__name__)

DROP_REASONS = ("stale", "duplicate", "unknown_version", "hash_mismatch", "rolled_back", "sandbox_error")
_LENGTH_BIN = 8  # tokens per bucket of the response-length histograms


@dataclass
class DropLog:
    """Counts and shapes of dropped groups, so a reader can see whether dropping biases training
    (e.g. towards short answers, which finish sooner and are less often stale)."""

    by_reason: Counter[str] = field(default_factory=Counter)
    length_hist: Counter[int] = field(default_factory=Counter)
    reward_hist: Counter[float] = field(default_factory=Counter)

    def add(self, group: ResponseGroup, reason: str) -> None:
        self.by_reason[reason] += 1
        for r in group.rollouts:
            self.length_hist[(r.token_ids.size // _LENGTH_BIN) * _LENGTH_BIN] += 1
        for reward in group.rewards or ():
            self.reward_hist[round(reward, 1)] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def length_histogram(groups: list[ResponseGroup]) -> dict[str, int]:
    """Response lengths bucketed like ``DropLog.length_hist`` (keys: bucket start, as strings)."""
    sizes = (r.token_ids.size for g in groups for r in g.rollouts)
    hist: Counter[int] = Counter((n // _LENGTH_BIN) * _LENGTH_BIN for n in sizes)
    return {str(k): v for k, v in sorted(hist.items())}


class GroupIntake:
    """Receipt checks against the learner's snapshot history and the run's trained ids."""

    def __init__(self, max_policy_lag: int) -> None:
        self.max_policy_lag = max_policy_lag
        self.history: dict[int, str] = {}
        self.earlier: set[tuple[int, str]] = set()  # published before the resume this run continues from
        self.trained: set[str] = set()
        self.drops = DropLog()

    def record_snapshot(self, version: int, sha256: str) -> None:
        self.history[version] = sha256

    def reason_to_drop(self, group: ResponseGroup, learner_version: int) -> str | None:
        """None if the group may be trained at ``learner_version``, else the drop reason."""
        if group.group_id in self.trained:
            return "duplicate"
        if "sandbox_error" in (group.verdicts or ()):
            return "sandbox_error"
        known = self.history.get(group.behavior_version)
        if known != group.behavior_sha256:
            if (group.behavior_version, group.behavior_sha256) in self.earlier:
                if group.behavior_version > learner_version:
                    return "rolled_back"
            elif known is None:
                return "unknown_version"
            else:
                return "hash_mismatch"
        if learner_version - group.behavior_version > self.max_policy_lag:
            return "stale"
        return None

    def drop(self, group: ResponseGroup, reason: str, learner_version: int) -> None:
        self.drops.add(group, reason)
        alarming = reason in ("unknown_version", "hash_mismatch", "sandbox_error")
        log = logger.error if alarming else logger.warning
        log(
            "dropped group %s: %s (behaviour v%d sha %s, learner v%d)",
            group.group_id,
            reason,
            group.behavior_version,
            group.behavior_sha256[:12],
            learner_version,
        )

    def mark_trained(self, groups: list[ResponseGroup]) -> None:
        self.trained.update(g.group_id for g in groups)
