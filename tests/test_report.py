"""The run report: PNG and HTML from synthetic run folders, including partial and empty runs."""

from __future__ import annotations

import json
import struct

import pytest

from hw_profiles.report import _devices, _usage_by_tier, load_run, main, summary_lines, write_report

pytest.importorskip("matplotlib", reason="the report needs matplotlib")

FLEET = {"devices": [{"device_id": "dev0", "profile": "pi4-4gb", "tier": "small", "train_samples": 250},
                     {"device_id": "dev1", "profile": "pi5-8gb", "tier": "medium", "train_samples": 300},
                     {"device_id": "dev2", "profile": "jetson-orin-nano", "tier": "medium", "train_samples": 400},
                     {"device_id": "dev3", "profile": "pi-zero-2w", "tier": "nano", "train_samples": 120}],
         "experts": 8, "layers": [4, 5], "labels": ["business", "tech"], "method": "fft-moe",
         "dataset": "bbcnews", "partition": "dirichlet(0.5)"}
ACCURACY = [0.52, 0.66, 0.74, 0.71]  # best is round 2, final is round 3
SPEED = {"dev0": 30.0, "dev1": 14.0, "dev2": 9.0, "dev3": 55.0}
BYTES = {"dev0": 200_000, "dev1": 400_000, "dev2": 400_000, "dev3": 80_000}


def _usage(dev_index, round_index):
    hot = (2 * dev_index + round_index) % 8  # each device favours a different expert
    return {str(layer): [300 if e == hot else 40 + 10 * ((e + layer) % 3) for e in range(8)] for layer in (4, 5)}


def _round(r):
    devices = {}
    for i, dev in enumerate(FLEET["devices"]):
        dev_id = dev["device_id"]
        status = "missed" if (dev_id, r) == ("dev3", 1) else "oom" if (dev_id, r) == ("dev0", 2) else "ok"
        done = status == "ok"
        devices[dev_id] = {"profile": dev["profile"], "tier": dev["tier"], "status": status,
                           "emulated_s": SPEED[dev_id] * (1 + 0.1 * r) if done else None,
                           "compute_s": SPEED[dev_id] * 0.9 if done else None, "transfer_s": 2.0 if done else None,
                           "bytes_up": BYTES[dev_id] if done else 0, "bytes_down": BYTES[dev_id] + 10_000,
                           "usage": _usage(i, r) if done else {}}
    ok = [d for d in devices.values() if d["status"] == "ok"]
    return {"round": r, "test_accuracy": ACCURACY[r], "test_loss": 1.2 - ACCURACY[r], "participants": 4,
            "updates": len(ok), "bytes_up": sum(d["bytes_up"] for d in devices.values()),
            "bytes_down": sum(d["bytes_down"] for d in devices.values()),
            "emulated_round_s": max(d["emulated_s"] for d in ok), "wall_round_s": 10.0 + r,
            "usage_entropy": 1.9, "device_holdout_accuracy": ACCURACY[r] - 0.05, "devices": devices}


def _write_run(path, rounds, fleet=FLEET):
    path.mkdir(parents=True, exist_ok=True)
    if fleet is not None:
        (path / "fleet.json").write_text(json.dumps(fleet))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return path


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = _write_run(tmp_path_factory.mktemp("run"), [_round(r) for r in range(4)])
    return run, write_report(run)


def test_writes_png_of_expected_size(full_run):
    run, paths = full_run
    assert paths == [run / "report.png", run / "report.html"]
    assert _png_size(run / "report.png") == (1600, 1100)


def test_html_carries_summary_and_embedded_png(full_run):
    run, _ = full_run
    page = (run / "report.html").read_text()
    total_up = sum(_round(r)["bytes_up"] for r in range(4)) / 1e6
    total_down = sum(_round(r)["bytes_down"] for r in range(4)) / 1e6
    assert "71.00% (round 3)" in page  # final
    assert "74.00% (round 2)" in page  # best
    assert f"{total_up:.2f} MB up / {total_down:.2f} MB down" in page
    assert "missed 1 (dev3)" in page and "oom 1 (dev0)" in page and "ok 14" in page
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the PNG inlined, no external file needed
    assert page.count("<tr>") == 10 + 1 + 4  # summary rows + per-round header + one row per round


def test_summary_lines_match_html(full_run):
    run, _ = full_run
    lines = summary_lines(run)
    page = (run / "report.html").read_text()
    assert "rounds: 4" in lines and "final test accuracy: 71.00% (round 3)" in lines
    mean_emulated = sum(_round(r)["emulated_round_s"] for r in range(4)) / 4
    assert f"mean round time: {mean_emulated:.1f} s emulated vs 11.5 s wall" in "\n".join(lines)
    for line in lines:
        assert line.split(": ", 1)[1] in page


def test_expert_usage_is_summed_per_tier_over_the_run(full_run):
    run, _ = full_run
    fleet, rounds = load_run(run)
    usage = _usage_by_tier(rounds, _devices(fleet, rounds))
    assert sorted(usage) == ["medium", "nano", "small"]
    # dev1 and dev2 (both medium) finish all 4 rounds; nano's dev3 misses round 1, so it has 3 rounds of tokens
    expected = [sum(_usage(i, r)["4"][e] for i in (1, 2) for r in range(4)) for e in range(8)]
    assert usage["medium"]["4"] == expected
    assert sum(usage["nano"]["5"]) == sum(sum(_usage(3, r)["5"]) for r in (0, 2, 3))
    old = [{"round": 0, "usage": {"4": [0.5, 0.5]}}, {"round": 1, "usage": {"4": [0.25, 0.75]}}]
    assert _usage_by_tier([dict(r, devices={}) for r in old], []) == {"all devices": {"4": [0.75, 1.25]}}


def test_partial_run_with_missing_fields(tmp_path):
    bare = {"round": 0, "test_accuracy": 0.5, "devices": {"dev9": {"status": "failed"}, "dev0": {"status": "ok"}}}
    run = _write_run(tmp_path / "run", [bare], fleet=None)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"round": 1, "test_acc')  # torn write
    paths = write_report(run)
    assert _png_size(paths[0]) == (1600, 1100)
    lines = summary_lines(run)
    assert "rounds: 1" in lines and "best test accuracy: 50.00% (round 0)" in lines
    assert "total traffic: n/a up / n/a down" in lines and "device-rounds by status: ok 1, failed 1 (dev9)" in lines


def test_empty_metrics_reports_no_rounds(tmp_path):
    run = _write_run(tmp_path / "run", [])
    paths = write_report(run)
    assert _png_size(paths[0]) == (1600, 1100)
    assert "No completed rounds" in paths[1].read_text()
    assert "rounds: 0" in summary_lines(run) and "no completed rounds in metrics.jsonl" in summary_lines(run)


def test_cli_regenerates_and_rejects_missing_folder(tmp_path, capsys):
    run = _write_run(tmp_path / "run", [_round(0)])
    assert main([str(run)]) == 0
    assert "final test accuracy: 52.00% (round 0)" in capsys.readouterr().out
    assert (run / "report.html").is_file()
    assert main([str(tmp_path / "nope")]) == 1
    assert "run folder not found" in capsys.readouterr().err
