"""The verifier REST service: a FastAPI app factory (run by uvicorn, or by Ray Serve via ``serve.py``).

Routes: ``POST /v1/verify`` (score a batch now), ``POST /v1/tasks`` + ``GET /v1/tasks/{id}`` (score a
long batch in the background, results in Redis), ``POST /run_code`` (SandboxFusion-compatible),
``GET /healthz`` (no auth), ``GET /metrics`` (Prometheus) and the OpenAPI docs (``/docs``, ``/redoc``,
their JS and CSS served from the installed ``fastapi-offline`` package, so they render with no network).
Items are scored by the same rule objects as the queue worker (``rules.get_rule``), so both paths give
identical results. A background task belongs to the API key that submitted it (see ``tasks_store``).

Guards, outermost first: bearer API keys (401 missing, 403 wrong; every path but ``/healthz``), the
request body limit (413), then per route the schema (422 naming the field), batch and item size (413)
and admission: at most ``max_concurrency`` items run at once and ``max_concurrency + max_waiting``
requests may be in flight; past that the answer is 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import signal
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from services.common.config import VerifierConfig
from services.verifier.api_models import (
    Health,
    ItemResult,
    ItemStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunResult,
    TaskState,
    TaskSubmit,
    VerifyItem,
    VerifyRequest,
    VerifyResponse,
)
from services.verifier.docs_pages import docs_routes
from services.verifier.rules import RULES, configure_rules, get_rule
from services.verifier.sandbox.interface import ExecRequest, Limits, Sandbox
from services.verifier.sandbox.probe import ProbeResult, describe, run_canary, select_sandbox
from services.verifier.tasks_store import (
    OPEN_OWNER,
    RedisTaskStore,
    TaskConflictError,
    TaskRecord,
    TaskStore,
    owner_of,
)

log = logging.getLogger(__name__)

API_KEYS_ENV = "LPO_VERIFIER_API_KEYS"
OPEN_PATHS = frozenset({"/healthz"})
# Where AuthMiddleware records the caller's task owner in the ASGI scope (as Starlette's scope["user"]).
OWNER_SCOPE_KEY = "lpo_task_owner"
_CANARY_MAX_AGE_S = 5.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def api_keys(cfg: VerifierConfig) -> tuple[str, ...]:
    """The configured keys plus those in ``LPO_VERIFIER_API_KEYS`` (comma-separated)."""
    keys = [k.get_secret_value() for k in cfg.api_keys]
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    return tuple(k for k in keys if k)


async def _json_error(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Bearer keys on every path but ``/healthz``; keys are compared in constant time. An accepted
    request carries its key's task owner in ``scope[OWNER_SCOPE_KEY]`` (``OPEN_OWNER`` without keys)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], on_reject: Callable[[str], None]) -> None:
        self.app, self.on_reject = app, on_reject
        self.keys = [(k.encode(), owner_of(k.encode())) for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.keys:  # loopback-only mode: every caller is the one open owner
            scope[OWNER_SCOPE_KEY] = OPEN_OWNER
            return await self.app(scope, receive, send)
        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            self.on_reject("401")
            return await _json_error(
                send,
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
        token = token.strip()
        owners = [owner for key, owner in self.keys if hmac.compare_digest(token, key)]  # every key compared
        if not owners:
            self.on_reject("403")
            return await _json_error(send, 403, "API key not accepted")
        scope[OWNER_SCOPE_KEY] = owners[0]
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reject bodies over ``limit`` bytes with 413 (declared length first, then counted while reading)."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[str], None]) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body exceeds {self.limit} bytes (verifier.max_body_bytes); split the batch"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.on_reject("413")
            return await _json_error(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                self.on_reject("413")
                return await _json_error(send, 413, too_big)
        body = b"".join(chunks)
        return await self.app(
            scope, _replay([{"type": "http.request", "body": body, "more_body": False}]), send
        )


def _replay(messages: list[MutableMapping[str, Any]]) -> Receive:
    queue = list(messages)

    async def receive() -> MutableMapping[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # like a real client that sends nothing more
        raise AssertionError("unreachable")

    return receive


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter("lpo_verifier_items_total", "Items scored", ["task", "status"], registry=r)
        self.seconds = Histogram("lpo_verifier_item_seconds", "Scoring time per item", ["task"], registry=r)
        self.rejected = Counter("lpo_verifier_rejected_total", "Rejected requests", ["code"], registry=r)
        self.busy = Gauge("lpo_verifier_busy_slots", "Items being scored now", registry=r)
        self.waiting = Gauge(
            "lpo_verifier_requests_in_flight", "Requests admitted and not answered", registry=r
        )
        self.canary = Gauge("lpo_verifier_canary_ok", "1 when the latest sandbox canary passed", registry=r)
        # Every (task, status) series exists from the start at 0, so rates and error ratios (the dashboard,
        # the alert rules) have a series before the first failure rather than "no data".
        for task in RULES:
            for status in typing.get_args(ItemStatus):
                self.items.labels(task, status)


class ItemError(ValueError):
    """An item the rule rejected (a bad reference): reported as 422 naming the item."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"items[{index}]: {message}")
        self.index = index


class VerifierService:
    """State of one app: config, sandbox, admission, metrics, task store."""

    def __init__(
        self, cfg: VerifierConfig, sandbox: Sandbox, probe: ProbeResult, store: TaskStore | None
    ) -> None:
        self.cfg, self.sandbox, self.store = cfg, sandbox, store
        self.metrics = _Metrics()
        self.limiter = anyio.CapacityLimiter(cfg.max_concurrency)
        self.in_flight = 0
        self.background: set[asyncio.Task[None]] = set()
        self.canary, self.canary_at = probe, time.monotonic()
        self.metrics.canary.set(1.0 if probe.available else 0.0)

    # --- admission -------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or raise 429 when the wait queue is full."""
        if self.in_flight >= self.cfg.max_concurrency + self.cfg.max_waiting:
            self.metrics.rejected.labels("429").inc()
            raise HTTPException(
                429,
                f"{self.in_flight} requests in flight, the limit is max_concurrency + max_waiting = "
                f"{self.cfg.max_concurrency + self.cfg.max_waiting}; retry later",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.metrics.waiting.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.waiting.set(self.in_flight)

    def check_batch(self, items: Sequence[VerifyItem]) -> None:
        if len(items) > self.cfg.max_items:
            self.metrics.rejected.labels("413").inc()
            raise HTTPException(
                413, f"{len(items)} items; the limit is {self.cfg.max_items} (verifier.max_items)"
            )
        for i, item in enumerate(items):
            size = len(item.model_dump_json(by_alias=True))
            if size > self.cfg.max_item_bytes:
                self.metrics.rejected.labels("413").inc()
                raise HTTPException(
                    413,
                    f"items[{i}] is {size} bytes; the limit is {self.cfg.max_item_bytes} "
                    "(verifier.max_item_bytes)",
                )

    # --- scoring ---------------------------------------------------------------------------------
    def score_item(self, index: int, item: VerifyItem) -> ItemResult:
        """Score one item with the registered rule (runs in a worker thread)."""
        start = time.monotonic()
        if item.task == "code" and self.sandbox.isolation == "none" and not self.cfg.allow_unsandboxed_code:
            return ItemResult(
                id=item.id,
                reward=0.0,
                status="sandbox_error",
                tests_passed=0,
                tests_total=len(item.tests),
                wall_s=0.0,
                isolation="none",
                detail="code tasks need an isolating sandbox; the backend is 'none' and "
                "verifier.allow_unsandboxed_code is false",
            )
        try:
            verdict = get_rule(item.task)(item.response, item.reference())
        except ValueError as exc:
            raise ItemError(index, str(exc)) from None
        wall = time.monotonic() - start
        self.metrics.items.labels(item.task, verdict.status).inc()
        self.metrics.seconds.labels(item.task).observe(wall)
        return ItemResult(
            id=item.id,
            reward=verdict.reward,
            status=verdict.status,  # type: ignore[arg-type]
            tests_passed=getattr(verdict, "tests_passed", int(verdict.status == "pass")),
            tests_total=getattr(verdict, "tests_total", 1),
            wall_s=round(wall, 6),
            isolation=getattr(verdict, "isolation", "in_process"),
            detail=verdict.detail,
        )

    async def _slot(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self.limiter:
            self.metrics.busy.inc()
            try:
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                self.metrics.busy.dec()

    async def score_batch(self, items: Sequence[VerifyItem]) -> list[ItemResult]:
        """All items, at most ``max_concurrency`` at once; the first ``ItemError`` is raised."""
        return list(await asyncio.gather(*(self._slot(self.score_item, i, it) for i, it in enumerate(items))))

    async def run_task(self, owner: str, task_id: str, items: Sequence[VerifyItem]) -> None:
        assert self.store is not None
        store = self.store
        await anyio.to_thread.run_sync(store.mark_running, owner, task_id)
        try:
            results = await self.score_batch(items)
        except ItemError as exc:
            await anyio.to_thread.run_sync(store.finish, owner, task_id, None, str(exc))
            return
        except Exception as exc:  # the task records it; the service keeps serving
            log.exception("background task %s failed", task_id)
            await anyio.to_thread.run_sync(store.finish, owner, task_id, None, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.release()
        dumped = [r.model_dump() for r in results]
        await anyio.to_thread.run_sync(store.finish, owner, task_id, dumped)

    def run_code(self, req: RunCodeRequest) -> RunCodeResponse:
        """``/run_code``: the program as ``main.py`` (plus base64 ``files``) under the service's caps."""
        cfg = self.cfg
        if self.sandbox.isolation == "none" and not cfg.allow_unsandboxed_code:
            return RunCodeResponse(status="SandboxError", message="backend 'none' is not allowed for code")
        try:
            files = {name: base64.b64decode(data, validate=True) for name, data in req.files.items()}
            memory = cfg.memory_mb if req.memory_limit_MB <= 0 else min(req.memory_limit_MB, cfg.memory_mb)
            limits = Limits(
                wall_s=min(req.run_timeout, cfg.timeout_s),
                memory_mb=max(memory, 32),
                pids=cfg.pids_max,
                fsize_mb=cfg.fsize_mb,
                output_bytes=cfg.output_bytes,
            )
            request = ExecRequest(
                (cfg.python, "-I", "main.py"),
                files={**files, "main.py": req.code.encode()},
                stdin=(req.stdin or "").encode(),
                limits=limits,
            )
        except (binascii.Error, ValueError) as exc:  # the model validated the files: a defensive net
            raise _invalid(("body", "files"), str(exc)) from None
        res = self.sandbox.run(request)
        self.metrics.items.labels("run_code", res.status).inc()
        if res.status == "sandbox_error":
            return RunCodeResponse(status="SandboxError", message=res.detail)
        over_time = res.status == "timeout" or res.signal == signal.SIGXCPU
        run = RunResult(
            status="TimeLimitExceeded" if over_time else "Finished",
            execution_time=round(res.wall_s, 6),
            return_code=res.exit_code if res.signal is None else 128 + res.signal,
            stdout=res.stdout.decode(errors="replace"),
            stderr=res.stderr.decode(errors="replace"),
        )
        ok = res.status == "ok" and res.exit_code == 0
        return RunCodeResponse(status="Success" if ok else "Failed", message=res.detail, run_result=run)

    def fresh_canary(self) -> ProbeResult:
        if time.monotonic() - self.canary_at > _CANARY_MAX_AGE_S:
            self.canary, self.canary_at = run_canary(self.sandbox, self.cfg.python), time.monotonic()
            self.metrics.canary.set(1.0 if self.canary.available else 0.0)
        return self.canary


def _invalid(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in FastAPI's documented shape (``detail`` is a list of errors naming the field)."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": None}])


def _task_state(record: TaskRecord) -> TaskState:
    results = None if record.results is None else [ItemResult(**r) for r in record.results]
    return TaskState(
        task_id=record.task_id,
        status=record.status,  # type: ignore[arg-type]
        items=record.items,
        submitted_at=record.submitted_at,
        finished_at=record.finished_at,
        results=results,
        error=record.error,
    )


def create_app(
    cfg: VerifierConfig | None = None,
    *,
    sandbox: Sandbox | None = None,
    store: TaskStore | None = None,
    redis_url: str | None = None,
) -> FastAPI:
    """The verifier app. The sandbox is probed at start-up from ``cfg`` unless one is given (then its
    owner closes it); ``/v1/tasks`` needs ``store`` or ``redis_url`` and answers 503 without either."""
    cfg = cfg or VerifierConfig()
    holder: dict[str, VerifierService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = sandbox is None
        if sandbox is None:
            chosen, probes = await anyio.to_thread.run_sync(
                lambda: select_sandbox(
                    cfg.sandbox, fallback=cfg.sandbox_fallback, python=cfg.python, tmp_base=cfg.tmp_dir
                )
            )
            probe = probes[chosen.isolation]
        else:
            chosen = sandbox
            probe = await anyio.to_thread.run_sync(run_canary, chosen, cfg.python)
        configure_rules(cfg, chosen)
        await anyio.to_thread.run_sync(RULES["math"].pool)  # type: ignore[attr-defined]  # warm before serving
        task_store = store
        if task_store is None and redis_url is not None:
            from services.common.redis_server import redis_client

            task_store = RedisTaskStore(redis_client(redis_url), ttl_s=cfg.task_ttl_s)
        holder["service"] = VerifierService(cfg, chosen, probe, task_store)
        log.info(
            "verifier service up: backend %s, %d slots, auth %s",
            chosen.isolation,
            cfg.max_concurrency,
            "on" if api_keys(cfg) else "off (loopback only)",
        )
        try:
            yield
        finally:
            for task in list(holder["service"].background):
                task.cancel()
            RULES["math"].close()  # type: ignore[attr-defined]
            if own:
                chosen.close()

    app = FastAPI(
        title="LPO verifier",
        version="1.0",
        summary="Scores RL rollouts (countdown, math, code, exact, regex) with sandboxed code execution.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from a CDN: docs_routes serves them from this service
        redoc_url=None,
    )

    def service() -> VerifierService:
        if "service" not in holder:  # lifespan not run (yet): never a 500
            raise HTTPException(503, "the verifier is starting (sandbox probe in progress); retry shortly")
        return holder["service"]

    _routes(app, service)
    docs_routes(app)

    def rejected(code: str) -> None:
        if "service" in holder:
            holder["service"].metrics.rejected.labels(code).inc()

    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes, on_reject=rejected)
    app.add_middleware(AuthMiddleware, keys=api_keys(cfg), on_reject=rejected)
    return app


def _routes(app: FastAPI, service: Callable[[], VerifierService]) -> None:
    @app.post("/v1/verify", response_model=VerifyResponse, tags=["verify"])
    async def verify(body: VerifyRequest) -> VerifyResponse:
        """Score a batch of items now; one result per item, in order."""
        svc = service()
        svc.check_batch(body.items)
        svc.admit()
        try:
            return VerifyResponse(results=await svc.score_batch(body.items))
        except ItemError as exc:
            raise _invalid(("body", "items", exc.index), str(exc)) from None
        finally:
            svc.release()

    _task_routes(app, service)

    @app.post("/run_code", response_model=RunCodeResponse, tags=["sandbox-fusion"])
    async def run_code(body: RunCodeRequest) -> RunCodeResponse:
        """SandboxFusion-compatible: run ``code`` with ``stdin`` and report stdout, stderr and exit."""
        svc = service()
        svc.admit()
        try:
            return await svc._slot(svc.run_code, body)
        finally:
            svc.release()

    @app.get("/healthz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        """Backend, isolation level, which execution path serves, the latest canary (re-run when older than
        5 s), free slots."""
        svc = service()
        canary = await anyio.to_thread.run_sync(svc.fresh_canary)
        health = Health(
            status="ok" if canary.available else "degraded",
            backend=svc.sandbox.isolation,
            isolation="none" if svc.sandbox.isolation == "none" else "namespaces",
            sandbox=describe(svc.sandbox),
            canary=canary.as_dict(),
            canary_age_s=round(time.monotonic() - svc.canary_at, 3),
            free_slots=int(svc.limiter.total_tokens - svc.limiter.borrowed_tokens),
            waiting_requests=svc.in_flight,
            auth=bool(api_keys(svc.cfg)),
        )
        return JSONResponse(health.model_dump(), status_code=200 if canary.available else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service().metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _task_routes(app: FastAPI, service: Callable[[], VerifierService]) -> None:
    @app.post("/v1/tasks", status_code=202, response_model=TaskState, tags=["tasks"])
    async def submit_task(body: TaskSubmit, response: Response, request: Request) -> TaskState:
        """Queue a batch for background scoring; the same ``client_id`` (from the same API key) returns
        the same task. Tasks and client ids are private to the API key that submitted them."""
        svc = service()
        if svc.store is None:
            raise HTTPException(503, "background tasks need Redis: start the service with --redis-url")
        owner = _task_owner(request)
        svc.check_batch(body.items)
        dumped = [item.model_dump(by_alias=True) for item in body.items]
        svc.admit()  # released when the background run ends, or now if nothing new was queued
        try:
            record, created = await anyio.to_thread.run_sync(svc.store.submit, owner, body.client_id, dumped)
        except TaskConflictError as exc:
            svc.release()
            raise HTTPException(409, str(exc)) from None
        except BaseException:
            svc.release()
            raise
        if created:
            task = asyncio.create_task(svc.run_task(owner, record.task_id, body.items))
            svc.background.add(task)
            task.add_done_callback(svc.background.discard)
        else:
            svc.release()
        response.headers["Location"] = f"/v1/tasks/{record.task_id}"
        return _task_state(record)

    @app.get("/v1/tasks/{task_id}", response_model=TaskState, tags=["tasks"])
    async def get_task(request: Request, task_id: str = Path(pattern=r"^[0-9a-f]{32}$")) -> TaskState:
        """A task's status and, once done, its results (404 to any API key but the one that submitted it)."""
        svc = service()
        if svc.store is None:
            raise HTTPException(503, "background tasks need Redis: start the service with --redis-url")
        record = await anyio.to_thread.run_sync(svc.store.get, _task_owner(request), task_id)
        if record is None:  # another key's task reads exactly like an unknown one
            raise HTTPException(
                404,
                f"no task {task_id!r} for this API key (unknown, submitted with another key, or expired "
                "after verifier.task_ttl_s)",
            )
        return _task_state(record)


def _task_owner(request: Request) -> str:
    owner = request.scope.get(OWNER_SCOPE_KEY)
    if owner is None:  # fail closed: never a task without an owner
        raise RuntimeError(f"no {OWNER_SCOPE_KEY!r} in the request scope: is AuthMiddleware installed?")
    return str(owner)
