"""Math scorer: HuggingFace ``math-verify`` on the response's ``\\boxed{}`` answer, in a killable pool.

Reference: ``answer`` (the gold answer, LaTeX or plain, e.g. ``"\\frac{1}{2}"``; a value that already
holds ``\\boxed`` or ``$`` is parsed as is, anything else as ``$answer$``).

Decision (``status`` in brackets): no ``\\boxed`` in the response -> 0.0 [parse_error] (decided here,
without a worker); math-verify extracts nothing from it -> 0.0 [parse_error]; it proves the answer equal
to the gold -> 1.0 [pass]; else 0.0 [fail]. math-verify uses ``signal.alarm`` timeouts (main thread only)
and sympy can sit in one C call (``\\boxed{9^{9^{9^{9}}}}``) that no signal interrupts, so every check
runs in a worker process of a ``KillablePool``: math-verify's own timeouts run on the worker's main
thread, and past ``timeout_s`` (+1 s) the worker is SIGKILLed -> 0.0 [timeout].
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from services.verifier.rules.verdict import BinaryVerdict
from services.verifier.sandbox.pool import KillablePool, TaskTimeout, WorkerCrashed

MAX_RESPONSE_CHARS = 200_000
_KILL_GRACE_S = 1.0
_ISOLATION = "process_pool"


def check_in_worker(response: str, gold: str, timeout_s: int) -> tuple[str, str]:
    """Runs inside a pool worker (main thread): (status, detail)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    gold_text = gold if ("\\boxed" in gold or "$" in gold) else f"${gold}$"
    try:
        gold_parsed = parse(
            gold_text,
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=timeout_s,
        )
        if not gold_parsed:
            return "bad_reference", f"math-verify could not parse the gold answer {gold!r}"
        pred = parse(
            response,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
            parsing_timeout=timeout_s,
        )
        if not pred:
            return "parse_error", "math-verify extracted no answer from the \\boxed{} expression"
        same = verify(gold_parsed, pred, timeout_seconds=timeout_s, raise_on_error=True)
    except TimeoutException:
        return "timeout", f"math-verify timed out after {timeout_s}s"
    if same:
        return "pass", f"{pred[-1]!s} equals the gold answer"
    return "fail", f"{pred[-1]!s} differs from the gold answer {gold_parsed[-1]!s}"


class MathScorer:
    """The ``math`` rule: callable as ``rule(response, reference)``; the pool starts on first use."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0) -> None:
        self._workers, self._timeout_s = workers, timeout_s
        self._pool: KillablePool | None = None
        self._lock = threading.Lock()

    def configure(self, workers: int, timeout_s: float) -> None:
        """Set pool size and per-check limit (restarts the pool if it was running)."""
        with self._lock:
            old, self._pool = self._pool, None
            self._workers, self._timeout_s = workers, timeout_s
        if old is not None:
            old.close()

    def pool(self) -> KillablePool:
        with self._lock:
            if self._pool is None:
                self._pool = KillablePool(
                    self._workers,
                    preload=["math_verify", "services.verifier.rules.math"],
                    warmup=(check_in_worker, ("\\boxed{\\frac{1}{2}}", "0.5", 5)),
                )
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __call__(self, response: str, reference: Mapping[str, Any]) -> BinaryVerdict:
        gold = reference.get("answer")
        if not isinstance(gold, str | int | float) or isinstance(gold, bool) or str(gold).strip() == "":
            raise ValueError(f"math reference needs a non-empty 'answer' (string or number), got {gold!r}")
        if "\\boxed" not in response:
            return BinaryVerdict.error("parse_error", "no \\boxed{} answer in the response", _ISOLATION)
        if len(response) > MAX_RESPONSE_CHARS:
            return BinaryVerdict.error(
                "parse_error", f"response longer than {MAX_RESPONSE_CHARS} characters", _ISOLATION
            )
        limit = max(1, int(self._timeout_s))
        try:
            status, detail = self.pool().call(
                check_in_worker, (response, str(gold), limit), timeout_s=self._timeout_s + _KILL_GRACE_S
            )
        except TaskTimeout:
            return BinaryVerdict.error(
                "timeout", f"math check killed after {self._timeout_s + _KILL_GRACE_S}s", _ISOLATION
            )
        except WorkerCrashed as exc:
            return BinaryVerdict.error("timeout", f"math worker died (memory limit?): {exc}", _ISOLATION)
        if status == "bad_reference":
            raise ValueError(detail)
        if status in ("pass", "fail"):
            return BinaryVerdict.of(status == "pass", detail, _ISOLATION)
        return BinaryVerdict.error(status, detail, _ISOLATION)


math_rule = MathScorer()
