"""MQTT brokers the daemon relies on: the test broker (Mosquitto or fallback) and EmbeddedBroker.

Every check uses a real paho-mqtt 2 client over TCP. Waits are bounded (10 s) but nothing
asserts on timing.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mqtt_broker
import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import ENV_CHOICE, find_mosquitto, start_test_broker
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from detector.broker import EmbeddedBroker
from detector.ingest import loop_stop

WAIT = 10.0
V311, V5 = MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5


class Client:
    """A paho client with blocking helpers, so tests read as steps."""

    def __init__(self, port: int, protocol: MQTTProtocolVersion,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:12]}",
                                protocol=protocol)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = lambda *_: self._subscribed.set()
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        if will is not None:
            self.paho.will_set(*will)
        self.paho.connect("127.0.0.1", port, keepalive=30)
        self.paho.loop_start()
        if not self._connected.wait(WAIT):
            self.close()
            raise AssertionError("client did not connect")

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: mqtt.ConnectFlags, reason: ReasonCode,
                    _p: mqtt.Properties | None) -> None:
        if not reason.is_failure:
            self._connected.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.paho.subscribe(topic, qos)
        assert self._subscribed.wait(WAIT), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos, retain)
        if qos > 0:
            info.wait_for_publish(WAIT)  # PUBACK received: the broker has the message
            assert info.is_published()

    def receive(self, n: int = 1) -> list[mqtt.MQTTMessage]:
        try:
            return [self.messages.get(timeout=WAIT) for _ in range(n)]
        except queue.Empty:
            raise AssertionError(f"expected {n} message(s) within {WAIT} s") from None

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed daemon or a pulled cable would."""
        loop_stop(self.paho)
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if self.paho.is_connected():
            self.paho.disconnect()
        loop_stop(self.paho)


@pytest.fixture(scope="module", params=["test-broker", "embedded"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(kind, port) of a running broker, stopped after the module."""
    if request.param == "test-broker":
        handle = start_test_broker()
        yield handle.kind, handle.port
        handle.stop()
    else:
        with EmbeddedBroker(port=0) as embedded:
            yield "embedded", embedded.port
    assert not any(t.name == "embedded-mqtt-broker" for t in threading.enumerate())


@pytest.fixture(params=[V311, V5], ids=["v311", "v5"])
def connect(broker: tuple[str, int], request: pytest.FixtureRequest) -> Iterator[Callable[..., Client]]:
    """Factory for clients of `broker`; all are closed after the test."""
    kind, port = broker
    if request.param == V5 and kind == "embedded":
        pytest.skip("amqtt speaks MQTT 3.1.1 only")
    clients: list[Client] = []

    def make(**kw: Any) -> Client:
        clients.append(Client(port, request.param, **kw))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def topic() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"  # fresh per test: retained state must not leak


def test_qos0_and_qos1_delivered(connect: Callable[..., Client], topic: str) -> None:
    sub, pub = connect(), connect()
    sub.subscribe(f"{topic}/#", qos=1)
    pub.publish(f"{topic}/a", b"zero", qos=0)
    pub.publish(f"{topic}/b", b"one", qos=1)
    got = {m.topic: m for m in sub.receive(2)}
    assert got[f"{topic}/a"].payload == b"zero"
    assert got[f"{topic}/b"].payload == b"one" and got[f"{topic}/b"].qos == 1
    assert not any(m.retain for m in got.values())


def test_qos1_burst_arrives_complete_and_in_order(connect: Callable[..., Client], topic: str) -> None:
    sub, pub = connect(), connect()
    sub.subscribe(topic, qos=1)
    sent = [str(i).encode() for i in range(200)]
    for payload in sent:
        pub.publish(topic, payload, qos=1)
    assert [m.payload for m in sub.receive(len(sent))] == sent


def test_retained_reaches_late_subscriber(connect: Callable[..., Client], topic: str) -> None:
    connect().publish(topic, b"online", qos=1, retain=True)
    late = connect()
    late.subscribe(topic)
    (msg,) = late.receive()
    assert (msg.payload, msg.retain) == (b"online", True)


def test_retained_only_for_own_subscriptions(connect: Callable[..., Client], topic: str) -> None:
    """A client must not get retained messages for another client's subscriptions."""
    other = connect()
    other.subscribe(f"{topic}/status")
    connect().publish(f"{topic}/status", b"online", qos=1, retain=True)
    daemon = connect()
    daemon.subscribe(f"{topic}/sensors/#")
    connect().publish(f"{topic}/sensors/x", b"21.5", qos=1)
    assert daemon.receive()[0].topic == f"{topic}/sensors/x"


def test_last_will_on_dropped_connection(connect: Callable[..., Client], topic: str) -> None:
    """The daemon's status pattern: retained `online`, retained `offline` as the will."""
    watcher = connect()
    watcher.subscribe(topic)
    daemon = connect(will=(topic, b"offline", 1, True))
    daemon.publish(topic, b"online", qos=1, retain=True)
    assert watcher.receive()[0].payload == b"online"
    daemon.drop()
    assert watcher.receive()[0].payload == b"offline"
    late = connect()
    late.subscribe(topic)
    (msg,) = late.receive()
    assert (msg.payload, msg.retain) == (b"offline", True)


def test_embedded_rejects_mqtt5() -> None:
    refused = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=V5)

    def on_connect(_c: mqtt.Client, _u: object, _f: mqtt.ConnectFlags, reason: ReasonCode,
                   _p: mqtt.Properties | None) -> None:
        if reason.is_failure:
            refused.set()

    c.on_connect = on_connect
    with EmbeddedBroker(port=0) as broker:
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        try:
            assert refused.wait(WAIT), "amqtt accepted MQTT 5: update the docs and tests"
        finally:
            c.disconnect()
            loop_stop(c)


def test_embedded_port_in_use_is_one_line_error() -> None:
    with EmbeddedBroker(port=0) as running:
        clash = EmbeddedBroker(port=running.port)
        with pytest.raises(RuntimeError, match="port in use") as err:
            clash.start()
        assert "\n" not in str(err.value)
        clash.stop()  # stopping a broker that never started is a no-op


def test_embedded_stop_is_idempotent_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    threads_before = threading.active_count()
    broker = EmbeddedBroker(port=0)
    broker.start()
    Client(broker.port, V311).close()
    broker.stop()
    broker.stop()
    assert list(tmp_path.iterdir()) == []
    assert threading.active_count() == threads_before


def test_embedded_stops_cleanly_under_traffic(caplog: pytest.LogCaptureFixture) -> None:
    """Regression: amqtt's own shutdown could hang when a packet arrived during it."""
    broker = EmbeddedBroker(port=0)
    broker.start()
    clients = [Client(broker.port, V311, will=("status", b"offline", 1, True)) for _ in range(3)]
    try:
        for c in clients:
            c.subscribe("load/#")
        for i in range(50):
            clients[i % 3].paho.publish(f"load/{i}", b"x", qos=1)
        broker.stop()
    finally:
        for c in clients:
            c.close()
    # amqtt may warn that queued messages were dropped; errors or our timeout warning mean
    # shutdown went wrong and fell back to cancelling tasks.
    failures = [r.getMessage() for r in caplog.records
                if (r.levelno >= logging.ERROR and r.name.startswith("amqtt")) or r.name == "detector.broker"]
    assert failures == []


def test_lookup_finds_no_mosquitto_off_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mqtt_broker, "SBIN_MOSQUITTO", str(tmp_path / "mosquitto"))
    monkeypatch.delenv(ENV_CHOICE, raising=False)
    assert find_mosquitto() is None


def assert_restart_keeps_port(kind: str) -> None:
    handle = start_test_broker()
    try:
        assert handle.kind == kind
        port = handle.port
        handle.restart()
        assert handle.port == port
        Client(port, V311).close()
    finally:
        handle.stop()


def test_fallback_to_embedded_without_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CHOICE, "embedded")
    assert find_mosquitto() is None
    assert_restart_keeps_port("embedded")


def test_mosquitto_restart_keeps_port() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    assert_restart_keeps_port("mosquitto")
