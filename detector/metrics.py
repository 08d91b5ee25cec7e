"""Prometheus metrics and the HTTP endpoint that serves them with ``/healthz``.

Every metric lives in an injectable registry (as ``prometheus_client`` recommends), so a
test or a second daemon in one process gets its own set. No per-stream labels: with
thousands of streams they would be the costliest thing the daemon exports.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from detector.payloads import REASONS as PAYLOAD_REASONS

PREFIX = "anomaly_detector"

# Receive-to-scored latency buckets: the worker batches for a few milliseconds at most.
# Every label value the daemon uses, created at 0 on start: a rule like
# rate(...{reason="queue_full"}[5m]) > 0 needs the series to exist before the first drop.
INVALID_REASONS = PAYLOAD_REASONS + ("bad_topic", "feature_mismatch", "duplicate", "out_of_order",
                                     "future_timestamp", "missing_values")
DROPPED_REASONS = ("queue_full", "learning", "no_model", "internal_error", "shutdown")
EVENTS = ("anomaly_start", "anomaly_end")
EVICTION_REASONS = ("idle", "max_streams")
ALERT_DROP_REASONS = ("queue_full", "shutdown")
FIT_RESULTS = ("ok", "failed", "timeout")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    readings: Counter
    invalid: Counter
    dropped: Counter
    anomalous: Counter
    alerts: Counter
    streams: Gauge
    queue_depth: Gauge
    processing: Histogram
    mqtt_connected: Gauge
    model_info: Gauge
    evicted: Counter
    batch_size: Histogram
    checkpoint_failures: Counter
    learned_models: Gauge
    reload_failures: Counter
    healthy: Gauge
    dropped_alerts: Counter
    learn_fits: Counter
    refits: Counter


def create(registry: CollectorRegistry | None = None) -> Metrics:
    reg = registry if registry is not None else CollectorRegistry()

    def name(n: str) -> str:
        return f"{PREFIX}_{n}"

    m = Metrics(
        registry=reg,
        readings=Counter(name("readings"), "Readings scored", registry=reg),
        invalid=Counter(name("invalid_readings"), "Readings rejected, by reason", ["reason"], registry=reg),
        dropped=Counter(name("dropped_readings"), "Valid readings not scored, by reason", ["reason"],
                        registry=reg),
        anomalous=Counter(name("anomalous_readings"), "Readings flagged", registry=reg),
        alerts=Counter(name("alerts"), "Alerts published, by event", ["event"], registry=reg),
        streams=Gauge(name("streams"), "Streams with live state", registry=reg),
        queue_depth=Gauge(name("queue_depth"), "Readings waiting to be scored", registry=reg),
        processing=Histogram(name("processing_seconds"), "Receive to scored, seconds",
                             buckets=LATENCY_BUCKETS, registry=reg),
        mqtt_connected=Gauge(name("mqtt_connected"), "1 when connected to the broker", registry=reg),
        model_info=Gauge(name("model_info"), "1 per loaded model", ["model", "version", "runtime"],
                         registry=reg),
        evicted=Counter(name("evicted_streams"), "Stream states dropped, by reason", ["reason"],
                        registry=reg),
        batch_size=Histogram(name("batch_readings"), "Readings per scoring batch",
                             buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=reg),
        checkpoint_failures=Counter(name("checkpoint_failures"), "Checkpoints that could not be written",
                                    registry=reg),
        learned_models=Gauge(name("learned_models"), "Learned models in memory: streams scored by a model "
                             "learned from the stream, seen within [engine] idle_timeout_s",
                             registry=reg),
        reload_failures=Counter(name("reload_failures"), "SIGHUP reloads that kept the old models",
                                registry=reg),
        healthy=Gauge(name("healthy"), "1 while /healthz would answer 200 (worker alive, subscribed)",
                      registry=reg),
        dropped_alerts=Counter(name("dropped_alerts"), "Alerts not published, by reason (queue_full: the "
                               "outgoing queue held [alerts] max_queued unacknowledged alerts; shutdown: "
                               "still unacknowledged when the daemon stopped, the broker away)", ["reason"],
                               registry=reg),
        learn_fits=Counter(name("learn_fits"), "Learn-from-stream fits finished, by result "
                           "(ok, failed, timeout)", ["result"], registry=reg),
        refits=Counter(name("refits"), "Learned models refitted on their stream's recent normal readings "
                       "and swapped in", registry=reg),
    )
    for counter, values, label in ((m.invalid, INVALID_REASONS, "reason"), (m.dropped, DROPPED_REASONS, "reason"),
                                   (m.alerts, EVENTS, "event"), (m.evicted, EVICTION_REASONS, "reason"),
                                   (m.dropped_alerts, ALERT_DROP_REASONS, "reason"),
                                   (m.learn_fits, FIT_RESULTS, "result")):
        for v in values:
            counter.labels(**{label: v})
    return m


# A scrape or health check takes milliseconds; these bound what a client that does not
# finish (or thousands that connect) can hold.
HTTP_TIMEOUT_S = 10.0
HTTP_MAX_CONNECTIONS = 64


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (200 when ``healthy()`` says
    so, else 503) on one address, served from a daemon thread."""

    def __init__(self, metrics: Metrics, address: str, port: int,
                 healthy: Callable[[], tuple[bool, str]]) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            # A client that connects and sends nothing (or a byte a second) let go after
            # this many seconds, not held for ever with its thread and file descriptor.
            timeout = HTTP_TIMEOUT_S

            def do_HEAD(self) -> None:  # health checks (wget --spider, curl -I) use HEAD
                self._head_only = True
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    ok, why = healthy()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not getattr(self, "_head_only", False):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                pass

        # The address's own family (prometheus_client's start_http_server does the same):
        # ThreadingHTTPServer alone is IPv4, and "::" or "::1" failed to bind.
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror:
            family = socket.AF_INET  # the bind below then says what is wrong with the address
        slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)

        class Server(ThreadingHTTPServer):
            address_family = family
            request_queue_size = 64  # the kernel's backlog: 5 made a burst of scrapers look like a SYN flood

            def process_request(self, request: Any, client_address: Any) -> None:
                # At most HTTP_MAX_CONNECTIONS at once, each a thread and a descriptor: the
                # ones over it are closed at once, so clients of the metrics port can never
                # take the descriptors that checkpoints, fits and the broker need.
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        self._server = Server((address, port), Handler)
        self._server.daemon_threads = True
        # stop() waits up to one poll interval: short, as it counts against the shutdown budget.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def observe_many(hist: Histogram, values: np.ndarray) -> None:
    """``hist.observe(v)`` for every value, in one pass: a per-reading ``observe`` costs
    more than scoring the reading. Uses the histogram's bucket counters the way
    ``Histogram.observe`` does (a value goes to the first bucket whose bound is >= it);
    falls back to ``observe`` if a prometheus-client release changes them."""
    if not len(values):
        return
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values.tolist():
            hist.observe(v)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left"),
                         minlength=len(bounds))
    total.inc(float(values.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
