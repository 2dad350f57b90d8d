"""Provision a secure fleet for Debian mosquitto: CA, certificates, credentials, ACL, configuration.

`init_fleet` writes a fleet folder; `add_device` and `revoke_device` change it. The folder:

    fleet.json                 the non-secret record every file below is regenerated from
    ca/ca.crt ca.key           the fleet CA (the key signs server, device and aggregator certificates)
    broker/                    for the broker host: mosquitto.conf, acl, passwd or crl.pem, ca.crt,
                               server.crt, server.key, data/ (mosquitto's persistence)
    aggregator/                for `fftmoe serve`: server.toml, ca.crt, password or aggregator.crt/.key
    devices/ID/                one kit per device: device.toml, ca.crt, password or device.crt/.key

Authentication is a random password per user (mosquitto PBKDF2-SHA512 password file), or with
`auth="certificate"` a client certificate per user whose common name is the user name
(`use_identity_as_username`). The ACL has one explicit `user` block per credential, regenerated
whole from fleet.json on every change (see `render_acl` for why not `pattern` lines). Revocation
deletes the user's password line and ACL block, and for certificates also lists the certificate's
serial in the CRL; mosquitto reads all three again on SIGHUP. Secret files are written 0600 and
atomically. This module does not start or signal mosquitto; `fleet_cli.py` is the command line.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from broker_server import fleet_pki as pki
from edge_runtime import wire

SCHEMA = 1
AGGREGATOR = "aggregator"  # the aggregator's MQTT user name (no device may take it)
AUTH_MODES = ("password", "certificate")
# Largest MQTT packet the broker accepts: a 256 KiB chunk plus its frame header and topic, with
# room for devices configured with chunk_size up to 1 MiB. mosquitto's default is 256 MiB, which
# lets any authenticated client make the broker buffer that much per message.
MAX_PACKET_BYTES = 2 * 1024 * 1024
# QoS 1 messages mosquitto queues per client beyond those in flight (default 1000, past which it
# drops them): the aggregator may receive every device's chunks at once.
MAX_QUEUED_MESSAGES = 10000


class FleetError(ValueError):
    """A fleet command cannot be carried out; the message says why."""


@dataclass(frozen=True)
class FleetPaths:
    root: Path

    @property
    def record(self) -> Path:
        return self.root / "fleet.json"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def aggregator(self) -> Path:
        return self.root / "aggregator"

    def device(self, device_id: str) -> Path:
        return self.root / "devices" / device_id


# -- files ----------------------------------------------------------------------------------------
def _write(path: Path, data: bytes | str, secret: bool = False, owner: tuple[int, int] | None = None) -> None:
    """Write atomically (temporary file + rename), 0600 for secrets from the first byte."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)  # a leftover tmp file may have had other bits
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def _mkdir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, *owner)


def _broker_owner(broker_user: str) -> tuple[int, int] | None:
    """Who must own the broker files: mosquitto started as root drops to `user` (Debian: mosquitto)
    before it reads the password file, the ACL and the CRL (also on every SIGHUP)."""
    if os.geteuid() != 0 or broker_user == "root":
        return None
    try:
        entry = pwd.getpwnam(broker_user)
    except KeyError:
        return None  # not the broker host: chown on the broker host after copying (README)
    return entry.pw_uid, entry.pw_gid


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- the record -----------------------------------------------------------------------------------
def load_record(root: str | Path) -> dict:
    paths = FleetPaths(Path(root))
    try:
        record = json.loads(paths.record.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FleetError(f"{root} is not a fleet folder (no fleet.json; create one with `fftmoe fleet init`)") from err
    except (OSError, ValueError) as err:
        raise FleetError(f"{paths.record}: unreadable: {err}") from err
    schema = record.get("schema") if isinstance(record, dict) else None
    if schema != SCHEMA:
        raise FleetError(f"{paths.record}: unsupported fleet record schema {schema!r} (this fftmoe writes {SCHEMA})")
    return record


def _check_device_id(device_id: str) -> str:
    try:
        wire.validate_id(device_id, "device id")
    except wire.WireError as err:
        raise FleetError(str(err)) from err
    if device_id == AGGREGATOR:
        raise FleetError(f"device id {AGGREGATOR!r} is the aggregator's user name")
    return device_id


# -- mosquitto configuration ------------------------------------------------------------------------
def acl_filters(federation: str, device_id: str | None) -> list[tuple[str, str]]:
    """(access, topic filter) pairs for a device, or for the aggregator when `device_id` is None.
    Derived from the wire's topic builders, so the layout stays defined in one place."""
    def any_device(topic: str) -> str:  # replace the device level (the last one) by '+'
        return topic.rsplit("/", 1)[0] + "/+"

    if device_id is None:  # the coordinator, and its aggregator workers (same credential)
        return [("read", wire.upload_subscription(federation)), ("read", wire.presence_subscription(federation)),
                ("read", any_device(wire.upload_subscription(federation, AGGREGATOR))),  # every lane
                ("write", any_device(wire.task_topic(federation, AGGREGATOR))),
                ("write", wire.global_topic(federation)),
                ("readwrite", wire.worker_topic(federation, AGGREGATOR, "in").rsplit("/", 2)[0] + "/#")]
    upload = any_device(wire.upload_topic(federation, device_id, 0))  # .../up/ID/{round|none}
    return [("write", upload), ("write", upload + "/+"),  # and .../up/ID/{round}/{worker lane}
            ("write", wire.presence_topic(federation, device_id)),
            ("read", wire.task_topic(federation, device_id)), ("read", wire.global_topic(federation))]


def render_acl(record: dict) -> str:
    """The ACL file: one `user` block per active credential and nothing else, so a user not listed
    (a revoked device, any name not provisioned) may neither publish nor subscribe. Explicit blocks
    rather than `pattern ... %u` lines, because a pattern grants to every authenticated session:
    a revoked certificate's session that is already open survives a reload (only new handshakes
    check the CRL), and with patterns it could go on publishing; without its block it can do
    nothing. A pattern would also grant device rights to the aggregator, and an explicit file is
    what an auditor can read. (Not %c either: a device's client id is fftmoe-{fed}-{device}.)"""
    fed = record["federation"]
    lines = [f"# fftmoe fleet {fed!r}: generated from fleet.json by `fftmoe fleet`; edits here are overwritten.",
             "# Anything not granted is denied. Reload mosquitto (SIGHUP) after a change.", ""]
    users = [(AGGREGATOR, None)] + [(d, d) for d, info in sorted(record["devices"].items())
                                    if info["status"] == "active"]
    for user, device in users:
        lines.append(f"user {user}")
        lines += [f"topic {access} {topic}" for access, topic in acl_filters(fed, device)]
        lines.append("")
    return "\n".join(lines)


def render_mosquitto_conf(record: dict) -> str:
    broker = record["broker_dir"]
    certificate = record["auth"] == "certificate"
    listener = f"listener {record['port']}" + (f" {record['listen_address']}" if record.get("listen_address") else "")
    lines = [
        f"# mosquitto 2.0 configuration for fftmoe fleet {record['federation']!r}, generated by `fftmoe fleet`.",
        "# Start: mosquitto -c THIS_FILE. After `fftmoe fleet add-device/revoke`: kill -HUP <mosquitto pid>.",
        f"user {record['broker_user']}",
        "per_listener_settings false",
        "allow_anonymous false",
        *([] if certificate else [f"password_file {broker}/passwd"]),
        f"acl_file {broker}/acl",
        "persistence true",  # keeps retained presence messages across broker restarts
        f"persistence_location {broker}/data/",
        "autosave_interval 60",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "log_dest stderr",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        "",
        listener,
        "protocol mqtt",
        f"cafile {broker}/ca.crt",
        f"certfile {broker}/server.crt",
        f"keyfile {broker}/server.key",
        "tls_version tlsv1.2",  # the minimum: TLS 1.3 is negotiated when both sides have it
    ]
    if certificate:
        lines += ["require_certificate true", "use_identity_as_username true", f"crlfile {broker}/crl.pem"]
    return "\n".join(lines) + "\n"


def _client_toml(record: dict, kit: str, user: str, role: str) -> str:
    """The connection part of a device.toml or server.toml; paths point where the kit is installed."""
    host = record["server_hosts"][0]
    url = f"mqtts://{'[' + host + ']' if _is_ipv6(host) else host}:{record['port']}"
    lines = [f"federation = {_toml_str(record['federation'])}", f"broker = {_toml_str(url)}",
             f"ca_file = {_toml_str(kit + '/ca.crt')}"]
    if record["auth"] == "certificate":
        lines += [f"cert_file = {_toml_str(f'{kit}/{role}.crt')}", f"key_file = {_toml_str(f'{kit}/{role}.key')}"]
    else:
        lines += [f"username = {_toml_str(user)}", f"password_file = {_toml_str(kit + '/password')}"]
    return "\n".join(lines) + "\n"


# -- credentials ------------------------------------------------------------------------------------
def _issue(paths: FleetPaths, record: dict, user: str, folder: Path, kit: str, role: str) -> dict:
    """Write `user`'s credential into `folder` (mode 0700); return what fleet.json keeps about it."""
    _mkdir(folder, 0o700)
    shutil.copyfile(paths.ca / "ca.crt", folder / "ca.crt")
    info: dict = {"status": "active", "added": _now(), "serial": None}
    if record["auth"] == "certificate":
        ca_key = pki.load_key((paths.ca / "ca.key").read_bytes())
        ca_cert = pki.load_cert((paths.ca / "ca.crt").read_bytes())
        key, cert = pki.make_leaf(ca_key, ca_cert, user)
        _write(folder / f"{role}.key", pki.key_pem(key), secret=True)
        _write(folder / f"{role}.crt", pki.cert_pem(cert))
        info["serial"] = str(cert.serial_number)  # a string: JSON readers may lose a 159-bit int
    else:
        password = pki.new_password()
        _write(folder / "password", password + "\n", secret=True)
        _set_password_line(paths, record, user, pki.password_line(user, password))
    return info


def _set_password_line(paths: FleetPaths, record: dict, user: str, line: str | None) -> None:
    """Replace (or with None, delete) `user`'s line of the broker's password file."""
    passwd = paths.broker / "passwd"
    lines = passwd.read_text(encoding="utf-8").splitlines() if passwd.exists() else []
    lines = [entry for entry in lines if entry.partition(":")[0] != user]
    if line is not None:
        lines.append(line)
    _write(passwd, "".join(entry + "\n" for entry in lines), secret=True,
           owner=_broker_owner(record["broker_user"]))


def _write_broker_files(paths: FleetPaths, record: dict) -> None:
    """Regenerate what mosquitto reads from the record: ACL, configuration and (certificates) CRL."""
    owner = _broker_owner(record["broker_user"])
    _write(paths.broker / "acl", render_acl(record), secret=True, owner=owner)
    _write(paths.broker / "mosquitto.conf", render_mosquitto_conf(record), owner=owner)
    if record["auth"] == "certificate":
        ca_key = pki.load_key((paths.ca / "ca.key").read_bytes())
        ca_cert = pki.load_cert((paths.ca / "ca.crt").read_bytes())
        crl = pki.crl_pem(pki.make_crl(ca_key, ca_cert, [int(s) for s in record["revoked_serials"]]))
        _write(paths.ca / "crl.pem", crl)
        _write(paths.broker / "crl.pem", crl, owner=owner)
    _write(paths.record, json.dumps(record, indent=2) + "\n")


def _device_kit(paths: FleetPaths, record: dict, device_id: str) -> None:
    folder = paths.device(device_id)
    kit = record["device_dir"] or str(folder)
    record["devices"][device_id] = _issue(paths, record, device_id, folder, kit, "device")
    _write(folder / "device.toml",
           f"# fftmoe device kit for {device_id!r}: copy this folder to {kit} on the device (keep it 0700).\n"
           f"device_id = {_toml_str(device_id)}\n" + _client_toml(record, kit, device_id, "device") +
           "# Still to set here or as flags: artifacts, tier, data, state_dir (see `fftmoe device --help`).\n")


# -- commands -----------------------------------------------------------------------------------------
def init_fleet(out: str | Path, federation: str, devices: list[str], *, server_hosts: list[str],
               port: int = 8883, auth: str = "password", listen_address: str | None = None,
               broker_dir: str | None = None, broker_user: str = "mosquitto", device_dir: str | None = None) -> dict:
    """Create a fleet folder at `out` (which must not exist or be empty); return the record."""
    root = Path(out).absolute()
    try:
        wire.validate_id(federation, "federation")
    except wire.WireError as err:
        raise FleetError(str(err)) from err
    if auth not in AUTH_MODES:
        raise FleetError(f"auth {auth!r} must be one of {', '.join(AUTH_MODES)}")
    if not server_hosts or any(not h or "/" in h or ":" in h and not _is_ipv6(h) for h in server_hosts):
        raise FleetError(f"server hosts {server_hosts!r} must be host names or IP addresses")
    if not 1 <= port <= 65535:
        raise FleetError(f"port {port} must be in [1, 65535]")
    for device_id in devices:
        _check_device_id(device_id)
    if len(set(devices)) != len(devices):
        raise FleetError(f"device ids repeat: {devices}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FleetError(f"{root} exists and is not an empty folder; refusing to overwrite a fleet's CA")
    paths = FleetPaths(root)
    record = {"schema": SCHEMA, "federation": federation, "auth": auth, "server_hosts": list(server_hosts),
              "port": port, "listen_address": listen_address, "broker_user": broker_user,
              "broker_dir": broker_dir or str(paths.broker), "device_dir": device_dir,
              "created": _now(), "aggregator": {}, "devices": {}, "revoked_serials": []}
    owner = _broker_owner(broker_user)
    created = not root.exists()
    try:
        _mkdir(root, 0o755)
        _mkdir(paths.ca, 0o700)
        _mkdir(paths.broker, 0o700, owner)
        _mkdir(paths.broker / "data", 0o700, owner)
        _mkdir(root / "devices", 0o700)
        ca_key, ca_cert = pki.make_ca(federation)
        _write(paths.ca / "ca.key", pki.key_pem(ca_key), secret=True)
        _write(paths.ca / "ca.crt", pki.cert_pem(ca_cert))
        server_key, server_cert = pki.make_leaf(ca_key, ca_cert, server_hosts[0], server_hosts=server_hosts)
        _write(paths.broker / "ca.crt", pki.cert_pem(ca_cert), owner=owner)
        _write(paths.broker / "server.crt", pki.cert_pem(server_cert), owner=owner)
        _write(paths.broker / "server.key", pki.key_pem(server_key), secret=True, owner=owner)
        if auth == "password":
            _write(paths.broker / "passwd", "", secret=True, owner=owner)
        record["aggregator"] = _issue(paths, record, AGGREGATOR, paths.aggregator, str(paths.aggregator),
                                      AGGREGATOR)
        _write(paths.aggregator / "server.toml",
               "# fftmoe serve --config THIS_FILE --artifacts EXPORT_FOLDER --state-dir STATE_FOLDER\n"
               + _client_toml(record, str(paths.aggregator), AGGREGATOR, AGGREGATOR))
        for device_id in devices:
            _device_kit(paths, record, device_id)
        _write_broker_files(paths, record)
    except BaseException as err:
        _discard(root, created)
        if isinstance(err, OSError):
            raise FleetError(f"cannot write the fleet folder {root}: {err}") from err
        raise
    return record


def _discard(root: Path, created: bool) -> None:
    """Undo a failed init: a half-written fleet would block the retry and might hold a CA nobody
    recorded. The folder was new or empty, so everything in it is ours."""
    if created:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def add_device(root: str | Path, device_id: str) -> Path:
    """Provision one more device (a revoked id gets a fresh credential); return its kit folder."""
    paths = FleetPaths(Path(root).absolute())
    record = load_record(paths.root)
    _check_device_id(device_id)
    if record["devices"].get(device_id, {}).get("status") == "active":
        raise FleetError(f"device {device_id!r} is already provisioned (revoke it first to issue a new credential)")
    try:
        _device_kit(paths, record, device_id)
        _write_broker_files(paths, record)
    except OSError as err:
        raise FleetError(f"cannot write the fleet folder {paths.root}: {err}") from err
    return paths.device(device_id)


def revoke_device(root: str | Path, device_id: str) -> dict:
    """Withdraw a device's credential: its password line and ACL block go, a certificate's serial
    joins the CRL, and its kit folder is deleted. Takes effect when mosquitto reloads (SIGHUP)."""
    paths = FleetPaths(Path(root).absolute())
    record = load_record(paths.root)
    info = record["devices"].get(device_id)
    if info is None or info["status"] != "active":
        raise FleetError(f"device {device_id!r} is not an active member of this fleet "
                         f"({'already revoked' if info else 'unknown'})")
    try:
        if record["auth"] == "password":
            _set_password_line(paths, record, device_id, None)
        if info.get("serial") is not None:
            record["revoked_serials"].append(info["serial"])
        record["devices"][device_id] = {**info, "status": "revoked", "revoked": _now()}
        _write_broker_files(paths, record)
        shutil.rmtree(paths.device(device_id), ignore_errors=True)
    except OSError as err:
        raise FleetError(f"cannot write the fleet folder {paths.root}: {err}") from err
    return record["devices"][device_id]
