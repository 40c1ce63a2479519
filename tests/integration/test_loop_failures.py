"""``Runtime.loop_failures`` on real Ray actors: a loop that raised is named with its error, a running loop
and an actor Ray has given up on (the watchdog's actor states cover that one) are not."""

from __future__ import annotations

import threading

import ray

from services.coordinator.runtime import Runtime


@ray.remote(num_cpus=0, max_concurrency=2)
class _Looper:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self._stop = threading.Event()

    def run(self) -> None:
        if self.fail:
            raise RuntimeError("generator: snapshot v3 not announced within 600s")
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


def test_loop_failures_names_the_loop_that_raised(ray_local: None) -> None:
    running, failing, doomed = _Looper.remote(False), _Looper.remote(True), _Looper.remote(False)
    rt = Runtime(cfg=None, redis_url="", model_dir="", generators=[running, failing], verifiers=[doomed])  # type: ignore[arg-type]
    assert rt.loop_failures() == []  # before start_loops there are no loops
    loops = rt.start_loops()
    ray.wait([loops[1]], timeout=60)  # the failing loop has ended
    ray.kill(doomed, no_restart=True)
    ray.wait([loops[2]], timeout=60)
    assert rt.loop_failures() == [
        "generator-1: RuntimeError: generator: snapshot v3 not announced within 600s"
    ]
    ray.get(running.stop.remote())
    ray.get(loops[0], timeout=60)  # a loop that returned on stop is no failure either
    assert rt.loop_failures() == [
        "generator-1: RuntimeError: generator: snapshot v3 not announced within 600s"
    ]
