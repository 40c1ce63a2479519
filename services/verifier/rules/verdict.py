"""The verdict of a binary rule (math, exact, regex): reward 1.0 for ``pass``, 0.0 for anything else."""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("pass", "fail", "timeout", "parse_error", "sandbox_error")


@dataclass(frozen=True, slots=True)
class BinaryVerdict:
    """One item's outcome. ``isolation`` says where the check ran (``in_process`` or ``process_pool``)."""

    reward: float
    status: str
    detail: str
    tests_passed: int = 0
    tests_total: int = 1
    isolation: str = "in_process"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.reward != (1.0 if self.status == "pass" else 0.0):
            raise ValueError(f"status {self.status!r} cannot carry reward {self.reward}")

    @classmethod
    def of(cls, ok: bool, detail: str, isolation: str = "in_process") -> BinaryVerdict:
        """``pass`` (1.0) if ``ok`` else ``fail`` (0.0)."""
        return cls(1.0 if ok else 0.0, "pass" if ok else "fail", detail, int(ok), isolation=isolation)

    @classmethod
    def error(cls, status: str, detail: str, isolation: str = "in_process") -> BinaryVerdict:
        """A 0.0 verdict for ``timeout``, ``parse_error`` or ``sandbox_error``."""
        return cls(0.0, status, detail, isolation=isolation)
