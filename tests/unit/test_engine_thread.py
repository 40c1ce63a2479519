"""The generator actor's engine runs on the thread that built it, whichever thread calls it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.generator.actor import EngineThread


class _Engine:
    def __init__(self) -> None:
        self.built_on = threading.get_ident()
        self.restarts = 0

    def generate(self, tasks: list[int]) -> tuple[int, list[int]]:
        return threading.get_ident(), [t * 2 for t in tasks]

    def load_weights(self, path: str) -> None:
        raise RuntimeError(f"cannot load {path}")


def test_every_call_runs_on_the_building_thread_and_attributes_pass_through() -> None:
    engine = EngineThread(_Engine)
    assert engine.built_on != threading.get_ident()  # built on a thread of its own
    with ThreadPoolExecutor(3) as callers:  # as Ray's pool threads call a threaded actor
        results = list(callers.map(lambda n: engine.generate([n]), range(12)))
    assert {ident for ident, _ in results} == {engine.built_on}
    assert [out for _, out in results] == [[2 * n] for n in range(12)]
    assert engine.restarts == 0
    with pytest.raises(RuntimeError, match="cannot load w.bin"):  # the engine's own exception, unwrapped
        engine.load_weights("w.bin")
