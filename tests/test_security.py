"""Security against real components: Mosquitto with TLS client certificates, passwords and
the shipped ACL (deploy/mosquitto/acl, tls.conf), the real daemon process, real scrapes.

The certificates are made with ``openssl`` for each run (a CA, the broker's certificate
for 127.0.0.1 and localhost, one client certificate per role, and a second, untrusted
CA); passwords with ``mosquitto_passwd``. What docs/security.md promises is checked here:
the daemon connects only to a broker it can verify, with its own certificate and
password, and only to its topics; bad secrets stop the start with one line; secrets never
reach a log; model bundles cannot carry code; /metrics stays on loopback by default.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from detector import bundle as bundle_mod
from detector import config
from detector.cli import main as cli_main
from detector.ingest import loop_stop
from detector.errors import InputError
from detector.ingest import tls_context
from helpers import PLANT_MODEL, ROOT, Daemon, http_get, plant_messages, scrape, wait_for
from mqtt_broker import BrokerHandle, find_mosquitto, free_port, start_test_broker

DEPLOY = ROOT / "deploy" / "mosquitto"
OPENSSL = shutil.which("openssl")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
NOT_AUTHORIZED = 135  # MQTT 5 reason code: the broker's ACL refused the publish
ROLES = ("anomaly-detector", "sensor", "alerts")  # the user names in deploy/mosquitto/acl
STATUS = "anomaly-detector/status"


def need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("needs mosquitto (apt-get install mosquitto)")


# ---- certificates and passwords --------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    other_ca: Path  # a CA nobody here trusts, nor is signed by
    server_cert: Path
    server_key: Path
    dir: Path

    def cert(self, role: str) -> Path:
        return self.dir / f"{role}.crt"

    def key(self, role: str) -> Path:
        return self.dir / f"{role}.key"


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    proc = subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"openssl {args[0]}: {proc.stderr.strip()}"


def make_pki(d: Path) -> Pki:
    """A CA, the broker's certificate (CN localhost, SAN IP 127.0.0.1 and DNS localhost),
    a client certificate per role (CN = the role, the ACL's user name), and another CA."""
    def key(path: Path) -> Path:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        return path

    def ca(name: str) -> tuple[Path, Path]:
        k = key(d / f"{name}.key")
        _openssl("req", "-x509", "-new", "-key", str(k), "-out", str(d / f"{name}.crt"), "-days", "2",
                 "-subj", f"/CN=anomaly-detector test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return d / f"{name}.crt", k

    def leaf(name: str, issuer: tuple[Path, Path], cn: str, ext: str) -> None:
        k = key(d / f"{name}.key")
        csr = d / f"{name}.csr"
        _openssl("req", "-new", "-key", str(k), "-out", str(csr), "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(issuer[0]), "-CAkey", str(issuer[1]),
                 "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", str(d / f"{name}.crt"),
                 "-extfile", str(d / f"{name}.ext"))

    root = ca("ca")
    other = ca("other-ca")
    leaf("server", root, "localhost", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for role in ROLES:
        leaf(role, root, role, "extendedKeyUsage=clientAuth\n")
    return Pki(root[0], other[0], d / "server.crt", d / "server.key", d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("needs openssl (apt-get install openssl)")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """role → password, and "file" → the Mosquitto password file holding them."""
    if MOSQUITTO_PASSWD is None:
        pytest.skip("needs mosquitto_passwd (apt-get install mosquitto)")
    pw = {role: f"pw-{role}-{secrets.token_hex(8)}" for role in ROLES}
    path = tmp_path_factory.mktemp("passwd") / "passwd"
    for i, role in enumerate(ROLES):
        create = ["-c"] if i == 0 else []
        subprocess.run([MOSQUITTO_PASSWD, *create, "-b", str(path), role, pw[role]], check=True,
                       capture_output=True)
    return {**pw, "file": str(path)}


def auth_conf(passwords: dict[str, str]) -> str:
    """Passwords and the shipped ACL, as it is."""
    return f"password_file {passwords['file']}\nacl_file {DEPLOY / 'acl'}"


def tls_listener(pki: Pki) -> str:
    """deploy/mosquitto/tls.conf with this run's port, loopback address and files."""
    text = (DEPLOY / "tls.conf").read_text()
    for old, new in {"listener 8883\n": "listener {port} 127.0.0.1\n",
                     "/etc/mosquitto/certs/ca.crt": str(pki.ca),
                     "/etc/mosquitto/certs/server.crt": str(pki.server_cert),
                     "/etc/mosquitto/certs/server.key": str(pki.server_key)}.items():
        assert old in text, f"deploy/mosquitto/tls.conf no longer has {old.strip()!r}: update this test"
        text = text.replace(old, new)
    assert re.search(r"^require_certificate true$", text, re.MULTILINE)
    return text


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, passwords: dict[str, str]) -> Iterator[BrokerHandle]:
    need_mosquitto()
    handle = start_test_broker(listener=tls_listener(pki), conf_extra=auth_conf(passwords))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def auth_broker(passwords: dict[str, str]) -> Iterator[BrokerHandle]:
    need_mosquitto()
    handle = start_test_broker(listener="listener {port} 127.0.0.1\nallow_anonymous false",
                               conf_extra=auth_conf(passwords))
    yield handle
    handle.stop()


def broker_log(broker: BrokerHandle) -> str:
    assert broker.log_path is not None
    return broker.log_path.read_text(errors="replace")


def attempts(broker: BrokerHandle) -> int:
    """Connection attempts the broker has seen: Mosquitto logs each as one of these lines."""
    return len(re.findall(r"New connection from|Client connection from \S+ failed", broker_log(broker)))


# ---- an MQTT 5 test client, to see the broker's reason codes ----------------------------
class Peer:
    """A publisher or subscriber with a role's user name and password, over TLS with its
    own client certificate when ``pki`` is given; records messages and PUBACK reasons."""

    def __init__(self, port: int, role: str, password: str, pki: Pki | None = None,
                 topics: tuple[str, ...] = ()) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.acks: dict[int, mqtt.ReasonCode] = {}
        self.lock = threading.Lock()
        connected, subscribed = threading.Event(), threading.Event()
        self.connack: list[mqtt.ReasonCode] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{role}-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(role, password)
        if pki is not None:
            c.tls_set(ca_certs=str(pki.ca), certfile=str(pki.cert(role)), keyfile=str(pki.key(role)))
        def on_connect(cl: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object = None) -> None:
            self.connack.append(rc)
            connected.set()

        c.on_connect = on_connect
        c.on_subscribe = lambda cl, u, mid, rcs, p=None: subscribed.set()
        c.on_publish = lambda cl, u, mid, rc, p=None: self._ack(mid, rc)
        c.on_message = lambda cl, u, m: self._add(m)
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        wait_for(connected.is_set, f"{role} connected")
        assert not self.connack[0].is_failure, f"{role}: {self.connack[0]}"
        if topics:
            c.subscribe([(t, 1) for t in topics])
            wait_for(subscribed.is_set, f"{role} subscribed")

    def _ack(self, mid: int, rc: mqtt.ReasonCode) -> None:
        with self.lock:
            self.acks[mid] = rc

    def _add(self, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(m)

    def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        """Publish at QoS 1, wait for every PUBACK, return their reason codes' values."""
        infos = [self.client.publish(t, p, qos=1) for t, p in items]
        for info in infos:
            info.wait_for_publish(timeout=30)
        with self.lock:
            return [self.acks[i.mid].value for i in infos]

    def on(self, prefix: str) -> list[mqtt.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.startswith(prefix)]

    def close(self) -> None:
        self.client.disconnect()
        loop_stop(self.client)


def readings(d: Daemon) -> float:
    return d.value("anomaly_detector_readings_total")


def alerts_on(peer: Peer, stream: str) -> list[dict]:
    return [json.loads(m.payload) for m in peer.on(f"anomalies/{stream}")]


def tls_lines(pki: Pki, ca: Path | None = None, client_cert: bool = True) -> str:
    lines = f'tls = true\nca_file = "{ca or pki.ca}"\n'
    if client_cert:
        lines += f'cert_file = "{pki.cert("anomaly-detector")}"\nkey_file = "{pki.key("anomaly-detector")}"\n'
    return lines


def password_file(tmp: Path, password: str) -> Path:
    path = tmp / "mqtt-password"
    path.write_text(password + "\n")  # as `echo` or an editor leaves it
    path.chmod(0o600)
    return path


DEBUG_LOG = '[log]\nlevel = "debug"\n'


# ---- 1. TLS with client certificates -------------------------------------------------------
def test_tls_with_client_certificates_connects_scores_and_alerts(
        tmp_path: Path, tls_broker: BrokerHandle, pki: Pki, passwords: dict[str, str]) -> None:
    """The daemon verifies the broker (by host name: it connects to "localhost"), shows its
    own certificate, and logs in as the ACL's anomaly-detector user: readings published
    over TLS are scored and a fault's alert arrives over TLS."""
    pw = password_file(tmp_path, passwords["anomaly-detector"])
    d = Daemon(tmp_path, tls_broker.port, host="localhost", extra=DEBUG_LOG,
               mqtt=tls_lines(pki) + f'username = "anomaly-detector"\npassword_file = "{pw}"\n')
    watcher = Peer(tls_broker.port, "alerts", passwords["alerts"], pki, topics=("anomalies/#", STATUS))
    sensor = Peer(tls_broker.port, "sensor", passwords["sensor"], pki)
    d.start()
    try:
        wait_for(lambda: any(m.payload == b"online" for m in watcher.on(STATUS)), "online over TLS")
        assert d.healthz() == 200 and d.value("anomaly_detector_mqtt_connected") == 1
        stream = "sensors/plant/pump-1"
        acks = sensor.publish(plant_messages(stream, 400, seed=71, fault_at=300))
        assert set(acks) == {0}
        wait_for(lambda: readings(d) >= 400, "400 readings scored")
        assert readings(d) == 400
        starts = wait_for(lambda: [a for a in alerts_on(watcher, stream) if a["event"] == "anomaly_start"],
                          "an alert over TLS")
        assert starts[0]["stream"] == stream and max(starts[0]["features"], key=starts[0]["features"].get) == "pressure"
    finally:
        code = d.stop()
        watcher.close()
        sensor.close()
    assert code == 0
    log = d.logtext()
    assert "Traceback" not in log
    assert passwords["anomaly-detector"] not in log


@pytest.mark.parametrize("case", ["no client certificate", "trusts another CA", "names another host"])
def test_tls_without_client_certificate_or_with_the_wrong_ca_does_not_connect(
        tmp_path: Path, tls_broker: BrokerHandle, pki: Pki, passwords: dict[str, str], case: str) -> None:
    """The broker refuses a daemon without a certificate; a daemon that trusts another CA,
    or that reaches the broker under a name its certificate does not carry, refuses the
    broker. Either way: not connected, /healthz 503, a log line, retries with back-off, no
    crash, and a clean stop."""
    pw = password_file(tmp_path, passwords["anomaly-detector"])
    tls = {"no client certificate": tls_lines(pki, client_cert=False),
           "trusts another CA": tls_lines(pki, ca=pki.other_ca),
           "names another host": tls_lines(pki)}[case]
    # "127.1" is 127.0.0.1 to the resolver, but not a name in the certificate (which has
    # IP:127.0.0.1 and DNS:localhost): only the host name check can refuse it.
    d = Daemon(tmp_path, tls_broker.port, mqtt=tls + f'username = "anomaly-detector"\npassword_file = "{pw}"\n'
               "reconnect_max_s = 2\n", host="127.1" if case == "names another host" else "127.0.0.1")
    before = attempts(tls_broker)
    d.launch()
    try:
        wait_for(lambda: attempts(tls_broker) >= before + 2, "a second attempt")
        # Either the handshake fails on our side (paho's on_connect_fail, with the TLS
        # error as the reason), or, with TLS 1.3, the broker rejects the missing
        # certificate just after it (a connection that never came up): both are logged
        # as a failed connect.
        wait_for(lambda: "cannot connect to" in d.logtext(), "a 'cannot connect' line")
        if case == "trusts another CA":
            assert "certificate verify failed" in d.logtext()
        if case == "names another host":
            assert "Hostname mismatch" in d.logtext() or "IP address mismatch" in d.logtext()
        assert "disconnected from the broker" not in d.logtext()
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        assert d.healthz() == 503
        assert d.value("anomaly_detector_mqtt_connected") == 0
        assert "broker disconnected" in scrape(d.metrics_port, "/healthz")[1]
    finally:
        code = d.stop()
    assert code == 0
    log = d.logtext()
    assert "Traceback" not in log and passwords["anomaly-detector"] not in log
    if case == "no client certificate":
        assert "peer did not return a certificate" in broker_log(tls_broker)


# ---- 2. passwords and the ACL ------------------------------------------------------------------
@pytest.mark.parametrize("source", ["password_file", "password_env"])
def test_password_login_and_the_shipped_acl_confine_every_role(
        tmp_path: Path, auth_broker: BrokerHandle, passwords: dict[str, str], source: str) -> None:
    """The daemon logs in with its password (from a file, or the environment) and works
    under deploy/mosquitto/acl; the ACL keeps each role to its topics: a sensor cannot
    forge alerts or the status nor read alerts, an alert consumer cannot feed readings
    nor read them. The password never reaches the debug log."""
    secret = passwords["anomaly-detector"]
    env = None
    if source == "password_file":
        how = f'password_file = "{password_file(tmp_path, secret)}"'
    else:
        how = 'password_env = "AD_TEST_MQTT_PASSWORD"'
        env = {**os.environ, "AD_TEST_MQTT_PASSWORD": secret}
    d = Daemon(tmp_path, auth_broker.port, mqtt=f'username = "anomaly-detector"\n{how}\n', extra=DEBUG_LOG)
    watcher = Peer(auth_broker.port, "alerts", passwords["alerts"], topics=("anomalies/#", STATUS, "sensors/#"))
    sensor = Peer(auth_broker.port, "sensor", passwords["sensor"], topics=("anomalies/#", STATUS))
    d.start(env)
    try:
        wait_for(lambda: any(m.payload == b"online" for m in watcher.on(STATUS)), "online")
        stream = "sensors/plant/pump-2"
        assert set(sensor.publish(plant_messages(stream, 400, seed=72, fault_at=300))) == {0}
        forged = json.dumps({"stream": stream, "event": "anomaly_end", "ts": 0, "score": 0}).encode()
        # A sensor cannot publish alerts or the detector's status...
        assert sensor.publish([(f"anomalies/{stream}", forged), ("anomalies/other", forged),
                               (STATUS, b"offline")]) == [NOT_AUTHORIZED] * 3
        # ... and an alert consumer cannot publish readings.
        assert watcher.publish([(stream, b"21.5"), ("sensors/plant/pump-9", b"21.5")]) == [NOT_AUTHORIZED] * 2
        wait_for(lambda: readings(d) >= 400, "400 readings scored")
        starts = wait_for(lambda: [a for a in alerts_on(watcher, stream) if a["event"] == "anomaly_start"],
                          "an alert")
        assert starts[0]["stream"] == stream
        assert readings(d) == 400  # the consumer's readings never arrived
        assert all(m.payload != forged for m in watcher.on("anomalies/"))
        assert not watcher.on("anomalies/other")
        status = [m.payload for m in watcher.on(STATUS)]  # may start with the last test's retained offline
        assert b"offline" not in status[status.index(b"online"):], "a sensor faked the status"
        # Subscriptions are granted but deliver nothing the role may not read.
        assert not watcher.on("sensors/"), "the alert consumer read readings"
        assert not sensor.on("anomalies/") and not sensor.on(STATUS), "a sensor read alerts"
    finally:
        code = d.stop()
        watcher.close()
        sensor.close()
    assert code == 0
    log = d.logtext()
    assert "Traceback" not in log
    assert secret not in log


def test_wrong_password_is_refused_logged_and_retried_without_crashing(
        tmp_path: Path, auth_broker: BrokerHandle, passwords: dict[str, str]) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    pw = password_file(tmp_path, wrong)
    d = Daemon(tmp_path, auth_broker.port, extra=DEBUG_LOG,
               mqtt=f'username = "anomaly-detector"\npassword_file = "{pw}"\nreconnect_max_s = 2\n')
    d.launch()
    try:
        wait_for(lambda: d.logtext().count("refused the connection") >= 2, "a refusal, then a retry")
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        assert d.healthz() == 503
        assert d.value("anomaly_detector_mqtt_connected") == 0
    finally:
        code = d.stop()
    assert code == 0
    log = d.logtext()
    refused = [ln for ln in log.splitlines() if "refused the connection" in ln]
    assert all(re.search(r"not authori[sz]ed|bad user name or password", ln, re.IGNORECASE) for ln in refused), refused
    assert "Traceback" not in log
    assert wrong not in log and passwords["anomaly-detector"] not in log


# ---- 3. bad secret files stop the start ---------------------------------------------------------
def _unreadable_prefix(path: Path) -> list[str] | None:
    """A command prefix under which ``path`` (mode 000) cannot be read, or None. Root
    reads anything, so as root the daemon runs without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (still uid 0: the Python install under /root stays reachable)."""
    if os.geteuid() != 0:
        prefix: list[str] = []
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(path)!r}, 'rb')"],
                           capture_output=True, check=False)
    return prefix if probe.returncode != 0 and b"PermissionError" in probe.stderr else None


def _start_fails(tmp: Path, mqtt_lines: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, command: str = "run") -> subprocess.CompletedProcess[str]:
    cfg = tmp / "config.toml"
    cfg.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n{mqtt_lines}\n'
                   f'[metrics]\nport = {free_port()}\n[learn]\nenabled = false\n'
                   f'[state]\ndir = "{tmp / "state"}"\n{DEBUG_LOG}')
    return subprocess.run([*(prefix or []), sys.executable, "-m", "detector", command, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, start_new_session=True, check=False)


BAD_FILES = ["ca_file missing", "ca_file is a directory", "ca_file is not a certificate",
             "cert_file missing", "cert_file is not a certificate", "key_file is a directory", "key_file unreadable",
             "key_file does not match cert_file", "key_file is encrypted",
             "password_file missing", "password_file is a directory", "password_file unreadable",
             "password_file is not UTF-8", "password_env unset"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_missing_or_unreadable_tls_and_password_files_stop_the_start_with_one_line(
        tmp_path: Path, pki: Pki, case: str) -> None:
    key, problem = case.split(" ", 1)
    secret = f"pw-{secrets.token_hex(8)}"
    env = {**os.environ, "AD_TEST_MQTT_PASSWORD": secret}
    good = {"ca_file": pki.ca, "cert_file": pki.cert("anomaly-detector"), "key_file": pki.key("anomaly-detector")}
    bad = tmp_path / f"bad-{key}"
    prefix = None
    if problem == "missing":
        pass  # `bad` does not exist
    elif problem == "is a directory":
        bad.mkdir()
    elif problem == "unreadable":
        bad.write_text(secret if key == "password_file" else good[key].read_text())
        bad.chmod(0)
        prefix = _unreadable_prefix(bad)
        if prefix is None:
            pytest.skip("cannot make a file unreadable here (root without setpriv)")
    elif problem == "is not a certificate":
        bad.write_text("this is not PEM\n")
    elif problem == "does not match cert_file":
        bad = pki.server_key
    elif problem == "is encrypted":
        _openssl("pkey", "-in", str(good["key_file"]), "-out", str(bad), "-aes256", "-passout", "pass:xyz")
    elif problem == "is not UTF-8":
        bad.write_bytes(b"\xff\xfe" + secret.encode())
    if key == "password_env":
        del env["AD_TEST_MQTT_PASSWORD"]
        lines = 'username = "anomaly-detector"\npassword_env = "AD_TEST_MQTT_PASSWORD"\n'
    elif key == "password_file":
        lines = f'username = "anomaly-detector"\npassword_file = "{bad}"\n'
    else:
        files = dict(good, **{key: bad})
        lines = ('username = "anomaly-detector"\npassword_env = "AD_TEST_MQTT_PASSWORD"\ntls = true\n'
                 + "".join(f'{k} = "{v}"\n' for k, v in files.items()))
    proc = _start_fails(tmp_path, lines, env, prefix)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"[mqtt] {key}" in err, err
    assert (str(bad) if key != "password_env" else "AD_TEST_MQTT_PASSWORD") in err, err
    assert secret not in err


def test_tls_verifies_the_broker_certificate_and_host_name(pki: Pki) -> None:
    """No setting turns verification off: the broker's certificate must chain to ca_file
    (or a system CA) and name the host connected to; TLS 1.2 at least."""
    for extra in ({}, {"ca_file": str(pki.ca), "cert_file": str(pki.cert("anomaly-detector")),
                       "key_file": str(pki.key("anomaly-detector"))}):
        ctx = tls_context(config.parse({"mqtt": {"tls": True, **extra}}))
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_password_put_in_the_config_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """The config has no password key (files or environment only); writing one anyway is
    refused, and the one-line error does not repeat the value (it would land in logs)."""
    secret = f"pw-{secrets.token_hex(8)}"
    for command in ("check-config", "run"):
        proc = _start_fails(tmp_path, f'username = "anomaly-detector"\npassword = "{secret}"\n', command=command)
        assert proc.returncode == 2 and "[mqtt] password: unknown key" in proc.stderr, proc.stderr
        assert secret not in proc.stderr + proc.stdout


# ---- 4. model bundles carry no code -----------------------------------------------------------
class _Plant:
    """Runs ``os.mkdir(marker)`` when unpickled: proof that loading executed a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _copy_bundle(tmp: Path) -> Path:
    dst = tmp / "plant"
    shutil.copytree(PLANT_MODEL, dst)
    return dst


def _rehash(b: Path, name: str) -> None:
    """Update the manifest's checksum of ``name``: the tampering an attacker who can
    write the whole bundle would do, so the loader itself has to refuse the file."""
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"][name] = bundle_mod.sha256(b / name)
    (b / "manifest.json").write_text(json.dumps(manifest))


def _check_config_error(tmp: Path, b: Path, capsys: pytest.CaptureFixture[str]) -> str:
    cfg = tmp / "check.toml"
    cfg.write_text(f'[[models]]\nmatch = "sensors/#"\npath = "{b}"\n')
    capsys.readouterr()
    assert cli_main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_weights_holding_a_pickle_are_refused_and_never_unpickled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _copy_bundle(tmp_path)
    marker = tmp_path / "pickle-ran"
    with np.load(b / "weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    evil = np.empty(1, dtype=object)
    evil[0] = _Plant(marker)
    weights["kernel"] = evil
    np.savez(b / "weights.npz", **weights)  # object arrays are stored pickled
    # Tampered file, manifest untouched: the checksum refuses it.
    assert "checksum does not match" in _check_config_error(tmp_path, b, capsys)
    # Manifest hash updated too: np.load(allow_pickle=False) refuses it.
    _rehash(b, "weights.npz")
    err = _check_config_error(tmp_path, b, capsys)
    assert "weights" in err or str(b) in err
    assert "allow_pickle" in err or "pickle" in err.lower(), err
    with pytest.raises(InputError):
        bundle_mod.load(b)
    assert not marker.exists(), "loading the bundle ran the pickle"
    # The marker works: unpickling on purpose does run it (so the check above means something).
    with np.load(b / "weights.npz", allow_pickle=True) as npz:
        npz["kernel"]
    assert marker.exists()


def test_a_keras_model_with_a_lambda_layer_is_refused_without_running_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from detector import model as model_mod

    b = _copy_bundle(tmp_path)
    marker = tmp_path / "lambda-ran"
    # The layer's code creates the marker whenever it runs (Keras runs it when it rebuilds
    # the model on load); the path is a constant inside the serialised bytecode.
    fn = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inp = keras.Input(shape=(None, 3))
    evil = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Lambda(fn)(inp)))
    marker.unlink()  # building the model ran it once
    evil.save(b / "model.keras")
    with pytest.raises(InputError, match="checksum does not match"):
        bundle_mod.load(b).runtime("keras")
    _rehash(b, "model.keras")
    loaded = bundle_mod.load(b)  # the numpy/ONNX step never opens model.keras
    with pytest.raises(InputError) as refused:
        loaded.runtime("keras")
    assert "Lambda" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="Lambda"):
        model_mod.load(str(b / "model.keras"))
    assert not marker.exists(), "loading the model ran the Lambda layer's code"
    # The file does carry code: an unsafe load runs it.
    keras.saving.load_model(str(b / "model.keras"), compile=False, safe_mode=False)
    assert marker.exists()


# ---- 5. /metrics stays on loopback by default ---------------------------------------------------
def _non_loopback_ipv4() -> list[str]:
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in found if not a.startswith("127.") and a != "0.0.0.0")


def test_metrics_listen_on_loopback_only_by_default(tmp_path: Path) -> None:
    assert config.Config().metrics.address == "127.0.0.1"
    assert config.load(ROOT / "config.toml").metrics.address == "127.0.0.1"
    # No broker: /metrics and /healthz are served anyway (503, broker disconnected).
    d = Daemon(tmp_path, free_port())
    assert "address" not in d.config.read_text().split("[metrics]")[1].split("[")[0]
    d.launch()
    try:
        wait_for(lambda: d.healthz() == 503, "/healthz answering on 127.0.0.1")
        assert http_get(f"http://127.0.0.1:{d.metrics_port}/metrics")[0] == 200
        others = _non_loopback_ipv4()
        for addr in others:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((addr, d.metrics_port), timeout=5).close()
    finally:
        code = d.stop()
    assert code == 0
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address to try /metrics on")
