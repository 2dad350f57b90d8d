"""The device agent as a real process against real brokers (embedded amqtt and Debian mosquitto)."""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest

from edge_runtime import wire
from edge_runtime.local_state import LocalState
from tests.brokers import Mosquitto, running_broker
from tests.mqtt_harness import Harness, start_device, task_for
from tests.tiny_model import write_tiny_dataset


@pytest.fixture()
def data_file(tmp_path):
    return write_tiny_dataset(tmp_path / "local.csv", rows=40)


def _stop(process, log):
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    assert code == 0, log.read_text()[-3000:]


@contextmanager
def agent_on_broker(url, tiny_export, tier, device_id, data_file, tmp_path, extra=None):
    """A device process and a harness on `url`; yields (harness, stop) once the device said Hello.
    `stop()` sends SIGTERM and asserts a clean exit; anything left is killed on the way out."""
    harness = Harness(url)
    log = tmp_path / "device.log"
    device = start_device(url, tiny_export, tier, device_id, data_file, tmp_path / "state", log, extra=extra)
    try:
        hello = harness.wait_for(wire.Hello, device_id)
        yield harness, hello, lambda: _stop(device, log)
    finally:
        device.kill()
        harness.stop()


@pytest.mark.parametrize("broker_kind", ["embedded", "mosquitto"])
def test_round_trip_with_chunking(tiny_export, data_file, tmp_path, broker_kind):
    with running_broker(broker_kind, tmp_path) as url, \
            agent_on_broker(url, tiny_export, "small", "dev1", data_file, tmp_path,
                            extra=["--chunk-size", "2048"]) as (harness, hello, stop):
        assert hello.tier == "small" and hello.last_round_seen is None
        task = task_for(tiny_export, "small", "dev1", round_=3)
        harness.send("dev1", wire.encode(task, chunk_size=1024))
        update = harness.wait_for(wire.Update, "dev1")
        assert update.round == 3 and update.tier == "small"
        assert {k: v.shape for k, v in update.params.items()} == {k: v.shape for k, v in task.params.items()}
        assert any(not np.array_equal(update.params[k], task.params[k]) for k in task.params)
        assert update.num_samples == 30  # 40 rows, 8 per class, 2 per class held out (20%, rounded up)
        assert update.metrics["steps"] == 4 and 0 <= update.metrics["holdout_accuracy"] <= 1
        assert harness.chunks_seen > 3  # the update really travelled in several chunks
        assert sorted(update.expert_tokens) == [str(layer) for layer in tiny_export.tier("small").adapted_layers]
        stop()
        assert LocalState(tmp_path / "state").load().last_round_seen == 3


def test_corrupted_chunk_gets_an_error_reply(tiny_export, data_file, tmp_path):
    with running_broker("embedded", tmp_path) as url, \
            agent_on_broker(url, tiny_export, "small", "dev2", data_file, tmp_path) as (harness, _, stop):
        chunks = wire.encode(task_for(tiny_export, "small", "dev2", round_=0), chunk_size=1024)
        broken = bytearray(chunks[-1])
        broken[-1] ^= 0xFF
        harness.send("dev2", chunks[:-1] + [bytes(broken)])
        reply = harness.wait_for(wire.ErrorReply, "dev2")
        assert reply.code == wire.ErrorCode.BAD_HASH
        # the device is still serving: a good task now gets an update
        harness.send("dev2", wire.encode(task_for(tiny_export, "small", "dev2", round_=1)))
        assert harness.wait_for(wire.Update, "dev2").round == 1
        stop()


def test_wrong_tier_task_is_refused_not_fatal(tiny_export, data_file, tmp_path):
    with running_broker("embedded", tmp_path) as url, \
            agent_on_broker(url, tiny_export, "small", "dev3", data_file, tmp_path) as (harness, _, stop):
        harness.send("dev3", wire.encode(task_for(tiny_export, "big", "dev3", round_=0)))
        reply = harness.wait_for(wire.ErrorReply, "dev3")
        assert reply.code == wire.ErrorCode.UNKNOWN_TIER and "small" in reply.message
        stop()


def test_broker_restart_mid_upload_delivers_the_update_once(tiny_export, data_file, tmp_path):
    broker = Mosquitto(tmp_path).start()
    harness = Harness(broker.url)
    log = tmp_path / "device.log"
    device = start_device(broker.url, tiny_export, "big", "dev4", data_file, tmp_path / "state", log,
                          extra=["--chunk-size", "1024"])
    try:
        harness.wait_for(wire.Hello, "dev4")
        task = task_for(tiny_export, "big", "dev4", round_=7)
        task_chunks = wire.encode(task)
        harness.resend_on_hello["dev4"] = task  # an aggregator re-sends open tasks to re-announced devices
        restarted = []

        def kill_on_first_chunk(count):
            if count == 1 and not restarted:
                restarted.append(True)
                broker.kill()  # the device is mid-upload: dozens of 1 KiB chunks remain

        harness.on_upload_chunk = kill_on_first_chunk
        harness.send("dev4", task_chunks)
        deadline = time.monotonic() + 30
        while not restarted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restarted, "the upload never started"
        broker.start()
        update = harness.wait_for(wire.Update, "dev4", timeout=60)
        assert update.round == 7
        with pytest.raises(TimeoutError):  # exactly once: no second copy reaches the aggregator
            harness.wait_for(wire.Update, "dev4", timeout=3)
        _stop(device, log)
    finally:
        device.kill()
        harness.stop()
        broker.kill()


def test_personal_router_rows_stay_on_the_device(tiny_export, data_file, tmp_path):
    with running_broker("embedded", tmp_path) as url, \
            agent_on_broker(url, tiny_export, "small", "dev5", data_file, tmp_path,
                            extra=["--personal-router"]) as (harness, _, stop):
        first = task_for(tiny_export, "small", "dev5", round_=0)
        harness.send("dev5", wire.encode(first))
        trained = harness.wait_for(wire.Update, "dev5")
        router = next(n for n in trained.params if n.endswith(".router"))
        layer = tiny_export.tier("small").adapted_layers[0]
        deadline = time.monotonic() + 10
        while f"{layer}/1" not in (rows := LocalState(tmp_path / "state").load_router()):
            assert time.monotonic() < deadline, "the router rows were never saved"
            time.sleep(0.05)  # saved right after the upload
        np.testing.assert_array_equal(rows[f"{layer}/1"], trained.params[router][1])
        # next round the server sends global rows in swapped slots; the device keeps its own
        second = task_for(tiny_export, "small", "dev5", round_=1, steps=1)
        slots = [1, 0]
        second = wire.RoundTask(**{**second.__dict__, "slot_map": {str(layer): slots},
                                   "params": {k: (v[slots] if k.endswith((".w1", ".b1", ".w2", ".b2", ".router"))
                                                  else v) for k, v in second.params.items()}})
        harness.send("dev5", wire.encode(second))
        update = harness.wait_for(wire.Update, "dev5")
        start_rows = second.params[router]
        # slot 0 now holds global expert 1: training started from the device's own row, not the global one
        moved = np.abs(update.params[router][0] - trained.params[router][1]).max()
        from_global = np.abs(update.params[router][0] - start_rows[0]).max()
        assert moved < from_global
        stop()


def test_a_task_with_a_logit_prior_trains_with_the_devices_own_label_prior(tiny_export, tmp_path):
    """RoundTask.logit_prior: a device holding one label trains with its prior in the logits (its training
    loss starts low), and the head bias it uploads carries no trace of the prior. Its label counts leave
    the device only when the task asks (report_label_counts)."""
    from tests.tiny_model import LABELS
    one_label = write_tiny_dataset(tmp_path / "one.csv", rows=40, labels=LABELS[:1])
    with running_broker("embedded", tmp_path) as url, \
            agent_on_broker(url, tiny_export, "small", "dev6", one_label, tmp_path) as (harness, _, stop):
        updates = {}
        for round_, tau in ((0, 0.0), (1, 1.0)):
            task = task_for(tiny_export, "small", "dev6", round_=round_, steps=2)
            harness.send("dev6", wire.encode(wire.RoundTask(**{**task.__dict__, "logit_prior": tau,
                                                              "learning_rate": 1e-6,
                                                              "report_label_counts": tau > 0})))
            updates[tau] = harness.wait_for(wire.Update, "dev6")
        assert updates[1.0].metrics["loss"] < 0.3 * updates[0.0].metrics["loss"]
        assert updates[0.0].label_counts == []  # not asked: no label counts leave the device
        assert updates[1.0].label_counts == [updates[1.0].num_samples] + [0] * (len(LABELS) - 1)
        bias = "fftmoe_head.bias"
        np.testing.assert_allclose(updates[1.0].params[bias], task.params[bias], atol=1e-4)
        stop()


def test_a_device_with_a_label_count_epsilon_sends_one_private_release_every_round_and_after_a_restart(
        tiny_export, data_file, tmp_path):
    """--label-count-epsilon: the counts a device reports sum to its samples (the server's check passes),
    say so in the metrics, and are the same draw in every round and after the process restarts."""
    from broker_server.update_checks import label_count_problems
    from edge_runtime.label_privacy import RELEASE_FILE

    def ask(harness, round_):
        task = task_for(tiny_export, "small", "dev7", round_=round_, steps=1)
        harness.send("dev7", wire.encode(wire.RoundTask(**{**task.__dict__, "report_label_counts": True})))
        return harness.wait_for(wire.Update, "dev7")

    released = []
    with running_broker("embedded", tmp_path) as url:
        for rounds in ((0, 1), (2,)):
            with agent_on_broker(url, tiny_export, "small", "dev7", data_file, tmp_path,
                                 extra=["--label-count-epsilon", "0.5"]) as (harness, _, stop):
                for round_ in rounds:
                    update = ask(harness, round_)
                    assert label_count_problems(update.label_counts, update.num_samples, 5) == []
                    assert update.metrics["label_count_epsilon"] == 0.5
                    released.append(update.label_counts)
                stop()
    assert released[0] == released[1] == released[2]
    saved = json.loads((tmp_path / "state" / RELEASE_FILE).read_text())
    assert saved["exact"] == [6] * 5 and saved["released"] == released[0]
