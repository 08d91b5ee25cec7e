"""Load and fault generator: `anomaly-detector simulate`, and the demo's simulated plant.

Stream i is one pump (see plant.py) publishing multivariate readings on
``{topic_prefix}/pump-<i>`` as ``{"ts": ..., "values": {...}}`` (a JSON array of those
when batch > 1). Faults are injected at random and reported when their first reading is
sent, so a person can match alerts to faults.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from detector import plant
from detector.ingest import loop_stop

CHUNK = 4096            # readings generated per stream at a time (plant.normal is a Python loop)
FIRST_CHUNK_MIN = 256   # first chunks have random sizes so streams do not all refill at once
WINDOW = 1000           # messages handed to paho but not yet confirmed: our own backpressure
DRAIN_TIMEOUT = 10.0    # seconds to wait at the end for the last publishes to complete
CONNECT_TIMEOUT = 10.0
MAX_BEHIND = 1.0       # seconds of schedule backlog caught up with bursts; more is skipped
# Values are rounded for payload size; plant noise is far coarser than 1e-4.
_ITEM = '{"ts": %r, "values": {' + ", ".join(f'"{f}": %r' for f in plant.FEATURES) + "}}"

FaultCallback = Callable[[str, plant.Fault, float], None]


class SimError(Exception):
    """Bad configuration or an unreachable broker: one line for the user."""


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    streams: int = 4              # pumps
    rate: float = 1.0             # readings per second per stream; 0 = as fast as possible
    duration: float | None = None  # seconds; None = until stopped
    count: int | None = None      # readings per stream, then stop
    topic_prefix: str = "sensors/plant"  # the shipped config routes sensors/plant/+ to models/plant
    fault_every: float = 60.0     # mean seconds between fault starts per stream (0 = none)
    batch: int = 1                # readings per MQTT message (>1: JSON array payload)
    qos: int = 0
    seed: int = 0
    protocol: str = "3.1.1"       # or "5"
    period: int = 288             # readings per simulated day (plant.normal's period)
    fault_warmup: int = 0         # no faults in each stream's first readings (a learner's warm-up)

    def validate(self) -> None:
        checks = [(self.streams >= 1, "streams must be >= 1"),
                  (math.isfinite(self.rate) and self.rate >= 0, "rate must be >= 0"),
                  (self.duration is None or self.duration > 0, "duration must be > 0"),
                  (self.count is None or self.count >= 1, "count must be >= 1"),
                  (self.batch >= 1, "batch must be >= 1"),
                  (self.qos in (0, 1, 2), "qos must be 0, 1 or 2"),
                  (math.isfinite(self.fault_every) and self.fault_every >= 0,
                   "fault-every must be >= 0"),
                  (self.protocol in ("3.1.1", "5"), "mqtt version must be 3.1.1 or 5"),
                  (self.period >= 2, "period must be >= 2"),
                  (self.fault_warmup >= 0, "fault-warmup must be >= 0"),
                  (0 <= self.seed < 2**32, "seed must be 0 to 2**32 - 1"),
                  (1 <= self.port <= 65535, f"bad port {self.port}"),
                  (bool(self.topic_prefix) and not set("+#") & set(self.topic_prefix),
                   f"bad topic prefix {self.topic_prefix!r}")]
        for ok, message in checks:
            if not ok:
                raise SimError(message)


@dataclass
class SimStats:
    published: int = 0            # readings in messages the client confirmed as sent/acked
    messages: int = 0
    faults: list[tuple[str, str, str, float]] = field(default_factory=list)  # stream, kind, feature, ts
    seconds: float = 0.0
    lost: int = 0                 # readings in messages that failed or were never confirmed

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


class _Stream:
    """One pump: values in chunks from plant.normal, faults injected into the chunks."""

    def __init__(self, idx: int, cfg: SimConfig) -> None:
        self.idx, self.cfg = idx, cfg
        self.topic = f"{cfg.topic_prefix}/pump-{idx}"
        self.rng = np.random.default_rng([cfg.seed, idx])
        self.rows: list[list[float]] = []
        self.pos = 0
        self.sent = 0             # stream index of the next reading
        self.chunks = 0
        self.carry: np.ndarray | None = None
        self.last_ts = 0.0
        self.pending: deque[plant.Fault] = deque()  # Fault.start is the stream reading index
        # fault_every is in seconds; faults are placed in readings (flat out: as if at 1/s).
        self.mean_gap = cfg.fault_every * (cfg.rate if cfg.rate > 0 else 1.0)
        self.next_fault = cfg.fault_warmup + self._gap() if self.mean_gap > 0 else None

    def _gap(self) -> int:
        return 1 + int(self.rng.exponential(self.mean_gap))

    def _refill(self) -> None:
        cfg, base = self.cfg, self.sent
        n = CHUNK if self.chunks else int(self.rng.integers(FIRST_CHUNK_MIN, CHUNK + 1))
        if cfg.count is not None:
            n = max(1, min(n, cfg.count - base))
        blend = max(8, cfg.period // 3)
        seed = int(np.random.SeedSequence([cfg.seed, self.idx, self.chunks]).generate_state(1)[0])
        _, values = plant.normal(n + blend, seed=seed, period=cfg.period)
        if self.carry is not None:
            # Each chunk has its own random phase and load; cross-fading from the previous
            # chunk's continuation over a third of a day avoids a step at the seam.
            w = np.linspace(0.0, 1.0, blend)[:, None]
            values[:blend] = (1.0 - w) * self.carry + w * values[:blend]
        self.carry = values[n:].copy()
        values = values[:n]
        while self.next_fault is not None and self.next_fault < base + n:
            start = self.next_fault - base
            kind = str(self.rng.choice(plant.FAULTS))
            length = 1 if kind == "spike" else int(self.rng.integers(20, 61))
            length = max(1, min(length, int(self.mean_gap // 2)))
            if start + length > n and start > 0:
                self.next_fault = base + n  # would be cut off by the seam: start the next chunk
                break
            fault = plant.Fault(kind, int(self.rng.integers(len(plant.FEATURES))), start,
                                min(length, n - start))
            plant.inject(values, fault, self.rng)
            self.pending.append(plant.Fault(kind, fault.feature, base + start, fault.length))
            self.next_fault = base + start + fault.length + self._gap()
        self.rows = np.round(values, 4).tolist()
        self.pos, self.chunks = 0, self.chunks + 1

    def take(self, n: int) -> tuple[list[list[float]], list[plant.Fault]]:
        """The next n rows and the faults starting among them."""
        rows: list[list[float]] = []
        while len(rows) < n:
            if self.pos >= len(self.rows):
                self._refill()
            k = min(n - len(rows), len(self.rows) - self.pos)
            rows.extend(self.rows[self.pos:self.pos + k])
            self.pos += k
        starts: list[plant.Fault] = []
        while self.pending and self.pending[0].start < self.sent + n:
            starts.append(self.pending.popleft())
        self.sent += n
        return rows, starts

    def stamps(self, n: int, now: float) -> list[float]:
        # Batched readings are spaced 1/rate apart ending now; ts never repeats per stream
        # (1e-6 s is above a float's resolution at today's epoch, about 2.4e-7 s).
        rate, last, out = self.cfg.rate, self.last_ts, []
        for j in range(n):
            t = now - (n - 1 - j) / rate if rate > 0 else now
            last = t if t > last else last + 1e-6
            out.append(last)
        self.last_ts = last
        return out


class Simulator:
    def __init__(self, cfg: SimConfig, on_fault: FaultCallback | None = None) -> None:
        cfg.validate()
        self.cfg, self.on_fault = cfg, on_fault
        self._streams = [_Stream(i, cfg) for i in range(cfg.streams)]
        self._connected = threading.Event()
        self._answered = threading.Event()
        self._refused: str | None = None

    def run(self, stop: threading.Event | None = None) -> SimStats:
        """Publish until duration, count or `stop`; raises SimError if the broker is unreachable."""
        stop = stop or threading.Event()
        client = self._connect()
        stats, pending = SimStats(), deque[tuple[mqtt.MQTTMessageInfo, int]]()
        t0 = time.monotonic()
        try:
            self._loop(client, stop, stats, pending, t0)
            give_up = time.monotonic() + DRAIN_TIMEOUT
            while pending and self._settle(pending, stats, give_up, None):
                pass
            stats.lost += sum(n for _, n in pending)  # never confirmed: not counted as sent
        finally:
            stats.seconds = time.monotonic() - t0
            client.disconnect()
            loop_stop(client)
        return stats

    def _connect(self) -> mqtt.Client:
        cfg = self.cfg
        self._answered.clear()  # a Simulator may run again, continuing its streams
        self._refused = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"anomaly-simulate-{uuid.uuid4().hex[:12]}",
                             protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311)
        # 0 = unbounded, the default: a bounded paho queue drops with MQTT_ERR_QUEUE_SIZE.
        # WINDOW bounds what we hand over instead, and blocks rather than drops.
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        where = f"cannot connect to {cfg.host}:{cfg.port}"
        try:
            client.connect(cfg.host, cfg.port, keepalive=30)
        except OSError as exc:  # refused, unknown host, timeout, unreachable network
            raise SimError(f"{where}: {exc.strerror or exc or type(exc).__name__}") from None
        client.loop_start()
        if not self._answered.wait(CONNECT_TIMEOUT) or self._refused is not None:
            loop_stop(client)
            client.disconnect()
            raise SimError(f"{where}: {self._refused or 'no CONNACK from broker'}")
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        else:
            self._connected.set()
        self._answered.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: Any, properties: Any) -> None:
        self._connected.clear()

    def _loop(self, client: mqtt.Client, stop: threading.Event, stats: SimStats,
              pending: deque[tuple[mqtt.MQTTMessageInfo, int]], t0: float) -> None:
        cfg = self.cfg
        # A fixed schedule: a slow round is caught up, not added to every later interval.
        # Backlog is capped at MAX_BEHIND, so a stall or an outage does not end in a burst
        # of readings stamped with the same wall-clock time.
        step = cfg.batch / cfg.rate if cfg.rate > 0 else 0.0
        deadline = t0 + cfg.duration if cfg.duration is not None else math.inf
        due, live = t0, list(self._streams)
        while live and not stop.is_set() and time.monotonic() < deadline:
            if not self._connected.is_set():
                stop.wait(0.1)  # paho reconnects; publishing meanwhile would only lose readings
                continue
            due = max(due, time.monotonic() - MAX_BEHIND)
            now = time.time()
            for s in live:
                n = cfg.batch if cfg.count is None else min(cfg.batch, cfg.count - s.sent)
                rows, starts = s.take(n)
                stamps = s.stamps(n, now)
                for fault in starts:
                    ts = stamps[fault.start - (s.sent - n)]
                    stats.faults.append((s.topic, fault.kind, plant.FEATURES[fault.feature], ts))
                    if self.on_fault is not None:
                        self.on_fault(s.topic, fault, ts)
                items = [_ITEM % (t, *r) for t, r in zip(stamps, rows, strict=True)]
                payload = items[0] if cfg.batch == 1 else "[" + ", ".join(items) + "]"
                while len(pending) >= WINDOW and self._settle(pending, stats, deadline, stop):
                    pass
                pending.append((client.publish(s.topic, payload, cfg.qos), n))
            if cfg.count is not None:
                live = [s for s in live if s.sent < cfg.count]
            if step:
                due += step
                if due > time.monotonic():
                    stop.wait(min(due, deadline) - time.monotonic())  # --duration ends a slow pace too

    @staticmethod
    def _settle(pending: deque[tuple[mqtt.MQTTMessageInfo, int]], stats: SimStats,
                give_up: float, stop: threading.Event | None) -> bool:
        """Wait for the oldest message; False once give_up or stop comes first."""
        info, n = pending[0]
        while time.monotonic() < give_up and not (stop is not None and stop.is_set()):
            try:
                info.wait_for_publish(0.2)
                done = info.is_published()
            except (RuntimeError, ValueError):  # not connected, connection lost, queue full
                pending.popleft()
                stats.lost += n
                return True
            if done:
                pending.popleft()
                stats.published += n
                stats.messages += 1
                return True
        return False


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:1883
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SimError(f"bad --broker {text!r}: expected HOST:PORT")
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    a = parser.add_argument
    a("--broker", default=f"{d.host}:{d.port}", metavar="HOST:PORT", help="MQTT broker (%(default)s)")
    a("--streams", type=int, default=d.streams, help="pumps, one topic each (%(default)s)")
    a("--rate", type=float, default=d.rate,
      help="readings per second per stream; 0 = as fast as possible (%(default)s)")
    a("--duration", type=float, metavar="SECONDS", help="stop after this long (default: run until Ctrl-C)")
    a("--count", type=int, help="stop after this many readings per stream")
    a("--batch", type=int, default=d.batch, help="readings per message; >1 sends JSON arrays (%(default)s)")
    a("--qos", type=int, choices=(0, 1, 2), default=d.qos, help="publish QoS (%(default)s)")
    a("--fault-every", type=float, default=d.fault_every, metavar="SECONDS",
      help="mean time between faults per stream, 0 = none (%(default)s)")
    a("--fault-warmup", type=int, default=d.fault_warmup, metavar="READINGS",
      help="no faults in each stream's first READINGS readings (%(default)s)")
    a("--topic-prefix", default=d.topic_prefix, help="topics are PREFIX/pump-<i> (%(default)s)")
    a("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    a("--period", type=int, default=d.period, help="readings per simulated day (%(default)s)")
    a("--mqtt-version", choices=("3.1.1", "5"), default=d.protocol, help="(%(default)s)")


def _print_fault(stream: str, fault: plant.Fault, ts: float) -> None:
    when = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
    print(f"fault: {stream} {fault.kind} on {plant.FEATURES[fault.feature]} at {when}",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    handlers: dict[signal.Signals, Any] = {}
    try:
        host, port = parse_broker(args.broker)
        cfg = SimConfig(host=host, port=port, streams=args.streams, rate=args.rate,
                        duration=args.duration, count=args.count, topic_prefix=args.topic_prefix,
                        fault_every=args.fault_every, batch=args.batch, qos=args.qos,
                        seed=args.seed, protocol=args.mqtt_version, period=args.period,
                        fault_warmup=args.fault_warmup)
        sim = Simulator(cfg, on_fault=_print_fault)
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C and SIGTERM end the run cleanly: drain, disconnect, print the summary.
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda *_: stop.set())
        stats = sim.run(stop)
    except SimError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    lost = f", {stats.lost} lost" if stats.lost else ""
    print(f"simulate: {stats.published} readings in {stats.messages} messages over "
          f"{stats.seconds:.1f} s ({stats.rate:.0f} readings/s), {len(stats.faults)} faults{lost}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-detector simulate",
                                     description="Publish simulated pump readings with faults.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
