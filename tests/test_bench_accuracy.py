"""`fftmoe bench accuracy`: a tiny grid end to end (real runs and references, resume, a crashed cell
retried, a failing cell reported), and the table arithmetic on hand-made cell records."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw_profiles import bench_accuracy as bench
from hw_profiles import bench_tables as tables
from tests.tiny_model import TINY_TIERS, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny_bench(tiny_model_dir, tmp_path_factory):
    """Options every tiny bench shares: the tiny model, its tiers, a learnable CSV and one export cache."""
    root = tmp_path_factory.mktemp("bench")
    (root / "tiers.toml").write_text(TINY_TIERS)
    data = write_tiny_dataset(root / "data.csv", rows=120)
    return root, ["--model", str(tiny_model_dir), "--tiers", str(root / "tiers.toml"), "--dataset", str(data),
                  "--cache", str(root / "cache"), "--fleet", "laptop:1,pi4-4gb:1", "--rounds", "2",
                  "--local-steps", "2", "--ablations", "none", "--seeds", "0"]


def _bench(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "bench", "accuracy", *argv], capture_output=True,
                          text=True, timeout=timeout)


def _with(argv: list[str], **values) -> list[str]:
    """argv with the values of some options replaced: _with(argv, rounds=3)."""
    argv = list(argv)
    for name, value in values.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
    return argv


def _rows(markdown: str, section: str) -> dict[str, list[str]]:
    """method -> cells of the table under `## section`."""
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")]
    return {r[0]: r for r in rows[1:]}


def test_tiny_grid_writes_tables_and_resumes(tiny_bench):
    root, common = tiny_bench
    out = root / "grid"
    argv = [*common, "--out", str(out), "--methods", "fft-moe,local,central", "--partitions", "iid,dir0.5"]
    first = _bench(*argv, "--json")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-5000:]
    assert "6 cells: 0 already finished (skipped), 6 to run" in first.stderr
    assert re.search(r"6/6 dir0\.5/central/seed0: final test accuracy 0\.\d+ in \dm\d\ds; elapsed .*ETA", first.stderr)

    markdown = (out / "accuracy.md").read_text()
    for partition in ("iid", "dir0.5"):
        rows = _rows(markdown, partition)
        assert set(rows) == {"fft-moe", "local", "central"}
        for name, row in rows.items():
            assert row[1] == "0"  # one seed, so no ± spread
            for acc in row[2:5]:  # held-out is n/a only if every device dropped out of the last round
                assert acc == "n/a" and row.index(acc) == 4 or 0.0 <= float(acc) <= 100.0, (name, row)
        assert rows["fft-moe"][5].endswith("kB") and rows["local"][5] == "0 B" and rows["central"][6] == "0 B"
        assert float(rows["fft-moe"][7]) >= 0 and rows["local"][7] == "n/a"
    assert set(_rows(markdown, "Robustness: final test accuracy as % of IID")) == {"fft-moe", "local", "central"}

    summary = json.loads((out / "accuracy.json").read_text())
    assert summary == json.loads(first.stdout[:first.stdout.rindex("}") + 1])  # --json prints the same numbers
    assert summary["finished"] == 6 and summary["pending"] == 0 and summary["failed"] == []
    assert {(c["partition"], c["name"], c["seed"]) for c in summary["cells"]} == {
        (p, m, 0) for p in ("iid", "dir0.5") for m in ("fft-moe", "local", "central")}
    for cell in summary["cells"]:
        assert {"final_test_accuracy", "best_test_accuracy", "holdout_accuracy", "bytes_up_per_device_round",
                "bytes_down_per_device_round", "emulated_round_s", "usage_entropy", "curve", "wall_s"} <= set(cell)
        assert [p["round"] for p in cell["curve"]] == [0, 1]
        assert cell["best_test_accuracy"] >= cell["final_test_accuracy"]
    assert (out / "accuracy.png").stat().st_size > 10_000

    local = out / "cells" / "iid" / "local" / "seed0"
    records = [json.loads(line) for line in (local / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and set(records[0]["devices"]) == {"dev0", "dev1"}
    assert records[1]["test_accuracy"] == pytest.approx(
        sum(d["test_accuracy"] for d in records[1]["devices"].values()) / 2)
    central = json.loads((out / "cells" / "iid" / "central" / "seed0" / "run" / "fleet.json").read_text())
    assert central["method"] == "central" and central["devices"][0]["device_id"] == "central"
    pinned = json.loads((out / "bench.json").read_text())["device_tiers"]  # chosen once, for every cell
    assert f"device tiers, pinned for every cell: {pinned}" in first.stderr
    for partition in ("iid", "dir0.5"):
        for name in ("fft-moe", "local"):
            fleet = json.loads((out / "cells" / partition / name / "seed0" / "run" / "fleet.json").read_text())
            assert ",".join(d["tier"] for d in fleet["devices"]) == pinned

    started = time.perf_counter()
    again = _bench(*argv)  # every cell finished: nothing runs
    assert again.returncode == 0, again.stderr
    assert "6 cells: 6 already finished (skipped), 0 to run" in again.stderr
    assert time.perf_counter() - started < 20  # seconds, on a loaded 2-core host; the first run took ~30

    (out / "accuracy.md").unlink()
    report = _bench(*argv, "--only-report")
    assert report.returncode == 0 and "running" not in report.stderr
    assert (out / "accuracy.md").read_text().split("(updated")[0] == markdown.split("(updated")[0]

    (local / "cell.json").unlink()  # as if the bench died during this cell: it runs again, alone
    retried = _bench(*argv)
    assert retried.returncode == 0, retried.stderr
    assert "5 already finished (skipped), 1 to run" in retried.stderr
    assert "iid/local/seed0: final test" in retried.stderr
    assert (local / "cell.json").is_file()

    other = _bench(*_with(argv, rounds=3))  # into a folder of 2-round cells
    assert other.returncode == 2 and "other settings" in other.stderr and "rounds 2" in other.stderr


def test_failing_cell_is_reported_with_its_log(tiny_bench, tmp_path):
    root, common = tiny_bench
    argv = _with(common, dataset=tmp_path / "missing.csv")
    unpinned = _bench(*argv, "--out", str(tmp_path / "first"), "--methods", "local", "--partitions", "iid")
    assert unpinned.returncode == 2 and unpinned.stderr.count("\n") == 1  # pinning the fleet needs the data
    assert "error: choosing the device tiers:" in unpinned.stderr and "missing.csv" in unpinned.stderr
    done = _bench(*argv, "--out", str(tmp_path / "grid"), "--methods", "local,central", "--partitions", "iid",
                  "--device-tiers", "big,big")  # so each cell fails on its own
    assert done.returncode == 1, done.stderr
    log = tmp_path / "grid" / "cells" / "iid" / "local" / "seed0" / "log.txt"
    assert f"iid/local/seed0: FAILED (exit code 2; log: {log})" in done.stderr
    assert "2/2 iid/central/seed0" in done.stderr  # the bench went on with the next cell
    assert "missing.csv" in log.read_text()
    markdown = (tmp_path / "grid" / "accuracy.md").read_text()
    assert "## Failed cells" in markdown and str(log) in markdown and "2 failed" in markdown


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited meanwhile
            continue
    return pids


def test_sigterm_stops_the_running_cell_with_its_devices(tiny_bench, tmp_path):
    root, common = tiny_bench
    out = tmp_path / "grid"
    bench_cmd = [sys.executable, "-m", "fftmoe.cli", "bench", "accuracy", *_with(common, rounds=50, local_steps=500),
                 "--out", str(out), "--methods", "fft-moe", "--partitions", "iid"]
    process = subprocess.Popen(bench_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "cells" / "iid" / "fft-moe" / "seed0" / "log.txt", time.monotonic() + 120
    while not (log.is_file() and "devices up" in log.read_text()):  # the server and both devices are running
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as `kill` does to a bench left running in the background
    _, err = process.communicate(timeout=90)
    assert process.returncode == 130, err
    assert "run the same command again to resume" in err
    assert not (log.parent / "cell.json").exists() and (out / "accuracy.md").is_file()
    assert _processes_mentioning(str(out)) == []  # no orphaned `fftmoe run` or device process


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fft-moe,fedavg"], "unknown method 'fedavg'"),
    (["--partitions", "iid,dir"], "unknown partition 'dir'"),
    (["--partitions", "dir0"], "unknown partition 'dir0'"),
    (["--ablations", "no-router"], "unknown ablation 'no-router'"),
    (["--seeds", "0,one"], "--seeds '0,one' must be a comma list of integers"),
    (["--fleet", "pi4-4gb:two"], "must look like PROFILE or PROFILE:COUNT"),
    (["--rounds", "0"], "--rounds and --local-steps must be at least 1"),
])
def test_bad_options_fail_in_one_line(argv, message, tmp_path, capsys):
    assert bench.main([*argv, "--out", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "grid").exists()


def test_a_tiers_file_named_differently_is_the_same_setting_only_with_the_same_content(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tiers.toml").write_text("[tiers.nano]\nexperts = 2\n")
    (tmp_path / "b" / "tiers.toml").write_text("[tiers.nano]\nexperts = 2\n")  # a copy in another checkout
    settings = {key: None for key in bench.SETTINGS} | {"rounds": 2, "tiers": str(tmp_path / "a" / "tiers.toml")}
    out = tmp_path / "grid"
    out.mkdir()
    bench._check_settings(out, settings, bench._saved_settings(out))  # the first run writes them
    monkeypatch.chdir(tmp_path)
    # relative here, absolute there
    bench._check_settings(out, settings | {"tiers": "a/tiers.toml"}, bench._saved_settings(out))
    bench._check_settings(out, settings | {"tiers": "b/tiers.toml"}, bench._saved_settings(out))
    (tmp_path / "b" / "tiers.toml").write_text("[tiers.nano]\nexperts = 4\n")
    with pytest.raises(bench.BenchError, match="other settings .*tiers"):
        bench._check_settings(out, settings | {"tiers": "b/tiers.toml"}, bench._saved_settings(out))
    with pytest.raises(bench.BenchError, match="rounds 2 here vs 3 asked"):
        bench._check_settings(out, settings | {"rounds": 3}, bench._saved_settings(out))


def test_plan_gives_extra_seeds_only_to_seeded_methods_and_builds_commands():
    args = bench.parse_options(["--methods", "fft-moe,local", "--partitions", "iid,dir0.1", "--seeds", "0,1",
                                "--seeded-methods", "fft-moe", "--ablations", "no-het,personal-router"])
    keys = [c.key for c in bench.plan_cells(args)]
    assert keys == ["iid/fft-moe/seed0", "iid/local/seed0", "dir0.1/fft-moe/seed0", "dir0.1/local/seed0",
                    "dir0.1/no-het/seed0", "dir0.1/personal-router/seed0",  # first seed of everything first
                    "iid/fft-moe/seed1", "dir0.1/fft-moe/seed1"]
    run = bench.cell_command(bench.Cell("dir0.1", "no-het", 0), args, bench.Path("r"))
    assert run[1:4] == ["-m", "fftmoe.cli", "run"] and run[-4:] == ["--method", "fft-moe", "--lambda-het", "0"]
    assert run[run.index("--alpha") + 1] == "0.1" and "--cache" not in run  # fftmoe run's defaults unless given
    personal = bench.cell_command(bench.Cell("iid", "personal-router", 0), args, bench.Path("r"))
    assert personal[-1] == "--personalise-router"
    ref = bench.cell_command(bench.Cell("iid", "local", 1), args, bench.Path("r"))
    assert ref[1:4] == ["-m", "hw_profiles.references", "local"] and "--method" not in ref
    assert ref[ref.index("--partition") + 1] == "iid" and ref[ref.index("--seed") + 1] == "1"
    assert "--device-tiers" not in run
    pinned = bench.parse_options(["--methods", "fedit", "--device-tiers", "small,big"])
    for cell in bench.plan_cells(pinned):  # every cell trains the same fleet
        command = bench.cell_command(cell, pinned, bench.Path("r"))
        assert command[command.index("--device-tiers") + 1] == "small,big"


def _cell(partition, name, seed, final, **extra):
    record = {"partition": partition, "name": name, "kind": "ablation" if name in tables.ABLATIONS else "method",
              "seed": seed, "final_test_accuracy": final, "best_test_accuracy": final + 0.01, "holdout_accuracy": 0.5,
              "bytes_up_per_device_round": 2.5e6 if name != "local" else 0.0, "bytes_down_per_device_round": 1000.0,
              "emulated_round_s": 30.0 if name != "local" else None, "usage_entropy": 1.9 if name != "local" else None,
              "curve": [{"round": 0, "test_accuracy": final - 0.1}, {"round": 1, "test_accuracy": final}]}
    return {**record, **extra}


def test_tables_mean_spread_robustness_and_ablations(tmp_path):
    cells = [_cell("iid", "fft-moe", s, f) for s, f in ((0, 0.90), (1, 0.92), (2, 0.94))]
    cells += [_cell("dir0.1", "fft-moe", s, f) for s, f in ((0, 0.81), (1, 0.83), (2, 0.85))]
    cells += [_cell("iid", "local", 0, 0.70), _cell("dir0.1", "local", 0, 0.56), _cell("dir0.1", "no-het", 0, 0.80)]
    cells += [_cell("dir0.1", "fedit", 0, 0.88), _cell("dir0.1", "fedit-label-skew", 0, 0.90)]
    result = tables.summary(cells, {"fleet": "pi4-4gb:2", "rounds": 2, "local_steps": 2}, [], pending=3)
    row = next(r for r in result["rows"] if r["partition"] == "iid" and r["name"] == "fft-moe")
    assert row["seeds"] == [0, 1, 2] and row["final_mean"] == pytest.approx(0.92)
    assert row["final_std"] == pytest.approx(0.02)  # sample standard deviation over the seeds
    assert [p["round"] for p in row["curve"]] == [0, 1]
    assert row["curve"][1] == pytest.approx({"round": 1, "mean": 0.92, "min": 0.90, "max": 0.94})
    assert result["robustness"]["fft-moe"]["dir0.1"] == pytest.approx(100 * 0.83 / 0.92)
    assert result["robustness"]["local"]["dir0.1"] == pytest.approx(80.0)
    assert "no-het" not in result["robustness"]

    markdown = tables.render_markdown(result)
    iid = _rows(markdown, "iid")
    assert list(iid) == ["fft-moe", "local"]  # methods in their canonical order, ablations not among them
    assert iid["fft-moe"][1:4] == ["0,1,2", "92.0 ± 2.0", "93.0"] and iid["local"][2] == "70.0"
    assert iid["fft-moe"][5:9] == ["2.5 MB", "1 kB", "30.0", "1.90"] and iid["local"][7:9] == ["n/a", "n/a"]
    assert _rows(markdown, "Robustness: final test accuracy as % of IID")["fft-moe"][1] == "90.2%"
    ablations = _rows(markdown, "Ablations (FFT-MoE at dir0.1)")
    # paired on the shared seed 0 (80.0 vs 81.0), not against the 3-seed mean (83.0)
    assert list(ablations) == ["fft-moe", "no-het", "fedit-label-skew"] and ablations["no-het"][-1] == "-1.0"
    assert ablations["fedit-label-skew"][-1] == "+2.0 vs fedit"  # a baseline's variant against that baseline
    assert "11 cells finished, 3 pending, 0 failed" in markdown

    tables.write_plot(tmp_path / "accuracy.png", result)
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
