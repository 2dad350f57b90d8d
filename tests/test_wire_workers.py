"""The coordinator <-> aggregator-worker messages of wire 1.1 (round trips, int64 sums only where they
belong, binding to worker topics) and the coordinator's WorkerPool bookkeeping, with no broker."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.coordinator import WorkerPool
from broker_server.workers import plan_settings, settings_config
from broker_server.aggregation import AggregationConfig
from edge_runtime import wire
from edge_runtime.wire import MalformedMessage

SUMS = {"layer.0.w1": np.arange(12, dtype=np.int64).reshape(3, 4) * (1 << 40), "head": np.array([-5], np.int64)}


def _partial(**over):
    kw = dict(worker_id="wa", round=3, session="s1-3-0", devices=["pi-1", "pi-2"], den={"5": [20.0, 0.0, 7.0]},
              tokens={"5": [100.0, 0.0, 12.0]}, head_den=[20.0, 7.0], samples=27, bytes_folded=4096, clipped=1,
              norms=[0.5, 1.25], params=SUMS)
    kw.update(over)
    return wire.WorkerPartial(**kw)


MESSAGES = [
    wire.WorkerStatus(worker_id="wa", online=True),
    wire.WorkerPlan(worker_id="wa", round=3, session="s1-3-0", tiers={"pi-1": "small"},
                    slot_maps={"pi-1": {"5": [2, 7]}}, settings={"weighting": "samples"},
                    params={"g": np.ones((2, 3), np.float32)}),
    wire.WorkerPlan(worker_id="wa", round=3, session="s1-3-0", tiers={}, slot_maps={}, settings={}),
    wire.WorkerClose(worker_id="wa", round=3, session="s1-3-0"),
    wire.WorkerReceipt(worker_id="wa", device_id="pi-1", round=3, session="s1-3-0", ok=True, bytes_in=1000,
                       expert_tokens={"5": [10, 0]}, metrics={"loss": 0.5}),
    wire.WorkerReceipt(worker_id="wa", device_id="pi-2", round=3, session="s1-3-0", ok=False, reason="NaN"),
    _partial(),
    _partial(devices=[], den={}, tokens={}, norms=[], params={}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.kind)
def test_worker_messages_round_trip_on_their_topics(message):
    [decoded] = [wire.decode_single(c) for c in wire.encode(message, chunk_size=1 << 20)]
    assert decoded == message
    direction = "in" if isinstance(message, (wire.WorkerPlan, wire.WorkerClose)) else "out"
    topic = wire.worker_topic("fed", "wa", direction)
    assert wire.check_origin(decoded, topic).kind == f"worker-{direction}"
    with pytest.raises(MalformedMessage, match="worker 'wa' on the topic of 'wb'"):
        wire.check_origin(decoded, wire.worker_topic("fed", "wb", direction))
    with pytest.raises(MalformedMessage):
        wire.check_origin(decoded, wire.worker_topic("fed", "wa", "out" if direction == "in" else "in"))


def test_a_partial_weighs_each_head_row_and_a_1_2_worker_number_reads_as_every_row():
    assert wire.decode_single(wire.encode(_partial(), chunk_size=1 << 20)[0]).head_den == [20.0, 7.0]
    assert _partial(head_den=27.0).head_den == [27.0]  # what a 1.2 worker sends: one weight for every row
    with pytest.raises(MalformedMessage, match="head_den"):
        _partial(head_den=[1.0, -2.0])


def test_int64_tensors_only_in_partial_sums():
    decoded = wire.decode_single(wire.encode(_partial(), chunk_size=1 << 20)[0])
    assert decoded.params["layer.0.w1"].dtype == np.int64 and decoded.params["layer.0.w1"][2, 3] == 11 << 40
    with pytest.raises(MalformedMessage, match="int64"):
        _partial(params={"x": np.ones(3, np.float32)})
    with pytest.raises(MalformedMessage, match="float32 or float16"):
        wire.Update(device_id="d", round=1, tier="t", params={"x": np.ones(3, np.int64)}, expert_tokens={},
                    num_samples=1)
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        wire.encode(_partial(), dtype="int64")  # not an upload dtype


def test_a_task_names_its_upload_lane_and_old_tasks_have_none():
    task = wire.RoundTask(federation="f", round=1, device_id="d", tier="t", slot_map={}, lambda_bal=0.0,
                          lambda_het=0.0, het_target={}, local_steps=1, learning_rate=0.1, deadline_s=1.0,
                          upload_dtype="float32", params={})
    assert task.upload_lane == ""
    laned = wire.decode_single(wire.encode(wire.RoundTask(**{**task.__dict__, "upload_lane": "wa"}))[0])
    assert laned.upload_lane == "wa"
    with pytest.raises(MalformedMessage, match="upload_lane"):
        wire.RoundTask(**{**task.__dict__, "upload_lane": "a/b"})


def test_plan_settings_round_trip():
    config = AggregationConfig(weighting="activation", personalise_router=True, norm_policy="reject")
    back, limit = settings_config(plan_settings(config, 2.5, 1234))
    assert (back.weighting, back.personalise_router, back.clip_bound, back.norm_policy, back.exact, limit) == \
        ("activation", True, 2.5, "reject", True, 1234)
    assert settings_config(plan_settings(AggregationConfig(), None, 1))[0].clip_bound is None


def test_pool_balances_and_a_lost_worker_gives_back_its_devices():
    pool = WorkerPool()
    for w in ("wb", "wa", "wc"):
        pool.status(wire.WorkerStatus(worker_id=w, online=True))
    pool.begin("s1")
    lanes = pool.assign([f"d{i}" for i in range(7)])
    load = {w: list(lanes.values()).count(w) for w in ("wa", "wb", "wc")}
    assert sorted(load.values()) == [2, 2, 3] and load["wa"] == 3  # least loaded first, ties by id
    pool.receipts["d0"] = "receipt"
    pool.partials["wa"] = "partial"
    lost = pool.status(wire.WorkerStatus(worker_id="wa", online=False))
    assert lost == sorted(d for d, w in lanes.items() if w == "wa") and "d0" in lost
    assert "d0" not in pool.receipts and "wa" not in pool.partials and pool.live() == ["wb", "wc"]
    moved = pool.assign(lost)
    assert set(moved.values()) <= {"wb", "wc"}
    pool.status(wire.WorkerStatus(worker_id="wa", online=True))  # back, but its share of s1 is gone
    assert pool.live() == ["wb", "wc"] and pool.lose("wa", "again") == []
    pool.begin("s2")
    assert pool.live() == ["wa", "wb", "wc"]


# -- an AggregatorWorker's decisions, driven message by message (no broker: sends are captured) ------
def _worker(manifest):
    from broker_server.workers import AggregatorWorker
    from edge_runtime.mqtt import BrokerConfig

    worker = AggregatorWorker("wa", "fed", manifest, BrokerConfig(port=1))
    sent = []
    worker._send_receipt = lambda r: (worker._receipts.__setitem__(r.device_id, r), sent.append(r))
    worker.connection.publish_chunks = lambda topic, chunks, qos=1: sent.append(wire.decode_single(chunks[0])
                                                                                 if len(chunks) == 1 else chunks)
    return worker, sent


def _tiny_update(manifest, device, round_=0, seed=0, samples=8):
    tier = manifest.tier("small")
    rng = np.random.default_rng(seed)
    params = {p.name: rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in tier.params}
    tokens = {str(layer): [5] * tier.experts_held for layer in tier.adapted_layers}
    return wire.Update(device_id=device, round=round_, tier="small", params=params, expert_tokens=tokens,
                       num_samples=samples)


def test_worker_folds_each_assigned_device_once_and_closes_with_its_partial(tiny_export):
    worker, sent = _worker(tiny_export)
    tier = tiny_export.tier("small")
    slots = {str(layer): list(range(tier.experts_held)) for layer in tier.adapted_layers}
    with np.load(tiny_export.root / tiny_export.global_init.path) as data:
        arrays = {k: data[k] for k in data.files}
    plan = dict(worker_id="wa", round=0, session="s1", tiers={"d1": "small", "d2": "small"},
                slot_maps={"d1": slots, "d2": slots}, settings=plan_settings(AggregationConfig(), None, 1 << 26))
    worker.handle(wire.WorkerPlan(**plan, params=arrays))
    worker.handle(_tiny_update(tiny_export, "d1"))
    worker.handle(_tiny_update(tiny_export, "d1"))  # a duplicate: folded once, its receipt sent again
    worker.handle(_tiny_update(tiny_export, "stranger"))  # not assigned here: dropped without a receipt
    worker.handle(wire.ErrorReply(device_id="d2", round=0, code=wire.ErrorCode.OUT_OF_MEMORY, message="oom"))
    receipts = [m for m in sent if isinstance(m, wire.WorkerReceipt)]
    assert [(r.device_id, r.ok) for r in receipts] == [("d1", True), ("d1", True), ("d2", False)]
    assert receipts[2].reason == "OUT_OF_MEMORY: oom"
    worker.handle(wire.WorkerClose(worker_id="wa", round=0, session="s1"))
    partial = sent[-1]
    assert isinstance(partial, wire.WorkerPartial) and partial.devices == ["d1"] and partial.samples == 8
    assert all(a.dtype == np.int64 for a in partial.params.values())
    worker.handle(_tiny_update(tiny_export, "d2", seed=1))  # after the close: too late
    worker.handle(wire.WorkerClose(worker_id="wa", round=0, session="s1"))  # a repeated close: the same partial
    assert sent[-1] == partial and not any(isinstance(m, wire.WorkerReceipt) and m.device_id == "d2" and m.ok
                                           for m in sent)
    # a plan of the same session adds a device and reopens; the next partial is cumulative
    worker.handle(wire.WorkerPlan(**{**plan, "tiers": {"d3": "small"}, "slot_maps": {"d3": slots}}))
    worker.handle(_tiny_update(tiny_export, "d3", seed=2, samples=5))
    worker.handle(wire.WorkerClose(worker_id="wa", round=0, session="s1"))
    assert sent[-1].devices == ["d1", "d3"] and sent[-1].samples == 13
    # a new session starts from zero; a close for a session never started answers with nothing
    worker.handle(wire.WorkerPlan(**{**plan, "session": "s2"}, params=arrays))
    worker.handle(wire.WorkerClose(worker_id="wa", round=0, session="s2"))
    assert sent[-1].devices == [] and sent[-1].samples == 0
    worker.handle(wire.WorkerClose(worker_id="wa", round=7, session="other"))
    assert sent[-1].devices == [] and sent[-1].round == 7


def test_an_update_arriving_before_its_plan_is_handled_still_counts_its_bytes(tiny_export):
    """The coordinator's plan and a fast device's update can both reach the worker's network thread
    before its main thread handles the plan: the receipt must still carry the upload's size (a round
    with bytes_up 0 in CI)."""
    worker, sent = _worker(tiny_export)
    tier = tiny_export.tier("small")
    slots = {str(layer): list(range(tier.experts_held)) for layer in tier.adapted_layers}
    with np.load(tiny_export.root / tiny_export.global_init.path) as data:
        arrays = {k: data[k] for k in data.files}
    plan = wire.WorkerPlan(worker_id="wa", round=3, session="s1", tiers={"d1": "small"}, slot_maps={"d1": slots},
                           settings=plan_settings(AggregationConfig(), None, 1 << 26), params=arrays)
    chunks = wire.encode(_tiny_update(tiny_export, "d1", round_=3), chunk_size=4096)
    for payload in wire.encode(plan):
        worker.receiver(wire.worker_topic("fed", "wa", "in"), payload, lambda: None)
    for payload in chunks:
        worker.receiver(wire.upload_topic("fed", "d1", 3, "wa"), payload, lambda: None)
    while not worker.inbox.empty():  # only now does the main thread get to the plan, then the update
        message, finish = worker.inbox.get_nowait()
        worker.handle(message)
        finish()
    receipts = [m for m in sent if isinstance(m, wire.WorkerReceipt)]
    assert [(r.device_id, r.ok) for r in receipts] == [("d1", True)]
    assert receipts[0].bytes_in == sum(map(len, chunks)) > 0
