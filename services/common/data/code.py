"""Code problems: a prompt and the unit tests that score a Python program (the verifier's ``code`` rule:
reward = the fraction of tests passed, the paper's Eq. 61).

Rows (JSON Lines or Parquet, local or ``hf://datasets/...``) in the formats public code-RL sets use:

* **native**: ``prompt`` and ``tests``, a list of ``{"stdin": ..., "expected_stdout": ...}`` and/or
  ``{"assert": "<python statement>"}``; optional ``fn_name`` and ``limits`` (``wall_s``, ``memory_mb``).
* **inputs/outputs ground truth** (PRIME / Eurus code data, verl's preprocessed sets): the ground truth is a
  JSON object (or its JSON string) with ``inputs`` and ``outputs`` lists and optionally ``fn_name``, in a
  ``ground_truth`` column or in ``reward_model.ground_truth``; the prompt is ``prompt`` (a string, or
  verl's list of chat messages, whose user turns are joined), ``question`` or ``problem``.
* **APPS / TACO**: ``question`` and ``input_output``, the same JSON object as a string.

Without ``fn_name`` each input/output pair is a stdin/stdout test (an input given as a list of lines is
joined with newlines); with it, the program must define that function (or a ``Solution`` class with that
method, as LeetCode-style rows do) and each pair becomes an assert that calls it with the input's
arguments. A malformed row is a ``DatasetError`` naming the file, the row and the field; a row without any
test is refused, never scored as a pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.data.rows import DatasetError, read_rows, resolve_data_path, short
from services.common.data.rows import matching as _matching

PROMPT_FIELDS = ("prompt", "question", "problem")
TRUTH_FIELDS = ("tests", "ground_truth", "input_output", "reward_model")
_COLUMNS = (*PROMPT_FIELDS, *TRUTH_FIELDS, "fn_name", "limits")
_LIMIT_KEYS = {"wall_s": (0.1, 600.0), "memory_mb": (16, 65536)}


@dataclass(frozen=True, slots=True)
class CodeProblem:
    """A prompt and its tests, in the verifier's reference format (``tests``: stdin/expected_stdout or
    assert dicts; ``limits``: ``wall_s`` / ``memory_mb`` where the row sets them)."""

    prompt: str
    tests: tuple[dict[str, str], ...]
    limits: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("a code problem needs a non-empty prompt")
        if not self.tests:
            raise ValueError("a code problem needs at least one test")

    def reference(self) -> dict[str, Any]:
        """What the ``code`` rule reads from a task."""
        ref: dict[str, Any] = {"language": "python", "tests": [dict(t) for t in self.tests]}
        if self.limits:
            ref["limits"] = dict(self.limits)
        return ref


def _prompt(row: dict[str, Any], where: str) -> str:
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, list):  # verl: a list of chat messages
            turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            if turns and all(isinstance(t, str) for t in turns):
                value = "\n\n".join(turns)
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(
                f"{where}: field {name!r} must be a non-empty string (or a list of chat messages with user "
                f"turns), got {short(value)}"
            )
        return value
    raise DatasetError(
        f"{where}: no prompt; add one of the fields {list(PROMPT_FIELDS)} (present: {sorted(row)})"
    )


def _json_object(value: Any, name: str, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: field {name!r} is not valid JSON ({exc.msg}); it must be an object "
                               'such as {"inputs": ["1 2\\n"], "outputs": ["3\\n"]}') from None  # fmt: skip
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: field {name!r} must be a JSON object, got {short(value)}")
    return value


def _native_tests(tests: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(tests, list):
        raise DatasetError(f"{where}: field 'tests' must be a list of test objects, got {short(tests)}")
    out = []
    for i, t in enumerate(tests):
        if (
            isinstance(t, dict)
            and set(t) == {"assert"}
            and isinstance(t["assert"], str)
            and t["assert"].strip()
        ):
            out.append({"assert": t["assert"]})
        elif (
            isinstance(t, dict) and set(t) == {"stdin", "expected_stdout"}
            and all(isinstance(t[k], str) for k in t)
        ):  # fmt: skip
            out.append({"stdin": t["stdin"], "expected_stdout": t["expected_stdout"]})
        else:
            raise DatasetError(
                f"{where}: field 'tests' item {i} must be {{'stdin': str, 'expected_stdout': str}} or "
                f"{{'assert': str}}, got {short(t)}"
            )
    return out


def _as_text(value: Any, what: str, where: str) -> str:
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "\n".join(value) + ("\n" if value and not value[-1].endswith("\n") else "")
    if isinstance(value, str):
        return value
    raise DatasetError(
        f"{where}: {what} must be a string or a list of lines for stdin/stdout tests, got {short(value)}"
    )


def _io_tests(truth: dict[str, Any], name: str, where: str, fn_name: Any) -> list[dict[str, str]]:
    inputs, outputs = truth.get("inputs"), truth.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise DatasetError(
            f"{where}: field {name!r} needs 'inputs' and 'outputs' lists, got keys {sorted(truth)}"
        )
    if len(inputs) != len(outputs):
        raise DatasetError(f"{where}: field {name!r} has {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = truth.get("fn_name", fn_name)
    if fn_name is None:
        return [
            {
                "stdin": _as_text(i, f"{name} inputs[{n}]", where),
                "expected_stdout": _as_text(o, f"{name} outputs[{n}]", where),
            }
            for n, (i, o) in enumerate(zip(inputs, outputs, strict=True))
        ]
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise DatasetError(f"{where}: fn_name must be a Python identifier, got {short(fn_name)}")
    tests = []
    for n, (args, expected) in enumerate(zip(inputs, outputs, strict=True)):
        args = args if isinstance(args, list) else [args]
        # Call-based rows (APPS/TACO) wrap the return value in a one-element list.
        if isinstance(expected, list) and len(expected) == 1:
            expected = expected[0]
        try:
            call = json.dumps([args, expected])
        except (TypeError, ValueError):
            raise DatasetError(
                f"{where}: {name} pair {n} is not JSON data: {short((args, expected))}"
            ) from None
        target = f"(Solution().{fn_name} if 'Solution' in globals() else {fn_name})"
        tests.append(
            {"assert": f"import json as _j; _a, _e = _j.loads({call!r}); assert {target}(*_a) == _e"}
        )
    return tests


def _tests(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "tests" in row and row["tests"] is not None:
        return _native_tests(row["tests"], where)
    for name in ("ground_truth", "input_output"):
        if row.get(name) is not None:
            return _io_tests(_json_object(row[name], name, where), name, where, row.get("fn_name"))
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        truth = _json_object(reward_model["ground_truth"], "reward_model.ground_truth", where)
        return _io_tests(truth, "reward_model.ground_truth", where, row.get("fn_name"))
    raise DatasetError(
        f"{where}: no tests; add 'tests', 'ground_truth', 'input_output' or 'reward_model.ground_truth' "
        f"(present: {sorted(row)}): a problem without tests cannot be scored"
    )


def _limits(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= set(_LIMIT_KEYS):
        raise DatasetError(
            f"{where}: field 'limits' must be an object with keys from {sorted(_LIMIT_KEYS)}, "
            f"got {short(value)}"
        )
    out = {}
    for key, v in value.items():
        lo, hi = _LIMIT_KEYS[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise DatasetError(f"{where}: limits.{key} must be a number in [{lo}, {hi}], got {short(v)}")
        out[key] = float(v)
    return out


def parse_code_row(row: Any, where: str) -> CodeProblem:
    """One dataset row -> problem; ``where`` is ``"<file>: row <n>"`` for error messages."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with a prompt and tests, got {short(row)}")
    tests = _tests(row, where)
    if not tests:
        raise DatasetError(f"{where}: the row's test list is empty; a problem without tests cannot be scored")
    return CodeProblem(_prompt(row, where), tuple(tests), _limits(row.get("limits"), where))


def load_code_problems(
    path: str | os.PathLike[str], where: Mapping[str, Any] | None = None
) -> list[CodeProblem]:
    """Every problem of a code dataset file (see the module docstring for the row formats)."""
    path = resolve_data_path(path)
    rows = read_rows(path, (), _COLUMNS, example='{"prompt": "Print the sum of two integers.", "tests": '
                     '[{"stdin": "1 2\\n", "expected_stdout": "3\\n"}]}', where=where)  # fmt: skip
    problems = [parse_code_row(row, f"{path}: row {n}") for n, row in rows]
    if not problems:
        raise DatasetError(
            f"{path}: the file holds no rows{_matching(where)}; expected at least one with a prompt and tests"
        )
    return problems


def save_code_problems(problems: list[CodeProblem], path: str | os.PathLike[str]) -> None:
    """Write ``problems`` as native JSON Lines rows that ``load_code_problems`` reads back unchanged."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for p in problems:
            row: dict[str, Any] = {"prompt": p.prompt, "tests": list(p.tests)}
            if p.limits:
                row["limits"] = p.limits
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
