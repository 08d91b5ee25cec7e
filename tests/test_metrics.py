"""The metrics endpoint over real HTTP: contract names, /healthz, isolated registries."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest

from detector import metrics


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_and_healthz_over_http() -> None:
    m = metrics.create()
    state = {"ok": False}
    server = metrics.MetricsServer(m, "127.0.0.1", 0, lambda: (state["ok"], "broker disconnected"))
    server.start()
    try:
        m.readings.inc(3)
        m.invalid.labels(reason="bad_json").inc()
        m.model_info.labels(model="plant", version="v1", runtime="auto").set(1)
        m.processing.observe(0.002)
        base = f"http://127.0.0.1:{server.port}"
        code, text = get(base + "/metrics")
        assert code == 200
        assert "anomaly_detector_readings_total 3.0" in text
        assert 'anomaly_detector_invalid_readings_total{reason="bad_json"} 1.0' in text
        assert 'anomaly_detector_model_info{model="plant",runtime="auto",version="v1"} 1.0' in text
        for name in ("dropped_readings_total", "anomalous_readings_total", "alerts_total", "streams",
                     "queue_depth", "processing_seconds_bucket", "mqtt_connected"):
            assert f"# TYPE anomaly_detector_{name.removesuffix('_total').removesuffix('_bucket')}" in text
        assert get(base + "/healthz") == (503, "broker disconnected\n")
        state["ok"] = True
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_registries_are_independent() -> None:
    a, b = metrics.create(), metrics.create()
    a.readings.inc()
    assert b.registry.get_sample_value("anomaly_detector_readings_total") == 0.0
    assert a.registry.get_sample_value("anomaly_detector_readings_total") == 1.0


def test_observe_many_equals_one_observe_per_value() -> None:
    rng = np.random.default_rng(3)
    bounds = list(metrics.LATENCY_BUCKETS)
    # Values on every bound exactly, between bounds, below the first and above the last.
    values = np.concatenate([np.array(bounds), np.array(bounds) * 1.01, [0.0, 1e-6, 99.0, 1e9],
                             rng.exponential(0.01, 500)])
    one, many = metrics.create(), metrics.create()
    for v in values.tolist():
        one.processing.observe(v)
    metrics.observe_many(many.processing, values[:7])
    metrics.observe_many(many.processing, values[7:])
    metrics.observe_many(many.processing, np.array([]))

    def lines(m: metrics.Metrics) -> list[str]:
        return [ln for ln in generate_latest(m.registry).decode().splitlines()
                if ln.startswith("anomaly_detector_processing_seconds") and "_created" not in ln]

    a, b = lines(one), lines(many)
    assert [x.rsplit(" ", 1)[0] for x in a] == [x.rsplit(" ", 1)[0] for x in b]
    for x, y in zip(a, b):
        assert float(x.rsplit(" ", 1)[1]) == pytest.approx(float(y.rsplit(" ", 1)[1]), rel=1e-12)


def test_metrics_listen_on_an_ipv6_address() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = metrics.MetricsServer(metrics.create(), "::1", 0, lambda: (True, "ok"))
    server.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"anomaly_detector_readings_total" in r.read()
    finally:
        server.stop()


def test_idle_clients_are_let_go_and_cannot_take_every_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that connects and sends nothing held a thread and a descriptor for ever:
    # enough of them exhausted the process's descriptors, and checkpoints failed.
    monkeypatch.setattr(metrics, "HTTP_TIMEOUT_S", 0.5)
    server = metrics.MetricsServer(metrics.create(), "127.0.0.1", 0, lambda: (True, "ok"))
    server.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(metrics.HTTP_MAX_CONNECTIONS + 5):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        for s in idle:  # every one is closed by the server: over the cap at once, the rest timed out
            assert s.recv(1) == b""
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/healthz") == (200, "ok\n")
        req = urllib.request.Request(base + "/healthz", method="HEAD")  # wget --spider, curl -I
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""
    finally:
        for s in idle:
            s.close()
        server.stop()
