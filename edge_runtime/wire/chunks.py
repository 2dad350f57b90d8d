"""Chunk framing: one body <-> MQTT payloads of bounded size, and the `Reassembler` that joins them.

Each payload is a 68-byte frame header (magic, schema version, message id, chunk index and count,
body length, sha256 of the whole body) followed by a slice of the body, so a message of several
MB passes brokers with small packet limits. `encode` / `decode_single` are the one-call entry
points; `Reassembler` collects chunks per (source, message id) with bounded memory, expiry and
duplicate suppression for QoS 1 redeliveries. This module does not look inside a body (that is
`codec`) and does not talk to MQTT (no paho here).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .codec import decode_body, encode_body
from .errors import (
    DEFAULT_CHUNK_SIZE, DEFAULT_MAX_MESSAGE_BYTES, SCHEMA_VERSION, ChecksumError, MalformedMessage,
    PayloadTooLarge, _check_version,
)
from .messages import Message

CHUNK_MAGIC = b"FMOC"
_FRAME = struct.Struct("<4sHH16sIII32s")  # magic, major, minor, id, index, count, total, sha256
FRAME_HEADER_SIZE = _FRAME.size  # 68


class _Frame(NamedTuple):
    message_id: bytes
    index: int
    count: int
    total: int
    digest: bytes
    data: bytes | memoryview  # read-only


def chunk_body(body: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE, message_id: bytes | None = None,
               max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """Split a body into framed MQTT payloads of at most `chunk_size` bytes each, frame included."""
    if chunk_size <= FRAME_HEADER_SIZE:
        raise ValueError(f"chunk_size must exceed the {FRAME_HEADER_SIZE}-byte frame header")
    if len(body) > min(max_message_bytes, 0xFFFFFFFF):
        raise PayloadTooLarge(f"message is {len(body)} bytes encoded, over the limit of {max_message_bytes} bytes")
    if message_id is None:
        message_id = os.urandom(16)
    if not isinstance(message_id, bytes) or len(message_id) != 16:
        raise ValueError("message_id must be 16 bytes")
    step = chunk_size - FRAME_HEADER_SIZE
    count = max(1, -(-len(body) // step))
    digest = hashlib.sha256(body).digest()
    return [_FRAME.pack(CHUNK_MAGIC, *SCHEMA_VERSION, message_id, i, count, len(body), digest)
            + body[i * step:(i + 1) * step] for i in range(count)]


def encode(message: Message, *, chunk_size: int = DEFAULT_CHUNK_SIZE, dtype: str | None = None,
           max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, message_id: bytes | None = None) -> list[bytes]:
    """Encode `message` into MQTT payloads. Raises PayloadTooLarge before anything is sent."""
    body = encode_body(message, dtype=dtype)
    if len(body) > max_message_bytes:
        raise PayloadTooLarge(f"{message.kind} message is {len(body)} bytes encoded, "
                              f"over the limit of {max_message_bytes} bytes")
    return chunk_body(body, chunk_size=chunk_size, message_id=message_id, max_message_bytes=max_message_bytes)


def _parse_frame(payload: bytes) -> _Frame:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) <= FRAME_HEADER_SIZE:
        raise MalformedMessage(f"chunk truncated ({len(payload)} bytes)")
    magic, major, minor, mid, index, count, total, digest = _FRAME.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise MalformedMessage(f"bad chunk magic {magic!r}")
    _check_version(major, minor)
    # a view when the payload is immutable bytes (what MQTT clients hand over): no copy of the body here,
    # the decoder copies each tensor out of it anyway; a mutable buffer is copied as before
    data = memoryview(payload)[FRAME_HEADER_SIZE:] if isinstance(payload, bytes) else bytes(payload[FRAME_HEADER_SIZE:])
    if not index < count <= total or len(data) > total:  # every chunk carries at least one byte
        raise MalformedMessage(f"inconsistent chunk frame (index {index}, count {count}, total {total})")
    return _Frame(mid, index, count, total, digest, data)


def _finish(body: bytes, frame: _Frame) -> bytes:
    if len(body) != frame.total:
        raise MalformedMessage(f"reassembled {len(body)} bytes, frame says {frame.total}")
    if hashlib.sha256(body).digest() != frame.digest:
        raise ChecksumError("sha256 of the reassembled message does not match its chunks")
    return body


def decode_single(payload: bytes) -> Message:
    """Decode a message that fits in one chunk (no reassembly state, no duplicate suppression)."""
    frame = _parse_frame(payload)
    if frame.count != 1:
        raise MalformedMessage(f"decode_single got chunk {frame.index} of {frame.count}; use a Reassembler")
    return decode_body(_finish(frame.data, frame))


@dataclass
class _Pending:
    created: float
    frame: _Frame  # the first chunk seen; later chunks must agree with its count/total/digest
    chunks: dict[int, bytes] = field(default_factory=dict)
    data_bytes: int = 0
    cost: int = 0  # what it counts against max_pending_bytes: data plus one frame header per chunk


class Reassembler:
    """Collects chunks per (source, message id) and returns each completed message once.

    `source` should be the device id taken from the topic, so one device cannot complete, evict
    or spoof another's messages. Memory is bounded: at most `max_pending_messages` incomplete
    messages (`max_pending_per_source` per source) holding at most `max_pending_bytes`, each
    expiring `ttl_s` after its first chunk; the oldest are evicted to make room. Ids of completed
    messages are remembered for `ttl_s` so QoS 1 redeliveries are not returned twice.
    """

    def __init__(self, *, max_pending_messages: int = 64, max_pending_bytes: int = 128 * 1024 * 1024,
                 max_pending_per_source: int = 4, ttl_s: float = 300.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_completed: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self._max_messages, self._max_bytes = max_pending_messages, max_pending_bytes
        self._max_per_source, self._ttl, self._clock = max_pending_per_source, ttl_s, clock
        self._max_message, self._max_completed = max_message_bytes, max_completed
        self._pending: OrderedDict[tuple[str, bytes], _Pending] = OrderedDict()  # oldest first
        self._completed: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._bytes = 0

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def expire(self) -> None:
        """Drop incomplete messages and remembered ids older than ttl_s (add() does this too)."""
        limit = self._clock() - self._ttl
        while self._pending and next(iter(self._pending.values())).created <= limit:
            self._drop(next(iter(self._pending)))
        while self._completed and next(iter(self._completed.values())) <= limit:
            self._completed.popitem(last=False)

    def add(self, chunk: bytes, source: str) -> Message | None:
        """Feed one MQTT payload; returns the message when its last chunk arrives, else None."""
        frame = _parse_frame(chunk)
        self.expire()
        key = (source, frame.message_id)
        if key in self._completed:
            return None  # redelivery of a message already returned
        if frame.total > self._max_message or frame.total + frame.count * FRAME_HEADER_SIZE > self._max_bytes:
            raise PayloadTooLarge(f"chunk announces a {frame.total}-byte message, over the limit")
        pending = self._pending.get(key)
        if pending is None:
            if frame.count == 1:
                return self._complete(key, frame.data, frame)
            self._make_room(source)
            pending = self._pending[key] = _Pending(self._clock(), frame)
        first = pending.frame
        if (frame.count, frame.total, frame.digest) != (first.count, first.total, first.digest):
            self._drop(key)
            raise MalformedMessage("chunks of one message disagree on count, length or sha256")
        if frame.index in pending.chunks:
            return None  # duplicate chunk
        if pending.data_bytes + len(frame.data) > frame.total:
            self._drop(key)
            raise MalformedMessage("chunks carry more bytes than the message length")
        cost = len(frame.data) + FRAME_HEADER_SIZE
        while self._bytes + cost > self._max_bytes:
            self._drop(next(k for k in self._pending if k != key))
        pending.chunks[frame.index] = frame.data
        pending.data_bytes += len(frame.data)
        pending.cost += cost
        self._bytes += cost
        if len(pending.chunks) < frame.count:
            return None
        self._drop(key)
        return self._complete(key, b"".join(pending.chunks[i] for i in range(frame.count)), frame)

    def _complete(self, key: tuple[str, bytes], body: bytes, frame: _Frame) -> Message:
        _finish(body, frame)
        self._completed[key] = self._clock()
        while len(self._completed) > self._max_completed:
            self._completed.popitem(last=False)
        return decode_body(body)

    def _make_room(self, source: str) -> None:
        mine = [k for k in self._pending if k[0] == source]
        if len(mine) >= self._max_per_source:
            self._drop(mine[0])
        while len(self._pending) >= self._max_messages:
            self._drop(next(iter(self._pending)))

    def _drop(self, key: tuple[str, bytes]) -> None:
        self._bytes -= self._pending.pop(key).cost
