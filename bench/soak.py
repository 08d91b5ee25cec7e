"""Soak: the long versions of tests/test_overload.py, with figures for bench/RESULTS.md.

    python bench/soak.py [--only overload|flood|learn ...] [--seconds 60] [--queue-bytes 65536 33554432]
                         [--topics 1000000] [--max-streams 100000]

* overload: the daemon's sustainable rate (what it scores while offered more than it
  can), then twice that for ``--seconds``, one run per ``--queue-bytes`` (``[worker]
  queue_bytes``; 65536 holds six messages). Load: JSON arrays of 100 readings of one
  stream (4 streams), QoS 1, paced. Reports the daemon's
  RSS before and its peak, published / scored / dropped(queue_full), that
  published = scored + dropped + rejected, and the time to drain to queue_depth 0.
* flood: ``--topics`` distinct topics under the routed prefix ``sensors/plant/``, one
  reading each, with ``[engine] max_streams``: RSS before/after, live streams, evictions,
  duration.
* learn: the same flood on unrouted topics with ``[learn]`` on: the learner's buffers.

A real Mosquitto (tests/mqtt_broker.py) and the real daemon process (tests/helpers.py).
The publisher never lets more than 50,000 readings wait between it and the daemon's
counters, so the broker's queue limit (100,000 messages per client) never drops
anything; ``unaccounted`` (published minus scored, dropped and rejected) = 0 shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import Daemon, PeakRss, rss_bytes, sample  # noqa: E402
from mqtt_broker import start_test_broker  # noqa: E402

from detector import plant  # noqa: E402

FEATURES = plant.FEATURES
MB = 2**20


def metrics(d: Daemon) -> str:
    return d.metrics()


def accounted(text: str) -> float:
    invalid = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                  if ln.startswith("anomaly_detector_invalid_readings_total{"))
    dropped = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                  if ln.startswith("anomaly_detector_dropped_readings_total{"))
    return sample(text, "anomaly_detector_readings_total") + invalid + dropped


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent = 0
        self._infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, readings: int) -> None:
        self._infos.append(self.client.publish(topic, payload, qos=1))
        self.sent += readings
        if len(self._infos) >= 5000:
            for info in self._infos:
                info.wait_for_publish(timeout=120)
            self._infos.clear()

    def close(self) -> None:
        for info in self._infos:
            info.wait_for_publish(timeout=120)
        self.client.loop_stop()
        self.client.disconnect()


# ---- overload -------------------------------------------------------------------------

class Batches:
    """JSON arrays of ``per`` readings of one stream, round robin over ``streams``."""

    def __init__(self, streams: int = 4, per: int = 100, prefix: str = "sensors/plant/load") -> None:
        self.streams, self.per, self.prefix, self.seq = streams, per, prefix, 0
        self.t0 = time.time() - 50_000_000
        self.values = plant.normal(4096, seed=5)[1].round(4).tolist()

    def next(self) -> tuple[str, bytes]:
        k, base = self.seq % self.streams, self.seq // self.streams * self.per
        self.seq += 1
        body = [{"ts": self.t0 + base + i, "values": dict(zip(FEATURES, self.values[(base + i) % 4096]))}
                for i in range(self.per)]
        return f"{self.prefix}-{k}", json.dumps(body).encode()


def paced(d: Daemon, pub: Publisher, gen: Batches, seconds: float, rate: float) -> None:
    """``rate`` readings/s for ``seconds``."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        if n * gen.per > (now - start) * rate:
            time.sleep(min(0.005, n * gen.per / rate - (now - start)))
            continue
        topic, payload = gen.next()
        pub.publish(topic, payload, gen.per)
        n += 1


def overload(port: int, tmp: Path, queue_bytes: int, seconds: float) -> dict[str, float]:
    d = Daemon(tmp, port, worker=f"queue_bytes = {queue_bytes}", state="checkpoint_interval_s = 3600",
               extra='[log]\nlevel = "warning"\n')
    d.start()
    assert d.proc is not None
    pub, gen = Publisher(port), Batches()
    try:
        paced(d, pub, gen, 2.0, 1000)  # warm-up
        while accounted(metrics(d)) < pub.sent:
            time.sleep(0.05)
        before = rss_bytes(d.proc.pid)
        peak = PeakRss(d.proc.pid, every=0.2)
        # Sustainable: what it scores while offered far more (paced: nothing queues at the
        # broker), over 10 s after 2 s of settling.
        paced(d, pub, gen, 2.0, 40_000)
        s0, t0 = sample(metrics(d), "anomaly_detector_readings_total"), time.monotonic()
        paced(d, pub, gen, 10.0, 40_000)
        sustainable = (sample(metrics(d), "anomaly_detector_readings_total") - s0) / (time.monotonic() - t0)
        dropped0 = sample(metrics(d), 'anomaly_detector_dropped_readings_total{reason="queue_full"}')
        sent0, s1, t1 = pub.sent, sample(metrics(d), "anomaly_detector_readings_total"), time.monotonic()
        paced(d, pub, gen, seconds, 2 * sustainable)
        offered = (pub.sent - sent0) / (time.monotonic() - t1)
        scored_rate = (sample(metrics(d), "anomaly_detector_readings_total") - s1) / (time.monotonic() - t1)
        pub.close()
        t_end = time.monotonic()
        while True:
            text = metrics(d)
            if accounted(text) >= pub.sent and sample(text, "anomaly_detector_queue_depth") == 0:
                break
            time.sleep(0.05)
        drain = time.monotonic() - t_end
        top = peak.stop()
        text = metrics(d)
        scored = sample(text, "anomaly_detector_readings_total")
        dropped = sample(text, 'anomaly_detector_dropped_readings_total{reason="queue_full"}')
        return {"queue_bytes": queue_bytes, "seconds": seconds, "sustainable": sustainable, "offered": offered,
                "scored_rate": scored_rate, "published": pub.sent, "scored": scored, "dropped": dropped,
                "dropped_in_run": dropped - dropped0, "unaccounted": pub.sent - accounted(text),
                "rss_before_mb": before / MB, "rss_peak_mb": top / MB, "rss_after_mb": rss_bytes(d.proc.pid) / MB,
                "drain_s": drain, "healthz": d.healthz()}
    finally:
        d.stop(timeout=120)


# ---- floods ---------------------------------------------------------------------------

def flood(port: int, tmp: Path, topics: int, max_streams: int, learn: bool) -> dict[str, float]:
    prefix = "sensors/unrouted/f" if learn else "sensors/plant/f"
    d = Daemon(tmp, port, learn="enabled = true\nwarmup_readings = 40" if learn else "enabled = false",
               state="checkpoint_interval_s = 3600", extra=f'[engine]\nmax_streams = {max_streams}\n'
                                                           '[log]\nlevel = "warning"\n')
    d.start()
    assert d.proc is not None
    pub = Publisher(port)
    try:
        before = rss_bytes(d.proc.pid)
        peak = PeakRss(d.proc.pid, every=0.2)
        t0 = time.time() - 10_000_000
        reading = dict(zip(FEATURES, (20.0, 1.0, 50.0, 0.5)))
        start = time.monotonic()
        checkpoints = {}
        for i in range(topics):
            pub.publish(f"{prefix}-{i}", json.dumps({"ts": t0 + i, "values": reading}).encode(), 1)
            if i % 20_000 == 0:
                while pub.sent - accounted(metrics(d)) > 50_000:  # backpressure: the broker never drops
                    time.sleep(0.05)
            if i + 1 in (topics // 10, topics // 2):
                checkpoints[i + 1] = rss_bytes(d.proc.pid) / MB
        pub.close()
        while accounted(metrics(d)) < topics:
            time.sleep(0.1)
        duration = time.monotonic() - start
        top = peak.stop()
        text = metrics(d)
        return {"topics": topics, "max_streams": max_streams, "learn": learn, "duration_s": duration,
                "rate": topics / duration, "rss_before_mb": before / MB,
                **{f"rss_at_{k}_mb": v for k, v in checkpoints.items()},
                "rss_after_mb": rss_bytes(d.proc.pid) / MB, "rss_peak_mb": top / MB,
                "scored": sample(text, "anomaly_detector_readings_total"),
                "learning": sample(text, 'anomaly_detector_dropped_readings_total{reason="learning"}'),
                "live_streams": sample(text, "anomaly_detector_streams"),
                "evicted_max_streams": sample(text, 'anomaly_detector_evicted_streams_total{reason="max_streams"}'),
                "unaccounted": topics - accounted(text), "healthz": d.healthz()}
    finally:
        d.stop(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("overload", "flood", "learn"),
                    default=["overload", "flood", "learn"])
    ap.add_argument("--seconds", type=float, default=60.0, help="overload duration (default 60)")
    ap.add_argument("--queue-bytes", type=int, nargs="+", default=[65536, 32 << 20])
    ap.add_argument("--topics", type=int, default=1_000_000)
    ap.add_argument("--max-streams", type=int, default=100_000)
    args = ap.parse_args()
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}", flush=True)
    broker = start_test_broker()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.only:
                runs = ([("overload", q) for q in args.queue_bytes] if name == "overload" else [(name, None)])
                for kind, q in runs:
                    work = Path(tempfile.mkdtemp(dir=tmp))
                    if kind == "overload":
                        res = overload(broker.port, work, q, args.seconds)  # type: ignore[arg-type]
                    else:
                        res = flood(broker.port, work, args.topics, args.max_streams, learn=kind == "learn")
                    print(json.dumps({"run": kind, **{k: round(v, 2) if isinstance(v, float) else v
                                                      for k, v in res.items()}}), flush=True)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
