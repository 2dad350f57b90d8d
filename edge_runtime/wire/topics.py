"""MQTT topics of the wire protocol: id validation, the topic builders, `parse_topic` and the QoS.

Every fftmoe topic string is built or parsed here, and nowhere else:
    fftmoe/{fed}/up/{device}/{round}   device -> server: Update or ErrorReply ("none" = round unknown)
    fftmoe/{fed}/up/{device}/{round}/{worker}  the same, to the aggregator worker the task named
                                       (RoundTask.upload_lane; sharded aggregation)
    fftmoe/{fed}/presence/{device}     device -> server: Hello, Presence (heartbeat and last will)
    fftmoe/{fed}/task/{device}         server -> device: RoundTask
    fftmoe/{fed}/global                server -> all:    GlobalState
    fftmoe/{fed}/worker/{worker}/in    coordinator -> aggregator worker: WorkerPlan, WorkerClose
    fftmoe/{fed}/worker/{worker}/out   worker -> coordinator: WorkerStatus (also its last will),
                                       WorkerReceipt, WorkerPartial (one topic per direction, so MQTT
                                       keeps each worker's messages in order)
The device id sits at a fixed level of every per-device topic, so a broker ACL can grant a device
exactly its own topics; `fftmoe fleet` writes one explicit mosquitto `user` block per device
(broker_server/fleet.py explains why not `pattern` lines); only the aggregator's user may write
task/ and global. This module
knows topics only: it does not look at payloads (binding a payload to its topic is
`messages.check_origin`) and it does not subscribe or publish (no MQTT client here).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from .errors import MAX_ROUND, TopicError, WireError

# QoS 1 (at least once) everywhere. QoS 0 may silently drop one chunk, which loses a whole update;
# QoS 2 costs a four-packet handshake per chunk on slow device links and still is not end-to-end
# exactly-once across reconnects. Duplicates are harmless: the Reassembler drops repeated chunks
# and repeated completed messages, and the aggregator keys updates by (device, round).
QOS_UPLOAD = QOS_PRESENCE = QOS_TASK = QOS_GLOBAL = QOS_WORKER = 1

TOPIC_ROOT = "fftmoe"
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ROUND_RE = re.compile(r"0|[1-9][0-9]{0,9}")
_NO_ROUND = "none"


class Topic(NamedTuple):
    kind: str  # "up" | "presence" | "task" | "global" | "worker-in" | "worker-out"
    federation: str
    device_id: str | None  # the device, or the worker on worker topics
    round: int | None
    lane: str | None = None  # the aggregator worker an upload is addressed to


def validate_id(value: Any, what: str = "id", error: type[WireError] = TopicError) -> str:
    """Return `value` if it is a valid federation or device id, else raise `error`."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise error(f"invalid {what} {value!r:.80}: must match [A-Za-z0-9_.-]{{1,64}}")
    return value


def upload_topic(federation: str, device_id: str, round: int | None, lane: str | None = None) -> str:
    """Where a device publishes its Update or ErrorReply for `round` (None: round unknown); `lane`
    names the aggregator worker its task assigned it to (sharded aggregation), None the server."""
    if round is None:
        segment = _NO_ROUND
    elif isinstance(round, int) and not isinstance(round, bool) and 0 <= round <= MAX_ROUND:
        segment = str(round)
    else:
        raise TopicError(f"invalid round {round!r}")
    topic = f"{_base(federation)}/up/{validate_id(device_id, 'device id')}/{segment}"
    return topic if lane is None else f"{topic}/{validate_id(lane, 'upload lane')}"


def upload_subscription(federation: str, lane: str | None = None) -> str:
    """The server's subscription to every device's uploads, or a worker's to those of its lane."""
    return f"{_base(federation)}/up/+/+" + ("" if lane is None else f"/{validate_id(lane, 'upload lane')}")


def worker_topic(federation: str, worker_id: str, direction: str) -> str:
    """A worker's inbound ("in": from the coordinator) or outbound ("out") topic."""
    if direction not in ("in", "out"):
        raise TopicError(f"worker topic direction must be 'in' or 'out', got {direction!r}")
    return f"{_base(federation)}/worker/{validate_id(worker_id, 'worker id')}/{direction}"


def worker_subscription(federation: str) -> str:
    """The coordinator's subscription to every worker's outbound messages."""
    return f"{_base(federation)}/worker/+/out"


def presence_topic(federation: str, device_id: str) -> str:
    """Where a device publishes Hello, heartbeats and (as MQTT last will) its offline Presence."""
    return f"{_base(federation)}/presence/{validate_id(device_id, 'device id')}"


def presence_subscription(federation: str) -> str:
    """The server's subscription to every device's presence messages."""
    return f"{_base(federation)}/presence/+"


def task_topic(federation: str, device_id: str) -> str:
    """Where the aggregator publishes a device's RoundTask (the device subscribes to its own)."""
    return f"{_base(federation)}/task/{validate_id(device_id, 'device id')}"


def global_topic(federation: str) -> str:
    """The aggregator's broadcast topic (GlobalState)."""
    return f"{_base(federation)}/global"


def _base(federation: str) -> str:
    return f"{TOPIC_ROOT}/{validate_id(federation, 'federation')}"


def parse_topic(topic: str) -> Topic:
    """Inverse of the topic builders; raises TopicError for anything they cannot produce."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) >= 3 and parts[0] == TOPIC_ROOT:
        fed, kind, rest = validate_id(parts[1], "federation"), parts[2], parts[3:]
        if kind == "global" and not rest:
            return Topic(kind, fed, None, None)
        if kind in ("presence", "task") and len(rest) == 1:
            return Topic(kind, fed, validate_id(rest[0], "device id"), None)
        if kind == "worker" and len(rest) == 2 and rest[1] in ("in", "out"):
            return Topic(f"worker-{rest[1]}", fed, validate_id(rest[0], "worker id"), None)
        if kind == "up" and len(rest) in (2, 3):
            device = validate_id(rest[0], "device id")
            lane = validate_id(rest[2], "upload lane") if len(rest) == 3 else None
            if rest[1] == _NO_ROUND:
                return Topic(kind, fed, device, None, lane)
            if _ROUND_RE.fullmatch(rest[1]) and int(rest[1]) <= MAX_ROUND:
                return Topic(kind, fed, device, int(rest[1]), lane)
    raise TopicError(f"not an fftmoe topic: {topic!r}")
