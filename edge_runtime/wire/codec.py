"""The message body codec: one message <-> one body of bytes (prefix, JSON header, raw tensors).

`encode_body` writes the 14-byte prefix (magic, schema version, kind code, header length), the
deterministic JSON header (small fields plus the tensor table) and the arrays packed back to back;
`decode_body` reads it back, refusing anything malformed with a WireError subclass and never
using pickle or eval. Arrays come back as fresh native-order copies. This module knows nothing of
chunk frames, message ids or reassembly (that is `chunks`), nor of topics.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from typing import Any

import numpy as np

from .errors import (
    _DTYPES, _MAX_HEADER_BYTES, _TENSOR_DTYPES, _MAX_ITEMS, _MAX_NDIM, SCHEMA_VERSION, MalformedMessage, WireError,
    _check_version,
)
from .fields import ErrorCode, _v_str
from .messages import _CLASSES, _TOPIC_KIND, ErrorReply, Message

MESSAGE_MAGIC = b"FMOM"
_PREFIX = struct.Struct("<4sHHHI")  # magic, major, minor, kind code, JSON header length


def encode_body(message: Message, *, dtype: str | None = None) -> bytes:
    """Encode one message as a body (no chunk frame). `dtype` converts every tensor (e.g. "float16")."""
    if type(message) not in _TOPIC_KIND:
        raise TypeError(f"not a wire message: {type(message).__name__}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be None or one of {sorted(_DTYPES)}, got {dtype!r}")
    fields: dict[str, Any] = {}
    table, blobs, offset = [], [], 0
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name != "params":
            fields[f.name] = value.name if isinstance(value, enum.Enum) else value
            continue
        for name, array in value.items():
            wire_name = dtype or array.dtype.name
            with np.errstate(over="ignore"):  # overflow is checked just below, with the name
                data = np.asarray(array, dtype=_TENSOR_DTYPES[wire_name])
            if wire_name != array.dtype.name and data.dtype.kind == "f" and not np.isfinite(data).all():
                raise MalformedMessage(f"tensor {name!r} overflows {wire_name}")
            blob = data.tobytes(order="C")
            table.append({"name": name, "dtype": wire_name, "shape": list(data.shape),
                          "offset": offset, "nbytes": len(blob)})
            blobs.append(blob)
            offset += len(blob)
    header = json.dumps({"fields": fields, "tensors": table}, sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False, allow_nan=False).encode("utf-8")
    return _PREFIX.pack(MESSAGE_MAGIC, *SCHEMA_VERSION, message.kind_code, len(header)) + header + b"".join(blobs)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # json.loads would silently keep the last one
            raise MalformedMessage(f"duplicate JSON key {k!r:.40}")
        out[k] = v
    return out


def _no_constant(name: str) -> None:
    raise MalformedMessage(f"non-finite number {name} in header")


def _decode_tensors(table: Any, section: memoryview) -> dict[str, np.ndarray]:
    if not isinstance(table, list) or len(table) > _MAX_ITEMS:
        raise MalformedMessage("tensor table must be a list")
    out: dict[str, np.ndarray] = {}
    expected = 0
    for entry in table:
        if not isinstance(entry, dict):
            raise MalformedMessage("tensor table entry must be an object")
        name, dt, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        offset, nbytes = entry.get("offset"), entry.get("nbytes")
        _v_str("tensor name", name, 512, empty=False)
        if name in out:
            raise MalformedMessage(f"duplicate tensor {name!r}")
        if not isinstance(dt, str) or dt not in _TENSOR_DTYPES:
            raise MalformedMessage(f"tensor {name!r}: unknown dtype {dt!r:.40}")
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or any(type(d) is not int or d < 0 for d in shape)):
            raise MalformedMessage(f"tensor {name!r}: bad shape {shape!r:.80}")
        count = math.prod(shape)
        # Tensors must be packed back to back: no gaps, overlaps or bytes outside the section.
        if (type(offset) is not int or type(nbytes) is not int or offset != expected
                or nbytes != count * _TENSOR_DTYPES[dt].itemsize or expected + nbytes > len(section)):
            raise MalformedMessage(f"tensor {name!r}: offset/nbytes do not match shape or buffer")
        flat = np.frombuffer(section, dtype=_TENSOR_DTYPES[dt], count=count, offset=offset)
        out[name] = flat.astype(np.dtype(dt)).reshape(shape)  # a native-order copy, never a view
        expected += nbytes
    if expected != len(section):
        raise MalformedMessage(f"{len(section) - expected} stray bytes after the tensors")
    return out


def decode_body(body: bytes) -> Message:
    """Decode a body produced by `encode_body`; raises a WireError subclass on anything else.

    Arrays come back in the dtype they were sent in, as fresh native-order copies the caller owns.
    """
    if not (isinstance(body, bytes) or isinstance(body, memoryview) and body.readonly and body.format == "B"
            and body.ndim == 1):
        body = bytes(body)  # nothing read below may change under us
    if len(body) < _PREFIX.size:
        raise MalformedMessage(f"body truncated ({len(body)} bytes)")
    magic, major, minor, code, hlen = _PREFIX.unpack_from(body)
    if magic != MESSAGE_MAGIC:
        raise MalformedMessage(f"bad body magic {magic!r}")
    _check_version(major, minor)
    cls = _CLASSES.get(code)
    if cls is None:
        raise MalformedMessage(f"unknown message kind code {code}")
    if hlen > min(_MAX_HEADER_BYTES, len(body) - _PREFIX.size):
        raise MalformedMessage(f"header length {hlen} exceeds the body")
    try:
        header = json.loads(str(body[_PREFIX.size:_PREFIX.size + hlen], "utf-8"),
                            object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # includes JSON, UTF-8 and int-size errors
        if isinstance(exc, WireError):
            raise
        raise MalformedMessage(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("fields"), dict):
        raise MalformedMessage("header must be an object with a 'fields' object")
    params = _decode_tensors(header.get("tensors"), memoryview(body)[_PREFIX.size + hlen:])
    fields, kwargs = header["fields"], {}
    for f in dataclasses.fields(cls):
        if f.name == "params":
            kwargs["params"] = params
        elif f.name in fields:
            kwargs[f.name] = fields[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MalformedMessage(f"{cls.kind}: missing field {f.name!r}")
    if params and "params" not in kwargs:
        raise MalformedMessage(f"{cls.kind} carries no tensors")
    if cls is ErrorReply and isinstance(kwargs["code"], str) and kwargs["code"] not in ErrorCode.__members__:
        # A newer minor may add codes; keep the information in the text rather than failing.
        kwargs["message"] = f"[{kwargs['code']:.64}] {kwargs.get('message', '')}"
        kwargs["code"] = ErrorCode.INTERNAL
    try:
        return cls(**kwargs)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessage(f"{cls.kind}: {exc}") from None

