"""Disk faults in the server state folder: the round fails loudly, the previous state stays intact.

Tests run as root, where chmod-based read-only folders are not enforced, so the faults are made
with other mechanisms: `os.replace` raising ENOSPC/EROFS, or a directory in the way of a file.
"""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from broker_server import state as state_mod
from broker_server.server import AggregationServer, RoundOutcome
from broker_server.state import ServerState, StateError, StateStore


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer0.lora_a": rng.standard_normal((4, 8)).astype(np.float32),
            "layer0.lora_b": rng.standard_normal((8, 4)).astype(np.float32),
            "router": rng.standard_normal((3,)).astype(np.float32)}


def _state(round_: int) -> ServerState:
    return ServerState(round=round_, global_arrays=_arrays(round_), optimizer={"m": np.full(3, float(round_))},
                       usage={"0": [0.5, 0.5]}, backbone_sha256="abc",
                       last_record={"round": round_ - 1, "updates": 2})


def _committed(tmp_path, rounds: int = 2) -> StateStore:
    store = StateStore(tmp_path / "state")
    store.check_writable()
    for r in range(1, rounds + 1):
        store.commit(_state(r))
    return store


def _snapshot(store: StateStore):
    return {p.name: p.read_bytes() for p in sorted(store.folder.iterdir()) if not p.name.startswith(".")}


def _assert_is_round(store: StateStore, round_: int) -> None:
    loaded = store.load()
    assert loaded.round == round_
    expected = _state(round_)
    assert loaded.global_arrays.keys() == expected.global_arrays.keys()
    for name, value in expected.global_arrays.items():
        assert loaded.global_arrays[name].dtype == value.dtype
        assert loaded.global_arrays[name].tobytes() == value.tobytes()  # bit-identical
    np.testing.assert_array_equal(loaded.optimizer["m"], expected.optimizer["m"])
    assert [r["round"] for r in store.metrics()] == list(range(round_))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("fail_on", ["global", "optimizer", "state.json"])
def test_commit_failure_raises_and_keeps_previous_round(tmp_path, monkeypatch, code, fail_on):
    store = _committed(tmp_path)
    before = _snapshot(store)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        if fail_on in os.path.basename(dst):
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StateError) as caught:
        store.commit(_state(3))
    monkeypatch.undo()
    assert str(store.folder) in str(caught.value)
    assert "previous round's state is intact" in str(caught.value)
    after = _snapshot(store)
    for name in ("state.json", "metrics.jsonl", "global-000002.npz", "optimizer-000002.npz"):
        assert after[name] == before[name], name
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in store.folder.iterdir())  # no temp left
    _assert_is_round(store, 2)
    # The folder recovers: the same round commits once the disk has space again.
    store.commit(_state(3))
    _assert_is_round(store, 3)
    assert not (store.folder / "global-000002.npz").exists()


def test_commit_blocked_by_directory_in_the_way(tmp_path):
    """A path that cannot be replaced (a directory where the npz goes), no monkeypatching."""
    store = _committed(tmp_path)
    (store.folder / "global-000003.npz").mkdir()
    with pytest.raises(StateError, match=str(store.folder)):
        store.commit(_state(3))
    _assert_is_round(store, 2)


def test_metrics_append_failure_after_commit_point_is_repaired(tmp_path, monkeypatch):
    """A kill/disk error between state.json and metrics.jsonl: load re-appends the record once."""
    store = _committed(tmp_path)
    monkeypatch.setattr(StateStore, "_append_metrics", lambda self, record: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        store.commit(_state(3))
    monkeypatch.undo()
    assert [r["round"] for r in store.metrics()] == [0, 1]
    _assert_is_round(store, 3)  # committed; metrics repaired to rounds 0, 1, 2 exactly once
    _assert_is_round(store, 3)  # idempotent


def test_truncated_global_file_is_an_error_naming_it(tmp_path):
    store = _committed(tmp_path)
    path = store.folder / "global-000002.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateError, match="global-000002.npz"):
        store.load()


def test_empty_or_missing_global_file_is_an_error_naming_it(tmp_path):
    store = _committed(tmp_path)
    (store.folder / "optimizer-000002.npz").write_bytes(b"")
    with pytest.raises(StateError, match="optimizer-000002.npz"):
        store.load()
    (store.folder / "global-000002.npz").unlink()
    with pytest.raises(StateError, match="global-000002.npz"):
        store.load()


@pytest.mark.parametrize("content", [b"", b"{\"schema\": 1, \"round\"", b"\xff\xfe garbage", b"[]",
                                     b"{\"schema\": 99}", b"{\"schema\": 1}"])
def test_corrupt_state_json_is_an_error_naming_it(tmp_path, content):
    store = _committed(tmp_path)
    store.state_file.write_bytes(content)
    with pytest.raises(StateError, match="state.json"):
        store.load()


def test_truncated_metrics_line_is_dropped_not_fatal(tmp_path):
    store = _committed(tmp_path)
    with open(store.metrics_file, "a") as fh:
        fh.write('{"round": 2, "upd')  # a kill mid-append of an uncommitted round
    _assert_is_round(store, 2)


class _FakeStrategy:
    """Stands in for both the server's method and its strategy: what `_close` calls."""

    def usage(self):
        return {"0": [0.5, 0.5]}

    def finish(self):
        stats = SimpleNamespace(samples=10, clipped=0, usage_share={0: np.array([0.5, 0.5])}, pseudo_grad_norm=1.0,
                                usage_entropy={0: 0.69})
        return _arrays(3), stats

    def optimizer_state(self):
        return {"m": np.full(3, 3.0)}


def test_server_close_with_failing_commit_keeps_previous_state(tmp_path, monkeypatch):
    """Through the real `AggregationServer._close`: the round fails loudly, nothing is broadcast,
    and both the folder and the server's in-memory state stay at the previous round."""
    store = _committed(tmp_path)
    published = []
    server = AggregationServer.__new__(AggregationServer)
    server.store, server.evaluate = store, None
    server.strategy = server.method = _FakeStrategy()
    server.config = SimpleNamespace(federation="e2e")
    server.connection = SimpleNamespace(publish_chunks=lambda *a, **kw: published.append(a))
    server.state = store.load()

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state_mod, "atomic_write_bytes", full_disk)
    outcome = RoundOutcome(updates=2, devices={"dev0": {"status": "ok"}, "dev1": {"status": "ok"}})
    with pytest.raises(StateError, match=str(store.folder)):
        server._close(2, ["dev0", "dev1"], outcome, attempt=1, wall=0.1)
    monkeypatch.undo()
    assert published == []  # no GlobalState for a round that was not committed
    assert server.state.round == 2  # the server would retry round 2, not skip it
    assert server.state.global_arrays["router"].tobytes() == _state(2).global_arrays["router"].tobytes()
    _assert_is_round(store, 2)
    assert json.loads(store.state_file.read_text())["round"] == 2
