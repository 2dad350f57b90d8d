"""Project contracts: import boundaries between roles, and a device CLI that never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is part of the dev extra"
    done = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_device_help_does_not_import_torch():
    code = ("import sys\nfrom fftmoe.cli import main\n"
            "try:\n    main(['device', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx'))\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "usage: fftmoe device" in done.stdout
    assert "HEAVY []" in done.stdout


def test_top_level_usage_lists_commands():
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "export" in done.stdout and "device" in done.stdout
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown command 'nonsense'" in done.stderr


def test_no_pickle_in_project_code():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in ("tests", ".venv", "build"):
            continue
        text = path.read_text()
        if "import pickle" in text or "allow_pickle=True" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
