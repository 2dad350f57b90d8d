"""The wire messages: eleven frozen dataclasses, the `Message` union and `check_origin`.

Six are the device protocol (Hello, Presence, RoundTask, GlobalState, Update, ErrorReply); five
are between the coordinator and its aggregator workers when aggregation is sharded (WorkerStatus,
WorkerPlan, WorkerClose, WorkerReceipt, WorkerPartial; broker_server/workers.py).

Each message validates every field on construction (by the rules in `fields`), so a message
that exists is a valid one, whether built by the sender or decoded from bytes. Messages compare
equal field by field, arrays included (same dtype and values). `check_origin` binds a decoded
message to the topic it arrived on. This module does not turn messages into bytes (that is
`codec`) and does not split or reassemble payloads (that is `chunks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .errors import MalformedMessage
from .fields import _RULES, ErrorCode
from .topics import Topic, parse_topic


class _Message:
    """Shared behaviour: validation by _RULES in __post_init__, equality that understands arrays.

    Messages are unhashable (they hold dicts); two messages are equal when every field is, arrays
    included, with the same dtype.
    """

    kind: ClassVar[str]
    kind_code: ClassVar[int]  # on the wire
    _nullable: ClassVar[tuple[str, ...]] = ()
    _int_tensors: ClassVar[bool] = False  # params are int64 sums (WorkerPartial), not float arrays

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in self._nullable:
                rule = _RULES["partial_sums" if f.name == "params" and self._int_tensors else f.name]
                object.__setattr__(self, f.name, rule(f.name, value))
        self._check_together()

    def _check_together(self) -> None:
        """Rules that relate several fields (none by default)."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = None  # type: ignore[assignment]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@dataclass(frozen=True, eq=False)
class Hello(_Message):
    """A device (re)joins: its hardware profile, its tier and the last round it saw (None: never)."""

    kind, kind_code, _nullable = "hello", 1, ("last_round_seen",)
    device_id: str
    profile: str
    tier: str
    last_round_seen: int | None = None
    runtime: dict[str, str] = field(default_factory=dict)  # e.g. {"onnxruntime": "1.19.2"}


@dataclass(frozen=True, eq=False)
class Presence(_Message):
    """Heartbeat (online=True) or the MQTT last will (online=False); timestamp is sender wall time."""

    kind, kind_code = "presence", 2
    device_id: str
    online: bool
    timestamp: float


@dataclass(frozen=True, eq=False)
class RoundTask(_Message):
    """The aggregator's order to one device for one round, with the global arrays of its slots.

    slot_map: adapted layer name -> global expert index held in each local slot. het_target uses the
    same layers and slot order (it may be empty when lambda_het is 0). params are the global arrays
    the device starts from, under the names the exported graph uses. upload_dtype is what the
    device should encode its Update with. logit_prior scales the device's own label prior in its
    training loss and own_labels_only keeps the head rows of labels it lacks (`trainer.LossInputs`);
    neither sends the device's label counts anywhere. report_label_counts asks for them in the
    Update, for a server that weights each head row by the device's samples of its label.
    """

    kind, kind_code = "round_task", 3
    federation: str
    round: int
    device_id: str
    tier: str
    slot_map: dict[str, list[int]]
    lambda_bal: float
    lambda_het: float
    het_target: dict[str, list[float]]
    local_steps: int
    learning_rate: float
    deadline_s: float
    upload_dtype: str  # "float32" | "float16"
    params: dict[str, np.ndarray]
    upload_lane: str = ""  # the aggregator worker to upload to (sharded aggregation); "" = the server
    logit_prior: float = 0.0  # tau: train with tau * log p_local(y) added to the logits (1.2; 0 = plain CE)
    own_labels_only: bool = False  # update only the head rows of labels the device has samples of (1.2)
    report_label_counts: bool = False  # send Update.label_counts (1.3)

    def _check_together(self) -> None:
        shape = {layer: len(slots) for layer, slots in self.slot_map.items()}
        if self.het_target and {k: len(v) for k, v in self.het_target.items()} != shape:
            raise MalformedMessage("het_target must be empty or have slot_map's layers and slot counts")


@dataclass(frozen=True, eq=False)
class GlobalState(_Message):
    """Broadcast: the current round and the global usage share of every expert, per adapted layer."""

    kind, kind_code = "global_state", 4
    round: int
    expert_usage: dict[str, list[float]]  # layer -> usage per global expert index
    note: str = ""  # ROLL_CALL asks every device to answer with a Hello


# GlobalState.note of the server's roll call: after a restart its registry is empty while devices
# are still connected, so it asks them to announce themselves again.
ROLL_CALL = "announce"


@dataclass(frozen=True, eq=False)
class Update(_Message):
    """A device's trained arrays for one round, with the statistics the aggregator weights by.

    expert_tokens: layer -> tokens routed to each local slot, in the order of the task's slot_map.
    metrics: e.g. loss, accuracy, train_seconds. label_counts: the device's training samples per label
    (head row), summing to num_samples; empty unless the task asked (RoundTask.report_label_counts).
    """

    kind, kind_code = "update", 5
    device_id: str
    round: int
    tier: str
    params: dict[str, np.ndarray]
    expert_tokens: dict[str, list[int]]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    label_counts: list[int] = field(default_factory=list)  # (1.3)


@dataclass(frozen=True, eq=False)
class ErrorReply(_Message):
    """A device's answer when it cannot produce an Update; round is None if the task was unreadable."""

    kind, kind_code, _nullable = "error_reply", 6, ("round",)
    device_id: str
    round: int | None
    code: ErrorCode
    message: str = ""


# -- sharded aggregation: coordinator <-> aggregator workers -------------------------------------
@dataclass(frozen=True, eq=False)
class WorkerStatus(_Message):
    """An aggregator worker is up (online, sent on connect) or gone (offline: its MQTT last will)."""

    kind, kind_code = "worker_status", 7
    worker_id: str
    online: bool


@dataclass(frozen=True, eq=False)
class WorkerPlan(_Message):
    """The devices one worker aggregates in one round: tiers and slot maps by device (their tasks'),
    the aggregation settings to fold with, and the round's global arrays. A later plan of the same
    round adds devices (taken over from a failed worker) and carries no arrays."""

    kind, kind_code = "worker_plan", 8
    worker_id: str
    round: int
    session: str  # the coordinator's run and attempt: a plan of a new session starts from zero
    tiers: dict[str, str]
    slot_maps: dict[str, dict[str, list[int]]]
    settings: dict[str, str]
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class WorkerClose(_Message):
    """The coordinator closes the round: the worker stops folding and sends its WorkerPartial."""

    kind, kind_code = "worker_close", 9
    worker_id: str
    round: int
    session: str


@dataclass(frozen=True, eq=False)
class WorkerReceipt(_Message):
    """A worker received a device's answer: folded (ok) or rejected / failed (reason), with what the
    coordinator records per device (bytes, routed tokens per local slot, the device's metrics)."""

    kind, kind_code = "worker_receipt", 10
    worker_id: str
    device_id: str
    round: int
    session: str
    ok: bool
    reason: str = ""
    bytes_in: int = 0
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class WorkerPartial(_Message):
    """A worker's share of a closed round: the exact int64 sums by array name (params) and the
    counts beside them (broker_server/aggregation.py RoundPartial), with the devices they hold."""

    kind, kind_code, _int_tensors = "worker_partial", 11, True
    worker_id: str
    round: int
    session: str
    devices: list[str]
    den: dict[str, list[float]]
    tokens: dict[str, list[float]]
    head_den: list[float]  # weight per head row (1.2: one number for every row; still read)
    samples: int
    bytes_folded: int
    clipped: int
    norms: list[float]
    params: dict[str, np.ndarray] = field(default_factory=dict)


Message = (Hello | Presence | RoundTask | GlobalState | Update | ErrorReply
           | WorkerStatus | WorkerPlan | WorkerClose | WorkerReceipt | WorkerPartial)
_CLASSES: dict[int, type] = {c.kind_code: c for c in (Hello, Presence, RoundTask, GlobalState, Update, ErrorReply,
                                                      WorkerStatus, WorkerPlan, WorkerClose, WorkerReceipt,
                                                      WorkerPartial)}
_TOPIC_KIND = {Hello: "presence", Presence: "presence", RoundTask: "task", GlobalState: "global",
               Update: "up", ErrorReply: "up", WorkerPlan: "worker-in", WorkerClose: "worker-in",
               WorkerStatus: "worker-out", WorkerReceipt: "worker-out", WorkerPartial: "worker-out"}


def check_origin(message: Message, topic: str) -> Topic:
    """Raise MalformedMessage unless `message` belongs on `topic` (same kind, device and round).

    The broker ACL binds a topic to a device; this binds the payload to the topic, so a device
    cannot upload in another device's name.
    """
    t = parse_topic(topic)
    if _TOPIC_KIND.get(type(message)) != t.kind:
        raise MalformedMessage(f"{getattr(message, 'kind', type(message).__name__)} message on a {t.kind} topic")
    if t.device_id is not None:  # the topic names its sender: a device, or a worker on worker topics
        worker = t.kind.startswith("worker")
        sender = message.worker_id if worker else message.device_id
        if sender != t.device_id:
            raise MalformedMessage(f"message of {'worker' if worker else 'device'} {sender!r} on the topic of "
                                   f"{t.device_id!r}")
    if t.kind == "up" and message.round != t.round:
        raise MalformedMessage(f"message for round {message.round} on the topic of round {t.round}")
    if isinstance(message, RoundTask) and message.federation != t.federation:
        raise MalformedMessage(f"task of federation {message.federation!r} on {t.federation!r}")
    return t

