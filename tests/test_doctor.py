"""`fftmoe device doctor`: all OK on a good setup, and a FAIL line naming the problem for a corrupt
artifact, an unreachable broker, a broker that never answers MQTT, too little free RAM (a fake
/proc/meminfo), a missing data file, an unsupported Python and a training runtime that drags in torch."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from broker_server.embedded_broker import free_port
from edge_runtime import doctor
from tests.brokers import running_broker
from tests.tiny_model import write_tiny_dataset


def meminfo_file(folder: Path, available_mb: float) -> Path:
    path = folder / "meminfo"
    path.write_text(f"MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                    f"MemAvailable:   {int(available_mb * 1024):>8} kB\nBuffers:           1000 kB\n")
    return path


def run_doctor(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "device", "doctor", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def lines(done: subprocess.CompletedProcess) -> dict[str, str]:
    """check name -> its whole line."""
    found = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("OK", "WARN", "FAIL"):
            found[parts[1]] = line
    return found


def test_good_setup_is_all_ok(tiny_export, tmp_path):
    with running_broker("embedded", tmp_path) as url:
        done = run_doctor("--artifacts", str(tiny_export.root), "--tier", "small", "--broker", url,
                          "--meminfo", str(meminfo_file(tmp_path, 4000)))
    assert done.returncode == 0, done.stdout + done.stderr
    checks = lines(done)
    assert set(checks) == {"python", "runtime", "artifacts", "broker", "memory"}
    assert all(line.startswith("OK") for line in checks.values()), done.stdout
    assert "without torch" in checks["runtime"] and "4000 MB available" in checks["memory"]


def test_config_mode_checks_what_the_service_runs(tiny_export, tmp_path):
    install = tmp_path / "device"
    shutil.copytree(tiny_export.root, install / "artifacts")
    (install / "password").write_text("pw\n")
    with running_broker("embedded", tmp_path) as url:
        (install / "device.toml").write_text(f'device_id = "pi-1"\nbroker = "{url}"\nartifacts = "artifacts"\n'
                                             'tier = "big"\ndata = "data.csv"\nusername = "pi-1"\n'
                                             'password_file = "password"\n')
        meminfo = str(meminfo_file(tmp_path, 4000))
        missing = run_doctor("--config", "device.toml", "--meminfo", meminfo, cwd=install)
        write_tiny_dataset(install / "data.csv", rows=10)
        good = run_doctor("--config", "device.toml", "--meminfo", meminfo, cwd=install)
    assert missing.returncode == 1 and lines(missing)["data"].startswith("FAIL")
    assert "data.csv not found" in lines(missing)["data"] and "fix:" in lines(missing)["data"]
    assert good.returncode == 0, good.stdout
    assert set(lines(good)) == {"python", "config", "runtime", "artifacts", "data", "broker", "memory"}
    assert "device pi-1" in lines(good)["config"]
    elsewhere = run_doctor("--config", str(install / "device.toml"), "--meminfo", meminfo, cwd=tmp_path)
    assert lines(elsewhere)["config"].startswith("FAIL")  # the relative password file is not found from there
    assert "run doctor from the folder of" in lines(elsewhere)["config"]  # ... and doctor says why


def test_corrupt_artifact_fails_naming_the_file(tiny_export, tmp_path):
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_export.root, copy)
    blob = bytearray((copy / "small" / "checkpoint").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "small" / "checkpoint").write_bytes(bytes(blob))
    done = run_doctor("--artifacts", str(copy), "--tier", "small", "--meminfo", str(meminfo_file(tmp_path, 4000)))
    assert done.returncode == 1
    line = lines(done)["artifacts"]
    assert line.startswith("FAIL") and "small/checkpoint" in line and "sha256" in line and "fix:" in line
    assert lines(done)["memory"].startswith("OK")  # the other checks still run
    assert "failed: artifacts" in done.stdout


def test_unreachable_broker_fails(tiny_export, tmp_path):
    port = free_port()  # nothing listens there
    done = run_doctor("--artifacts", str(tiny_export.root), "--tier", "small", "--broker", f"mqtt://127.0.0.1:{port}",
                      "--timeout", "2", "--meminfo", str(meminfo_file(tmp_path, 4000)))
    assert done.returncode == 1
    line = lines(done)["broker"]
    assert line.startswith("FAIL") and f"127.0.0.1:{port}" in line and "over TCP" in line and "fix:" in line


def test_broker_that_never_speaks_mqtt_fails_the_connect():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)  # accept TCP, never send a CONNACK

    threading.Thread(target=serve, daemon=True).start()
    try:
        check = doctor.check_broker(f"mqtt://127.0.0.1:{port}", timeout=1.0)
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert check.status == "FAIL" and "MQTT CONNECT failed" in check.detail, check


def test_too_little_free_ram_fails_and_tight_ram_warns(tiny_export, tmp_path):
    peak = tiny_export.tiers["big"].measured["peak_rss_mb"]
    done = run_doctor("--artifacts", str(tiny_export.root), "--tier", "big",
                      "--meminfo", str(meminfo_file(tmp_path, peak / 2)))
    assert done.returncode == 1
    line = lines(done)["memory"]
    assert line.startswith("FAIL") and "too little free RAM" in line and f"peaks at {peak:.0f} MB" in line
    entry = tiny_export.tiers["big"]
    assert doctor.check_memory(entry, lambda: {"MemAvailable": int(peak * 1.1 * 1024)}).status == "WARN"
    assert doctor.check_memory(entry, lambda: {"MemAvailable": int(peak * 3 * 1024)}).status == "OK"
    assert doctor.check_memory(entry, lambda: {}).status == "WARN"  # no /proc/meminfo (not Linux)


def test_python_version_and_runtime_checks_can_fail(tmp_path):
    assert doctor.check_python((3, 11)).status == "OK"
    assert doctor.check_python((3, 13)).status == "FAIL" and "3.10-3.12" in doctor.check_python((3, 13)).detail
    real = doctor.check_training_api(sys.executable)
    assert real.status == "OK" and "without torch" in real.detail, real  # the shim keeps torch out, here too
    fakes = {'{"ort": "1.19.2", "module": true, "torch": true}': "imported torch",
             '{"error": "No module named onnxruntime", "torch": false}': "not importable"}
    for output, words in fakes.items():
        fake = tmp_path / "fake-python"
        fake.write_text(f"#!/bin/sh\necho '{output}'\n")
        fake.chmod(0o755)
        check = doctor.check_training_api(str(fake))
        assert check.status == "FAIL" and words in check.detail, check


def test_doctor_needs_artifacts_or_config():
    done = run_doctor("--tier", "small")
    assert done.returncode == 2 and "--config" in done.stderr


def test_meminfo_reader_parses_proc_format(tmp_path):
    fields = doctor.read_meminfo(str(meminfo_file(tmp_path, 2048)))
    assert fields["MemAvailable"] == 2048 * 1024 and fields["MemTotal"] == 16000000
