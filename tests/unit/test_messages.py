"""Messages validate their invariants and survive the wire format unchanged."""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import messages as m

SHA = hashlib.sha256(b"v0").hexdigest()


def _task(k: int = 3) -> m.RolloutTask:
    return m.RolloutTask(
        task_id="t-1",
        prompt_token_ids=[5, 6, 7],
        prompt_text="Use 1 2 3 to make 6.\n",
        task_kind="countdown",
        reference={"nums": [1, 2, 3], "target": 6},
        group_size=k,
        sampling=m.SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=3),
        admit_version=2,
    )


def _group(k: int = 3, scored: bool = True) -> m.ResponseGroup:
    rollouts = tuple(
        m.Rollout(token_ids=[1, 2, i], logprobs=[-0.5, -1.25, -0.1 * i], finish_reason="stop", text=f"r{i}")
        for i in range(k)
    )
    group = m.ResponseGroup(
        task=_task(k), rollouts=rollouts, behavior_version=4, behavior_sha256=SHA, generator_id="g0"
    )
    return group.with_rewards((1.0, 0.1, 0.0)[:k], ("pass", "fail", "parse_error")[:k]) if scored else group


def test_round_trip_every_message_type() -> None:
    entry_a = m.TensorEntry("w", "float32", (2, 3), 0, 24)
    entry_b = m.TensorEntry("b", "float32", (3,), 24, 12)
    snapshot = m.WeightSnapshot(1, (entry_a, entry_b), 36, SHA, "redis", "lpo:run:w:1")
    metrics = m.LearnerStepMetrics(loss=-0.01, grad_norm=0.7, objective={"kl_forward": 0.02, "drift": 0.1})
    for msg in (_task(), _group(), _group(scored=False), snapshot, metrics, m.SamplingParams()):
        back = m.decode(m.encode(msg), expected=type(msg))
        assert back == msg and type(back) is type(msg)
    flat = metrics.as_json()
    assert flat["kl_forward"] == 0.02 and "update_norm" not in flat and "objective" not in flat
    assert m.LearnerStepMetrics.from_flat(flat) == metrics
    g = m.decode(m.encode(_group()))
    assert g.rollouts[2].logprobs.dtype == np.float32 and g.rollouts[2].token_ids.dtype == np.int32
    assert g.group_id == "t-1" and g.task.reference["nums"] == (1, 2, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**31 - 1), st.floats(-50, 0, width=32)), min_size=0, max_size=64))
def test_rollout_round_trip_property(pairs) -> None:
    ids = [p[0] for p in pairs]
    lps = [p[1] for p in pairs]
    r = m.Rollout(token_ids=ids, logprobs=lps, finish_reason="length")
    back = m.decode(m.encode(r), expected=m.Rollout)
    assert back == r and back.token_ids.tolist() == ids


def test_arrays_are_read_only() -> None:
    r = _group().rollouts[0]
    with pytest.raises(ValueError):
        r.logprobs[0] = 0.0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: m.Rollout([1, 2], [-0.1], "stop"), "differ in length"),
        (lambda: m.Rollout([1], [0.5], "stop"), "<= 0"),
        (lambda: m.Rollout([1], [float("nan")], "stop"), "finite"),
        (lambda: m.Rollout([1], [-0.1], "eos"), "finish_reason"),
        (lambda: m.ResponseGroup(_task(3), _group(2).rollouts, 0, SHA), "2 rollouts, task asks for 3"),
        (lambda: m.ResponseGroup(_task(3), _group(3).rollouts, 0, "abc"), "sha256"),
        (lambda: m.ResponseGroup(_task(3), _group(3).rollouts, -1, SHA), "behavior_version"),
        (lambda: _group(scored=False).with_rewards((1.0,), ("pass",)), "one entry per rollout"),
        (lambda: m.RolloutTask("t", [], "", "countdown", {}, 4), "empty"),
        (lambda: m.RolloutTask("t", [1], "", "countdown", {}, 0), "group_size must be >= 1"),
        (lambda: m.SamplingParams(temperature=0.0), "temperature"),
        (
            lambda: m.WeightSnapshot(1, (m.TensorEntry("w", "float32", (2,), 4, 8),), 8, SHA, "redis", "k"),
            "starts at 4",
        ),
        (
            lambda: m.WeightSnapshot(1, (m.TensorEntry("w", "float32", (2,), 0, 8),), 9, SHA, "redis", "k"),
            "covers 8",
        ),
    ],
)
def test_invariants_are_enforced(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_truncated_payload_is_a_clear_error() -> None:
    payload = m.encode(_group())
    with pytest.raises(m.MessageDecodeError, match="truncated"):
        m.decode(payload[: len(payload) // 2])


def test_schema_version_mismatch_is_a_clear_error() -> None:
    envelope = msgpack.unpackb(m.encode(_task()), raw=False)
    envelope["schema"] = m.SCHEMA_VERSION + 1
    with pytest.raises(m.MessageDecodeError, match=f"schema version {m.SCHEMA_VERSION + 1}"):
        m.decode(msgpack.packb(envelope, use_bin_type=True))


def test_wrong_type_and_unknown_type() -> None:
    with pytest.raises(m.MessageDecodeError, match="expected a ResponseGroup"):
        m.decode(m.encode(_task()), expected=m.ResponseGroup)
    envelope = msgpack.unpackb(m.encode(_task()), raw=False)
    envelope["data"]["__t__"] = "Nope"
    with pytest.raises(m.MessageDecodeError, match="unknown message type 'Nope'"):
        m.decode(msgpack.packb(envelope, use_bin_type=True))
    with pytest.raises(TypeError, match="cannot encode dict"):
        m.encode({"a": 1})


def _seeded(task_id: str, seed: int | None, key: str | None) -> m.RolloutTask:
    sampling = m.SamplingParams(seed=seed, seed_key=key)
    return m.RolloutTask(task_id, [5, 6], "p", "countdown", {"nums": [1], "target": 1}, 2, sampling)


def test_sampling_seed_hashes_the_base_with_the_key_or_the_task_id() -> None:
    # the coordinator's tasks: base = generator.seed, key = stream position; the run name (in the id) is out
    assert _seeded("run-a-t7", 0, "t7").sampling_seed(5) == _seeded("run-b-t7", 0, "t7").sampling_seed(5)
    assert _seeded("run-a-t7", 0, "t7").sampling_seed(5) == m.task_seed(0, "t7")
    assert _seeded("run-a-t7", 0, "t7").sampling_seed(5) != _seeded("run-a-t8", 0, "t8").sampling_seed(5)
    assert _seeded("run-a-t7", 1, "t7").sampling_seed(5) != _seeded("run-a-t7", 0, "t7").sampling_seed(5)
    # no key: the task id (tasks queued by older builds, external producers); no seed: the generator's
    assert _seeded("x-1", 4, None).sampling_seed(5) == m.task_seed(4, "x-1")
    assert _seeded("x-1", None, None).sampling_seed(5) == m.task_seed(5, "x-1")
    assert _seeded("x-1", 4, None).sampling_seed(5) != _seeded("x-2", 4, None).sampling_seed(5)


def test_a_task_encoded_without_seed_key_still_decodes() -> None:
    # an older build's payload (no seed_key field) left in a stream across an upgrade and a resume
    wire = msgpack.unpackb(m.encode(_task()), raw=False)
    del wire["data"]["sampling"]["seed_key"]
    task = m.decode(msgpack.packb(wire, use_bin_type=True), m.RolloutTask)
    assert task.sampling.seed_key is None and task.sampling_seed(0) == m.task_seed(3, "t-1")
