"""The generator's loop (``Generator.step / sync_weights / sample``) with a fake engine, queue, transport
and clock: it reads tasks, waits for the admitted version, swaps weights only between batches, stamps each
group with the snapshot that sampled it, forwards the groups and counts its idle time. The real parts are
tested elsewhere: the queue in tests/integration/test_queue.py, the transports in test_weights.py, vLLM in
test_learner_generator.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.messages import ResponseGroup, Rollout, RolloutTask, TensorEntry, WeightSnapshot
from services.common.queue import QueueEntry
from services.common.weights import pack, sha256_hex, unpack
from services.generator.worker import Generator


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Transport:
    """Announces snapshots whose one tensor ``w`` holds the version; ``publish_on_poll[n] = v`` publishes
    ``v`` just before the ``n``-th ``latest()`` (a learner publishing while the generator polls)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.announced: WeightSnapshot | None = None
        self.payloads: dict[int, bytes] = {}
        self.polls = 0
        self.publish_on_poll: dict[int, int] = {}

    def publish(self, version: int) -> WeightSnapshot:
        payload, manifest = pack({"w": torch.full((3,), float(version))})
        snapshot = WeightSnapshot(version, manifest, len(payload), sha256_hex(payload), "fake", f"v{version}")
        self.payloads[version] = bytes(payload)
        self.announced = snapshot
        return snapshot

    def latest(self) -> WeightSnapshot | None:
        self.polls += 1
        if self.polls in self.publish_on_poll:
            self.publish(self.publish_on_poll[self.polls])
        return self.announced

    def fetch_payload(self, snapshot: WeightSnapshot) -> bytes:
        self.log.append(f"fetch v{snapshot.version}")
        return self.payloads[snapshot.version]


class _Engine:
    """Loads the payload file it is given (and remembers the version in it); samples K responses of
    lengths 1..K; ``during_generate`` runs in the middle of a batch."""

    def __init__(self, log: list[str], clock: _Clock, generate_s: float = 0.0) -> None:
        self.log, self.clock, self.generate_s = log, clock, generate_s
        self.restarts = 0
        self.loaded: int | None = None
        self.paths: list[Path] = []
        self.during_generate: Callable[[], None] | None = None

    def load_weights(self, payload_path: Path, manifest: tuple[TensorEntry, ...]) -> None:
        tensors = unpack(np.fromfile(payload_path, dtype=np.uint8), manifest)
        self.loaded = int(tensors["w"][0])
        self.paths.append(payload_path)
        self.log.append(f"load v{self.loaded}")

    def generate(self, tasks: Sequence[RolloutTask]) -> list[list[Rollout]]:
        self.log.append(f"generate {','.join(t.task_id for t in tasks)} with v{self.loaded}")
        if self.during_generate is not None:
            self.during_generate()
        self.clock.now += self.generate_s
        return [[Rollout([7] * n, [-0.5] * n, "stop") for n in range(1, t.group_size + 1)] for t in tasks]


class _Queue:
    """Hands out the queued batches one per read (a read of an empty queue takes ``empty_read_s``)."""

    run = "loop"

    def __init__(self, clock: _Clock, empty_read_s: float = 0.0) -> None:
        self.clock, self.empty_read_s = clock, empty_read_s
        self.batches: list[list[QueueEntry]] = []
        self.reads: list[dict] = []
        self.forwarded: list[tuple[str, list[str], str, list[ResponseGroup]]] = []

    def read_or_claim(
        self, stream: str, consumer: str, *, count: int, block_ms: int | None, claim_idle_ms: int | None
    ) -> list[QueueEntry]:
        self.reads.append(
            {"stream": stream, "consumer": consumer, "count": count, "claim_idle_ms": claim_idle_ms}
        )
        if not self.batches:
            self.clock.now += self.empty_read_s
            return []
        return self.batches.pop(0)

    def forward(
        self, in_stream: str, entry_ids: Sequence[str], out_stream: str, messages: Sequence[ResponseGroup]
    ) -> list[str]:
        self.forwarded.append((in_stream, list(entry_ids), out_stream, list(messages)))
        return [f"out-{i}" for i in range(len(messages))]


class _Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def zero(self, name: str) -> None:
        self.counts[name] += 0

    def inc(self, name: str, value: float = 1.0) -> None:
        self.counts[name] += value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        pass


def _task(i: int, admit_version: int = 0) -> RolloutTask:
    return RolloutTask(
        task_id=f"t-{i}",
        prompt_token_ids=[1, 2, 3],
        prompt_text="p",
        task_kind="countdown",
        reference={"nums": [1, 2], "target": 3},
        group_size=3,
        admit_version=admit_version,
    )


class _Rig:
    def __init__(self, *, generate_s: float = 0.0, empty_read_s: float = 0.0) -> None:
        self.log: list[str] = []
        self.clock = _Clock()
        self.engine = _Engine(self.log, self.clock, generate_s)
        self.queue = _Queue(self.clock, empty_read_s)
        self.transport = _Transport(self.log)
        self.metrics = _Metrics()
        self.gen = Generator(
            self.engine,
            self.queue,  # type: ignore[arg-type]
            self.transport,  # type: ignore[arg-type]
            consumer="gen-7",
            batch_tasks=4,
            claim_idle_ms=5000,
            metrics=self.metrics,  # type: ignore[arg-type]
            clock=self.clock,
        )

    def enqueue(self, *tasks: RolloutTask) -> list[str]:
        ids = [f"1-{t.task_id}" for t in tasks]
        self.queue.batches.append([QueueEntry(i, t) for i, t in zip(ids, tasks, strict=True)])
        return ids


def test_step_reads_samples_stamps_and_forwards_a_batch() -> None:
    rig = _Rig(generate_s=2.0)
    v0 = rig.transport.publish(0)
    ids = rig.enqueue(_task(1), _task(2))
    assert rig.gen.step(block_ms=200) == 2
    assert rig.queue.reads == [{"stream": "tasks", "consumer": "gen-7", "count": 4, "claim_idle_ms": 5000}]
    assert rig.log == ["fetch v0", "load v0", "generate t-1,t-2 with v0"]
    assert not any(p.exists() for p in rig.engine.paths)  # the payload file is gone after the load
    [(in_stream, acked, out_stream, groups)] = rig.queue.forwarded
    assert (in_stream, acked, out_stream) == ("tasks", ids, "rollouts")
    assert [g.group_id for g in groups] == ["t-1", "t-2"]
    for group in groups:
        assert (group.behavior_version, group.behavior_sha256, group.generator_id) == (0, v0.sha256, "gen-7")
        assert [r.token_ids.size for r in group.rollouts] == [1, 2, 3]
    stats = rig.gen.stats
    # 2 groups x (1 + 2 + 3) tokens; the 2 s of sampling are busy time, the read took none.
    assert (stats.groups, stats.tokens, stats.batches, stats.weight_loads) == (2, 12, 1, 1)
    assert (stats.busy_s, stats.idle_s) == (2.0, 0.0)
    assert (
        rig.metrics.counts["lpo_generator_groups"] == 2 and rig.metrics.counts["lpo_generator_tokens"] == 12
    )
    assert rig.metrics.gauges["lpo_generator_weights_version"] == 0


def test_a_task_waits_for_the_version_it_was_admitted_for() -> None:
    rig = _Rig()
    rig.transport.publish(1)
    rig.transport.publish_on_poll = {3: 2}  # v2 is announced while the generator waits for it
    rig.enqueue(_task(1, admit_version=2))
    assert rig.gen.step() == 1
    assert rig.log == ["fetch v1", "load v1", "fetch v2", "load v2", "generate t-1 with v2"]
    [group] = rig.queue.forwarded[0][3]
    assert group.behavior_version == 2 and group.behavior_sha256 == rig.transport.announced.sha256


def test_the_version_wait_times_out_naming_the_version() -> None:
    rig = _Rig()
    rig.transport.publish(1)
    real_latest = rig.transport.latest

    def latest_after_a_second() -> WeightSnapshot | None:
        rig.clock.now += 1.0
        return real_latest()

    rig.transport.latest = latest_after_a_second  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match="gen-7: snapshot v5 not announced within 3.0s"):
        rig.gen.wait_for_version(5, timeout_s=3.0)
    assert rig.gen.version == 1  # the newer snapshots it saw meanwhile were still loaded


def test_weights_change_only_between_batches() -> None:
    rig = _Rig()
    v0 = rig.transport.publish(0)
    rig.enqueue(_task(1), _task(2))
    rig.enqueue(_task(3))
    rig.engine.during_generate = lambda: rig.transport.publish(1)  # the learner publishes mid-batch
    assert rig.gen.step() == 2
    rig.engine.during_generate = None
    # The whole first batch was sampled, and stamped, with v0; v1 is loaded before the next batch.
    assert {g.behavior_version for g in rig.queue.forwarded[0][3]} == {0}
    assert {g.behavior_sha256 for g in rig.queue.forwarded[0][3]} == {v0.sha256}
    assert rig.gen.step() == 1
    assert [g.behavior_version for g in rig.queue.forwarded[1][3]] == [1]
    assert rig.log == [
        "fetch v0",
        "load v0",
        "generate t-1,t-2 with v0",
        "fetch v1",
        "load v1",
        "generate t-3 with v1",
    ]
    # An idle read also picks up a new snapshot; an unchanged one is not fetched again.
    rig.transport.publish(2)
    assert rig.gen.step() == 0 and rig.gen.version == 2
    assert rig.gen.step() == 0 and rig.log[-2:] == ["fetch v2", "load v2"]
    assert rig.gen.stats.weight_loads == 3 and rig.queue.forwarded[2:] == []


def test_an_empty_read_counts_as_idle_time() -> None:
    rig = _Rig(empty_read_s=0.5)
    rig.transport.publish(0)
    assert rig.gen.step(block_ms=500) == 0
    assert rig.gen.step(block_ms=500) == 0
    assert (rig.gen.stats.idle_s, rig.gen.stats.busy_s, rig.gen.stats.batches) == (1.0, 0.0, 0)
    assert rig.metrics.counts["lpo_generator_idle_seconds"] == 1.0
    assert rig.queue.forwarded == []


def test_sampling_without_record_leaves_the_stats_alone() -> None:
    rig = _Rig(generate_s=2.0)
    v0 = rig.transport.publish(0)
    groups = rig.gen.sample([_task(1), _task(2)], record=False)
    assert [(g.group_id, g.behavior_version, g.behavior_sha256) for g in groups] == [
        ("t-1", 0, v0.sha256),
        ("t-2", 0, v0.sha256),
    ]
    stats = rig.gen.stats
    assert (stats.groups, stats.tokens, stats.batches, stats.busy_s, stats.idle_s) == (0, 0, 0, 0.0, 0.0)
    assert rig.metrics.counts["lpo_generator_groups"] == 0 and rig.metrics.counts["lpo_generator_tokens"] == 0
    assert rig.queue.reads == [] and rig.queue.forwarded == []  # queue-less: evaluation's path
    rig.gen.sample([_task(3)])  # the same call recording: counted
    assert (stats.groups, stats.tokens, stats.batches) == (1, 6, 1)
