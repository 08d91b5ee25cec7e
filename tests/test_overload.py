"""Overload and resource bounds, against the real daemon and a real Mosquitto.

* Twice the sustainable rate: memory stays bounded (the daemon's RSS against a bound
  derived from ``[worker] queue_bytes``), every reading is accounted for (scored or
  dropped with reason ``queue_full``: published = scored + dropped), and the queue drains
  to 0 afterwards. The daemon is made slow relative to the publisher rather than the
  publisher fast: a small queue, and batches of one stream's readings, which the engine
  must step one by one.
* A flood of new stream ids: ``[engine] max_streams`` holds, the least recently used
  streams are evicted and counted, memory stays bounded; for a routed prefix, and for
  unrouted ids collected by the learner.

The minute-long and million-topic versions are ``bench/soak.py`` (figures in
``bench/RESULTS.md``, "Soak"); no timing is asserted here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from detector import plant
from detector.ingest import loop_stop
from helpers import Daemon, PeakRss, publish_all, rss_bytes, sample, wait_for
from mqtt_broker import start_test_broker

# The smallest queue the config allows ([mqtt] max_payload_bytes): six of the publisher's
# messages of a hundred readings, ~10.7 KB each.
QUEUE_BYTES = 65536
QUEUE_READINGS = 600
# A queued reading is ~107 bytes of its message's payload; decoded for the step that
# scores it (its Reading and dict of four floats) it takes 380-490 bytes in CPython
# (tracemalloc); 2 KB leaves room for the message it came in. Allocator noise, paho's
# buffers and numpy's batch temporaries are what the fixed slack is for: the runs here
# grow by 0.3-3 MB, while an unbounded queue would hold every reading this overload
# drops (~40,000 here, ~18 MB).
ITEM_BYTES = 2048
QUEUED_BYTES = 450
SLACK_BYTES = 12 << 20


@pytest.fixture(scope="module")
def broker() -> Iterator[Any]:
    handle = start_test_broker()
    yield handle
    handle.stop()


def metric(d: Daemon, name: str) -> float:
    return sample(d.metrics(), f"anomaly_detector_{name}")


def scraped_when(d: Daemon, name: str, at_least: float) -> str | None:
    """The /metrics text once ``name`` has reached ``at_least``, scraped again a moment
    later: the step that got it there updates its other series after that counter."""
    if sample(d.metrics(), f"anomaly_detector_{name}") < at_least:
        return None
    time.sleep(0.2)
    return d.metrics()


def invalid_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("anomaly_detector_invalid_readings_total{"))


def accounted(text: str) -> float:
    """Readings the daemon has done with: scored, dropped for a full queue, or rejected."""
    return (sample(text, "anomaly_detector_readings_total") + invalid_total(text)
            + sample(text, 'anomaly_detector_dropped_readings_total{reason="queue_full"}'))


class Publisher:
    """Batches of ``per_message`` readings of one stream each, round robin over
    ``streams`` streams, QoS 1, at a given message rate (0: flat out)."""

    def __init__(self, port: int, streams: int, per_message: int, prefix: str = "sensors/plant/load") -> None:
        self.streams, self.per_message, self.prefix = streams, per_message, prefix
        self.sent = 0  # readings
        self._seq = 0
        self._t0 = time.time() - 10_000_000  # far enough back that ts never runs into the future
        self._values = plant.normal(4096, seed=5)[1].round(4).tolist()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._infos: list[mqtt.MQTTMessageInfo] = []

    def _message(self) -> tuple[str, bytes]:
        k = self._seq % self.streams
        base = self._seq // self.streams * self.per_message
        self._seq += 1
        batch = [{"ts": self._t0 + base + i, "values": dict(zip(plant.FEATURES, self._values[(base + i) % 4096]))}
                 for i in range(self.per_message)]
        return f"{self.prefix}-{k}", json.dumps(batch).encode()

    def burst(self, messages: int) -> None:
        """``messages`` messages at once; returns when the broker has them."""
        infos = []
        for _ in range(messages):
            topic, payload = self._message()
            infos.append(self.client.publish(topic, payload, qos=1))
            self.sent += self.per_message
        for info in infos:
            info.wait_for_publish(timeout=60)

    def run(self, seconds: float, rate: float = 0.0) -> None:
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < seconds:
            if rate and n > (now - start) * rate:
                time.sleep(min(0.005, n / rate - (now - start)))
                continue
            topic, payload = self._message()
            self._infos.append(self.client.publish(topic, payload, qos=1))
            self.sent += self.per_message
            n += 1
            if len(self._infos) > 2000:  # keep the local backlog (and our memory) bounded
                self._infos.pop(0).wait_for_publish(timeout=60)

    def close(self) -> None:
        for info in self._infos:
            info.wait_for_publish(timeout=60)
        loop_stop(self.client)
        self.client.disconnect()


def test_twice_the_sustainable_rate_drops_by_reason_bounded_memory_and_recovers(tmp_path: Path, broker: Any) -> None:
    d = Daemon(tmp_path, broker.port, worker=f"queue_bytes = {QUEUE_BYTES}\noverload = \"drop_oldest\"")
    d.start()
    assert d.proc is not None
    pub = Publisher(broker.port, streams=4, per_message=100)
    try:
        # A first guess of the sustainable rate (on the low side): bursts that fit the
        # queue, timed from publish to scored; the first ones warm the daemon up.
        times = []
        for _ in range(6):
            t0 = time.monotonic()
            pub.burst(QUEUE_READINGS // pub.per_message)
            wait_for(lambda: accounted(d.metrics()) >= pub.sent, "a burst scored", every=0.005)
            times.append(time.monotonic() - t0)
        guess = QUEUE_READINGS / min(times[2:])
        baseline = rss_bytes(d.proc.pid)
        rss = PeakRss(d.proc.pid)
        # The sustainable rate: what the daemon scores while offered four times the guess
        # (paced, so that nothing piles up at the broker: the daemon sees it all at once).
        scored0, t0 = metric(d, "readings_total"), time.monotonic()
        pub.run(3.0, rate=4 * guess / pub.per_message)
        sustainable = (metric(d, "readings_total") - scored0) / (time.monotonic() - t0)
        pub.run(12.0, rate=2 * sustainable / pub.per_message)  # twice that for 12 s
        pub.close()
        peak = rss.stop()

        def drained() -> str | None:
            text = d.metrics()
            done = accounted(text) >= pub.sent and sample(text, "anomaly_detector_queue_depth") == 0
            return text if done else None

        text = wait_for(drained, "every published reading scored or dropped, queue empty", deadline=120)
        scored = sample(text, "anomaly_detector_readings_total")
        dropped = sample(text, 'anomaly_detector_dropped_readings_total{reason="queue_full"}')
        print(f"\noverload: guess {guess:.0f}, sustainable {sustainable:.0f} readings/s, published {pub.sent}, "
              f"scored {scored:.0f}, dropped {dropped:.0f}; RSS {baseline / 2**20:.1f} MB before, peak "
              f"{peak / 2**20:.1f} MB; an unbounded queue would have held ~{dropped * QUEUED_BYTES / 2**20:.0f} MB more")
        assert dropped > 0, "no overload happened: the test proved nothing"
        assert scored + dropped == pub.sent  # nothing unaccounted for (the broker dropped nothing)
        assert invalid_total(text) == 0
        for reason in ("learning", "no_model", "internal_error"):
            assert sample(text, f'anomaly_detector_dropped_readings_total{{reason="{reason}"}}') == 0
        assert peak <= baseline + QUEUE_READINGS * ITEM_BYTES + SLACK_BYTES
        # Recovered: healthy, and new readings are scored again, none dropped.
        assert d.healthz() == 200
        more = Publisher(broker.port, streams=1, per_message=10, prefix="sensors/plant/after")
        more.run(0.5, rate=10)
        more.close()
        wait_for(lambda: metric(d, "readings_total") >= scored + more.sent, "scoring after the overload")
        assert metric(d, 'dropped_readings_total{reason="queue_full"}') == dropped
    finally:
        assert d.stop() == 0


def flood(port: int, prefix: str, n: int, keeper: str | None = None, every: int = 100) -> list[tuple[str, bytes]]:
    """One reading on each of ``n`` new topics; with ``keeper``, that stream gets a
    reading every ``every`` topics (it stays recently used)."""
    t0 = time.time() - 100_000
    reading = dict(zip(plant.FEATURES, (20.0, 1.0, 50.0, 0.5)))
    msgs = []
    for i in range(n):
        msgs.append((f"{prefix}-{i}", json.dumps({"ts": t0 + i, "values": reading}).encode()))
        if keeper and i % every == 0:
            msgs.append((keeper, json.dumps({"ts": t0 + i, "values": reading}).encode()))
    return msgs


def test_a_flood_of_new_stream_ids_evicts_least_recently_used_and_memory_stays_bounded(
        tmp_path: Path, broker: Any) -> None:
    max_streams, n = 500, 20_000
    d = Daemon(tmp_path, broker.port, extra=f"[engine]\nmax_streams = {max_streams}\n")
    d.start()
    assert d.proc is not None
    try:
        keeper = "sensors/plant/keeper"
        msgs = flood(broker.port, "sensors/plant/f", n, keeper=keeper)
        first = msgs[: len(msgs) // 10]  # 2,000 new ids: already four times max_streams
        publish_all(broker.port, first)
        wait_for(lambda: metric(d, "readings_total") >= len(first), "first part scored")
        baseline = rss_bytes(d.proc.pid)
        publish_all(broker.port, msgs[len(first):])
        text = wait_for(lambda: scraped_when(d, "readings_total", len(msgs)), "the flood scored", deadline=120)
        after = rss_bytes(d.proc.pid)
        live = sample(text, "anomaly_detector_streams")
        evicted = sample(text, 'anomaly_detector_evicted_streams_total{reason="max_streams"}')
        print(f"\nflood: {n} ids, {live:.0f} live, {evicted:.0f} evicted; "
              f"RSS {baseline / 2**20:.1f} MB after 2k ids, {after / 2**20:.1f} MB after {n}")
        assert sample(text, "anomaly_detector_readings_total") == len(msgs)
        assert 0 < live <= max_streams
        assert evicted == n + 1 - live  # every id beyond the live ones was evicted, and counted
        assert sample(text, 'anomaly_detector_evicted_streams_total{reason="idle"}') == 0
        assert after <= baseline + SLACK_BYTES
        # Least recently used: the keeper (a reading every 100 new ids) kept its state, so
        # its last reading again is a duplicate; the first flood id lost its state, so its
        # reading again starts a new stream and is scored.
        assert msgs[0][0] == "sensors/plant/f-0"
        publish_all(broker.port, [[m for m in msgs if m[0] == keeper][-1], msgs[0]])
        wait_for(lambda: metric(d, "readings_total") + metric(d, 'invalid_readings_total{reason="duplicate"}')
                 >= len(msgs) + 2, "the two probes")
        assert metric(d, 'invalid_readings_total{reason="duplicate"}') == 1
        assert metric(d, "readings_total") == len(msgs) + 1
        assert d.healthz() == 200
    finally:
        assert d.stop() == 0


LEARN = "enabled = true\nwarmup_readings = 40"
N_UNROUTED = 20_000


@pytest.fixture(scope="module")
def learn_flood(tmp_path_factory: pytest.TempPathFactory, broker: Any) -> Iterator[tuple[str, int, int, int]]:
    """A daemon with [learn] on and [engine] max_streams = 500 gets one reading on each of
    20,000 ids no [[models]] route takes: each goes to the learner. Yields the /metrics
    text after the flood, the RSS after the first 2,000 ids and at the end, and the exit
    code of the daemon stopped afterwards (in a list, filled at teardown)."""
    n = N_UNROUTED
    d = Daemon(tmp_path_factory.mktemp("learn-flood"), broker.port, learn=LEARN,
               extra="[engine]\nmax_streams = 500\n")
    d.start()
    assert d.proc is not None
    try:
        msgs = flood(broker.port, "sensors/unrouted", n)
        publish_all(broker.port, msgs[: n // 10])
        wait_for(lambda: metric(d, 'dropped_readings_total{reason="learning"}') >= n // 10, "first part collected")
        baseline = rss_bytes(d.proc.pid)
        publish_all(broker.port, msgs[n // 10:])
        text = wait_for(lambda: scraped_when(d, 'dropped_readings_total{reason="learning"}', n),
                        "the flood collected", deadline=120)
        after = rss_bytes(d.proc.pid)
        healthy = d.healthz()
    finally:
        code = d.stop()
    yield text, baseline, after, healthy
    assert code == 0


def test_a_flood_of_unrouted_ids_keeps_the_learner_bounded(learn_flood: tuple[str, int, int, int]) -> None:
    """The learner's per-stream warm-up buffers are rings of ``warmup_readings`` and at
    most ``[engine] max_streams`` streams collect at once: memory stays bounded."""
    text, baseline, after, healthy = learn_flood
    print(f"\nlearn flood: RSS {baseline / 2**20:.1f} MB after {N_UNROUTED // 10} ids, "
          f"{after / 2**20:.1f} MB after {N_UNROUTED}")
    # Every reading is counted: collected for learning, or refused (at capacity) as such.
    assert sample(text, 'anomaly_detector_dropped_readings_total{reason="learning"}') == N_UNROUTED
    assert sample(text, "anomaly_detector_readings_total") == 0
    assert after <= baseline + SLACK_BYTES
    assert healthy == 200


def test_a_flood_of_unrouted_ids_evicts_least_recently_used_learner_state(
        learn_flood: tuple[str, int, int, int]) -> None:
    text = learn_flood[0]
    evicted = sample(text, 'anomaly_detector_evicted_streams_total{reason="max_streams"}')
    assert evicted >= N_UNROUTED - 500  # [engine] max_streams = 500 holds for collecting streams too
