"""The wire protocol's error family, schema version and size limits: the leaf of `edge_runtime.wire`.

This module holds what every other part of the package refers to: `WireError` and its subclasses
(raised for any payload, topic or value the protocol rejects), `SCHEMA_VERSION` with the check
that refuses a foreign major, the wire dtypes and the bounds on chunk, message, header and
container sizes. It is not a codec and defines no topic or message; it imports nothing from the
package, only the standard library and numpy.
"""

from __future__ import annotations

import numpy as np

# (major, minor); 1.1: upload lanes and the aggregator-worker messages; 1.2: RoundTask.logit_prior and
# own_labels_only; 1.3: RoundTask.report_label_counts, Update.label_counts and per-row
# WorkerPartial.head_den (a 1.2 worker's single number is still read)
SCHEMA_VERSION = (1, 3)

DEFAULT_CHUNK_SIZE = 256 * 1024  # frame included; MQTT adds only the topic and a few bytes
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_ROUND = 2**31 - 1
_MAX_INT = 2**53  # JSON integers beyond this do not survive every JSON reader
_MAX_HEADER_BYTES = 1 << 20
_MAX_NDIM = 8
_MAX_ITEMS = 4096  # entries of any dict or list in the JSON header
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}  # wire name -> little-endian
# tensors may also be int64: a worker's exact partial sums (never a device's upload or an upload dtype)
_TENSOR_DTYPES = {**_DTYPES, "int64": np.dtype("<i8")}
_MAX_WORKER_ITEMS = 1 << 17  # devices (and norms) one worker may list for one round


class WireError(ValueError):
    """Base of every error about a payload, topic or message value this module rejects."""


class MalformedMessage(WireError):
    """The bytes or the field values do not form a valid message."""


class SchemaVersionError(WireError):
    """The payload was written with a schema major version this side does not speak."""


class ChecksumError(WireError):
    """The reassembled body does not match the sha256 carried by its chunks."""


class PayloadTooLarge(WireError):
    """A message is larger than the configured limit (refused before sending or buffering)."""


class TopicError(WireError):
    """A topic string or an id used in one is not valid."""


def _check_version(major: int, minor: int) -> None:
    if major != SCHEMA_VERSION[0]:
        raise SchemaVersionError(
            f"payload has schema {major}.{minor}, this side speaks {SCHEMA_VERSION[0]}.x")
