"""`fftmoe bench emulation`: a short run on the tiny export gives the three cases with sane numbers;
bad options are one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys


def _bench(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "bench", "emulation", *argv], capture_output=True,
                          text=True, timeout=timeout)


def test_short_run_measures_the_three_cases(tiny_export):
    done = _bench("--artifacts", str(tiny_export.root), "--tier", "small", "--steps", "5", "--devices", "2",
                  "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "emulation" and result["tier"] == "small" and result["profile"] == "pi4-4gb"
    assert (result["steps"], result["devices"], result["repeats"]) == (5, 2, 1)
    records = {r["case"]: r for r in result["records"]}
    assert list(records) == ["alone", "slots", "no-slots"]
    assert [r["processes"] for r in records.values()] == [1, 2, 2]
    for r in records.values():
        for key in ("emulated_s", "cpu_s", "wall_s", "ratio"):
            assert r[key] > 0, (r["case"], key)
        assert r["waited_s"] >= 0
    assert records["alone"]["ratio"] == 1.0
    assert records["no-slots"]["waited_s"] == 0.0  # these never ask for a slot
    assert "[bench] repeat 1/1: 2 devices, no slots" in done.stderr  # progress while it runs


def test_default_tier_is_the_largest(tiny_export):
    from hw_profiles.bench_emulation import build_parser, resolve

    assert resolve(build_parser().parse_args(["--artifacts", str(tiny_export.root)]))[1] == "big"


def test_bad_options_are_one_line_and_exit_2(tiny_export, tmp_path):
    for argv, message in ((["--tier", "huge"], "unknown tier 'huge'"), (["--devices", "1"], "--devices at least 2"),
                          (["--profile", "nope"], "unknown profile 'nope'")):
        done = _bench("--artifacts", str(tiny_export.root), *argv)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
    done = _bench("--artifacts", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no export at" in done.stderr and not done.stdout, done.stderr
