"""`fftmoe run` end to end with the tiny model: real export, broker, server and device processes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.tiny_model import TINY_TIERS, write_tiny_dataset

TINY_RAM_PROFILE = """
name = "tiny-ram"  # a board whose memory cannot hold even the smallest runtime (test only)
cpu_cores = 2
cpu_ghz = 1.0
cpu_model = "test"
description = "test board with 50 MB of RAM"
ram_mb = 50
os_reserved_mb = 10
core_gflops = 50.0
uplink_mbps = 100.0
downlink_mbps = 100.0
latency_ms = 1.0
availability = 1.0
"""


def test_run_with_three_profiles(tiny_model_dir, tmp_path):
    """Also the label-aware recipe with private label counts: the server asks, every device answers from
    one saved release at the run's epsilon (the default settings run in tests/test_federation_e2e.py)."""
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TINY_TIERS)
    data = write_tiny_dataset(tmp_path / "data.csv", rows=200)
    board = tmp_path / "tiny-ram.toml"
    board.write_text(TINY_RAM_PROFILE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fftmoe.cli", "run", "--model", str(tiny_model_dir), "--tiers", str(tiers),
           "--dataset", str(data), "--fleet", f"laptop:1,pi4-4gb:1,{board}", "--rounds", "2", "--local-steps", "3",
           "--out", str(out), "--cache", str(tmp_path / "cache"), "--round-deadline-s", "60",
           "--recipe", "label-aware", "--label-count-epsilon", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in records:  # the laptop (availability 0.8) and the Pi 4 (0.93) may drop out of a round
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["participants"] == 2 and r["updates"] >= 1
        assert r["bytes_up"] > 0 and r["emulated_round_s"] > 0 and r["wall_round_s"] > 0
        assert set(r["devices"]) == {"dev0", "dev1"}
        assert {d["status"] for d in r["devices"].values()} <= {"ok", "missed"}
    fleet = json.loads((out / "fleet.json").read_text())
    assert fleet["exit_codes"]["dev2"] == 137  # the emulated OOM kill, reported rather than hung
    assert fleet["recipe"] == "label-aware" and fleet["label_count_epsilon"] == 2.0
    for d in ("dev0", "dev1"):
        release = json.loads((out / "devices" / f"{d}-state" / "label_counts.json").read_text())
        assert release["epsilon"] == 2.0 and sum(release["released"]) == sum(release["exact"]) > 0
    assert "dev2" in done.stderr and "out of memory" in done.stderr
    assert "no tier fits its 40 MB of usable memory" in done.stderr
    logs = {d: (out / "devices" / f"{d}.log").read_text() for d in ("dev0", "dev1")}
    assert "emulating laptop: 2 threads" in logs["dev0"] and "emulating pi4-4gb: 2 threads" in logs["dev1"]
    for name in ("report.html", "report.png", "global_adapter.npz", "model/model.onnx", "data/test.csv"):
        assert (out / name).is_file(), name
    assert "test accuracy" in done.stdout.lower()
    assert "(recipe label-aware, label counts at epsilon 2)" in done.stdout  # the summary names the settings
    assert "served model: tier big: 4 of 4 experts per layer, 2 layers" in done.stdout

    predicted = subprocess.run([sys.executable, "-m", "fftmoe.cli", "predict", "--model", str(out / "model" / "model.onnx"),
                                "stock market shares bank profit", "election minister vote"],
                               capture_output=True, text=True, timeout=60)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in fleet["labels"] for line in lines)
