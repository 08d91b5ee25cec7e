"""The read-ahead paho client against a real broker: every message arrives intact and in
order, whatever its size relative to the 64 KiB read-ahead, across a reconnect too."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from detector.ingest import ReadAheadClient
from helpers import publish_all, wait_for
from mqtt_broker import start_test_broker


@pytest.fixture(scope="module")
def broker() -> Iterator[object]:
    handle = start_test_broker()
    yield handle
    handle.stop()


class Receiver:
    def __init__(self, port: int, protocol: mqtt.MQTTProtocolVersion) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = ReadAheadClient(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_connect = lambda c, u, f, r, p=None: c.subscribe("ra/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, m.payload))

    def count(self) -> int:
        with self.lock:
            return len(self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _messages(seed: int, n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 127, 128, 16383, 16384, 65535, 65536, 65537, 200_000]) if i % 10 == 0
             else rng.randint(1, 300) for i in range(n)]
    return [(f"ra/s{i % 17}", bytes(rng.getrandbits(8) for _ in range(min(s, 64))) * (s // 64 + 1))
            for i, s in enumerate(sizes)]


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_every_message_arrives_intact_and_in_order(broker, protocol) -> None:  # type: ignore[no-untyped-def]
    if protocol == mqtt.MQTTv5 and broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    rx = Receiver(broker.port, protocol)
    msgs = _messages(seed=protocol, n=3000)
    try:
        publish_all(broker.port, msgs)
        wait_for(lambda: rx.count() >= len(msgs), "every message")
    finally:
        rx.close()
    assert rx.got == msgs  # one publisher, QoS 1: the broker keeps its order


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
