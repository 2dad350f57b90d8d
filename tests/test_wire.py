"""Tests of edge_runtime.wire: round trips, golden bytes, chunking, bounds and schema (topics: test_wire_topics)."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime import wire
from edge_runtime.wire import (
    ChecksumError, ErrorCode, ErrorReply, GlobalState, Hello, MalformedMessage, PayloadTooLarge,
    Presence, Reassembler, RoundTask, SchemaVersionError, Update, WireError,
)

FIXED_ID = bytes(range(16))


def params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "encoder.layer.0.fftmoe_adapter.w1": rng.standard_normal((2, 8, 4)).astype(dtype),
        "encoder.layer.0.fftmoe_adapter.b2": rng.standard_normal((2, 8)).astype(dtype),
        "fftmoe_head.bias": np.array(0.25, dtype=dtype),  # 0-d
        "empty": np.zeros((0, 3), dtype=dtype),
    }


def make_task(p=None, **over):
    kw = dict(federation="fed-1", round=7, device_id="pi-04", tier="small",
              slot_map={"layer.0": [3, 0], "layer.1": [5, 1]}, lambda_bal=0.01, lambda_het=0.1,
              het_target={"layer.0": [0.75, 0.25], "layer.1": [0.5, 0.5]}, local_steps=20,
              learning_rate=3e-4, deadline_s=120.0, upload_dtype="float16",
              params=params() if p is None else p)
    kw.update(over)
    return RoundTask(**kw)


def make_update(p=None, **over):
    kw = dict(device_id="pi-04", round=7, tier="small", params=params() if p is None else p,
              expert_tokens={"layer.0": [120, 8], "layer.1": [0, 128]}, num_samples=64,
              metrics={"loss": 0.6931, "accuracy": 0.5, "train_seconds": 12.25})
    kw.update(over)
    return Update(**kw)


MESSAGES = [
    Hello("pi-04", "rpi4-4gb", "small", None, {"onnxruntime": "1.19.2", "note": "Grüße ✓ 日本"}),
    Hello("jetson.1", "orin_nano", "large", 12, {}),
    Presence("pi-04", True, 1_700_000_000.5),
    Presence("pi-04", False, 0.0),
    make_task(),
    make_task(params(np.float16), het_target={}, lambda_het=0.0),
    make_task({}),
    GlobalState(7, {"layer.0": [0.1, 0.2, 0.7]}, "ünïcode note ✓"),
    GlobalState(0, {}),
    make_update(),
    make_update(params(np.float16), metrics={}),
    make_update({}, expert_tokens={}),
    ErrorReply("pi-04", 7, ErrorCode.OUT_OF_MEMORY, "CUDA: 内存不足"),
    ErrorReply("pi-04", None, ErrorCode.BAD_HASH, ""),
]


def roundtrip(msg, **kw):
    r = Reassembler()
    out = [r.add(c, "src") for c in wire.encode(msg, **kw)]
    assert all(o is None for o in out[:-1])
    return out[-1]


def make_body(kind_code, header, tensors=b"", major=1, minor=0, magic=b"FMOM"):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<4sHHHI", magic, major, minor, kind_code, len(raw)) + raw + tensors


def header_of(msg):
    body = wire.encode_body(msg)
    hlen = struct.unpack_from("<I", body, 10)[0]
    return json.loads(body[14:14 + hlen]), body[14 + hlen:]


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.kind)
def test_round_trip_every_message(msg):
    for chunk_size in (wire.DEFAULT_CHUNK_SIZE, 200):
        got = roundtrip(msg, chunk_size=chunk_size)
        assert type(got) is type(msg) and got == msg
    assert wire.decode_body(wire.encode_body(msg)) == msg


def test_equality_detects_differences():
    a = make_update()
    p = params()
    p["fftmoe_head.bias"] = np.array(0.5, np.float32)
    assert a != make_update(p)
    assert a != make_update(params(np.float16))  # same values, different dtype
    assert a != make_update(num_samples=65)


def test_float16_upload_conversion_and_decoded_dtype():
    msg = make_update()
    got = roundtrip(msg, dtype="float16")
    for name, a in msg.params.items():
        assert got.params[name].dtype == np.float16 and got.params[name].shape == a.shape
        np.testing.assert_allclose(got.params[name], a, rtol=1e-3, atol=1e-3)
    assert roundtrip(make_update(params(np.float16)), dtype="float32").params["empty"].dtype == np.float32
    big = make_update({"x": np.full(3, 1e6, np.float32)})
    with pytest.raises(MalformedMessage, match="overflows float16"):
        wire.encode(big, dtype="float16")


def test_decoded_arrays_do_not_alias():
    msg = make_update()
    body = wire.encode_body(msg)
    first = wire.decode_body(body)
    first.params["encoder.layer.0.fftmoe_adapter.w1"][...] = 0.0  # owned, writable copy
    again = wire.decode_body(body)
    assert again == msg and first != msg


def test_construction_validates():
    bad = [
        lambda: make_update(round=-1),
        lambda: make_update(num_samples=0),
        lambda: make_update(num_samples=True),
        lambda: make_update(metrics={"loss": float("nan")}),
        lambda: make_update(params={"x": np.array([np.inf], np.float32)}),
        lambda: make_update(params={"x": np.zeros(2, np.float64)}),
        lambda: make_update(device_id="a/b"),
        lambda: make_update(expert_tokens={"l": [-1]}),
        lambda: make_task(slot_map={"layer.0": [1, 1]}),
        lambda: make_task(het_target={"layer.0": [1.0]}),
        lambda: make_task(upload_dtype="bfloat16"),
        lambda: make_task(learning_rate=0.0),
        lambda: make_task(local_steps=0),
        lambda: Presence("d", "yes", 1.0),
        lambda: ErrorReply("d", 1, "NOT_A_CODE", ""),
        lambda: Hello("d", "p", "t", -3, {}),
    ]
    for make in bad:
        with pytest.raises(MalformedMessage):
            make()
    assert ErrorReply("d", 1, "BAD_TASK").code is ErrorCode.BAD_TASK


# ---------------------------------------------------------------------------------- golden bytes
# Changing any golden value below means the wire format changed: that requires a SCHEMA_VERSION
# major bump (old peers would misread the new bytes), not just an update of the hex digest. The one
# exception is a minor bump, which changes the version bytes and may add a field with a default (an
# older reader ignores fields it does not know: test_newer_minor_with_extra_fields_is_accepted). 1.0 -> 1.1
# and 1.1 -> 1.2 changed these digests by the version bytes only; 1.2 -> 1.3 also added the Update's
# empty label_counts (checked by encoding the same messages with the version set back and that field left out).
GOLDEN = [
    (lambda: Presence("pi-04", False, 1_700_000_000.5), 1,
     "8d2ad207c175b6291bc555d43790eb196bbd09e7a0b9c5575b339f9b44ced6dc"),
    (lambda: ErrorReply("pi-04", 3, ErrorCode.TRAINING_FAILED, "loss is NaN ✗"), 1,
     "1cebc1f7821872ef1607e0c7e05def517a837a8473daf4677c54ca79470d4a58"),
    (lambda: make_update({"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                          "h": np.arange(4, dtype=np.float16)}), 3,
     "badf16c11209a57e1c6958406b6d48511fc4c572aaebddb8c18eef398c7525e9"),
]


@pytest.mark.parametrize("index", range(len(GOLDEN)))
def test_golden_bytes(index):
    make, count, digest = GOLDEN[index]
    chunks = wire.encode(make(), chunk_size=256, message_id=FIXED_ID)
    assert len(chunks) == count
    for i, c in enumerate(chunks):
        assert c[:4] == b"FMOC" and c[24:28] == i.to_bytes(4, "little")
        assert c[8:24] == FIXED_ID and c[28:32] == count.to_bytes(4, "little")
    body = b"".join(c[wire.FRAME_HEADER_SIZE:] for c in chunks)
    assert body[:4] == b"FMOM" and body[4:8] == b"\x01\x00\x03\x00"
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == digest


# -------------------------------------------------------------------------------------- chunking
def test_encoding_is_deterministic_given_the_message_id():
    msg = make_task()
    assert wire.encode(msg, message_id=FIXED_ID) == wire.encode(make_task(), message_id=FIXED_ID)
    a, b = wire.encode(msg), wire.encode(msg)
    assert a[0][8:24] != b[0][8:24] and a[0][24:] == b[0][24:]  # random ids, same content


def test_many_small_chunks_respect_chunk_size():
    msg = make_update()
    for size in (69, 100, 1000):
        chunks = wire.encode(msg, chunk_size=size)
        assert all(len(c) <= size for c in chunks)
        assert len(chunks) == -(-len(wire.encode_body(msg)) // (size - wire.FRAME_HEADER_SIZE))
    with pytest.raises(ValueError):
        wire.encode(msg, chunk_size=wire.FRAME_HEADER_SIZE)


def test_shuffled_and_duplicated_chunks_reassemble_once():
    msg = make_task()
    chunks = wire.encode(msg, chunk_size=128)
    assert len(chunks) > 10
    stream = chunks + random.Random(1).sample(chunks, 5)
    random.Random(2).shuffle(stream)
    r = Reassembler()
    results = [r.add(c, "pi-04") for c in stream]
    done = [m for m in results if m is not None]
    assert done == [msg] and r.pending_count == 0 and r.pending_bytes == 0
    # QoS 1 redelivery after completion is not returned a second time (nor left pending).
    assert all(r.add(c, "pi-04") is None for c in chunks) and r.pending_count == 0


def test_single_chunk_redelivery_returned_once():
    r = Reassembler()
    [chunk] = wire.encode(MESSAGES[2])
    assert r.add(chunk, "pi-04") == MESSAGES[2]
    assert r.add(chunk, "pi-04") is None
    assert r.add(chunk, "other") == MESSAGES[2]  # keyed by source


def test_corrupted_byte_raises_checksum_error():
    chunks = wire.encode(make_update(), chunk_size=300)
    bad = bytearray(chunks[1])
    bad[wire.FRAME_HEADER_SIZE + 10] ^= 0x40
    chunks[1] = bytes(bad)
    r = Reassembler()
    with pytest.raises(ChecksumError):
        for c in chunks:
            r.add(c, "pi-04")
    assert r.pending_count == 0 and r.pending_bytes == 0
    [single] = wire.encode(MESSAGES[2])
    with pytest.raises(ChecksumError):
        wire.decode_single(single[:-1] + bytes([single[-1] ^ 1]))


def test_interleaved_sources_and_no_cross_completion():
    a, b = make_update(device_id="pi-a"), make_update(device_id="pi-b", num_samples=3)
    ca = wire.encode(a, chunk_size=200, message_id=FIXED_ID)
    cb = wire.encode(b, chunk_size=200, message_id=FIXED_ID)  # same id on purpose
    r = Reassembler()
    got = []
    for x, y in zip(ca, cb):
        got += [r.add(x, "pi-a"), r.add(y, "pi-b")]
    assert [m for m in got if m is not None] == [a, b]
    # Source A holds every chunk of B but one; B's last chunk sent by A must not complete B.
    r = Reassembler()
    for c in cb[:-1]:
        assert r.add(c, "pi-b") is None
    assert r.add(cb[-1], "pi-a") is None
    assert r.pending_count == 2
    assert r.add(cb[-1], "pi-b") == b


def test_chunks_that_disagree_are_malformed():
    c1 = wire.encode(make_update(), chunk_size=200, message_id=FIXED_ID)
    c2 = wire.encode(make_update(num_samples=2), chunk_size=200, message_id=FIXED_ID)
    r = Reassembler()
    r.add(c1[0], "s")
    with pytest.raises(MalformedMessage, match="disagree"):
        r.add(c2[1], "s")
    assert r.pending_count == 0


def test_decode_single_rejects_multi_chunk():
    with pytest.raises(MalformedMessage):
        wire.decode_single(wire.encode(make_update(), chunk_size=200)[0])
    assert wire.decode_single(wire.encode(MESSAGES[0])[0]) == MESSAGES[0]


# ---------------------------------------------------------------------------------------- bounds
def test_flood_of_incomplete_messages_stays_bounded():
    limits = dict(max_pending_messages=32, max_pending_bytes=64 * 1024)
    r = Reassembler(**limits)
    first = wire.encode(make_update(), chunk_size=256, message_id=FIXED_ID)[0]
    for i in range(10_000):
        chunk = first[:8] + i.to_bytes(16, "little") + first[24:]
        assert r.add(chunk, f"dev{i % 50}") is None
        assert r.pending_count <= 32 and r.pending_bytes <= 64 * 1024
    assert r.pending_count == 32  # the newest survive
    # A single flooding source only evicts its own messages.
    r = Reassembler(max_pending_per_source=4)
    victim = wire.encode(make_update(), chunk_size=256)
    r.add(victim[0], "honest")
    for i in range(1000):
        r.add(first[:8] + i.to_bytes(16, "little") + first[24:], "flooder")
    assert r.pending_count == 5
    assert [r.add(c, "honest") for c in victim[1:]][-1] == make_update()


def test_pending_bytes_limit_evicts_oldest():
    big = wire.encode(make_task(), chunk_size=1024)
    size = len(wire.encode_body(make_task()))
    r = Reassembler(max_pending_bytes=3 * size)
    for i in range(6):
        for c in big[:-1]:
            r.add(c[:8] + bytes([i]) * 16 + c[24:], f"s{i}")
        assert r.pending_bytes <= 3 * size
    assert r.pending_count < 6
    with pytest.raises(PayloadTooLarge):
        Reassembler(max_pending_bytes=size).add(big[0], "s")
    with pytest.raises(PayloadTooLarge):
        Reassembler(max_message_bytes=size - 1).add(big[0], "s")


def test_expiry_with_injected_clock():
    now = [100.0]
    r = Reassembler(ttl_s=10.0, clock=lambda: now[0])
    chunks = wire.encode(make_update(), chunk_size=300)
    r.add(chunks[0], "s")
    now[0] = 109.0
    r.expire()
    assert r.pending_count == 1
    now[0] = 110.5
    r.expire()
    assert r.pending_count == 0 and r.pending_bytes == 0
    # After expiry the rest of that message cannot complete it.
    assert all(r.add(c, "s") is None for c in chunks[1:])


# ---------------------------------------------------------------------------------------- schema
def test_unknown_major_is_refused_in_frame_and_body():
    [chunk] = wire.encode(MESSAGES[2])
    with pytest.raises(SchemaVersionError):
        wire.decode_single(chunk[:4] + b"\x02\x00" + chunk[6:])
    header, _ = header_of(MESSAGES[2])
    with pytest.raises(SchemaVersionError):
        wire.decode_body(make_body(2, header, major=2))
    with pytest.raises(SchemaVersionError):
        Reassembler().add(chunk[:4] + b"\x00\x00" + chunk[6:], "s")


def test_newer_minor_with_extra_fields_is_accepted():
    msg = make_update()
    header, tensors = header_of(msg)
    header["fields"]["added_in_1_7"] = {"anything": [1, 2]}
    chunks = wire.chunk_body(make_body(5, header, tensors, minor=7), chunk_size=300)
    chunks = [c[:6] + b"\x07\x00" + c[8:] for c in chunks]
    r = Reassembler()
    assert [r.add(c, "s") for c in chunks][-1] == msg


def test_unknown_error_code_from_newer_minor_reads_as_internal():
    header, _ = header_of(ErrorReply("d", 1, ErrorCode.INTERNAL, "boom"))
    header["fields"]["code"] = "GPU_ON_FIRE"
    got = wire.decode_body(make_body(6, header, minor=1))
    assert got.code is ErrorCode.INTERNAL and "GPU_ON_FIRE" in got.message and "boom" in got.message


def test_truncated_wrong_magic_and_garbage():
    chunks = wire.encode(make_update(), chunk_size=100_000)
    body = wire.encode_body(make_update())
    for cut in (0, 10, wire.FRAME_HEADER_SIZE, len(chunks[0]) - 1):
        with pytest.raises(WireError):
            wire.decode_single(chunks[0][:cut])
    for cut in (0, 5, 13, 14, 40, len(body) - 1):
        with pytest.raises(MalformedMessage):
            wire.decode_body(body[:cut])
    with pytest.raises(MalformedMessage, match="magic"):
        wire.decode_single(b"XXXX" + chunks[0][4:])
    with pytest.raises(MalformedMessage, match="magic"):
        wire.decode_body(b"XXXX" + body[4:])
    with pytest.raises(MalformedMessage):
        Reassembler().add("not bytes", "s")  # type: ignore[arg-type]


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h["tensors"].append(dict(h["tensors"][0])), "duplicate tensor"),
    (lambda h: h["tensors"][0].update(dtype="float64"), "unknown dtype"),
    (lambda h: h["tensors"][0].update(dtype="int64"), "offset/nbytes|float32 or float16"),  # int64: partial sums only
    (lambda h: h["tensors"][0].update(dtype=["float32"]), "unknown dtype"),
    (lambda h: h["tensors"][0].update(shape=[-1, 4]), "bad shape"),
    (lambda h: h["tensors"][0].update(shape=[3.0, 4]), "bad shape"),
    (lambda h: h["tensors"][0].update(offset=0.0), "offset/nbytes"),
    (lambda h: h["tensors"][0].update(nbytes=48.0), "offset/nbytes"),
    (lambda h: h["tensors"][0].update(shape=[2**40, 2**40]), "offset/nbytes"),
    (lambda h: h["tensors"][0].update(offset=10**9), "offset/nbytes"),
    (lambda h: h["tensors"][0].update(nbytes=4), "offset/nbytes"),
    (lambda h: h["tensors"].clear(), "stray bytes"),
    (lambda h: h["fields"].update(round=-1), "round"),
    (lambda h: h["fields"].update(num_samples=0), "num_samples"),
    (lambda h: h["fields"].update(num_samples=2.5), "num_samples"),
    (lambda h: h["fields"].update(metrics={"loss": 1e999}), "non-finite"),  # dumped as Infinity
    (lambda h: h["fields"].update(metrics={"loss": 10**400}), "metrics"),  # parses, overflows float
    (lambda h: h["fields"].pop("tier"), "missing field"),
    (lambda h: h["fields"].update(tier=["x"]), "tier"),
])
def test_decode_validates_header(mutate, match):
    header, tensors = header_of(make_update({"w": np.ones((3, 4), np.float32)}))
    mutate(header)
    with pytest.raises(MalformedMessage, match=match):
        wire.decode_body(make_body(5, header, tensors))


def test_decode_rejects_json_tricks():
    dup = b'{"fields":{"expert_usage":{},"round":1,"round":2},"tensors":[]}'  # last-wins would pass
    with pytest.raises(MalformedMessage, match="duplicate JSON key"):
        wire.decode_body(make_body(4, dup))
    assert wire.decode_body(make_body(4, dup.replace(b',"round":2', b""))) == GlobalState(1, {})
    for raw in (b'{"fields":{"round":NaN},"tensors":[]}',
                b"[" * 100_000, b'\xff\xfe', b'{"fields":{"round":' + b"9" * 5000 + b'},"tensors":[]}'):
        with pytest.raises(MalformedMessage):
            wire.decode_body(make_body(4, raw))
    header, _ = header_of(GlobalState(1, {}))
    with pytest.raises(MalformedMessage, match="no tensors"):
        wire.decode_body(make_body(4, {**header, "tensors": [
            {"name": "x", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}]}, b"\0" * 4))
    with pytest.raises(MalformedMessage, match="kind code"):
        wire.decode_body(make_body(99, header))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_never_escape_as_other_exceptions(data):
    for payload in (data, b"FMOC\x01\x00\x00\x00" + data, b"FMOM\x01\x00\x00\x00" + data):
        for decode in (wire.decode_single, wire.decode_body, lambda p: Reassembler().add(p, "s")):
            try:
                decode(payload)
            except WireError:
                pass


VALID_CHUNKS = [wire.encode(m, chunk_size=4096, message_id=FIXED_ID)[0]
                for m in (MESSAGES[0], MESSAGES[2], make_update({"w": np.ones(3, np.float32)}),
                          MESSAGES[12])]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID_CHUNKS), st.integers(min_value=0), st.integers(1, 255), st.booleans())
def test_single_byte_mutations_give_message_or_wire_error(chunk, where, flip, body_only):
    # body_only mutates the body and decodes it without the sha256 check, to reach the parser.
    data = bytearray(chunk[wire.FRAME_HEADER_SIZE:] if body_only else chunk)
    data[where % len(data)] ^= flip
    decode = wire.decode_body if body_only else wire.decode_single
    try:
        result = decode(bytes(data))
    except WireError:
        return
    assert isinstance(result, (Hello, Presence, RoundTask, GlobalState, Update, ErrorReply))


# -------------------------------------------------------------------------------------- oversize
def test_oversize_refused_before_sending():
    msg = make_update({"w": np.zeros((512, 512), np.float32)})
    size = len(wire.encode_body(msg))
    with pytest.raises(PayloadTooLarge, match=f"update message is {size} bytes.*limit of 1000000 bytes"):
        wire.encode(msg, max_message_bytes=1_000_000)
    assert len(wire.encode(msg, max_message_bytes=size)) == -(-size // (wire.DEFAULT_CHUNK_SIZE - 68))
    assert len(wire.encode(msg, dtype="float16", max_message_bytes=1_000_000)) == 3
