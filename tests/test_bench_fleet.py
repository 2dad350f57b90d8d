"""`fftmoe bench fleet`: a short run through a real broker on a free loopback port (every published
update aggregated, sane numbers), the simulated update against the server's checks, and bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from broker_server import bench_fleet as fleet
from broker_server import bench_fleet_capacity as capacity
from broker_server.aggregation import ClientUpdate
from broker_server.update_checks import validate_update
from edge_runtime import wire


def _bench(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "bench", "fleet", *argv], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_simulated_update_passes_the_servers_checks(dtype):
    space, slots, layers = fleet.tier_of(None, "small")
    expected = space.tier_shapes(layers, slots)
    params = {n: np.full(s, 0.5, np.float32) for n, s in expected.items()}
    message = fleet.make_update(7, "small", slots, layers, params)
    chunks = wire.encode(message, dtype=dtype, chunk_size=64 * 1024)
    assert len(chunks) > 1  # the real chunking, reassembled as the server does
    topic = wire.upload_topic(fleet.FEDERATION, fleet.device_id(7), fleet.ROUND)
    reassembler = wire.Reassembler()
    got = [reassembler.add(c, source=topic) for c in chunks]
    decoded = got[-1]
    assert got[:-1] == [None] * (len(chunks) - 1) and decoded.device_id == "sim-000007"
    wire.check_origin(decoded, topic)
    assert {a.dtype.name for a in decoded.params.values()} == {dtype}
    update = ClientUpdate(device_id=decoded.device_id,
                          params={k: v.astype(np.float32) for k, v in decoded.params.items()},
                          slot_map=fleet.slot_map_of(7, slots, layers, space.experts), num_samples=decoded.num_samples,
                          expert_tokens={int(k): np.asarray(v, float) for k, v in decoded.expert_tokens.items()})
    assert validate_update(update, expected, space.experts) == []


def test_short_fleet_run_aggregates_every_update():
    broker = "mosquitto" if fleet.mosquitto_binary() else "embedded"
    pinned = len(os.sched_getaffinity(0)) >= 2  # the subscribers on a core of their own
    done = _bench("--clients", "20,60", "--broker", broker, "--publishers", "1", "--connections", "2",
                  "--jitter-ms", "50", "--repeats", "1", "--workers", "1,2", "--json",
                  *(["--aggregator-cores", "1"] if pinned else []))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "fleet" and result["tier"] == "nano"
    assert result["aggregator_cores"] == ([max(os.sched_getaffinity(0))] if pinned else None)
    assert [r["clients"] for r in result["records"]] == [20, 60]
    for r in result["records"]:
        assert r["updates_folded"] == r["updates_published"] == r["clients"]
        for key in ("updates_per_s", "mbytes_per_s", "server_peak_rss_mb", "round_close_s",
                    "broker_only_updates_per_s", "broker_only_mbytes_per_s"):
            assert r[key] > 0, key
        # MB/s is updates/s times the encoded size of one nano update (0.2 MB in float32)
        assert r["mbytes_per_s"] == pytest.approx(r["updates_per_s"] * r["mbytes_per_update"], rel=0.01)
        assert 0.15 < r["mbytes_per_update"] < 0.3
        assert r["round_close_s"] >= r["clients"] / r["updates_per_s"] * 0.99  # closes after the last fold
        # the same load through real aggregator worker processes on their lanes (the run fails if any
        # update is not folded exactly once and merged)
        assert [s["workers"] for s in r["sharded"]] == [1, 2]
        for s in r["sharded"]:
            assert s["updates_per_s"] > 0 and s["worker_peak_rss_mb"] > 0 and len(s["worker_cpu_s"]) == s["workers"]
            assert s["round_close_s"] >= r["clients"] / s["updates_per_s"] * 0.99
    assert "[fleet] 60 devices" in done.stderr  # progress on stderr, JSON alone on stdout
    # what limits the run: the aggregator alone, and how busy the host was in each pass (Linux)
    assert result["aggregator_capacity_updates_per_s"] == pytest.approx(1e3 / result["aggregator_cpu_ms_per_update"],
                                                                        rel=0.01)
    for r in result["records"]:
        assert 0 < r["host_cpu_busy"] <= 1 and 0 < r["broker_only_host_cpu_busy"] <= 1


def _uploads(count, tier="nano", poison=None):
    space, slots, layers = fleet.tier_of(None, tier)
    params = {n: np.full(s, 0.01, np.float32) for n, s in space.tier_shapes(layers, slots).items()}
    uploads = []
    for i in range(count):
        p = dict(params)
        if i == poison:
            name = next(iter(p))
            p[name] = np.zeros(p[name].shape[:-1] + (p[name].shape[-1] + 1,), np.float32)  # not the tier's shape
        uploads.append((wire.upload_topic(fleet.FEDERATION, fleet.device_id(i), fleet.ROUND),
                        wire.encode(fleet.make_update(i, tier, slots, layers, p))))
    return fleet.BenchFold(space, slots, layers, 0, fleet.slot_map_of), uploads


def test_aggregator_capacity_folds_every_upload_through_the_servers_checks():
    fold, uploads = _uploads(12)
    result = capacity.aggregator_capacity(fold, uploads, repeats=2)
    assert result["aggregator_cpu_ms_per_update"] > 0
    _, stats = fold.strategy.finish()
    assert stats.clients == 24  # two passes of twelve, each folded once
    fold, uploads = _uploads(5, poison=3)
    with pytest.raises(RuntimeError, match="sim-000003 failed validation"):
        capacity.aggregator_capacity(fold, uploads, repeats=1)


def test_host_cpu_share_from_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(capacity, "_PROC_STAT", stat)
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n")
    host = capacity.HostCpu()
    stat.write_text("cpu  200 0 200 1300 100 0 0 0 0 0\n")  # 800 jiffies, 600 of them idle
    assert host.busy() == 0.25
    stat.unlink()
    assert host.busy() is None  # no /proc/stat: not a Linux host


@pytest.mark.parametrize("argv, words", [
    (["--clients", "0,10"], "must be >= 1"),
    (["--clients", "ten"], "comma-separated integers"),
    (["--tier", "huge"], "unknown tier 'huge' (tiers: nano, small, medium, large)"),
    (["--broker", "ftp://example"], "--broker must be embedded, mosquitto or a URL"),
    (["--upload-dtype", "int8"], "invalid choice"),
    (["--repeats", "0"], "--repeats >= 1"),
    (["--workers", "0"], "--workers: every count must be >= 1"),
    (["--aggregator-cores", "4096"], "reserve at least 1 and leave at least 1 for the broker and publishers"),
])
def test_bad_options_exit_2_with_one_line(argv, words):
    done = _bench(*argv, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("fftmoe bench fleet: ") and done.stderr.count("\n") == 1, done.stderr
    assert words in done.stderr
