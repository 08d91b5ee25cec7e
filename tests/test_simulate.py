"""The load and fault generator against a real broker (Mosquitto, else the embedded one)."""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import BrokerHandle, free_port, start_test_broker
from paho.mqtt.enums import CallbackAPIVersion

from detector import payloads, plant, simulate
from detector.ingest import loop_stop
from detector.simulate import SimConfig, SimError, Simulator

WAIT = 20.0  # upper bound for deliveries to arrive; never asserted as a duration


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerHandle]:
    handle = start_test_broker()
    yield handle
    handle.stop()


class Collector:
    """A subscriber on PREFIX/# that keeps (topic, payload) in arrival order."""

    def __init__(self, broker: BrokerHandle, prefix: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(WAIT), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_for(self, n: int) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + WAIT
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # room for extras (duplicates) to show up before counting
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        loop_stop(self.client)


@pytest.fixture
def prefix() -> str:
    return f"sensors/t{uuid.uuid4().hex[:8]}"  # per test, so no test sees another's messages


@pytest.fixture
def collector(broker: BrokerHandle, prefix: str) -> Iterator[Collector]:
    c = Collector(broker, prefix)
    yield c
    c.close()


def readings_by_stream(messages: list[tuple[str, bytes]]) -> dict[str, list[payloads.Reading]]:
    """Decode with the daemon's own decoder: every payload must be a contract form."""
    out: dict[str, list[payloads.Reading]] = defaultdict(list)
    for topic, payload in messages:
        readings, rejected = payloads.decode(topic, payload, received=0.0)
        assert not rejected, (payload, rejected)
        for r in readings:
            assert r.values is not None and list(r.values) == plant.FEATURES
            assert all(np.isfinite(list(r.values.values())))
            assert r.ts > 1.6e9  # a real epoch time, not the receive-time default
        out[topic].extend(readings)
    return out


def assert_increasing(by_stream: dict[str, list[payloads.Reading]]) -> None:
    for topic, rs in by_stream.items():
        ts = [r.ts for r in rs]
        assert all(b > a for a, b in zip(ts, ts[1:], strict=False)), topic


def config(broker: BrokerHandle, prefix: str, **kw: Any) -> SimConfig:
    kw.setdefault("fault_every", 0.0)
    return SimConfig(host=broker.host, port=broker.port, topic_prefix=prefix, **kw)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_flat_out_qos1_exact(broker: BrokerHandle, collector: Collector, prefix: str,
                             protocol: str) -> None:
    cfg = config(broker, prefix, streams=3, rate=0, count=200, qos=1, protocol=protocol)
    stats = Simulator(cfg).run()
    assert (stats.published, stats.messages, stats.lost, stats.faults) == (600, 600, 0, [])
    messages = collector.wait_for(600)
    assert len(messages) == 600
    by_stream = readings_by_stream(messages)
    assert {t: len(rs) for t, rs in by_stream.items()} == {f"{prefix}/pump-{i}": 200 for i in range(3)}
    assert all(p.startswith(b"{") for _, p in messages)  # batch 1: one object per message
    assert_increasing(by_stream)


def test_batches_are_arrays_and_last_batch_partial(broker: BrokerHandle, collector: Collector,
                                                   prefix: str) -> None:
    cfg = config(broker, prefix, streams=2, rate=0, count=45, batch=10, qos=1)
    stats = Simulator(cfg).run()
    assert (stats.published, stats.messages) == (90, 10)
    messages = collector.wait_for(10)
    assert len(messages) == 10
    sizes = sorted(len(json.loads(p)) for _, p in messages)
    assert sizes == [5, 5] + [10] * 8
    by_stream = readings_by_stream(messages)
    assert sorted(len(rs) for rs in by_stream.values()) == [45, 45]
    assert_increasing(by_stream)


@pytest.mark.parametrize("qos,batch", [(0, 1), (1, 4)])
def test_paced_rate_uses_wall_clock(broker: BrokerHandle, collector: Collector, prefix: str,
                                    qos: int, batch: int) -> None:
    cfg = config(broker, prefix, streams=2, rate=40, count=12, qos=qos, batch=batch)
    before = time.time()
    stats = Simulator(cfg).run()
    after = time.time()
    assert stats.published == 24 and stats.messages == 24 // batch
    by_stream = readings_by_stream(collector.wait_for(24 // batch))
    assert sorted(len(rs) for rs in by_stream.values()) == [12, 12]
    assert_increasing(by_stream)
    # Batched readings are back-dated by up to (batch - 1) / rate.
    assert all(before - 1 <= r.ts <= after + 1 for rs in by_stream.values() for r in rs)


def test_faults_reported_with_the_reading_they_start_on(broker: BrokerHandle, collector: Collector,
                                                        prefix: str) -> None:
    seen: list[tuple[str, plant.Fault, float]] = []
    cfg = config(broker, prefix, streams=3, rate=0, count=400, qos=1, fault_every=20.0,
                 fault_warmup=50, batch=7)
    stats = Simulator(cfg, on_fault=lambda s, f, ts: seen.append((s, f, ts))).run()
    assert seen and len(seen) == len(stats.faults)
    by_stream = readings_by_stream(collector.wait_for(3 * 58))
    for (stream, fault, ts), recorded in zip(seen, stats.faults, strict=True):
        assert recorded == (stream, fault.kind, plant.FEATURES[fault.feature], ts)
        assert fault.kind in plant.FAULTS and fault.start >= 50
        # Fault.start is the stream's reading index: that reading carries the reported ts.
        assert by_stream[stream][fault.start].ts == ts
    assert {s for s, _, _ in seen} == {f"{prefix}/pump-{i}" for i in range(3)}


def test_stop_event_and_duration_keep_published_exact(broker: BrokerHandle, collector: Collector,
                                                      prefix: str) -> None:
    stop = threading.Event()

    def stop_soon() -> None:  # half a second after the first reading, however slow the connect
        collector.wait_for(1)
        time.sleep(0.5)
        stop.set()

    threading.Thread(target=stop_soon, daemon=True).start()
    stats = Simulator(config(broker, prefix, streams=4, rate=0, qos=1)).run(stop)
    timed = Simulator(config(broker, prefix, streams=4, rate=20, qos=1, duration=0.5,
                             seed=1)).run()
    total = stats.published + timed.published
    assert stats.published > 0 and timed.published > 0 and stats.lost == timed.lost == 0
    messages = collector.wait_for(total)
    assert len(messages) == total


def test_seam_between_chunks_is_smooth() -> None:
    s = simulate._Stream(0, SimConfig(fault_every=0, rate=0))
    rows, _ = s.take(1)
    first = len(s.rows)  # the first chunk's size is random; later ones are CHUNK
    rest, _ = s.take(first + simulate.CHUNK + 9)
    values = np.array(rows + rest)
    flow = values[:, plant.FEATURES.index("flow")]
    # Without the cross-fade a new chunk's phase and load jump: flow steps by 2 to 20 there.
    for seam in (first, first + simulate.CHUNK):
        assert abs(flow[seam] - flow[seam - 1]) < 2.5
    again, _ = simulate._Stream(0, SimConfig(fault_every=0, rate=0)).take(100)
    assert again == values[:100].tolist()  # same seed, same readings


def test_config_and_broker_validation() -> None:
    assert simulate.parse_broker("localhost:1884") == ("localhost", 1884)
    assert simulate.parse_broker("[::1]:1883") == ("::1", 1883)
    for bad in ("localhost", ":1883", "host:0", "host:x"):
        with pytest.raises(SimError, match="HOST:PORT"):
            simulate.parse_broker(bad)
    for kw in ({"streams": 0}, {"rate": -1.0}, {"batch": 0}, {"count": 0}, {"qos": 3},
               {"protocol": "4"}, {"topic_prefix": "a/#"}):
        with pytest.raises(SimError):
            Simulator(SimConfig(**kw))


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    return simulate.run(parser.parse_args(argv))


def test_cli_summary_and_fault_lines(broker: BrokerHandle, collector: Collector, prefix: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli("--broker", f"{broker.host}:{broker.port}", "--streams", "2", "--count", "60",
             "--rate", "0", "--qos", "1", "--fault-every", "10", "--topic-prefix", prefix)
    out, err = capsys.readouterr()
    assert rc == 0
    assert re.fullmatch(r"simulate: 120 readings in 120 messages over [\d.]+ s "
                        r"\(\d+ readings/s\), \d+ faults\n", out)
    assert err, "faults were injected, so they are printed"
    pattern = (rf"fault: {prefix}/pump-[01] ({'|'.join(plant.FAULTS)}) on "
               rf"({'|'.join(plant.FEATURES)}) at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}\+00:00")
    assert all(re.fullmatch(pattern, line) for line in err.splitlines()), err
    assert len(collector.wait_for(120)) == 120


@pytest.mark.parametrize("argv,message", [
    (["--broker", "127.0.0.1:{free}"], "simulate: cannot connect to 127.0.0.1:{free}: "),
    (["--broker", "nonsense"], "simulate: bad --broker 'nonsense': expected HOST:PORT"),
    (["--streams", "0", "--broker", "127.0.0.1:{free}"], "simulate: streams must be >= 1"),
])
def test_cli_bad_usage_is_one_line(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    port = str(free_port())  # nothing listens there: connection refused
    rc = cli(*(a.replace("{free}", port) for a in argv))
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith(message.replace("{free}", port)) and err.count("\n") == 1, err
    assert "Traceback" not in err
