"""String scorers: ``exact`` (normalised equality) and ``regex`` (a pattern with a hard match timeout).

Both look at the *answer text*: the whole response, or with ``extract: "answer_tag"`` the text of the last
``<answer>…</answer>`` pair (no pair -> 0.0 [parse_error]). Whitespace runs are collapsed and the ends
stripped before comparing.

- ``exact``: reference ``answer`` (string), optional ``case_sensitive`` (default true). Equal -> 1.0
  [pass], else 0.0 [fail].
- ``regex``: reference ``pattern``, optional ``mode`` (``fullmatch`` default, or ``search``) and
  ``ignore_case``. The ``regex`` package enforces a timeout on matching (Python's ``re`` cannot), so a
  catastrophic-backtracking pattern gives 0.0 [timeout] instead of a hung worker. A pattern that does not
  compile is a reference error (``ValueError``), never a reward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import regex

from services.verifier.rules.countdown import extract_answer
from services.verifier.rules.verdict import BinaryVerdict

MAX_PATTERN_CHARS = 4096
MATCH_TIMEOUT_S = 1.0


def _answer_text(response: str, reference: Mapping[str, Any]) -> str | None:
    extract = reference.get("extract", "none")
    if extract not in ("none", "answer_tag"):
        raise ValueError(f"reference 'extract' must be 'none' or 'answer_tag', got {extract!r}")
    text = extract_answer(response) if extract == "answer_tag" else response
    return None if text is None else " ".join(text.split())


def _verdict(ok: bool, detail: str) -> BinaryVerdict:
    return BinaryVerdict.of(ok, detail)


def exact_rule(response: str, reference: Mapping[str, Any]) -> BinaryVerdict:
    """Registry entry ``exact``: normalised string equality with the reference ``answer``."""
    answer = reference.get("answer")
    if not isinstance(answer, str):
        raise ValueError(f"exact reference needs a string 'answer', got {answer!r}")
    text = _answer_text(response, reference)
    if text is None:
        return BinaryVerdict.error("parse_error", "no <answer>...</answer> pair in the response")
    want = " ".join(answer.split())
    if not reference.get("case_sensitive", True):
        text, want = text.casefold(), want.casefold()
    return _verdict(text == want, "matches the answer" if text == want else "differs from the answer")


def compile_pattern(pattern: Any, ignore_case: bool = False) -> regex.Pattern[str]:
    """Compile a reference pattern; ``ValueError`` naming the problem when it is not usable."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"regex reference needs a 'pattern' string of 1..{MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except regex.error as exc:
        raise ValueError(f"regex reference 'pattern' does not compile: {exc}") from None


def regex_rule(response: str, reference: Mapping[str, Any]) -> BinaryVerdict:
    """Registry entry ``regex``: the answer text matches ``pattern`` (``fullmatch`` or ``search``)."""
    compiled = compile_pattern(reference.get("pattern"), bool(reference.get("ignore_case", False)))
    mode = reference.get("mode", "fullmatch")
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"regex reference 'mode' must be 'fullmatch' or 'search', got {mode!r}")
    text = _answer_text(response, reference)
    if text is None:
        return BinaryVerdict.error("parse_error", "no <answer>...</answer> pair in the response")
    match = compiled.fullmatch if mode == "fullmatch" else compiled.search
    try:
        found = match(text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        return BinaryVerdict.error("timeout", f"pattern matching exceeded {MATCH_TIMEOUT_S}s")
    return _verdict(found, f"pattern {mode} {'matched' if found else 'did not match'}")
