"""`fftmoe bundle` and the bundle's install.sh and systemd unit, end to end on this machine.

The headline test builds a bundle from the tiny export, unpacks it, installs it with
`install.sh --no-systemd --prefix TMP` into a fresh virtual environment (only the `edge` extra: torch
must not be importable there), and runs the installed device with the bundled device.toml against a
real broker and a real `fftmoe serve` until the server completes one round and exits 0.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edge_runtime.device_config import load_device_config
from tests.brokers import running_broker
from tests.federation import metrics, start_server, stop_all
from tests.tiny_model import write_tiny_dataset

TOP = "device-bundle"


def bundle(*args: str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "bundle", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="fully_trusted")  # keep the modes: they are under test
        else:  # pragma: no cover
            tar.extractall(dest)
    return dest / archive.name[:-len(".tar.gz")]


@pytest.fixture(scope="module")
def fftmoe_wheel(tiny_export, tmp_path_factory):
    """One bundle built the normal way (the wheel built from this checkout); its wheel is reused below."""
    out = tmp_path_factory.mktemp("first") / f"{TOP}.tar.gz"
    bundle("--profile", "laptop", "--artifacts", str(tiny_export.root), "--broker", "mqtt://127.0.0.1:1883", out=out)
    folder = unpack(out, out.parent)
    wheels = sorted((folder / "wheels").glob("fftmoe-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_bundle_holds_one_tier_config_credentials_and_installer(tiny_export, fftmoe_wheel, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("ca.crt", "client.crt", "client.key", "password"):
        (creds / name).write_text(f"secret {name}\n")
    (creds / "username").write_text("pi-7\n")
    out = tmp_path / f"{TOP}.tar.gz"
    bundle("--profile", "pi-zero-2w", "--artifacts", str(tiny_export.root), "--broker", "mqtts://broker.lan:8883",
           "--credentials", str(creds), "--federation", "demo", "--wheel", str(fftmoe_wheel), out=out)
    with tarfile.open(out) as tar:
        members = {m.name[len(TOP) + 1:]: m for m in tar.getmembers() if m.name != TOP}
    root = Path(tiny_export.root)
    tier = "big"  # the tiny tiers peak near 70 MB: even a Pi Zero 2 W fits the bigger one
    expected = {f"artifacts/{f.path}" for f in tiny_export.tiers[tier].files.values()} | {"artifacts/manifest.json"}
    shipped = {name for name, m in members.items() if name.startswith("artifacts/") and m.isfile()}
    assert shipped == expected  # no global_init.npz, no other tier
    for name in ("credentials/ca.crt", "credentials/client.crt", "credentials/client.key", "credentials/password"):
        assert members[name].mode == 0o600, name
    assert members["credentials"].mode == 0o700
    assert members["install.sh"].mode == 0o755
    assert {"fftmoe-device.service", "README.txt", "device.toml", f"wheels/{fftmoe_wheel.name}",
            "wheels/edge-requirements.txt"} <= set(members)
    folder = unpack(out, tmp_path / "unpacked")
    assert (folder / "artifacts/manifest.json").read_bytes() == (root / "manifest.json").read_bytes()
    requirements = [line for line in (folder / "wheels/edge-requirements.txt").read_text().splitlines()
                    if not line.startswith("#")]
    assert any(r.startswith("paho-mqtt") for r in requirements) and any(r.startswith("tokenizers") for r in requirements)
    assert not any(r.startswith(("onnxruntime", "torch", "transformers", "amqtt")) for r in requirements), requirements
    config = load_device_config(folder / "device.toml", {"device_id": "pi-7"})  # the device's own loader
    assert (config.tier, config.federation, config.profile, config.username) == (tier, "demo", "pi-zero-2w", "pi-7")
    assert (config.ca_file, config.password_file, config.state_dir) == ("credentials/ca.crt", "credentials/password",
                                                                         "state")
    assert config.threads == 4  # the Pi Zero 2 W's cores
    keys = [line.split("=")[0].strip() for line in (folder / "device.toml").read_text().splitlines()
            if "=" in line and not line.startswith("#")]
    assert "device_id" not in keys  # install.sh sets it from the host name


def test_bundle_dry_run_lists_every_file_and_writes_nothing(tiny_export, tmp_path):
    out = tmp_path / "never.tar.gz"
    done = bundle("--profile", "laptop", "--artifacts", str(tiny_export.root), "--broker", "mqtt://h:1883",
                  "--dry-run", out=out)
    assert not out.exists()
    for name in ["artifacts/manifest.json", "device.toml", "install.sh", "fftmoe-device.service", "README.txt",
                 "wheels/fftmoe-", "wheels/edge-requirements.txt"] + \
            [f"artifacts/{f.path}" for f in tiny_export.tiers["big"].files.values()]:
        assert name in done.stdout, name
    assert "global_init" not in done.stdout and "artifacts/small/" not in done.stdout
    assert "tier big" in done.stdout and 'broker = "mqtt://h:1883"' in done.stdout


def test_bundle_refuses_bad_input(tiny_export, tmp_path):
    art = str(tiny_export.root)
    cases = [(["--profile", "no-such-device"], 2, "unknown profile"),
             (["--broker", "mqtt://u:pw@h:1883"], 2, "--password-file"),
             (["--ca-file", str(Path(art) / "manifest.json")], 2, "mqtts://"),
             (["--tier", "huge"], 2, "no tier 'huge'")]
    for extra, code, words in cases:
        args = ["--profile", "laptop", "--artifacts", art, "--broker", "mqtt://h:1883"]
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        done = bundle(*args, "--dry-run", out=tmp_path / "x.tar.gz", check=False)
        assert done.returncode == code and words in done.stderr, (extra, done.stderr)
    tiny = tmp_path / "tiny.toml"  # 100 MB of RAM, 50 reserved: 40 MB budget, below both tiers' ~70 MB peak
    tiny.write_text('name = "tiny"\ndescription = "too small"\ncpu_model = "x"\ncpu_cores = 1\ncpu_ghz = 1.0\n'
                    'ram_mb = 100\nos_reserved_mb = 50\ncore_gflops = 1.0\nuplink_mbps = 1.0\n'
                    'downlink_mbps = 1.0\nlatency_ms = 1.0\navailability = 1.0\n')
    done = bundle("--profile", str(tiny), "--artifacts", art, "--broker", "mqtt://h:1883", "--dry-run",
                  out=tmp_path / "x.tar.gz", check=False)
    assert done.returncode == 2 and "fits no tier" in done.stderr and "does not fit" in done.stderr, done.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(art, corrupt)
    (corrupt / "big" / "checkpoint").write_bytes(b"garbage")
    done = bundle("--profile", "laptop", "--artifacts", str(corrupt), "--broker", "mqtt://h:1883", "--dry-run",
                  out=tmp_path / "x.tar.gz", check=False)
    assert done.returncode == 3 and "checkpoint" in done.stderr, done.stderr


def test_install_dry_run_prints_every_step_and_changes_nothing(tiny_export, fftmoe_wheel, tmp_path):
    out = tmp_path / f"{TOP}.tar.gz"
    bundle("--profile", "laptop", "--artifacts", str(tiny_export.root), "--broker", "mqtt://h:1883",
           "--wheel", str(fftmoe_wheel), out=out)
    folder = unpack(out, tmp_path)
    prefix = tmp_path / "prefix"
    steps = {"systemd": ["-m venv", "pip install", "onnxruntime-training-cpu==1.19.2", "[edge]", "cp -R",
                         "device.toml", "useradd --system", "ln -s /var/lib/fftmoe", "/etc/systemd/system/"
                         "fftmoe-device.service", "systemctl daemon-reload", "device doctor",
                         "systemctl enable --now fftmoe-device.service"],
             "no-systemd": ["-m venv", "pip install", "[edge]", "cp -R", "device doctor", "device run --config"]}
    for mode, expected in steps.items():
        args = ["--dry-run", "--prefix", str(prefix), "--device-id", "pi-9"] + (["--no-systemd"] if mode != "systemd"
                                                                               else [])
        done = subprocess.run(["sh", str(folder / "install.sh"), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for words in expected:
            assert words in done.stdout, (mode, words, done.stdout)
        assert 'device_id = "pi-9"' in done.stdout
        if mode == "no-systemd":
            assert "useradd" not in done.stdout and "systemctl" not in done.stdout
    assert not prefix.exists()
    done = subprocess.run(["sh", str(folder / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option" in done.stderr


def test_install_picks_the_ort_wheel_the_device_needs(tiny_export, fftmoe_wheel, tmp_path):
    ort = tmp_path / "onnxruntime_training_cpu-1.19.2-cp311-cp311-linux_aarch64.whl"
    ort.write_bytes(b"a wheel built by deploy/build_ort_training_aarch64.sh")
    out = tmp_path / f"{TOP}.tar.gz"
    bundle("--profile", "pi5-8gb", "--artifacts", str(tiny_export.root), "--broker", "mqtt://h:1883",
           "--wheel", str(fftmoe_wheel), "--ort-wheel", str(ort), out=out)
    folder = unpack(out, tmp_path / "unpacked")
    assert (folder / "wheels" / ort.name).read_bytes() == ort.read_bytes()

    def dry(*extra: str) -> str:
        done = subprocess.run(["sh", str(folder / "install.sh"), "--dry-run", "--no-systemd", "--prefix",
                               str(tmp_path / "p"), *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"pip install --disable-pip-version-check {folder / 'wheels' / ort.name}" in dry()  # the bundled one
    other = tmp_path / "onnxruntime_training_cpu-1.19.2-cp311-cp311-linux_aarch64-other.whl"
    other.write_bytes(b"x")
    assert f"pip install --disable-pip-version-check {other}" in dry("--ort-wheel", str(other))
    assert "--extra-index-url https://wheels.lan/simple onnxruntime-training-cpu==1.19.2" in dry(
        "--index-url", "https://wheels.lan/simple")
    done = subprocess.run(["sh", str(folder / "install.sh"), "--dry-run", "--ort-wheel", str(tmp_path / "nope.whl")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no such file" in done.stderr


def _unit_for_prefix(folder: Path, prefix: Path) -> Path:
    """The unit as install.sh writes it for `prefix`, with an executable fftmoe at prefix/venv/bin."""
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "fftmoe").symlink_to(Path(sys.executable).parent / "fftmoe")
    unit = prefix / "fftmoe-device.service"
    unit.write_text((folder / "fftmoe-device.service").read_text().replace("/opt/fftmoe", str(prefix)))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_passes_systemd_analyze_verify(tiny_export, fftmoe_wheel, tmp_path):
    out = tmp_path / f"{TOP}.tar.gz"
    bundle("--profile", "laptop", "--artifacts", str(tiny_export.root), "--broker", "mqtt://h:1883",
           "--wheel", str(fftmoe_wheel), out=out)
    folder = unpack(out, tmp_path)
    unit = _unit_for_prefix(folder, tmp_path / "prefix")
    text = unit.read_text()
    for line in ("User=fftmoe", "Restart=on-failure", "StateDirectory=fftmoe", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", f"ExecStart={tmp_path / 'prefix'}/venv/bin/fftmoe device run --config"):
        assert line in text, line

    def verify(path: Path) -> str:
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        return f"rc={done.returncode} {done.stdout}{done.stderr}".strip()

    assert verify(unit) == "rc=0"
    broken = unit.with_name("broken.service")  # the check can fail: a misspelt key is reported
    broken.write_text(text.replace("RestartSec=", "RestartSecs="))
    assert "RestartSecs" in verify(broken)


def test_installed_bundle_joins_a_federation_and_completes_a_round(tiny_export, tmp_path):
    data = write_tiny_dataset(tmp_path / "local.csv", rows=40, seed=3)
    state = tmp_path / "server-state"
    with running_broker("embedded", tmp_path) as url:
        out = tmp_path / f"{TOP}.tar.gz"
        bundle("--profile", "laptop", "--artifacts", str(tiny_export.root), "--broker", url, "--federation", "e2e",
               "--device-id", "pi-bundle", "--data", str(data), "--threads", "1", out=out)
        folder = unpack(out, tmp_path / "unpacked")
        prefix = tmp_path / "prefix"
        started = time.monotonic()
        done = subprocess.run(["sh", str(folder / "install.sh"), "--no-systemd", "--prefix", str(prefix)],
                              capture_output=True, text=True, timeout=900)
        install_s = time.monotonic() - started
        print(f"install.sh --no-systemd took {install_s:.1f} s")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "7 of 7 checks passed" in done.stdout, done.stdout[-3000:]  # doctor ran in the new environment
        python = prefix / "venv" / "bin" / "python"
        probe = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('torch', "
                                "'transformers') if u.find_spec(m)], u.find_spec('onnxruntime') is not None)"],
                               capture_output=True, text=True)
        assert probe.stdout.strip() == "[] True", probe.stderr
        server = start_server(tiny_export, state, tmp_path / "server.log", broker=url,
                              extra=["--rounds", "1", "--min-devices", "1", "--min-updates", "1"])
        device = subprocess.Popen([str(prefix / "venv" / "bin" / "fftmoe"), "device", "run", "--config", "device.toml"],
                                  cwd=prefix / "device", stdout=open(tmp_path / "device.log", "w"),
                                  stderr=subprocess.STDOUT)
        try:
            code = server.wait(timeout=180)
            assert code == 0, (tmp_path / "server.log").read_text()[-3000:] + (tmp_path / "device.log").read_text()
        finally:
            codes = stop_all([device, server])
    records = metrics(state)
    assert len(records) == 1 and records[0]["updates"] == 1
    assert records[0]["devices"]["pi-bundle"]["status"] == "ok"
    assert records[0]["devices"]["pi-bundle"]["tier"] == "big"
    assert codes[0] == 0, (tmp_path / "device.log").read_text()[-3000:]  # clean stop on SIGTERM
    assert any((prefix / "device" / "state").iterdir())  # the device's durable state lives in the install
