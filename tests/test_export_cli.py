"""`fftmoe export` on bad input: one clear line on stderr, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from export.cli import main
from tests.tiny_model import TINY_TIERS


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _tiers(tmp_path, old, new):
    path = tmp_path / "tiers.toml"
    path.write_text(TINY_TIERS.replace(old, new))
    return str(path)


def test_unknown_model_path(capsys, tmp_path):
    code, line = _run(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and line == f"fftmoe export: error: model path {tmp_path / 'nope'} does not exist"


def test_folder_without_config(capsys, tmp_path):
    code, line = _run(capsys, "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "has no config.json" in line


@pytest.mark.parametrize("old, new, message", [
    ("experts_held = 4", "experts_held = 6", "experts_held = 6 exceeds the global expert count 4"),
    ("top_k = 1", "top_k = 3", "top_k = 3 exceeds experts_held = 2"),
    ("seq_len = 32", "seq_len = 65", "seq_len 65 above the model's maximum of 64"),
    ("lora_rank = 2\n\n[tiers.big]", "lora_rank = 2\nwidth = 3\n\n[tiers.big]", "unknown key(s) ['width']"),
])
def test_bad_tiers(capsys, tmp_path, tiny_model_dir, old, new, message):
    code, line = _run(capsys, "--model", str(tiny_model_dir), "--tiers", _tiers(tmp_path, old, new),
                      "--out", str(tmp_path / "o"), "--labels", "a,b")
    assert code == 2 and line.startswith("fftmoe export: error: ") and message in line


def test_unwritable_output_folder(capsys, tmp_path, tiny_model_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a regular file
        target = tmp_path / "file"
        target.write_text("x")
        locked = target / "sub"
    code, line = _run(capsys, "--model", str(tiny_model_dir), "--out", str(locked), "--labels", "a,b")
    assert code == 2 and f"output folder {locked} is not writable" in line


def test_duplicate_labels(capsys, tmp_path, tiny_model_dir, tiny_tiers_file):
    code, line = _run(capsys, "--model", str(tiny_model_dir), "--tiers", str(tiny_tiers_file),
                      "--out", str(tmp_path / "o"), "--labels", "a,a")
    assert code == 2 and "need at least two distinct class labels" in line


def test_console_command_reports_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "export", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "does not exist" in done.stderr


def test_export_through_cli_prints_summary(capsys, tmp_path, tiny_model_dir, tiny_tiers_file):
    out = tmp_path / "artifacts"
    assert main(["--model", str(tiny_model_dir), "--tiers", str(tiny_tiers_file), "--out", str(out),
                 "--labels", "neg,pos", "--probe-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "[export] [2/2 big] generating training artifacts" in captured.err
    table = captured.out.splitlines()
    assert table[0].split()[:2] == ["tier", "slots"] and table[2].split()[0] == "small" and table[3].split()[0] == "big"
    assert (out / "manifest.json").is_file()
