"""Hostile and broken input at the server's and the device's receive paths (issue 7).

No broker: the AggregationServer / DeviceAgent are built with a BrokerConfig on an unused port;
their MqttConnection is never started. `receiver` is called as the MQTT thread would, and rounds
are driven as `_collect` does: `strategy.begin_round`, `_answer` per message, `strategy.finish`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker_server.config import ServerConfig
from broker_server.server import AggregationServer, OpenTask, RoundOutcome
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig

FED, DEV, ROUND = "fed", "dev-1", 0
UNUSED = BrokerConfig(host="127.0.0.1", port=1)  # never connected
FUZZ_EXAMPLES = 300  # per fuzz test; each example delivers 1-4 hostile payloads
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_counted = {"server": 0, "device": 0}


def make_server(manifest, folder, **over) -> AggregationServer:
    cfg = ServerConfig(artifacts=str(manifest.root), state_dir=str(folder), federation=FED, port=1, **over)
    return AggregationServer(cfg, manifest, StateStore(folder), UNUSED)


def slot_map_of(server, tier_name="small") -> dict[int, list[int]]:
    tier = server.manifest.tier(tier_name)
    return {layer: list(range(tier.experts_held)) for layer in tier.adapted_layers}


def make_update(server, round_=ROUND, device=DEV, scale=0.01, seed=0, num_samples=8, **over) -> wire.Update:
    slot_map = slot_map_of(server)
    rng = np.random.default_rng(seed)
    given_ = server.space.gather_slots(server.state.global_arrays, slot_map)
    params = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in given_.items()}
    kw = dict(device_id=device, round=round_, tier="small", params=params,
              expert_tokens={str(layer): [5] * len(slots) for layer, slots in slot_map.items()},
              num_samples=num_samples, metrics={"loss": 0.5})
    kw.update(over)
    return wire.Update(**kw)


def forged(message, **fields):
    """A copy of `message` with fields that skip the wire validation (as a decoder bug would let through)."""
    copy = object.__new__(type(message))
    for f in dataclasses.fields(message):
        object.__setattr__(copy, f.name, fields.get(f.name, getattr(message, f.name)))
    return copy


class FixedSlots:
    """A slot planner giving every device global experts 0..M_t-1, so updates can be built without the task."""

    def __init__(self, server):
        self.server = server

    def assign(self, layers, held, history):
        return slot_map_of(self.server)


def open_round(server, round_=ROUND, devices=(DEV,)):
    server.method.begin_round(server.state.global_arrays)
    server.method.planner = FixedSlots(server)
    tasks, outcome = {}, RoundOutcome()
    for device in devices:
        server._register(wire.Hello(device_id=device, profile="generic", tier="small"))
        task, slot_map = server._task(round_, server.devices[device])
        tasks[device] = OpenTask(task, slot_map, time.monotonic(), 0)
        outcome.devices[device] = {"status": "missed"}
    return tasks, outcome


def drain(server) -> list:
    out = []
    while not server.inbox.empty():
        message, ack = server.inbox.get_nowait()
        ack()
        out.append(message)
    return out


def changed(a: dict, b: dict) -> list[str]:
    return [k for k in a if not np.array_equal(a[k], b[k])]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def clean_global(manifest, tmp_path_factory):
    """The global arrays after a round that folded only the valid update."""
    server = make_server(manifest, tmp_path_factory.mktemp("clean"))
    tasks, outcome = open_round(server)
    server._answer(ROUND, make_update(server), tasks, outcome)
    assert outcome.updates == 1
    new, _ = server.strategy.finish()
    assert changed(server.state.global_arrays, new)  # the valid update does move the model
    return new


def wire_messages(server) -> list[tuple[str, wire.Message]]:
    """One valid message of every wire type, each with the topic it belongs on."""
    server.method.begin_round(server.state.global_arrays)
    task, _ = server._task(ROUND, server.devices.get(DEV) or _device(server))
    return [
        (wire.presence_topic(FED, DEV), wire.Hello(DEV, "generic", "small", 3, {"python": "3"})),
        (wire.presence_topic(FED, DEV), wire.Presence(DEV, True, 1.5)),
        (wire.task_topic(FED, DEV), task),
        (wire.global_topic(FED), wire.GlobalState(ROUND, {"1": [0.25, 0.25, 0.25, 0.25]}, "")),
        (wire.upload_topic(FED, DEV, ROUND), make_update(server)),
        (wire.upload_topic(FED, DEV, ROUND), wire.ErrorReply(DEV, ROUND, wire.ErrorCode.INTERNAL, "x")),
    ]


def _device(server):
    server._register(wire.Hello(device_id=DEV, profile="generic", tier="small"))
    return server.devices[DEV]


TOPICS = st.sampled_from([
    wire.upload_topic(FED, DEV, ROUND), wire.upload_topic(FED, DEV, None), wire.upload_topic(FED, "dev-2", ROUND),
    wire.presence_topic(FED, DEV), wire.task_topic(FED, DEV), wire.global_topic(FED),
    "fftmoe/fed/up/dev-1", "fftmoe/../up/dev-1/0", "fftmoe/fed/up/dev-1/01", "", "x/y/z", "fftmoe/fed/global/extra",
])


@st.composite
def hostile(draw, payloads: list[bytes]):
    """Random bytes, or one valid chunk with one byte changed, truncated or extended."""
    how = draw(st.sampled_from(["random", "mutate", "mutate", "truncate", "extend"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    chunk = draw(st.sampled_from(payloads))
    if how == "truncate":
        return chunk[:draw(st.integers(0, len(chunk) - 1))]
    if how == "extend":
        return chunk + draw(st.binary(min_size=1, max_size=16))
    i = draw(st.integers(0, len(chunk) - 1))
    byte = draw(st.integers(0, 255).filter(lambda b: b != chunk[i]))
    return chunk[:i] + bytes([byte]) + chunk[i + 1:]


# -- 1. fuzz: server receive path ------------------------------------------------------------------
def test_fuzz_server_receive_then_clean_fold(manifest, tmp_path, clean_global):
    server = make_server(manifest, tmp_path / "state")
    messages = wire_messages(server)
    originals = [m for _, m in messages]
    payloads = [c for _, m in messages for c in wire.encode(m)]
    payloads += wire.encode(make_update(server), chunk_size=1024)  # multi-chunk frames too
    before = {k: v.copy() for k, v in server.state.global_arrays.items()}

    @FUZZ_SETTINGS
    @given(st.lists(st.tuples(TOPICS, hostile(payloads)), min_size=1, max_size=4))
    def run(deliveries):
        for topic, payload in deliveries:
            _counted["server"] += 1
            server.receiver(topic, payload, lambda: None)  # must not raise
        landed = drain(server)
        for message in landed:  # only valid messages, identical to one that was sent (sha256-protected body)
            assert any(type(message) is type(o) and message == o for o in originals), message
        # then the valid update arrives; fold everything as _collect would
        server.receiver(wire.upload_topic(FED, DEV, ROUND), wire.encode(make_update(server))[0], lambda: None)
        tasks, outcome = open_round(server)
        for message in landed + drain(server):
            if isinstance(message, (wire.Update, wire.ErrorReply)):
                server._answer(ROUND, message, tasks, outcome)
        new, _ = server.strategy.finish()
        assert not changed(server.state.global_arrays, before)  # the server's own state untouched
        if outcome.updates:  # the valid update (or an accepted byte-identical copy) was folded, nothing else
            assert not changed(new, clean_global)
        else:  # a landed ErrorReply answered the task first: the model must not move
            assert isinstance(outcome.failed.get(DEV), str) and not changed(new, before)

    run()
    print(f"\nserver receive path: {_counted['server']} hostile payloads fuzzed")
    assert _counted["server"] >= FUZZ_EXAMPLES


def test_upload_byte_counters_stay_bounded(manifest, tmp_path):
    """Garbage on upload topics of many rounds must not grow the per-(device, round) byte counters forever."""
    server = make_server(manifest, tmp_path / "state")
    acks = []
    for round_ in range(5000):
        server.receiver(wire.upload_topic(FED, DEV, round_), b"garbage", lambda: acks.append(1))
    assert server.receiver.counters <= 1, f"{server.receiver.counters} byte counters kept for rounds never answered"
    assert len(acks) == 5000  # refused payloads are acknowledged at once: the broker's window never clogs


# -- 1. fuzz: device receive path ------------------------------------------------------------------
def test_fuzz_device_receive(manifest, tmp_path):
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.device_config import DeviceConfig
    from edge_runtime.local_state import LocalState

    server = make_server(manifest, tmp_path / "server")
    config = DeviceConfig(device_id=DEV, artifacts=str(manifest.root), tier="small", data="unused.csv",
                          federation=FED, state_dir=str(tmp_path / "dev"))
    # _receive touches only the reassembler and the inbox: no trainer or data needed
    agent = DeviceAgent(config, trainer=None, dataset=None, state=LocalState(tmp_path / "dev"), broker=UNUSED)
    messages = wire_messages(server)
    originals = [m for _, m in messages]
    payloads = [c for _, m in messages for c in wire.encode(m)]
    payloads += wire.encode(messages[2][1], chunk_size=1024)
    topics = st.sampled_from([wire.task_topic(FED, DEV), wire.global_topic(FED)])  # all it subscribes to

    @FUZZ_SETTINGS
    @given(st.lists(st.tuples(topics, hostile(payloads)), min_size=1, max_size=4))
    def run(deliveries):
        for topic, payload in deliveries:
            _counted["device"] += 1
            agent._receive(topic, payload)  # must not raise
        while not agent._inbox.empty():
            item = agent._inbox.get_nowait()
            if item[0] == "error":  # a typed rejection the device answers with an ErrorReply
                assert item[1] in (wire.ErrorCode.BAD_HASH, wire.ErrorCode.SCHEMA_VERSION) and item[2]
            else:
                assert item[0] == "message"
                assert any(type(item[1]) is type(o) and item[1] == o for o in originals), item[1]
        assert len(agent._bytes_in) <= 2  # keyed by its two topics only

    run()
    print(f"\ndevice receive path: {_counted['device']} hostile payloads fuzzed")
    assert _counted["device"] >= FUZZ_EXAMPLES


# -- 2. replay and impersonation -------------------------------------------------------------------
def test_replayed_update_of_previous_round_is_not_folded(manifest, tmp_path, caplog):
    server = make_server(manifest, tmp_path / "state")
    old = make_update(server, round_=ROUND)
    tasks, outcome = open_round(server, round_=ROUND + 1)
    server.receiver(wire.upload_topic(FED, DEV, ROUND), wire.encode(old)[0], lambda: None)
    (replayed,) = drain(server)
    with caplog.at_level(logging.INFO, logger="fftmoe.server"):
        server._answer(ROUND + 1, replayed, tasks, outcome)
    new, stats = server.strategy.finish()
    assert outcome.updates == 0 and stats.clients == 0 and not tasks[DEV].answered
    assert not changed(new, server.state.global_arrays)
    assert "late or unsolicited update from dev-1 for round 0 (current round 1)" in caplog.text


def test_update_in_another_devices_name_is_rejected(manifest, tmp_path, caplog):
    server = make_server(manifest, tmp_path / "state")
    impostor = make_update(server, device="dev-2")
    with caplog.at_level(logging.WARNING, logger="fftmoe.server"):
        for chunk in wire.encode(impostor):
            server.receiver(wire.upload_topic(FED, DEV, ROUND), chunk, lambda: None)  # dev-1's topic, dev-2's payload
    assert server.inbox.empty()
    assert "message of device 'dev-2' on the topic of 'dev-1'" in caplog.text
    with pytest.raises(wire.MalformedMessage):
        wire.check_origin(impostor, wire.upload_topic(FED, DEV, ROUND))


# -- 3. poisoned updates ---------------------------------------------------------------------------
def _first(params):
    return sorted(params)[0]


def _poison(kind, update):
    p = dict(update.params)
    name = _first(p)
    if kind == "nan":
        p[name] = p[name].copy()
        p[name].flat[0] = np.nan
        return forged(update, params=p), "contains NaN or Inf"
    if kind == "inf":
        p[name] = p[name].copy()
        p[name].flat[-1] = -np.inf
        return forged(update, params=p), "contains NaN or Inf"
    if kind == "shape":
        p[name] = np.zeros((*p[name].shape, 2), np.float32)
        return dataclasses.replace(update, params=p), "shape"
    if kind == "extra_name":
        p["encoder.layer.0.evil"] = np.zeros(3, np.float32)
        return dataclasses.replace(update, params=p), "unexpected array 'encoder.layer.0.evil'"
    if kind == "missing_name":
        del p[name]
        return dataclasses.replace(update, params=p), f"missing array {name!r}"
    if kind == "zero_samples":
        return forged(update, num_samples=0), "num_samples must be a positive integer"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "extra_name", "missing_name", "zero_samples"])
def test_poisoned_update_is_rejected_with_device_and_reason(manifest, tmp_path, caplog, kind):
    server = make_server(manifest, tmp_path / "state")
    bad, reason = _poison(kind, make_update(server, scale=1.0))
    if kind in ("nan", "inf", "zero_samples"):  # the wire refuses to even build or decode these
        with pytest.raises(wire.MalformedMessage):
            type(bad)(**{f.name: getattr(bad, f.name) for f in dataclasses.fields(bad)})
    tasks, outcome = open_round(server)
    with caplog.at_level(logging.WARNING, logger="fftmoe.server"):
        server._answer(ROUND, bad, tasks, outcome)
    new, stats = server.strategy.finish()
    assert outcome.updates == 0 and stats.clients == 0
    assert reason in outcome.failed[DEV]
    assert f"rejected the update of {DEV}" in caplog.text and reason in caplog.text
    assert not changed(new, server.state.global_arrays)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("clip", [2.0, None])
def test_outlier_update_is_clipped_to_multiple_of_previous_median(manifest, tmp_path, clip):
    server = make_server(manifest, tmp_path / "state", clip_multiplier=clip)
    g = server.state.global_arrays
    # round 0: three ordinary updates set the median delta norm
    tasks, outcome = open_round(server, devices=("a", "b", "c"))
    norms = []
    for seed, device in enumerate(("a", "b", "c")):
        update = make_update(server, device=device, seed=seed, scale=0.01)
        norms.append(_distance(server.space.gather_slots(g, slot_map_of(server)), update.params))
        server._answer(ROUND, update, tasks, outcome)
    assert outcome.updates == 3
    server.strategy.finish()
    median = float(np.median(norms))
    # round 1: one update 1000x the usual size
    tasks, outcome = open_round(server, round_=ROUND + 1, devices=("a",))
    server._answer(ROUND + 1, make_update(server, round_=ROUND + 1, device="a", seed=9, scale=10.0), tasks, outcome)
    new, stats = server.strategy.finish()
    moved = _distance(new, g)
    if clip is None:
        assert stats.clipped == 0 and moved > 100 * median
    else:
        assert stats.clipped == 1
        assert moved <= clip * median * 1.001, (moved, median)
        assert moved >= clip * median * 0.99  # clipped to the bound, not dropped


def test_outlier_update_is_rejected_with_norm_policy_reject(manifest, tmp_path, caplog):
    server = make_server(manifest, tmp_path / "state", clip_multiplier=2.0, norm_policy="reject")
    g = server.state.global_arrays
    tasks, outcome = open_round(server, devices=("a", "b", "c"))
    for seed, device in enumerate(("a", "b", "c")):
        server._answer(ROUND, make_update(server, device=device, seed=seed, scale=0.01), tasks, outcome)
    server.strategy.finish()
    tasks, outcome = open_round(server, round_=ROUND + 1, devices=("a", "b"))
    server._answer(ROUND + 1, make_update(server, round_=ROUND + 1, device="a", seed=9, scale=10.0), tasks, outcome)
    server._answer(ROUND + 1, make_update(server, round_=ROUND + 1, device="b", seed=4, scale=0.01), tasks, outcome)
    assert outcome.updates == 1 and "exceeds the bound" in outcome.failed["a"]
    assert "rejected the update of a" in caplog.text
    new, stats = server.strategy.finish()
    assert stats.clients == 1 and _distance(new, g) < 1.0  # only the ordinary update moved the model
