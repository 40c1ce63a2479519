"""The API docs as a person sees them, with no network: ``python -m services.verifier serve`` (keyless, so
loopback only) is opened in headless Chromium whose every off-machine request goes to a dead proxy.
``/docs`` (Swagger UI) and ``/redoc`` must render the operations (``/v1/verify`` appears in the DOM that
their JS builds from ``/openapi.json``) and the page must not ask for anything outside the service: the
browser's own record of the page's requests (DevTools ``Network`` events) is checked, so Chromium's
background calls to its vendor do not blur it. Needs Debian's ``chromium`` (``.ci/sysdeps``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from services.common.redis_server import free_port
from services.verifier.app import API_KEYS_ENV
from services.verifier.docs_pages import DOCS_CSP

REPO = Path(__file__).resolve().parents[2]
# Not 127.0.0.1: Swagger UI skips its (external) validator badge only for localhost and 127.0.0.1, so a
# host of another name is what a cluster user gets. The whole 127.0.0.0/8 is loopback on Linux.
HOST = "127.0.0.2"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0",
)  # fmt: skip


def _wait_for(
    condition: Callable[[], Any], what: str, timeout_s: float, detail: Callable[[], str] = str
) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f}s {detail()}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    """The CLI service without API keys (the loopback no-key mode) and without Redis."""
    port = free_port()
    argv = [sys.executable, "-m", "services.verifier", "serve", "--host", HOST, "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != API_KEYS_ENV} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*argv, "--redis-url", "none"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://{HOST}:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait_for(healthy, "the verifier became healthy", 90)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Browser:
    """One headless Chromium page driven over the DevTools protocol; ``events`` keeps every event seen."""

    def __init__(self, profile: Path) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail(
                "chromium is not installed: run `make sysdeps` (.ci/sysdeps installs Debian's chromium)"
            )
        dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens: no request can leave the machine
        argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--proxy-server={dead_proxy}"]
        self.proc = subprocess.Popen(
            [*argv, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        port_file = profile / "DevToolsActivePort"  # Chromium writes its debugging port here
        try:
            port = _wait_for(
                lambda: port_file.is_file() and port_file.read_text().split("\n")[0], "DevTools", 60
            )
            [page] = [
                t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"
            ]
            self.ws = ws_connect(page["webSocketDebuggerUrl"], max_size=None)
        except BaseException:
            self._stop()
            raise
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def close(self) -> None:
        self.ws.close()
        self._stop()

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[_Browser]:
    profile = tmp_path / "chromium-profile"  # a fresh profile per test
    profile.mkdir()
    browser = _Browser(profile)
    try:
        yield browser
    finally:
        browser.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_page_renders_offline_from_the_service_alone(
    service: str, browser: _Browser, page: str
) -> None:
    served = httpx.get(f"{service}{page}")
    assert served.status_code == 200 and served.headers["content-security-policy"] == DOCS_CSP
    assert not re.findall(r"https?://[^\s\"'<>]+", served.text), "the page names a URL off the service"
    assert "/v1/verify" not in served.text  # so finding it below means the page's JS built the view

    browser.call("Network.enable")
    browser.call("Runtime.enable")
    browser.call("Page.navigate", url=f"{service}{page}")
    dom = "document.documentElement ? document.documentElement.outerHTML : ''"  # '' mid-navigation
    seen: dict[str, Any] = {}

    def rendered() -> bool:
        seen["html"] = browser.call("Runtime.evaluate", expression=dom, returnByValue=True)["result"].get(
            "value"
        )
        seen["net"] = _network(browser.events)
        return "/v1/verify" in (seen["html"] or "") and bool(seen["net"].urls) and not seen["net"].pending

    def state() -> str:
        net = seen.get("net")
        found = "/v1/verify" in (seen.get("html") or "")
        return f"(/v1/verify in the DOM: {found}; requests open: {net and net.pending})"

    _wait_for(rendered, f"{page} rendered /v1/verify in headless Chromium, network idle", 90, state)

    net: _Network = seen["net"]
    assert f"{service}/openapi.json" in net.urls.values()  # the view was built from the service's spec
    # What a bundle would fetch off the service (ReDoc's sidebar logo) is refused by the page's CSP before
    # any connection is made; anything else off the service is a request that tried to leave.
    left = [
        url
        for rid, url in net.urls.items()
        if not url.startswith((f"{service}/", "data:", "blob:")) and net.blocked.get(rid) != "csp"
    ]
    assert not left, f"{page} asked for URLs outside the service: {left}"
    crashed = [
        e["params"]["exceptionDetails"]
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
    ]
    assert not crashed, f"{page} threw: {crashed}"


@dataclass
class _Network:
    """The page's requests as DevTools reported them: url by request id, which are still open, and why
    the blocked ones were blocked (``csp`` for the page's own policy)."""

    urls: dict[str, str]
    pending: list[str]
    blocked: dict[str, str]


def _network(events: list[dict[str, Any]]) -> _Network:
    urls: dict[str, str] = {}
    closed: set[str] = set()
    blocked: dict[str, str] = {}
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            closed.add(params["requestId"])
            if params.get("blockedReason"):
                blocked[params["requestId"]] = params["blockedReason"]
    # A blob: or data: URL is read from memory (ReDoc's search worker), never over the network; DevTools
    # does not always report it finished.
    open_ = [url for rid, url in urls.items() if rid not in closed and not url.startswith(("blob:", "data:"))]
    return _Network(urls, open_, blocked)
