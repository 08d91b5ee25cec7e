"""The read-ahead paho client against a real broker: every message arrives intact and in
order, whatever its size relative to the 64 KiB read-ahead, across a reconnect too, through
paho's own handling (QoS 1) and through the client's QoS 0 path."""

from __future__ import annotations

import random
import struct
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from detector.ingest import ReadAheadClient, loop_stop
from helpers import mqtt_packet, publish_all, wait_for
from mqtt_broker import start_test_broker


@pytest.fixture(scope="module")
def broker() -> Iterator[object]:
    handle = start_test_broker()
    yield handle
    handle.stop()


class Receiver:
    def __init__(self, port: int, protocol: mqtt.MQTTProtocolVersion, qos: int = 1) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.paho = 0  # messages that came through paho's on_message
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = ReadAheadClient(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_connect = lambda c, u, f, r, p=None: c.subscribe("ra/#", qos=qos)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_qos0 = self._on_qos0
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, m.payload))
            self.paho += 1

    def _on_qos0(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.got.append((topic, payload))

    def count(self) -> int:
        with self.lock:
            return len(self.got)

    def close(self) -> None:
        loop_stop(self.client)
        self.client.disconnect()


def _messages(seed: int, n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 127, 128, 16383, 16384, 65535, 65536, 65537, 200_000]) if i % 10 == 0
             else rng.randint(1, 300) for i in range(n)]
    return [(f"ra/s{i % 17}", bytes(rng.getrandbits(8) for _ in range(min(s, 64))) * (s // 64 + 1))
            for i, s in enumerate(sizes)]


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
@pytest.mark.parametrize("qos", [0, 1])
def test_every_message_arrives_intact_and_in_order(broker, protocol, qos) -> None:  # type: ignore[no-untyped-def]
    if protocol == mqtt.MQTTv5 and broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    rx = Receiver(broker.port, protocol, qos)
    msgs = _messages(seed=protocol, n=3000)
    try:
        publish_all(broker.port, msgs)
        wait_for(lambda: rx.count() >= len(msgs), "every message")
    finally:
        rx.close()
    assert rx.got == msgs  # one publisher, QoS 1: the broker keeps its order
    if qos == 0:  # paho only for what the QoS 0 path leaves to it (a packet cut by a read)
        assert rx.paho < len(msgs) // 2
    else:
        assert rx.paho == len(msgs)


def _publish(topic: bytes, payload: bytes, head: int = 0x30, props: bytes = b"") -> bytes:
    return mqtt_packet(head, struct.pack("!H", len(topic)) + topic + props + payload)


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_the_qos0_path_takes_whole_qos0_publishes_and_leaves_the_rest_to_paho(protocol) -> None:  # type: ignore[no-untyped-def]
    c = ReadAheadClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    got: list[tuple[str, bytes]] = []
    c.on_qos0 = lambda topic, payload: got.append((topic, payload))
    props = b"\x00" if protocol == mqtt.MQTTv5 else b""

    def take(*packets: bytes) -> int:
        got.clear()
        c._rbuf, c._rpos = b"".join(packets), 0
        return c._qos0_publishes()

    big = b"x" * 20000  # a three-byte remaining length
    assert take(_publish(b"a/b", b"1.5", props=props), _publish(b"r", big, head=0x31, props=props)) == 2
    assert got == [("a/b", b"1.5"), ("r", big)] and c._rpos == len(c._rbuf)
    whole = _publish(b"a", b"1", props=props)
    for cut in (1, 2, 4, len(whole) - 1):  # the next packet not wholly read: paho's
        assert take(whole, whole[:cut]) == 1 and c._rpos == len(whole)
    assert take(_publish(b"a", b"\x00\x01" + b"1", head=0x32)) == 0  # QoS 1: paho acknowledges it
    assert take(_publish(b"\xff", b"1", props=props)) == 0 and c._rpos == 0  # not UTF-8: paho's
    if protocol == mqtt.MQTTv5:  # properties (a topic alias, say) are paho's to read
        assert take(_publish(b"a", b"1", props=b"\x03\x23\x00\x01")) == 0


def test_reads_resume_cleanly_after_the_broker_restarts() -> None:
    own = start_test_broker()
    if own.kind != "mosquitto":
        own.stop()
        pytest.skip("restarting the broker mid-test needs mosquitto")
    rx = Receiver(own.port, mqtt.MQTTv311)
    try:
        first = _messages(seed=5, n=500)
        publish_all(own.port, first)
        wait_for(lambda: rx.count() >= len(first), "the first messages")
        rx.subscribed.clear()
        own.restart(down_for=1.0)
        wait_for(rx.subscribed.is_set, "resubscribed after the restart")
        second = _messages(seed=6, n=500)
        publish_all(own.port, second)
        wait_for(lambda: rx.count() >= len(first) + len(second), "the second messages")
        assert rx.got == first + second
    finally:
        rx.close()
        own.stop()
