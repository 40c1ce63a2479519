"""The attack suite, through the REST API, against every backend the probe reports available.

Each attack is an item whose test would *pass* only if the attack worked (or whose effect the test checks on
the host afterwards). All attacks of a backend go in one ``/v1/verify`` batch (they run concurrently, as
in production); then the service must still be healthy, with every slot free, and score a normal item.
Isolation attacks (network, host files, the API key, writes outside the temp dir, one execution reading
another's files, leftovers for the next execution) run against the isolating backends (zygote, nsjail,
bwrap) only: ``none`` promises no isolation, only limits.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
from fastapi.testclient import TestClient

from services.common.config import VerifierConfig
from services.verifier import app as app_module
from services.verifier.app import API_KEYS_ENV, create_app
from services.verifier.sandbox import ISOLATING_BACKENDS, build_backend, probe_all

AVAILABLE = [name for name, result in probe_all(python="/usr/bin/python3").items() if result.available]
ISOLATING = [name for name in AVAILABLE if name in ISOLATING_BACKENDS]
REPO = Path(__file__).resolve().parents[2]
WALL_S = 3.0


def _code(item_id: str, program: str, expected: str = "unreachable", **extra: object) -> dict:
    item = {"id": item_id, "task": "code", "response": f"```python\n{program}\n```"}
    return {**item, "tests": [{"stdin": "", "expected_stdout": expected}], **extra}


def _host_pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if pid != os.getpid()]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's 127.0.0.1 that a sandboxed program must not reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _resource_attacks(marker: str) -> dict[str, tuple[dict, set[str]]]:
    """item id -> (item, allowed statuses)."""
    return {
        "fork_bomb": (
            _code(
                "fork_bomb",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            ),
            {"fail", "timeout"},
        ),
        "memory_bomb": (
            _code(
                "memory_bomb",
                "b = []\nwhile True:\n    b.append(bytearray(32 << 20))",
                limits={"memory_mb": 128},
            ),
            {"fail"},
        ),
        "cpu_spin": (_code("cpu_spin", "while True:\n    pass"), {"timeout"}),
        "sleep": (_code("sleep", "import time\ntime.sleep(3600)"), {"timeout"}),
        "outlive": (
            _code(
                "outlive",
                "import os, subprocess\n"
                f"subprocess.Popen(['/usr/bin/sleep', '{marker}'], start_new_session=True)\n"
                "if os.fork() == 0:\n    os.setsid()\n"
                f"    os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
                "print('unreachable')",
            ),
            {"pass"},  # it prints the expected line; what matters is that nothing survives (checked below)
        ),
        "stdout_flood": (
            _code("stdout_flood", "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))"),
            {"fail"},
        ),
        # assert tests that pass only if the harness ran a statement the program neutered
        "assert_no_exec": (
            _code(
                "assert_no_exec",
                "import builtins\nbuiltins.exec = lambda *a, **k: None",
                tests=[{"assert": "assert False"}],
            ),
            {"fail"},
        ),
        "assert_no_compile": (
            _code(
                "assert_no_compile",
                "import builtins\ncompile_ = builtins.compile\n"
                "builtins.compile = lambda source, *a, **k: compile_('pass', *a, **k)",
                tests=[{"assert": "assert False"}],
            ),
            {"fail"},
        ),
        "math_tower": (
            {"id": "math_tower", "task": "math", "response": "\\boxed{9^{9^{9^{9}}}}", "answer": "1"},
            {"timeout"},
        ),
        "countdown_nesting": (
            {
                "id": "countdown_nesting",
                "task": "countdown",
                "response": "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
                "nums": [1],
                "target": 1,
            },
            {"parse_error"},
        ),
    }


def _isolation_attacks(
    port: int, secret_path: Path, secret: str, key: str, outside: list[str]
) -> dict[str, tuple[dict, set[str]]]:
    writes = "\n".join(
        f"try:\n    open({p!r}, 'w').write('pwned')\nexcept OSError:\n    pass" for p in outside
    )
    return {
        "tcp_connect": (
            _code(
                "tcp_connect",
                f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "s.sendall(b'pwned')\nprint('connected')",
                expected="connected",
            ),
            {"fail"},
        ),
        "read_host_file": (
            _code("read_host_file", f"print(open({str(secret_path)!r}).read())", expected=secret),
            {"fail"},
        ),
        "read_api_key": (
            _code(
                "read_api_key",
                "import glob, os\n"
                f"found = os.environ.get({API_KEYS_ENV!r}, '')\n"
                "for path in glob.glob('/proc/[0-9]*/environ'):\n"
                "    try:\n        data = open(path, 'rb').read()\n    except OSError:\n        continue\n"
                f"    for var in data.split(b'\\0'):\n        if var.startswith({API_KEYS_ENV.encode()!r}):\n"
                "            found = var.split(b'=', 1)[1].decode()\n"
                "print(found)",
                expected=key,
            ),
            {"fail"},
        ),
        "write_outside": (
            _code(
                "write_outside",
                writes + "\nopen('inside.txt', 'w').write('ok')\nprint('done')",
                expected="done",
            ),
            {"pass"},
        ),  # fmt: skip
    }


PLANT = (
    "import os, time\n"
    "secret = 'exec-secret-' + os.urandom(8).hex()\n"
    "os.environ['LPO_SECRET'] = secret\n"
    "for path in ('secret.txt', '/tmp/secret.txt'):\n"
    "    open(path, 'w').write(secret)\n"
    "time.sleep(2.5)\n"  # alive, holding its secret, for the whole of the stealer's search
    "print('planted')"
)
STEAL = (
    "import glob, os, time\n"
    "needle = ('exec-' + 'secret-').encode()  # so that this program's own source does not match\n"
    "patterns = ['/dev/shm/lpo-sbx-*/work/*', '/tmp/lpo-sbx-*/work/*', '/proc/[0-9]*/root/work/*',\n"
    "            '/proc/[0-9]*/root/tmp/*', '/proc/[0-9]*/cwd/*', '/proc/[0-9]*/environ',\n"
    "            '/tmp/*', '../*']\n"
    "found = False\n"
    "deadline = time.monotonic() + 1.5\n"
    "while not found and time.monotonic() < deadline:\n"
    "    for path in (p for pattern in patterns for p in glob.glob(pattern)):\n"
    "        try:\n            found = found or needle in open(path, 'rb').read()\n"
    "        except OSError:\n            continue\n"
    "    time.sleep(0.05)\n"
    "print('found' if found else 'nothing')"
)


@pytest.mark.parametrize("backend", [*ISOLATING, "none"])
def test_a_running_execution_is_invisible_to_another(backend: str) -> None:
    """Two executions start together: ``plant`` writes a secret into its work dir, /tmp and its environment
    and holds them while ``steal`` searches every path another execution's files could be reached by (the
    host's temp dirs, other processes' roots, cwds and environments). Under ``none`` (no isolation, both
    programs run as the same uid) the search finds it: the control that the stealer works."""
    assert backend in AVAILABLE, f"{backend} does not pass its probe here"
    cfg = VerifierConfig(
        sandbox=_config_name(backend), timeout_s=6.0, memory_mb=256, max_concurrency=2,
        allow_unsandboxed_code=backend == "none",
    )  # fmt: skip
    sandbox = build_backend(backend)
    try:
        with TestClient(create_app(cfg, sandbox=sandbox)) as client:
            items = [_code("plant", PLANT, expected="planted"), _code("steal", STEAL, expected="nothing")]
            reply = client.post("/v1/verify", json={"items": items})
            assert reply.status_code == 200, reply.text
            results = {r["id"]: r for r in reply.json()["results"]}
    finally:
        sandbox.close()
    assert results["plant"]["status"] == "pass", results["plant"]
    want = "fail" if backend == "none" else "pass"  # pass: the stealer printed 'nothing'
    assert results["steal"]["status"] == want, results["steal"]


LEAVE_BEHIND = (
    "import os, socket, subprocess\n"
    # sockets that outlive the program: a TIME_WAIT connection on loopback, and an abstract unix listener
    # held by the detached processes below
    "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
    "c = socket.create_connection(l.getsockname()); a, _ = l.accept(); c.close(); a.close(); l.close()\n"
    "u = socket.socket(socket.AF_UNIX); u.bind(b'\\0lpo-{marker}'); u.listen(); u.set_inheritable(True)\n"
    "for path in ('left.txt', '/tmp/left.txt', os.path.expanduser('~/left.txt'), '/dev/shm/left.txt'):\n"
    "    try:\n        open(path, 'w').write('{marker}')\n    except OSError:\n        pass\n"
    "subprocess.Popen(['/usr/bin/sleep', '{marker}'], start_new_session=True)\n"
    "if os.fork() == 0:\n    os.setsid()\n    os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
    "print('left')"
)
FIND_LEFTOVERS = (
    "import glob, os, socket\n"
    "found = []\n"
    "marker = '{marker}'.replace('#', '')  # so that this program's own source does not match\n"
    "for name in ('tcp', 'tcp6', 'udp', 'udp6', 'unix', 'raw', 'raw6', 'packet'):\n"
    "    found += [name + ': ' + l for l in open('/proc/net/' + name).read().splitlines()[1:]]\n"
    "lo = next(l for l in open('/proc/net/dev') if l.strip().startswith('lo:')).split(':')[1].split()\n"
    "if int(lo[1]) or int(lo[9]):\n    found.append('lo packets ' + lo[1] + ' ' + lo[9])\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n    s.connect(b'\\0lpo-' + marker.encode()); found.append('abstract socket')\n"
    "except OSError:\n    pass\n"
    "paths = glob.glob('*') + glob.glob('/tmp/*') + glob.glob(os.path.expanduser('~/*'))\n"
    "paths += glob.glob('/dev/shm/*')\n"
    "for path in paths:\n"
    "    try:\n        if marker in open(path).read():\n            found.append(path)\n"
    "    except OSError:\n        pass\n"
    "for cmdline in glob.glob('/proc/[0-9]*/cmdline'):\n"
    "    try:\n        if marker.encode() in open(cmdline, 'rb').read():\n            found.append(cmdline)\n"
    "    except OSError:\n        pass\n"
    "print(found or 'clean')"
)


@pytest.mark.parametrize("backend", ISOLATING)
def test_nothing_of_an_execution_reaches_the_next(backend: str) -> None:
    """A program leaves files (work dir, /tmp, HOME, /dev/shm), detached processes, a TIME_WAIT connection
    and an abstract socket; the next execution, on the same sandbox (and, for the zygote, the same warm
    interpreter and maybe a reused network namespace), finds none of it: no socket of any kind, and lo's
    counters at zero."""
    marker = f"78.{uuid.uuid4().int % 10**9}"
    cfg = VerifierConfig(sandbox=_config_name(backend), timeout_s=WALL_S, memory_mb=256, max_concurrency=2)
    sandbox = build_backend(backend)
    try:
        with TestClient(create_app(cfg, sandbox=sandbox)) as client:
            leave = _code("leave", LEAVE_BEHIND.replace("{marker}", marker), expected="left")
            first = client.post("/v1/verify", json={"items": [leave]}).json()["results"][0]
            assert first["status"] == "pass", first["detail"]
            for _ in range(3):  # a few runs: with a pool or a zygote, each may land on reused parts
                finder = FIND_LEFTOVERS.replace("{marker}", marker[:3] + "#" + marker[3:])
                probe = _code("find", finder, expected="clean")
                after = client.post("/v1/verify", json={"items": [probe]}).json()["results"][0]
                assert (after["status"], after["isolation"]) == ("pass", backend), after["detail"]
            assert _host_pids_with(marker) == []
    finally:
        sandbox.close()


def _config_name(backend: str) -> str:
    """The ``verifier.sandbox`` value for ``backend``; the app is given the sandbox itself, so a backend
    the config does not list yet (``zygote``) runs under the default name."""
    allowed = get_args(VerifierConfig.model_fields["sandbox"].annotation)
    return backend if backend in allowed else "nsjail"


@pytest.mark.parametrize("backend", AVAILABLE)
def test_attacks_are_contained_and_the_service_stays_healthy(
    backend: str, listener: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"attack-key-{uuid.uuid4().hex}"
    monkeypatch.setenv(API_KEYS_ENV, key)
    marker = f"77.{uuid.uuid4().int % 10**9}"
    attacks = _resource_attacks(marker)
    outside = [f"/tmp/lpo-attack-{uuid.uuid4().hex}", str(REPO / f"lpo-attack-{uuid.uuid4().hex}")]
    if backend in ISOLATING_BACKENDS:
        secret = f"host-secret-{uuid.uuid4().hex}"
        secret_path = tmp_path / "secret.txt"
        secret_path.write_text(secret)
        secret_path.chmod(0o644)
        tmp_path.chmod(0o755)
        attacks |= _isolation_attacks(listener.getsockname()[1], secret_path, secret, key, outside)
    cfg = VerifierConfig(
        sandbox=_config_name(backend), timeout_s=WALL_S, memory_mb=256, pids_max=32, math_timeout_s=2.0,
        allow_unsandboxed_code=backend == "none", max_concurrency=4,
    )  # fmt: skip
    sandbox = build_backend(backend)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with TestClient(create_app(cfg, sandbox=sandbox)) as client:
            start = time.monotonic()
            reply = client.post(
                "/v1/verify", json={"items": [a[0] for a in attacks.values()]}, headers=headers
            )
            elapsed = time.monotonic() - start
            assert reply.status_code == 200, reply.text
            results = {r["id"]: r for r in reply.json()["results"]}
            for item_id, (_, allowed) in attacks.items():
                assert results[item_id]["status"] in allowed, (item_id, results[item_id]["detail"])
                assert results[item_id]["wall_s"] < 4 * WALL_S + 5, (item_id, results[item_id])
            assert len(reply.content) < 200_000  # 100 MB of stdout never reached the response
            assert elapsed < 120
            # nothing of the run survives on the host
            assert _host_pids_with(marker) == []
            for path in outside:
                assert not os.path.exists(path), path
            with pytest.raises(BlockingIOError):
                listener.accept()
            # the service is healthy: canary passes, every slot free, a normal item still scores
            monkeypatch.setattr(app_module, "_CANARY_MAX_AGE_S", 0.0)  # /healthz runs a fresh canary
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok", health.text
            assert health.json()["free_slots"] == cfg.max_concurrency
            normal = _code("normal", "print(int(input()) + 1)")
            normal["tests"] = [{"stdin": "41", "expected_stdout": "42"}]
            after = client.post("/v1/verify", json={"items": [normal]}, headers=headers).json()["results"][0]
            assert (after["status"], after["reward"], after["isolation"]) == ("pass", 1.0, backend)
    finally:
        sandbox.close()
