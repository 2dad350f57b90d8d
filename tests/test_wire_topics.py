"""Tests of edge_runtime.wire topics: builders, parsing, id validation and binding a message to its topic."""

from __future__ import annotations

import pytest

from edge_runtime import wire
from edge_runtime.wire import ErrorReply, Hello, MalformedMessage, Presence, RoundTask, TopicError, Update
from tests.test_wire import MESSAGES, make_task, make_update


def test_topic_builders_and_parse():
    assert wire.upload_topic("fed-1", "pi-04", 7) == "fftmoe/fed-1/up/pi-04/7"
    assert wire.upload_topic("fed-1", "pi-04", None) == "fftmoe/fed-1/up/pi-04/none"
    assert wire.upload_subscription("fed-1") == "fftmoe/fed-1/up/+/+"
    assert wire.presence_topic("fed-1", "pi-04") == "fftmoe/fed-1/presence/pi-04"
    assert wire.presence_subscription("fed-1") == "fftmoe/fed-1/presence/+"
    assert wire.task_topic("fed-1", "pi-04") == "fftmoe/fed-1/task/pi-04"
    assert wire.global_topic("fed-1") == "fftmoe/fed-1/global"
    assert wire.parse_topic("fftmoe/fed-1/up/pi-04/7") == ("up", "fed-1", "pi-04", 7, None)
    assert wire.parse_topic("fftmoe/f/up/d/none") == ("up", "f", "d", None, None)
    assert wire.parse_topic("fftmoe/f/presence/d.x_1") == ("presence", "f", "d.x_1", None, None)
    assert wire.parse_topic("fftmoe/f/task/d") == ("task", "f", "d", None, None)
    assert wire.parse_topic("fftmoe/f/global") == ("global", "f", None, None, None)
    assert all(q == 1 for q in (wire.QOS_UPLOAD, wire.QOS_PRESENCE, wire.QOS_TASK, wire.QOS_GLOBAL, wire.QOS_WORKER))


def test_upload_lanes_and_worker_topics():
    assert wire.upload_topic("f", "pi-04", 7, "agg-1") == "fftmoe/f/up/pi-04/7/agg-1"
    assert wire.parse_topic("fftmoe/f/up/pi-04/7/agg-1") == ("up", "f", "pi-04", 7, "agg-1")
    assert wire.upload_subscription("f", "agg-1") == "fftmoe/f/up/+/+/agg-1"
    assert wire.worker_topic("f", "agg-1", "in") == "fftmoe/f/worker/agg-1/in"
    assert wire.parse_topic("fftmoe/f/worker/agg-1/out") == ("worker-out", "f", "agg-1", None, None)
    assert wire.worker_subscription("f") == "fftmoe/f/worker/+/out"
    for bad in ("fftmoe/f/worker/agg-1/sideways", "fftmoe/f/worker/agg-1", "fftmoe/f/up/d/7/a b",
                "fftmoe/f/up/d/7/a/b"):
        with pytest.raises(TopicError):
            wire.parse_topic(bad)
    with pytest.raises(TopicError, match="direction"):
        wire.worker_topic("f", "agg-1", "up")


@pytest.mark.parametrize("topic", [
    "", "fftmoe", "fftmoe/f", "other/f/global", "fftmoe/f/global/x", "fftmoe/f/up/d",
    "fftmoe/f/up/d/-1", "fftmoe/f/up/d/07", "fftmoe/f/up/d/1x", "fftmoe/f/up/d/99999999999",
    "fftmoe/f/up/+/+", "fftmoe/f/task/#", "fftmoe//global", "fftmoe/f/task/", "fftmoe/f/nope/d",
    "fftmoe/f/presence/d/extra", "/fftmoe/f/global", "fftmoe/" + "x" * 65 + "/global",
])
def test_parse_topic_rejects(topic):
    with pytest.raises(TopicError):
        wire.parse_topic(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+", "x" * 65, "spa ce", "é", None, 3])
def test_id_validation(bad):
    with pytest.raises(TopicError):
        wire.validate_id(bad)
    with pytest.raises(TopicError):
        wire.task_topic("fed", bad)
    with pytest.raises(TopicError):
        wire.global_topic(bad)
    with pytest.raises(MalformedMessage):
        Presence(bad, True, 1.0)
    assert wire.validate_id("A-z_0.9" + "x" * 57) == "A-z_0.9" + "x" * 57


def test_round_validation_in_topic():
    for bad in (-1, True, 1.0, 2**31):
        with pytest.raises(TopicError):
            wire.upload_topic("f", "d", bad)


def natural_topic(msg):
    if isinstance(msg, (Update, ErrorReply)):
        return wire.upload_topic("fed-1", msg.device_id, msg.round)
    if isinstance(msg, (Hello, Presence)):
        return wire.presence_topic("fed-1", msg.device_id)
    if isinstance(msg, RoundTask):
        return wire.task_topic(msg.federation, msg.device_id)
    return wire.global_topic("fed-1")


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.kind)
def test_check_origin_accepts_natural_topic(msg):
    topic = natural_topic(msg)
    assert wire.check_origin(msg, topic) == wire.parse_topic(topic)


def test_check_origin_rejects_spoofing():
    upd = make_update(device_id="pi-04", round=7)
    with pytest.raises(MalformedMessage, match="device"):
        wire.check_origin(upd, wire.upload_topic("fed-1", "pi-05", 7))
    with pytest.raises(MalformedMessage, match="round"):
        wire.check_origin(upd, wire.upload_topic("fed-1", "pi-04", 8))
    with pytest.raises(MalformedMessage):
        wire.check_origin(upd, wire.presence_topic("fed-1", "pi-04"))
    with pytest.raises(MalformedMessage, match="federation"):
        wire.check_origin(make_task(), wire.task_topic("fed-2", "pi-04"))
