"""Pure scoring rules, selected by task kind.

Every rule is ``rule(response, reference) -> verdict``: ``reference`` is the task's ground truth as
a mapping (for ``countdown``: ``nums`` and ``target``) and the verdict carries at least ``reward``,
``status`` and ``detail``. An unknown kind is a configuration error, never a reward of 0.

Kinds: ``countdown``, ``math`` (math-verify in a killable process pool), ``code`` (Python programs in
the sandbox), ``exact`` and ``regex``. The queue worker (``scoring.score_group``) and the REST service
call the same rule objects, so they give identical results for the same items; ``configure_rules``
points the ``code`` and ``math`` rules at a sandbox and limits taken from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from services.verifier.rules.code import CodeScorer, CodeSettings, code_rule
from services.verifier.rules.countdown import countdown_rule
from services.verifier.rules.exact import exact_rule, regex_rule
from services.verifier.rules.math import MathScorer, math_rule

if TYPE_CHECKING:
    from services.common.config import VerifierConfig
    from services.verifier.sandbox.interface import Sandbox


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
    "math": math_rule,
    "code": code_rule,
    "exact": exact_rule,
    "regex": regex_rule,
}


def get_rule(kind: str) -> Rule:
    """The rule for task kind ``kind``; raises ``ValueError`` listing the valid kinds otherwise."""
    try:
        return RULES[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {sorted(RULES)}") from None


def code_settings(cfg: VerifierConfig) -> CodeSettings:
    """The code rule's limits and defaults from the verifier config."""
    return CodeSettings(
        python=cfg.python,
        wall_s=cfg.timeout_s,
        memory_mb=cfg.memory_mb,
        pids=cfg.pids_max,
        fsize_mb=cfg.fsize_mb,
        output_bytes=cfg.output_bytes,
        short_circuit=cfg.code_short_circuit,
        allow_unsandboxed=cfg.allow_unsandboxed_code,
    )


def configure_rules(cfg: VerifierConfig, sandbox: Sandbox) -> None:
    """Point the registered ``code`` rule at ``sandbox`` and the ``math`` rule at the config's pool size
    and time limit. Call once per process before scoring (the REST app does); without it the code rule
    probes the default backend with default limits on first use."""
    code = RULES["code"]
    math = RULES["math"]
    assert isinstance(code, CodeScorer) and isinstance(math, MathScorer)
    code.configure(sandbox, code_settings(cfg))
    math.configure(cfg.math_workers, cfg.math_timeout_s)
