"""The fftmoe wire protocol: everything that crosses MQTT between devices and the aggregator.

This package is the single definition of the topics, the messages (frozen dataclasses), their
binary encoding and the chunking that lets a message of several MB pass brokers with small packet
limits. Devices and the server both import it (as `from edge_runtime import wire`); no other file
formats a topic or parses a payload. Its parts import one way only:
errors <- topics <- fields <- messages <- codec <- chunks; this file only re-exports them.

It is not an MQTT client (no paho here), not the trainer and not the aggregator: it turns messages
into `list[bytes]` payloads and back, and raises a `WireError` subclass on anything it does not
accept. It imports only the standard library and numpy, and never uses pickle or eval, because the
aggregator decodes bytes that any device (or anyone holding a device's credentials) can send.

Topics (QoS 1 everywhere; see `topics`):
    fftmoe/{fed}/up/{device}/{round}   device -> server: Update or ErrorReply ("none" = round unknown)
    fftmoe/{fed}/presence/{device}     device -> server: Hello, Presence (heartbeat and last will)
    fftmoe/{fed}/task/{device}         server -> device: RoundTask
    fftmoe/{fed}/global                server -> all:    GlobalState
Message body (all integers little-endian):
    prefix  14 B   magic b"FMOM", schema major u16, minor u16, kind code u16, JSON length u32
    header  UTF-8 JSON {"fields": {...small fields...}, "tensors": [{name, dtype, shape, offset,
            nbytes}, ...]}, keys sorted, no whitespace, so the encoding is deterministic
    tensors the raw C-order little-endian arrays, packed back to back in table order
Chunk frame (one MQTT payload), 68 B header then a slice of the body:
    magic b"FMOC", major u16, minor u16, message id 16 B, chunk index u32, chunk count u32,
    body length u32, sha256 of the whole body 32 B
Compatibility: a different major is refused (`SchemaVersionError`); any minor is accepted, so a
minor bump may only add optional JSON fields (older readers ignore them), error codes (older
readers read them as INTERNAL) or message kinds on topics older peers do not subscribe to (1.1:
RoundTask.upload_lane and the aggregator-worker messages; 1.2: RoundTask.logit_prior and
own_labels_only). Any other change is a major bump. The golden digests in tests/test_wire.py pin
the bytes: if they change, so must SCHEMA_VERSION.
"""

from __future__ import annotations

from .chunks import CHUNK_MAGIC, FRAME_HEADER_SIZE, Reassembler, chunk_body, decode_single, encode
from .codec import MESSAGE_MAGIC, decode_body, encode_body
from .errors import (
    DEFAULT_CHUNK_SIZE, DEFAULT_MAX_MESSAGE_BYTES, MAX_ROUND, SCHEMA_VERSION, ChecksumError,
    MalformedMessage, PayloadTooLarge, SchemaVersionError, TopicError, WireError,
)
from .fields import ErrorCode
from .messages import (
    ROLL_CALL, ErrorReply, GlobalState, Hello, Message, Presence, RoundTask, Update, WorkerClose, WorkerPartial,
    WorkerPlan, WorkerReceipt, WorkerStatus, check_origin,
)
from .topics import (
    QOS_GLOBAL, QOS_PRESENCE, QOS_TASK, QOS_UPLOAD, QOS_WORKER, TOPIC_ROOT, Topic, global_topic, parse_topic,
    presence_subscription, presence_topic, task_topic, upload_subscription, upload_topic,
    validate_id, worker_subscription, worker_topic,
)

__all__ = [
    # errors, version and limits
    "SCHEMA_VERSION", "DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_MESSAGE_BYTES", "MAX_ROUND",
    "WireError", "MalformedMessage", "SchemaVersionError", "ChecksumError", "PayloadTooLarge",
    "TopicError",
    # topics
    "TOPIC_ROOT", "QOS_UPLOAD", "QOS_PRESENCE", "QOS_TASK", "QOS_GLOBAL", "Topic", "validate_id",
    "upload_topic", "upload_subscription", "presence_topic", "presence_subscription", "task_topic",
    "global_topic", "parse_topic", "QOS_WORKER", "worker_topic", "worker_subscription",
    # messages
    "ROLL_CALL", "ErrorCode", "Hello", "Presence", "RoundTask", "GlobalState", "Update", "ErrorReply", "Message",
    "WorkerStatus", "WorkerPlan", "WorkerClose", "WorkerReceipt", "WorkerPartial",
    "check_origin",
    # body codec
    "MESSAGE_MAGIC", "encode_body", "decode_body",
    # chunks
    "CHUNK_MAGIC", "FRAME_HEADER_SIZE", "chunk_body", "encode", "decode_single", "Reassembler",
]
