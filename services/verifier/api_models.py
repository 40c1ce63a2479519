"""Request and response models of the verifier REST API (pydantic v2; the OpenAPI spec is built from them).

An item of ``POST /v1/verify`` is ``{id, task, response, ...task fields}``; ``task`` selects the model
(discriminated union) and everything but ``id``/``task``/``response`` becomes the rule's ``reference``,
exactly as a queue task's ``reference`` does. Unknown fields are rejected (422 naming the field).
``/run_code`` mirrors SandboxFusion's request/response shape so verl's ``sandbox_fusion`` client works.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.verifier.rules.exact import compile_pattern

ItemStatus = Literal["pass", "fail", "timeout", "sandbox_error", "parse_error"]
_ID = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$", description="Caller's item id.")
_RESPONSE = Field(max_length=1_000_000, description="The model's response text.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Item(_Strict):
    id: str = _ID
    response: str = _RESPONSE

    def reference(self) -> dict[str, Any]:
        """The rule's reference: every task field except ``id``, ``task`` and ``response``."""
        return self.model_dump(by_alias=True, exclude={"id", "task", "response"}, exclude_none=True)


class CountdownItem(_Item):
    """Countdown: the dataset's ``nums`` and ``target``; the answer is in ``<answer>…</answer>``."""

    task: Literal["countdown"]
    nums: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(min_length=1, max_length=16)
    target: int = Field(ge=-1_000_000_000, le=1_000_000_000)


class MathItem(_Item):
    """Math: the gold ``answer`` (LaTeX or plain); the response's ``\\boxed{}`` answer is checked."""

    task: Literal["math"]
    answer: str = Field(min_length=1, max_length=10_000)


class IoTest(_Strict):
    """A stdin/stdout test: run the program with ``stdin``; its stdout must equal ``expected_stdout``
    (line by line, trailing whitespace ignored)."""

    stdin: str = Field("", max_length=1_000_000)
    expected_stdout: str = Field(max_length=1_000_000)


class AssertTest(_Strict):
    """An assert-style test: a Python statement run after the program (as module ``solution``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    assert_: str = Field(alias="assert", min_length=1, max_length=100_000)


class CodeLimits(_Strict):
    """Per-item limits, capped by the service's own (``verifier.timeout_s``, ``verifier.memory_mb``)."""

    wall_s: float | None = Field(None, gt=0.0, le=3600.0, description="Wall-clock limit of all tests.")
    memory_mb: int | None = Field(None, ge=32, le=65536, description="Memory limit of the process tree.")


class CodeItem(_Item):
    """Code: a Python program (optionally inside a ```python fence) and its tests."""

    task: Literal["code"]
    language: Literal["python"] = "python"
    tests: list[IoTest | AssertTest] = Field(min_length=1, max_length=1000)
    limits: CodeLimits | None = None
    short_circuit: bool | None = Field(None, description="Stop at the first failure; reward 1 or 0.")


class ExactItem(_Item):
    """Exact: normalised string equality with ``answer``."""

    task: Literal["exact"]
    answer: str = Field(max_length=100_000)
    case_sensitive: bool = True
    extract: Literal["none", "answer_tag"] = "none"


class RegexItem(_Item):
    """Regex: the answer text matches ``pattern`` (``fullmatch`` or ``search``), with a match timeout."""

    task: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=4096)
    mode: Literal["fullmatch", "search"] = "fullmatch"
    ignore_case: bool = False
    extract: Literal["none", "answer_tag"] = "none"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        compile_pattern(value)
        return value


VerifyItem = Annotated[
    CountdownItem | MathItem | CodeItem | ExactItem | RegexItem, Field(discriminator="task")
]


class VerifyRequest(_Strict):
    """A batch of items (at most ``verifier.max_items``)."""

    items: list[VerifyItem] = Field(min_length=1, max_length=100_000)


class ItemResult(BaseModel):
    """One item's result. ``sandbox_error`` means the sandbox failed, never that the program did."""

    id: str
    reward: float
    status: ItemStatus
    tests_passed: int
    tests_total: int
    wall_s: float
    isolation: str = Field(description="nsjail | bwrap | none (code), process_pool (math), in_process.")
    detail: str = ""


class VerifyResponse(BaseModel):
    results: list[ItemResult]


class TaskSubmit(_Strict):
    """A long batch to score in the background; ``client_id`` makes the submission idempotent."""

    client_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    items: list[VerifyItem] = Field(min_length=1, max_length=100_000)


class TaskState(BaseModel):
    """A background task: ``queued`` -> ``running`` -> ``done`` (with ``results``) or ``failed`` (with
    ``error``). Kept in Redis for ``verifier.task_ttl_s``."""

    task_id: str
    status: Literal["queued", "running", "done", "failed"]
    items: int
    submitted_at: float
    finished_at: float | None = None
    results: list[ItemResult] | None = None
    error: str | None = None


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``/run_code`` request (fields this service does not use are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")
    code: str = Field(max_length=1_000_000)
    language: Literal["python"] = "python"
    compile_timeout: float = Field(10.0, ge=0.0, le=3600.0)
    run_timeout: float = Field(10.0, gt=0.0, le=3600.0)
    memory_limit_MB: int = Field(-1, ge=-1, le=65536)
    stdin: str | None = Field("", max_length=1_000_000)
    files: dict[str, str] = Field(default_factory=dict, max_length=64, description="name -> base64 content")
    fetch_files: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str]) -> dict[str, str]:
        for name, data in value.items():
            if (
                not name
                or name.startswith("/")
                or ".." in name.split("/")
                or "\0" in name
                or name == "main.py"
            ):
                raise ValueError(f"file name {name!r} must be a relative path without '..' (and not main.py)")
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"file {name!r} is not valid base64") from None
        return value


class RunResult(BaseModel):
    status: Literal["Finished", "TimeLimitExceeded", "Error"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeResponse(BaseModel):
    """SandboxFusion's response: ``Success`` (ran, exit 0), ``Failed`` (non-zero exit or time limit),
    ``SandboxError`` (the sandbox itself failed)."""

    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: RunResult | None = None
    run_result: RunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


class Health(BaseModel):
    """``GET /healthz``: the backend in use, its isolation, the latest canary, and free slots."""

    status: Literal["ok", "degraded"]
    backend: str
    isolation: str
    sandbox: dict[str, Any]
    """Which execution path serves (``sandbox.describe``): backend, fast_path, namespaces, cgroups, uid and,
    for the zygote, its pid and restarts."""
    canary: dict[str, Any]
    canary_age_s: float
    free_slots: int
    waiting_requests: int
    auth: bool
