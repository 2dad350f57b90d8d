"""The wire messages: six frozen dataclasses, the `Message` union and `check_origin`.

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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in self._nullable:
                object.__setattr__(self, f.name, _RULES[f.name](f.name, value))
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
    device should encode its Update with.
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
    metrics: e.g. loss, accuracy, train_seconds.
    """

    kind, kind_code = "update", 5
    device_id: str
    round: int
    tier: str
    params: dict[str, np.ndarray]
    expert_tokens: dict[str, list[int]]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ErrorReply(_Message):
    """A device's answer when it cannot produce an Update; round is None if the task was unreadable."""

    kind, kind_code, _nullable = "error_reply", 6, ("round",)
    device_id: str
    round: int | None
    code: ErrorCode
    message: str = ""


Message = Hello | Presence | RoundTask | GlobalState | Update | ErrorReply
_CLASSES: dict[int, type] = {c.kind_code: c for c in (Hello, Presence, RoundTask, GlobalState, Update, ErrorReply)}
_TOPIC_KIND = {Hello: "presence", Presence: "presence", RoundTask: "task", GlobalState: "global",
               Update: "up", ErrorReply: "up"}


def check_origin(message: Message, topic: str) -> Topic:
    """Raise MalformedMessage unless `message` belongs on `topic` (same kind, device and round).

    The broker ACL binds a topic to a device; this binds the payload to the topic, so a device
    cannot upload in another device's name.
    """
    t = parse_topic(topic)
    if _TOPIC_KIND.get(type(message)) != t.kind:
        raise MalformedMessage(f"{getattr(message, 'kind', type(message).__name__)} message on a {t.kind} topic")
    if t.device_id is not None and message.device_id != t.device_id:
        raise MalformedMessage(f"message of device {message.device_id!r} on the topic of {t.device_id!r}")
    if t.kind == "up" and message.round != t.round:
        raise MalformedMessage(f"message for round {message.round} on the topic of round {t.round}")
    if isinstance(message, RoundTask) and message.federation != t.federation:
        raise MalformedMessage(f"task of federation {message.federation!r} on {t.federation!r}")
    return t

