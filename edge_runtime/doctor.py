"""`fftmoe device doctor`: check an installed device and say what to fix, one line per check.

  fftmoe device doctor --config device.toml            # what the service will run
  fftmoe device doctor --artifacts DIR --tier NAME [--broker URL]

Checks: the Python version (3.10-3.12, what the ORT training wheel supports); the device config (with
--config); the ONNX Runtime training API importable without torch (in a fresh subprocess, which reports
whether torch got imported); the tier's artifacts present with the manifest's sha256; the local data
file present (with --config); the broker reachable (TCP connect, then an MQTT CONNECT through
`edge_runtime.mqtt` with the configured credentials and a short timeout); free RAM (MemAvailable of
/proc/meminfo) against the tier's measured peak RSS. Each line is OK, WARN (works, but see the advice) or
FAIL (the device will not run until fixed). Exit codes: 0 no check failed, 1 a check failed, 2 bad usage.

This module only reads and connects: it never trains, writes state or publishes anything. Imports only
the edge runtime (paho lazily, for the broker check).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PYTHONS = ((3, 10), (3, 11), (3, 12))
MEMORY_MARGIN = 1.25  # below this multiple of the measured peak, free RAM is tight (WARN)
_PROBE = """
import json, sys
try:
    from edge_runtime import _ort
    result = {"ort": _ort.onnxruntime.__version__, "module": hasattr(_ort, "Module")}
except ImportError as err:
    result = {"error": str(err)}
result["torch"] = "torch" in sys.modules
print(json.dumps(result))
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "OK", "WARN" or "FAIL"
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.name:<9} {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


def add_parser(sub) -> None:
    """Register `doctor` on the `fftmoe device` sub-parsers."""
    p = sub.add_parser("doctor", help="check this device's installation and say what to fix",
                       description="Check Python, the torch-free ORT training API, artifacts, the broker and free "
                       "RAM.", epilog="Exit codes: 0 no check failed (WARN lines are advice), 1 a check failed, "
                       "2 bad usage.")
    p.add_argument("--config", help="device TOML file (what `fftmoe device run --config` uses)")
    p.add_argument("--artifacts", help="export folder with manifest.json (overrides the config)")
    p.add_argument("--tier", help="tier name (overrides the config)")
    p.add_argument("--broker", help="broker URL to check (overrides the config)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")
    p.add_argument("--meminfo", default="/proc/meminfo", help="file in /proc/meminfo format (default /proc/meminfo)")


def main(args) -> int:
    if args.config is None and (args.artifacts is None or args.tier is None):
        print("fftmoe device doctor: error: give --config device.toml, or --artifacts DIR and --tier NAME",
              file=sys.stderr)
        return EXIT_USAGE
    checks = run_checks(config_path=args.config, artifacts=args.artifacts, tier=args.tier, broker=args.broker,
                        timeout=args.timeout, meminfo=lambda: read_meminfo(args.meminfo))
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if c.status == "FAIL"]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; failed: {', '.join(failed)}"
                                                                           if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def run_checks(config_path: str | None = None, artifacts: str | None = None, tier: str | None = None,
               broker: str | None = None, timeout: float = 5.0,
               meminfo: Callable[[], dict[str, int]] | None = None, python: str = sys.executable) -> list[Check]:
    """Every check, in order. `meminfo` returns /proc/meminfo's fields in kB (injectable for tests)."""
    checks = [check_python(sys.version_info[:2])]
    config = None
    if config_path is not None:
        config_check, config = check_config(config_path, {"artifacts": artifacts, "tier": tier, "broker": broker})
        checks.append(config_check)
        if config is not None:
            artifacts, tier, broker = config.artifacts, config.tier, config.broker
    checks.append(check_training_api(python))
    entry = None
    if artifacts is not None and tier is not None:
        artifact_check, entry = check_artifacts(artifacts, tier, config_path)
        checks.append(artifact_check)
    if config is not None:
        checks.append(check_data(config.data))
    checks.append(check_broker(broker, config, timeout))
    if entry is not None:
        checks.append(check_memory(entry, meminfo or read_meminfo))
    return checks


def check_python(version: tuple[int, int]) -> Check:
    text = f"Python {version[0]}.{version[1]}"
    if tuple(version) in PYTHONS:
        return Check("python", "OK", text)
    return Check("python", "FAIL", f"{text}: the ONNX Runtime training wheel (1.19.2) exists for CPython 3.10-3.12 "
                 "only", "install Python 3.10-3.12 and reinstall (install.sh --python python3.11)")


def _cwd_hint(config_path: str | None) -> str:
    """Advice when a config's relative paths are read from another folder than the config's own."""
    if config_path is None or Path(config_path).resolve().parent == Path.cwd().resolve():
        return ""
    return (f" (relative paths in {config_path} are read from the working directory {os.getcwd()}; run doctor "
            f"from the folder of {config_path}, as the service does)")


def check_config(path: str, overrides: dict):
    from edge_runtime.device_config import DeviceConfigError, load_device_config

    try:
        config = load_device_config(path, overrides)
        config.password()  # the password file must be readable too
    except DeviceConfigError as err:
        return Check("config", "FAIL", f"{err}{_cwd_hint(path)}", f"edit {path}"), None
    return Check("config", "OK", f"{path}: device {config.device_id}, federation {config.federation}, "
                 f"tier {config.tier}, {config.threads} threads"), config


def check_training_api(python: str = sys.executable, timeout: float = 120.0) -> Check:
    """Import the training API in a fresh interpreter (as the device does) and see whether torch came along."""
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError) as err:
        return Check("runtime", "FAIL", f"cannot run {python} to import the training API ({err})",
                     "reinstall the virtual environment (install.sh)")
    if "error" in result:
        return Check("runtime", "FAIL", f"ONNX Runtime training API not importable: {result['error']}",
                     "x86_64: pip install onnxruntime-training-cpu==1.19.2; aarch64: install the wheel built by "
                     "deploy/build_ort_training_aarch64.sh (install.sh --ort-wheel FILE)")
    if result["torch"]:
        return Check("runtime", "FAIL", f"onnxruntime {result['ort']}: importing the training API imported torch "
                     "(hundreds of MB a device does not have)", "use a virtual environment with only fftmoe[edge]")
    return Check("runtime", "OK", f"onnxruntime {result['ort']} training API imports without torch")


def check_artifacts(artifacts: str, tier: str, config_path: str | None = None):
    """(check, tier entry or None). The entry is returned whenever the manifest names the tier, so the
    memory check still runs when a file is corrupt."""
    from edge_runtime.manifest import ArtifactIntegrityError, ManifestError, load_manifest, verify_tier

    where = "" if Path(artifacts).is_absolute() else _cwd_hint(config_path)
    try:
        manifest = load_manifest(artifacts)
        entry = manifest.tier(tier)
    except ManifestError as err:
        return Check("artifacts", "FAIL", f"{err}{where}", "copy the bundle's artifacts/ folder again (install.sh)"), None
    try:
        verify_tier(manifest, tier)
    except ManifestError as err:  # a serving-only tier
        return Check("artifacts", "FAIL", str(err), "set `tier` in the device config to a device tier"), entry
    except ArtifactIntegrityError as err:
        return Check("artifacts", "FAIL", str(err), "reinstall the bundle (install.sh) or copy the tier folder "
                     "again"), entry
    return Check("artifacts", "OK", f"{artifacts}: tier {tier}, {len(entry.files)} files match the manifest's "
                 "sha256"), entry


def check_data(path: str) -> Check:
    data = Path(path)
    if not data.is_file():
        return Check("data", "FAIL", f"local data {data} not found (relative to {os.getcwd()})",
                     f"copy the training data there (CSV with columns text,label) or set `data` in the config")
    try:
        with open(data, "rb") as fh:
            fh.read(1)
    except OSError as err:
        return Check("data", "FAIL", f"local data {data} unreadable: {err.strerror}",
                     "make it readable by the fftmoe user (chmod g+r, chgrp fftmoe)")
    return Check("data", "OK", f"local data {data} ({data.stat().st_size:,} bytes)")


class _Capture(logging.Handler):
    """Keeps the MQTT connection's warnings (a refused CONNECT, a TLS error) for the doctor's message."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_broker(url: str | None, config=None, timeout: float = 5.0) -> Check:
    """TCP connect, then a real MQTT CONNECT (with the config's TLS files and credentials) within `timeout`."""
    if url is None:
        return Check("broker", "WARN", "no broker URL given, not checked", "pass --broker URL or --config")
    from edge_runtime.mqtt import BrokerConfig, BrokerConfigError, MqttConnection

    try:
        extra = {} if config is None else dict(ca_file=config.ca_file, cert_file=config.cert_file,
                                               key_file=config.key_file, username=config.username,
                                               password=config.password())
        broker = BrokerConfig.from_url(url, reconnect_min_s=0.2, reconnect_max_s=1.0, **extra)
    except (BrokerConfigError, ValueError) as err:
        return Check("broker", "FAIL", str(err), "fix the broker URL or credential paths in the config")
    where = f"{broker.host}:{broker.port}"
    try:
        with socket.create_connection((broker.host, broker.port), timeout=timeout):
            pass
    except OSError as err:
        return Check("broker", "FAIL", f"cannot reach {where} over TCP ({err.strerror or err})",
                     "check that the broker runs, the host name and port, and firewalls between here and there")
    capture = _Capture()
    logger = logging.getLogger("edge_runtime.mqtt")
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False  # the reason goes into the FAIL line, not stderr
    connection = MqttConnection(broker, client_id=f"fftmoe-doctor-{os.getpid()}-{threading.get_ident() % 10000}",
                                subscriptions=[], on_message=lambda topic, payload: None)
    try:
        connection.start()
        connected = connection.wait_connected(timeout)
    finally:
        connection.stop()
        logger.removeHandler(capture)
        logger.propagate = propagate
    if not connected:
        said = capture.messages[-1] if capture.messages else "no CONNACK"
        return Check("broker", "FAIL", f"TCP to {where} works but the MQTT CONNECT failed within {timeout:g} s "
                     f"({said})", "check the URL scheme (mqtt:// vs mqtts://), the CA file, and the user name, "
                     "password or client certificate")
    return Check("broker", "OK", f"MQTT CONNECT to {where} accepted{' over TLS' if broker.tls else ''}")


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as {field: kB}."""
    fields = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])
    return fields


def check_memory(entry, meminfo: Callable[[], dict[str, int]] = read_meminfo) -> Check:
    peak = entry.measured.get("peak_rss_mb")
    if peak is None:
        return Check("memory", "WARN", f"tier {entry.name} has no measured peak RSS in the manifest",
                     "re-export with a current `fftmoe export` (it measures every tier)")
    try:
        available_mb = meminfo()["MemAvailable"] / 1024
    except (OSError, KeyError, ValueError) as err:
        return Check("memory", "WARN", f"cannot read free memory ({err!r}); tier {entry.name} peaks at {peak:.0f} MB",
                     "make sure that much RAM is free")
    text = f"{available_mb:.0f} MB available, tier {entry.name} peaks at {peak:.0f} MB (measured at export)"
    fix = ("stop other services or add zram/swap, or bundle a smaller tier (fftmoe bundle --tier); if the "
           "fftmoe-device service is running, stop it before checking")
    if available_mb < peak:
        return Check("memory", "FAIL", f"{text}: too little free RAM", fix)
    if available_mb < peak * MEMORY_MARGIN:
        return Check("memory", "WARN", f"{text}: less than {MEMORY_MARGIN:g}x headroom", fix)
    return Check("memory", "OK", text)
