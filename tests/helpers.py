"""Small helpers shared by the tests that drive a real daemon process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as mqtt

from detector import plant
from detector.ingest import loop_stop
from mqtt_broker import free_port

T = TypeVar("T")
DEADLINE = 60.0
ROOT = Path(__file__).resolve().parents[1]
PLANT_MODEL = ROOT / "models" / "plant"
# [model]/[train] sections for learn-from-stream tests: a tiny model that fits in seconds.
SMALL_FIT = """
[model]
hidden = 8
bottleneck = 4
[train]
epochs = 2
seq_len = 32
"""


def mqtt_packet(head: int, body: bytes) -> bytes:
    """An MQTT control packet: its first byte, the remaining length, then ``body``."""
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 127
        length.append(digit | (128 if n else 0))
        if not n:
            return bytes([head]) + bytes(length) + body


def wait_for(pred: Callable[[], T], what: str, deadline: float = DEADLINE, every: float = 0.1) -> T:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` after
    ``deadline`` seconds (generous: no timing is asserted, only that it happens)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str) -> float:
    """The value of the series ``name`` (exactly, labels included) in /metrics text."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def publish_all(port: int, items: list[tuple[str, bytes]]) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait until the broker has them all."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for info in [pub.publish(t, p, qos=1) for t, p in items]:
        info.wait_for_publish(timeout=30)
    loop_stop(pub)
    pub.disconnect()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    return http_get(f"http://127.0.0.1:{port}{path}")


class Daemon:
    """A real ``anomaly-detector run`` process with its own config, state and log.

    Each keyword is the body of that config section (TOML lines), added to the defaults
    below; ``extra`` is appended as whole sections. ``models`` replaces the default route
    (the shipped plant model for ``sensors/plant/+``).
    """

    def __init__(self, tmp: Path, broker_port: int, *, mqtt: str = "", metrics: str = "",
                 learn: str = "enabled = false", state: str = "checkpoint_interval_s = 1.0",
                 score: str = "clear_readings = 5", worker: str = "", models: str | None = None,
                 extra: str = "", host: str = "127.0.0.1", topics: str = '["sensors/#"]') -> None:
        self.tmp = tmp
        self.metrics_port = free_port()
        self.config = tmp / "config.toml"
        if models is None:
            models = f'[[models]]\nmatch = "sensors/plant/+"\npath = "{PLANT_MODEL}"\n'
        self.config.write_text(f"""
[mqtt]
host = "{host}"
port = {broker_port}
topics = {topics}
client_id = "detector-test-{os.getpid()}-{self.metrics_port}"
{mqtt}
[metrics]
port = {self.metrics_port}
{metrics}
{models}
[learn]
{learn}
[state]
dir = "{tmp / 'state'}"
{state}
[score]
{score}
[worker]
{worker}
{extra}
""")
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, env: dict[str, str] | None = None) -> None:
        """Start the process without waiting for it to become healthy."""
        self.proc = subprocess.Popen([sys.executable, "-m", "detector", "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=ROOT,
                                     env=env)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.launch(env)
        wait_for(lambda: self.healthz() == 200, "daemon healthy")

    def healthz(self) -> int:
        return scrape(self.metrics_port, "/healthz")[0]

    def metrics(self) -> str:
        return scrape(self.metrics_port)[1]

    def value(self, name: str) -> float:
        return sample(self.metrics(), name)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Listener:
    """A subscriber that records every message it gets; subscribed (every SUBACK in) when
    the constructor returns, so what is published afterwards reaches it."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        acked = threading.Semaphore(0)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = lambda c, u, m: self._add(m)
        self.client.on_subscribe = lambda *args: acked.release()
        self.client.connect("127.0.0.1", port)
        for t in topics:
            self.client.subscribe(t, qos=1)
        self.client.loop_start()
        for t in topics:
            if not acked.acquire(timeout=DEADLINE):
                raise AssertionError(f"no SUBACK for {t!r}")

    def _add(self, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(m)

    def on(self, topic_prefix: str) -> list[mqtt.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    def close(self) -> None:
        loop_stop(self.client)
        self.client.disconnect()


def plant_messages(stream: str, n: int, seed: int, fault_at: int | None = None) -> list[tuple[str, bytes]]:
    """``n`` simulated plant readings on ``stream`` (one per second, ending now); with
    ``fault_at``, pressure far off for 20 readings from there."""
    times, values = plant.normal(n, seed=seed)
    if fault_at is not None:
        values[fault_at: fault_at + 20, 1] += 3.0
    t0 = time.time() - n
    return [(stream, json.dumps({"ts": t0 + i, "values": dict(zip(plant.FEATURES, values[i].tolist()))}).encode())
            for i in range(n)]


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class PeakRss:
    """A process's peak RSS, sampled in the background every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.peak, self._every = pid, rss_bytes(pid), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes(self.pid))
