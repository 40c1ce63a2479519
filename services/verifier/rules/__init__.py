"""Pure scoring rules, selected by task kind.

Every rule is ``rule(response, reference) -> verdict``: ``reference`` is the task's ground truth as
a mapping (for ``countdown``: ``nums`` and ``target``) and the verdict carries at least ``reward``,
``status`` and ``detail``. An unknown kind is a configuration error, never a reward of 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from services.verifier.rules.countdown import countdown_rule


class Verdict(Protocol):
    """What every rule returns (read-only, so frozen dataclasses satisfy it)."""

    @property
    def reward(self) -> float: ...

    @property
    def status(self) -> str: ...

    @property
    def detail(self) -> str: ...


Rule = Callable[[str, Mapping[str, Any]], Verdict]

RULES: dict[str, Rule] = {
    "countdown": countdown_rule,
}


def get_rule(kind: str) -> Rule:
    """The rule for task kind ``kind``; raises ``ValueError`` listing the valid kinds otherwise."""
    try:
        return RULES[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {sorted(RULES)}") from None
