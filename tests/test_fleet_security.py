"""`fftmoe fleet` against a real Debian mosquitto on 127.0.0.1: TLS, credentials, ACL, revocation.

Each fleet is provisioned by the real command, and mosquitto runs the generated mosquitto.conf
unchanged (its listener port is chosen free before `fleet init`). Clients are plain paho clients
(VERSION2 callbacks) that wait for CONNACK and SUBACK, so "nothing arrived" is never a race with a
subscription that was not active yet: every negative check is paired with a control message that
must arrive after it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from broker_server import fleet, fleet_pki
from broker_server.config import load_server_config
from broker_server.embedded_broker import free_port
from edge_runtime import wire
from edge_runtime.device_config import load_device_config
from edge_runtime.mqtt import BrokerConfig, MqttConnection
from tests.brokers import mosquitto_binary, wait_for_port
from tests.federation import metrics, start_devices, start_server, stop_all, wait_for_rounds

FED = "e2e"  # the federation tests/federation.py's helpers use


def fleet_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "fleet", *args], capture_output=True, text=True,
                          timeout=60)


class FleetBroker:
    """mosquitto running a fleet's generated configuration, unchanged."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.log = root / "mosquitto.log"
        self.process: subprocess.Popen | None = None
        self._reloads = 0

    def start(self) -> "FleetBroker":
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.root / "broker" / "mosquitto.conf")],
                                        stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        wait_for_port(self.port)
        return self

    def reload(self) -> None:
        """What `systemctl reload mosquitto` does: SIGHUP, then mosquitto re-reads password file, ACL, CRL."""
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while self.log.read_text().count("Reloading config") < self._reloads + 1:
            assert time.monotonic() < deadline, "mosquitto did not reload"
            time.sleep(0.05)
        self._reloads += 1
        time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def provision(tmp: Path, auth: str, devices: str) -> tuple[Path, int]:
    root, port = tmp / f"fleet-{auth}", free_port()
    # Started as root, mosquitto drops to its `user` (Debian: mosquitto) before reading the password
    # file, which then cannot traverse pytest's 0700 temporary folders; so stay root here.
    as_root = ["--broker-user", "root"] if os.geteuid() == 0 else []
    done = fleet_cmd("init", "--out", str(root), "--federation", FED, "--devices", devices, "--auth", auth,
                     "--port", str(port), "--listen-address", "127.0.0.1", "--server-host", "127.0.0.1,localhost",
                     *as_root)
    assert done.returncode == 0, done.stderr
    return root, port


class Peer:
    """A paho client that reports how its connection attempt ended and what it received."""

    def __init__(self, port: int, root: Path, *, user: str | None = None, password: str | None = None,
                 cert: Path | None = None, key: Path | None = None, tls: bool = True, client_id: str = ""):
        self.messages: list[tuple[str, bytes]] = []
        self.connack: str | None = None
        self.disconnected = threading.Event()
        self._connack = threading.Event()
        self._subacks: list = []
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                             reconnect_on_failure=False)
        if user is not None:
            client.username_pw_set(user, password)
        if tls:
            client.tls_set(ca_certs=str(root / "ca" / "ca.crt"), certfile=cert and str(cert),
                           keyfile=key and str(key), cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: (self.disconnected.set(), self._connack.set())
        client.on_subscribe = lambda c, u, mid, codes, p: self._subacks.append(codes)
        client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client = client
        try:
            client.connect("127.0.0.1", port, keepalive=10)
        except (OSError, ssl.SSLError) as err:  # the TLS handshake is part of connect()
            self.connack = f"connect failed: {type(err).__name__}"
            return
        client.loop_start()
        self._connack.wait(5)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = str(reason_code)
        self._connack.set()

    @property
    def accepted(self) -> bool:
        return self.connack == "Success" and not self.disconnected.is_set()

    def subscribe(self, *topics: str) -> None:
        before = len(self._subacks)
        self.client.subscribe([(t, 1) for t in topics])
        deadline = time.monotonic() + 5
        while len(self._subacks) == before:
            assert time.monotonic() < deadline, "no SUBACK"
            time.sleep(0.01)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait_for(self, topic: str, payload: bytes, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while (topic, payload) not in self.messages:
            assert time.monotonic() < deadline, f"{topic} {payload!r} never arrived; got {self.messages}"
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def secret(path: Path) -> str:
    return path.read_text().strip()


def device_peer(root: Path, port: int, device: str, **kw) -> Peer:
    return Peer(port, root, user=device, password=secret(root / "devices" / device / "password"), **kw)


def aggregator_peer(root: Path, port: int) -> Peer:
    return Peer(port, root, user=fleet.AGGREGATOR, password=secret(root / "aggregator" / "password"))


@pytest.fixture(scope="module")
def password_fleet(tmp_path_factory):
    root, port = provision(tmp_path_factory.mktemp("fleet"), "password", "dev0,dev1,dev2")
    broker = FleetBroker(root, port).start()
    yield root, port, broker
    broker.stop()


# -- the generated files ----------------------------------------------------------------------------
def test_generated_files_are_locked_down(password_fleet):
    root, port, _ = password_fleet
    conf = (root / "broker" / "mosquitto.conf").read_text()
    for line in (f"listener {port} 127.0.0.1", "allow_anonymous false", "tls_version tlsv1.2",
                 f"password_file {root}/broker/passwd", f"acl_file {root}/broker/acl", "keyfile", "certfile", "cafile"):
        assert line in conf
    for secret_file in ("ca/ca.key", "broker/server.key", "broker/passwd", "aggregator/password",
                        "devices/dev0/password"):
        assert stat.S_IMODE((root / secret_file).stat().st_mode) == 0o600, secret_file
    assert stat.S_IMODE((root / "devices" / "dev0").stat().st_mode) == 0o700
    passwd = (root / "broker" / "passwd").read_text()
    assert secret(root / "devices" / "dev0" / "password") not in passwd  # stored hashed only


def test_acl_filters_cover_exactly_the_wire_topics():
    match = paho.topic_matches_sub
    dev = fleet.acl_filters(FED, "dev0")
    writes = [t for a, t in dev if a == "write"]
    reads = [t for a, t in dev if a == "read"]
    own = [wire.upload_topic(FED, "dev0", 3), wire.upload_topic(FED, "dev0", None), wire.presence_topic(FED, "dev0")]
    assert all(any(match(f, t) for f in writes) for t in own)
    others = [wire.upload_topic(FED, "dev1", 3), wire.presence_topic(FED, "dev1"), wire.global_topic(FED),
              wire.task_topic(FED, "dev0"), wire.upload_topic("other", "dev0", 3)]
    assert not any(match(f, t) for f in writes for t in others)
    assert all(any(match(f, t) for f in reads) for t in (wire.task_topic(FED, "dev0"), wire.global_topic(FED)))
    assert not any(match(f, wire.task_topic(FED, "dev1")) for f in reads)
    agg = fleet.acl_filters(FED, None)
    assert {a for a, t in agg if match(t, wire.task_topic(FED, "any")) or match(t, wire.global_topic(FED))} == {"write"}


def test_password_hashes_match_mosquitto_passwd(tmp_path):
    line = fleet_pki.password_line("dev0", "s3cret", salt=b"\x01" * 12)
    assert line.startswith("dev0:$7$101$AQEBAQEBAQEBAQEB$") and fleet_pki.check_password_line(line, "dev0", "s3cret")
    assert not fleet_pki.check_password_line(line, "dev0", "wrong")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run([tool, str(passwd), "dev0"], input="s3cret\ns3cret\n", text=True, check=True, capture_output=True)
    assert fleet_pki.check_password_line(passwd.read_text(), "dev0", "s3cret")  # same format, both ways


def test_init_refuses_to_overwrite_and_bad_ids(tmp_path):
    root, _ = provision(tmp_path, "password", "dev0")
    again = fleet_cmd("init", "--out", str(root), "--federation", FED, "--devices", "dev9")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    for bad in ("aggregator", "a/b", "dev+"):
        done = fleet_cmd("init", "--out", str(tmp_path / f"x{len(bad)}"), "--federation", FED, "--devices", bad)
        assert done.returncode == 2, bad
    assert fleet_cmd("add-device", str(root), "dev0").returncode == 2  # already active
    assert fleet_cmd("revoke", str(root), "nobody").returncode == 2


# -- authentication -------------------------------------------------------------------------------------
def test_valid_device_connects_over_tls_with_its_kit(password_fleet):
    root, port, _ = password_fleet
    kit = root / "devices" / "dev0"
    toml = (kit / "device.toml").read_text()
    assert f'broker = "mqtts://127.0.0.1:{port}"' in toml and 'username = "dev0"' in toml
    config = BrokerConfig.from_url(f"mqtts://127.0.0.1:{port}", ca_file=str(kit / "ca.crt"), username="dev0",
                                   password=secret(kit / "password"))
    connection = MqttConnection(config, "fftmoe-e2e-dev0", [], lambda *_: None)
    connection.start()
    try:
        assert connection.wait_connected(10)
    finally:
        connection.stop()


def test_refused_without_valid_credentials(password_fleet):
    root, port, _ = password_fleet
    assert Peer(port, root).connack == "Not authorized"  # no credentials at all
    assert Peer(port, root, user="dev0", password="guess").connack == "Not authorized"
    # dev1's user name with dev0's password: a device cannot act as another one
    assert Peer(port, root, user="dev1", password=secret(root / "devices" / "dev0" / "password")).connack \
        == "Not authorized"
    assert Peer(port, root, user="ghost", password="x").connack == "Not authorized"
    control = device_peer(root, port, "dev1")
    assert control.accepted  # the same broker does admit a valid credential
    control.close()


def test_plaintext_connection_to_tls_listener_fails(password_fleet):
    root, port, _ = password_fleet
    plain = device_peer(root, port, "dev0", tls=False)
    assert not plain.accepted and plain.connack != "Success", plain.connack
    plain.close()
    control = device_peer(root, port, "dev0")  # the same credential over TLS
    assert control.accepted
    control.close()


# -- authorisation (ACL) ------------------------------------------------------------------------------------
def test_broker_drops_publishes_to_topics_the_device_does_not_own(password_fleet):
    root, port, _ = password_fleet
    server = aggregator_peer(root, port)
    server.subscribe(f"fftmoe/{FED}/#")  # more than the server needs: whatever the broker lets through
    dev1, dev0 = device_peer(root, port, "dev1"), device_peer(root, port, "dev0")
    assert server.accepted and dev0.accepted and dev1.accepted
    dev0.subscribe(wire.task_topic(FED, "dev0"), wire.global_topic(FED))
    forged = [wire.upload_topic(FED, "dev0", 1), wire.upload_topic(FED, "dev0", None),  # another device's uploads
              wire.presence_topic(FED, "dev0"),  # another device's presence
              wire.global_topic(FED), wire.task_topic(FED, "dev0")]  # the aggregator's topics
    for topic in forged:
        dev1.publish(topic, b"forged by dev1")
    dev1.publish(wire.upload_topic(FED, "dev1", 1), b"control")  # its own topic: delivered, and after the rest
    server.wait_for(wire.upload_topic(FED, "dev1", 1), b"control")
    time.sleep(0.3)
    assert [m for m in server.messages + dev0.messages if m[1] == b"forged by dev1"] == []
    chunk = os.urandom(256 * 1024 + 64)  # a full upload chunk with its frame header: within max_packet_size
    dev1.publish(wire.upload_topic(FED, "dev1", 2), chunk)
    server.wait_for(wire.upload_topic(FED, "dev1", 2), chunk)
    for peer in (server, dev0, dev1):
        peer.close()


def test_device_cannot_read_another_devices_task(password_fleet):
    root, port, _ = password_fleet
    snoop = device_peer(root, port, "dev1")
    snoop.subscribe(wire.task_topic(FED, "dev0"), f"fftmoe/{FED}/task/+", "#")  # the broker grants, then filters
    server = aggregator_peer(root, port)
    server.publish(wire.task_topic(FED, "dev0"), b"task for dev0")
    server.publish(wire.global_topic(FED), b"global")  # control: dev1 may read the broadcast
    snoop.wait_for(wire.global_topic(FED), b"global")
    time.sleep(0.3)
    assert [m for m in snoop.messages if m[1] == b"task for dev0"] == []
    snoop.close()
    server.close()


# -- revocation -------------------------------------------------------------------------------------------------
def test_revoked_device_is_disconnected_and_refused_then_can_be_readded(password_fleet):
    root, port, broker = password_fleet
    old_password = secret(root / "devices" / "dev2" / "password")
    online = device_peer(root, port, "dev2")
    assert online.accepted
    done = fleet_cmd("revoke", str(root), "dev2")
    assert done.returncode == 0 and "kill -HUP" in done.stdout, done.stderr
    assert "dev2:" not in (root / "broker" / "passwd").read_text()
    assert "user dev2" not in (root / "broker" / "acl").read_text()
    assert not (root / "devices" / "dev2").exists()
    broker.reload()
    assert online.disconnected.wait(5)  # mosquitto re-checks connected clients on reload
    assert Peer(port, root, user="dev2", password=old_password).connack == "Not authorized"
    assert "dev2" in fleet_cmd("list", str(root)).stdout
    # a repaired device gets a fresh credential; the stolen one stays dead
    assert fleet_cmd("add-device", str(root), "dev2").returncode == 0
    broker.reload()
    assert device_peer(root, port, "dev2").accepted
    assert Peer(port, root, user="dev2", password=old_password).connack == "Not authorized"


# -- certificates -------------------------------------------------------------------------------------------------
def test_certificate_fleet(tmp_path):
    root, port = provision(tmp_path, "certificate", "dev0,dev1")
    conf = (root / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "password_file" not in conf and f"crlfile {root}/broker/crl.pem" in conf
    broker = FleetBroker(root, port).start()
    kit = root / "devices"
    try:
        def device(name: str) -> Peer:
            return Peer(port, root, cert=kit / name / "device.crt", key=kit / name / "device.key")

        agg = root / "aggregator"
        server = Peer(port, root, cert=agg / "aggregator.crt", key=agg / "aggregator.key")
        server.subscribe(f"fftmoe/{FED}/#")
        dev0, dev1 = device("dev0"), device("dev1")
        assert server.accepted and dev0.accepted and dev1.accepted
        dev1.publish(wire.upload_topic(FED, "dev0", 1), b"forged")  # identity = certificate CN = dev1
        dev1.publish(wire.upload_topic(FED, "dev1", 1), b"control")
        server.wait_for(wire.upload_topic(FED, "dev1", 1), b"control")
        assert not Peer(port, root).accepted  # no client certificate
        assert not Peer(port, root, user="dev0", password="x").accepted  # a password is no substitute
        # the broker's own certificate (serverAuth only) is no client credential
        assert not Peer(port, root, cert=root / "broker" / "server.crt", key=root / "broker" / "server.key").accepted
        kept = (kit / "dev1" / "device.crt").read_bytes(), (kit / "dev1" / "device.key").read_bytes()
        assert fleet_cmd("revoke", str(root), "dev1").returncode == 0
        stolen = tmp_path / "stolen"
        stolen.mkdir()
        (stolen / "device.crt").write_bytes(kept[0])
        (stolen / "device.key").write_bytes(kept[1])
        broker.reload()
        # new TLS handshakes with the revoked certificate fail (crl.pem is re-read on SIGHUP) ...
        assert not Peer(port, root, cert=stolen / "device.crt", key=stolen / "device.key").accepted
        # ... and a session that was already open has lost every permission with its ACL block
        dev1.publish(wire.upload_topic(FED, "dev1", 2), b"after revocation")
        dev0.publish(wire.upload_topic(FED, "dev0", 2), b"control 2")
        server.wait_for(wire.upload_topic(FED, "dev0", 2), b"control 2")
        time.sleep(0.3)
        assert [m for m in server.messages if m[1] in (b"forged", b"after revocation")] == []
        assert device("dev0").accepted  # the CRL revokes only dev1
        # the kits are ready: the device's and the server's own config loaders connect with them
        device_config = load_device_config(kit / "dev0" / "device.toml", {"artifacts": "a", "tier": "t", "data": "d"})
        server_config = load_server_config(agg / "server.toml", {"artifacts": "a"})
        for config, client_id in ((device_config, "fftmoe-e2e-dev0"), (server_config, "fftmoe-server-e2e")):
            connection = MqttConnection(BrokerConfig.from_url(
                config.broker, ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file,
                username=config.username, password=config.password()), client_id, [], lambda *_: None)
            connection.start()
            try:
                assert connection.wait_connected(10), client_id
            finally:
                connection.stop()
    finally:
        broker.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not _has_user("mosquitto"), reason="needs root and Debian's mosquitto user")
def test_default_broker_user_reads_its_files_after_dropping_root():
    """Debian starts mosquitto as root and it drops to user mosquitto before reading the password
    file (and again on every reload): run as root, `fleet init` hands broker/ to that user."""
    folder = Path(tempfile.mkdtemp(prefix="fftmoe-fleet-"))  # not pytest's tmp: mosquitto must traverse it
    try:
        folder.chmod(0o755)
        root, port = folder / "fleet", free_port()
        done = fleet_cmd("init", "--out", str(root), "--federation", FED, "--devices", "dev0,dev1", "--port",
                         str(port), "--listen-address", "127.0.0.1")
        assert done.returncode == 0, done.stderr
        assert "user mosquitto" in (root / "broker" / "mosquitto.conf").read_text()
        broker = FleetBroker(root, port).start()
        try:
            peer = device_peer(root, port, "dev1")
            assert peer.accepted, (root / "mosquitto.log").read_text()
            assert fleet_cmd("revoke", str(root), "dev1").returncode == 0
            broker.reload()  # re-reads the rewritten files as user mosquitto
            assert peer.disconnected.wait(5)
            assert device_peer(root, port, "dev0").accepted
        finally:
            broker.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- a whole round ----------------------------------------------------------------------------------------------------
def test_round_with_real_server_and_device_and_a_forger(tiny_export, password_fleet, tmp_path):
    """`fftmoe serve` and `fftmoe device`, configured by their generated kits, complete a round over
    TLS; meanwhile dev1, a provisioned device, forges dev0's uploads and presence: the server never sees them."""
    root, port, _ = password_fleet
    url = f"mqtts://127.0.0.1:{port}"
    state, log = tmp_path / "server-state", tmp_path / "server.log"
    server = start_server(tiny_export, state, log, broker=url, extra=[
        "--config", str(root / "aggregator" / "server.toml"), "--rounds", "1", "--min-devices", "1"])
    processes = [server]
    forged = [wire.upload_topic(FED, "dev0", 0), wire.upload_topic(FED, "dev0", None), wire.presence_topic(FED, "dev0")]
    forger = device_peer(root, port, "dev1")

    def logged(topic: str) -> bool:
        return f"rejected a message on {topic}:" in (log.read_text() if log.exists() else "")

    def control(topic: str) -> None:
        """Garbage on dev1's own topic (allowed): the server logs it once it arrives. Repeated until
        then, because the server's subscriptions may still be in flight when it reports connecting."""
        deadline = time.monotonic() + 30
        while not logged(topic):
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-2000:]
            forger.publish(topic, b"control")
            time.sleep(0.2)

    try:
        control(wire.upload_topic(FED, "dev1", None))  # the server is subscribed from here on
        for topic in forged:
            forger.publish(topic, b"forged")
        control(wire.upload_topic(FED, "dev1", 0))  # sent after the forged ones, so they had their chance
        processes += start_devices(url, tiny_export, tmp_path, ["small"],
                                   extra=["--config", str(root / "devices" / "dev0" / "device.toml")])
        records = wait_for_rounds(state, 1, timeout=90, server=server)
        assert server.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        forger.close()
        stop_all(processes)
    assert records[0]["updates"] == 1 and records[0]["participants"] == 1
    assert len(metrics(state)) == 1
    for topic in forged:
        assert not logged(topic), topic
