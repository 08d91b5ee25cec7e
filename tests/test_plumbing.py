"""The daemon's small parts: intake overload policy, the worker's decoding steps, alert
topics, checkpoints, sd_notify."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import socket
import threading
import time
import weakref
from itertools import pairwise
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector import checkpoint, sdnotify
from detector import config as config_mod
from detector import worker as worker_mod
from detector.alerts import alert_payload, alert_topic
from detector.config import ModelRoute
from detector.engine import Engine, Event
from detector.intake import Intake, Raw
from detector.metrics import create
from detector.payloads import item_count
from detector.worker import Worker, load_models
from helpers import PLANT_MODEL, plant_messages


def raw(i: int, payload: bytes = b"1.5", received: float = 0.0) -> Raw:
    return Raw(f"s{i}", f"s{i}", payload, received)


def names(msgs: list[Raw]) -> list[str]:
    return [m.stream for m in msgs]


def test_drop_oldest_keeps_the_freshest_messages() -> None:
    q = Intake(3, 1000, "drop_oldest")
    assert all(q.put(raw(i)) == [] for i in range(3))
    assert names(q.put(raw(3))) == ["s0"] and len(q) == 3
    assert names(q.take(10, 0.0)) == ["s1", "s2", "s3"] and len(q) == 0 and q.nbytes == 0
    # the byte bound: 10-byte payloads in 25 bytes, then one of 20 evicts two
    q = Intake(100, 25, "drop_oldest")
    assert q.put(raw(0, b"1" * 10)) == [] and q.put(raw(1, b"2" * 10)) == []
    assert names(q.put(raw(2, b"3" * 20))) == ["s0", "s1"] and q.nbytes == 20
    assert names(q.put(raw(3, b"4" * 26))) == ["s3"]  # larger than the whole queue: refused
    assert names(q.take(1, 0.0)) == ["s2"]


def test_drop_newest_keeps_the_oldest_messages() -> None:
    q = Intake(2, 1000, "drop_newest")
    q.put(raw(0))
    q.put(raw(1))
    assert names(q.put(raw(2))) == ["s2"]
    assert names(q.take(1, 0.0)) == ["s0"] and names(q.take(5, 0.0)) == ["s1"]


def test_closed_intake_refuses_but_drains() -> None:
    q = Intake(10)
    q.put(raw(0))
    q.close()
    assert names(q.put(raw(1))) == ["s1"]
    assert names(q.take(10, 1.0)) == ["s0"] and q.take(10, 1.0) == []


def test_item_count_counts_a_dropped_message_without_judging_it() -> None:
    assert [item_count(p) for p in (b"1.5", b'{"value": 1}', b"[1, 2, {}]", b" [] ", b"[1, oops", b"[[1]]")] \
        == [1, 1, 3, 1, 1, 1]


def test_worker_decodes_steps_of_max_batch_readings_keeping_order_and_receive_times() -> None:
    cfg = config_mod.parse({"worker": {"max_batch": 5}, "log": {"invalid_interval_s": 3600.0}})
    q = Intake(100)
    metrics = create()
    worker = Worker(cfg, q, metrics, lambda t, p: None)
    q.put(raw(0, b"[0, 1, 2]", received=7.0))
    q.put(raw(0, b"not json", received=7.5))
    q.put(raw(0, b"[3, 4, 5, 6]", received=8.0))
    first = worker._take(0.0)
    assert [r.value for m in first for r in m.readings()] == [0, 1, 2, 3, 4]
    assert [m.received for m in first] == [7.0, 8.0]
    assert metrics.registry.get_sample_value("anomaly_detector_invalid_readings_total", {"reason": "bad_json"}) == 1
    assert worker.waiting() == 2  # the rest of the split message
    rest = worker._take(0.0)
    assert [r.value for m in rest for r in m.readings()] == [5, 6] and [m.received for m in rest] == [8.0]
    assert worker._take(0.0) == [] and worker.waiting() == 0


def test_worker_lingers_for_more_messages_only_when_not_behind() -> None:
    cfg = config_mod.parse({"worker": {"linger_ms": 500.0}})
    q = Intake(100)
    worker = Worker(cfg, q, create(), lambda t, p: None)

    def later(payload: bytes, after_s: float) -> None:
        time.sleep(after_s)
        q.put(raw(0, payload, received=time.time()))

    # a fresh message waits (up to 500 ms) for what comes meanwhile: one step for both
    q.put(raw(0, b"1", received=time.time()))
    threading.Thread(target=later, args=(b"2", 0.05)).start()
    assert [r.value for m in worker._take(0.0) for r in m.readings()] == [1.0, 2.0]
    # one that has waited that long already (a backlog) is scored at once: "4", put half
    # the linger later (not sooner: a stall of this thread must not let it join), is not
    # in that step, as it would be were the worker lingering
    q.put(raw(0, b"3", received=time.time() - 1.0))
    threading.Thread(target=later, args=(b"4", 0.25)).start()
    assert [r.value for m in worker._take(0.0) for r in m.readings()] == [3.0]
    assert [r.value for m in worker._take(1.0) for r in m.readings()] == [4.0]


def test_collections_paused_in_a_step_still_happen_and_free_old_cycles() -> None:
    class Node:
        pass

    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    freed: list[bool] = []
    gc.disable()  # as in a step: only _collect_due collects
    try:
        gc.collect()
        node = Node()
        node.self = node  # type: ignore[attr-defined]  # a cycle: only the collector frees it
        weakref.finalize(node, freed.append, True)
        gc.collect(1)  # survived twice: now in the oldest generation
        del node
        gc.set_threshold(1, 1, 1)
        kept: list[list[int]] = []  # live objects: what raises the young generation's count
        done = []
        for _ in range(20):
            kept += [[] for _ in range(3)]
            done.append(worker_mod._collect_due(full=False))
        assert {0, 1} <= set(done) and 2 not in done and not freed  # young ones do not reach it
        for _ in range(20):
            kept += [[] for _ in range(3)]
            if worker_mod._collect_due(full=True) == 2:
                break
        assert freed == [True]
    finally:
        gc.set_threshold(*thresholds)
        if enabled:
            gc.enable()


def test_alert_topic_cannot_escape_or_wildcard() -> None:
    assert alert_topic("anomalies", "sensors/pump-1") == "anomalies/sensors/pump-1"
    assert alert_topic("anomalies", "a/+/#") == "anomalies/a/_/_"
    ev = Event("s", "anomaly_start", 1.0, 0.9999, float("inf"), 0.2, {"x": 1.0}, {"name": "m", "version": "v"})
    body = json.loads(alert_payload(ev, "auto"))
    assert body["error"] is None and body["model"] == {"name": "m", "version": "v", "runtime": "auto"}
    odd = Event("s/\udcff/é", "anomaly_start", 1.0, 0.5, 1.5e-05, 0.2, {"é": 1.0}, {"name": "m", "version": "v"})
    body = json.loads(alert_payload(odd, "auto"))  # a lone surrogate cannot be UTF-8: escaped instead
    assert body["stream"] == "s/\udcff/é" and body["error"] == 1.5e-05 and body["features"] == {"é": 1.0}


def test_a_fault_on_every_stream_alerts_on_each_and_logs_a_summary(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(worker_mod, "LOGGED_EVENTS", 3)
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/plant/+", str(PLANT_MODEL)),))
    published: list[tuple[str, bytes]] = []
    metrics = create()
    q = Intake(1000)
    worker = Worker(cfg, q, metrics, lambda t, p: published.append((t, p)) or True)  # None: refused
    worker.install(cfg, load_models(cfg))
    streams = [plant_messages(f"sensors/plant/p{k}", 200, seed=k, fault_at=150) for k in range(12)]
    caplog.set_level(logging.INFO, logger="detector.worker")
    for i in range(200):  # every stream's i-th reading in one step: the fault hits all at once
        for msgs in streams:
            q.put(Raw(msgs[i][0], msgs[i][0], msgs[i][1], time.time()))
        worker.step(0.0)
    starts = [json.loads(p)["stream"] for _, p in published if json.loads(p)["event"] == "anomaly_start"]
    assert sorted(starts) == sorted(f"sensors/plant/p{k}" for k in range(12))
    assert metrics.registry.get_sample_value("anomaly_detector_alerts_total", {"event": "anomaly_start"}) == 12
    lines = [r.getMessage() for r in caplog.records if r.name == "detector.worker"]
    assert sum(line.startswith("anomaly_start sensors/plant/p") for line in lines) < 12
    summaries = [line for line in lines if line.startswith("and ")]
    assert summaries and all("more anomaly_start" in line and "(model plant;" in line for line in summaries)
    assert sum(int(line.split(" more anomaly_start")[0].rsplit(" ", 1)[1]) for line in summaries) \
        + sum(line.startswith("anomaly_start ") for line in lines) == 12


def test_a_stream_takes_the_first_route_that_matches_in_config_order() -> None:
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/plant/+", str(PLANT_MODEL)),
                          ModelRoute("sensors/#", str(PLANT_MODEL)),
                          ModelRoute("sensors/plant/+", str(PLANT_MODEL)),  # repeated: never chosen
                          ModelRoute("+/line2/#", str(PLANT_MODEL))))
    worker = Worker(cfg, Intake(10), create(), lambda t, p: None)
    worker.install(cfg, load_models(cfg))
    engines = [e for _, e in worker.models.routes]
    assert worker._route("sensors/plant/a") is engines[0]
    assert worker._route("sensors/line2/a") is engines[1]  # "+/line2/#" matches too, but comes later
    assert worker._route("sensors") is engines[1]  # "#" matches the parent level too
    assert worker._route("hall/line2") is engines[3]
    assert worker._route("hall/line3/a") is None
    assert worker._route("$SYS/line2/a") is None  # wildcards never match $ topics' first level


def test_checkpoint_round_trip_and_corrupt_file_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "a.npz"
    checkpoint.save(path, {"h": np.ones((2, 3), dtype=np.float32), "streams": np.array(["a", "b"])})
    snap, problem = checkpoint.load(path)
    assert problem is None and snap is not None and snap["streams"].tolist() == ["a", "b"]
    assert checkpoint.load(tmp_path / "none.npz") == (None, None)
    path.write_bytes(b"garbage")
    snap, problem = checkpoint.load(path)
    assert snap is None and problem is not None and "moved to" in problem
    assert not path.exists() and len(list(path.parent.glob("a.npz.corrupt-*"))) == 1


def test_sd_notify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(sock_path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        assert sdnotify.notify("READY=1")
        assert server.recv(64) == b"READY=1"
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


def test_readings_without_ts_never_go_back_in_time() -> None:
    # Two 100-item batches without ts received within their length of each other, then a
    # number received after the wall clock stepped back: every reading is kept, in order.
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/plant/+", str(PLANT_MODEL)),))
    metrics = create()
    q = Intake(100)
    worker = Worker(cfg, q, metrics, lambda t, p: None)
    worker.install(cfg, load_models(cfg))
    item = {"values": {"temperature": 30.0, "vibration": 2.9, "pressure": 30.0, "flow": 0.58}}
    batch = json.dumps([item] * 100).encode()
    now = time.time()
    for received in (now, now + 10e-6, now - 1.0):  # 10 µs apart; then 1 s back
        q.put(Raw("sensors/plant/a", "sensors/plant/a", batch, received))
    msgs = worker._take(0.0)
    ts = [t for m in msgs for t in m.ts]
    assert len(ts) == 300 and all(b > a for a, b in pairwise(ts))
    assert [m.received for m in msgs] == [now, now + 10e-6, now - 1.0]  # latency keeps the real times
    worker.process(msgs)
    assert metrics.registry.get_sample_value("anomaly_detector_readings_total") == 300
    assert metrics.registry.get_sample_value("anomaly_detector_invalid_readings_total",
                                             {"reason": "out_of_order"}) in (None, 0.0)


def test_a_clock_stepped_back_does_not_hold_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # The linger waits for the first message to be linger old by its wall-clock receive
    # time: one stamped 1 h ahead (the clock then stepped back) must not wait an hour.
    cfg = config_mod.parse({"worker": {"linger_ms": 50.0}})
    q = Intake(100)
    worker = Worker(cfg, q, create(), lambda t, p: None)
    waits: list[float] = []
    monkeypatch.setattr(worker_mod.time, "sleep", waits.append)
    q.put(raw(0, b"1", received=time.time() + 3600.0))
    assert [r.value for m in worker._take(0.0) for r in m.readings()] == [1.0]
    assert waits and max(waits) <= 0.05


def test_routes_come_before_learned_models_and_a_reload_reaches_both() -> None:
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/plant/+", str(PLANT_MODEL)),))
    worker = Worker(cfg, Intake(10), create(), lambda t, p: None)
    bundles = load_models(cfg)
    worker.install(cfg, bundles)
    learned = Engine(next(iter(bundles.values())), cfg.score, cfg.engine)
    worker.models.learned.update({"sensors/plant/p9": learned, "site/flow": learned})
    route = worker.models.routes[0][1]
    assert worker._route("sensors/plant/p9") is route  # the contract: first route that matches
    assert worker._route("site/flow") is learned  # no route: its own model
    t0 = time.time() - 10
    learned.process(["site/flow"], [t0], [[30.0, 2.9, 30.0, 0.58]], now=t0)
    stricter = replace(cfg, score=replace(cfg.score, threshold=0.9999), engine=replace(cfg.engine, max_streams=50))
    worker.install(stricter, bundles)
    eng = worker.models.learned["site/flow"]
    assert eng.cfg.threshold == 0.9999 and eng.ecfg.max_streams == 50
    assert eng.rt.name == "numpy"  # one stream per learned engine: no ONNX Runtime session
    assert eng.snapshot()["streams"].tolist() == ["site/flow"]  # its streams keep their state


def test_an_error_between_steps_does_not_end_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_mod.parse({"worker": {"max_wait_ms": 10.0}})
    q = Intake(100)
    metrics = create()
    worker = Worker(cfg, q, metrics, lambda t, p: None)
    calls: list[int] = []

    def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(11, "Resource temporarily unavailable")

    worker._between_batches = fails_once  # type: ignore[method-assign]
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(calls) < 3 and worker.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 3 and worker.alive()
        assert "scoring goes on" in caplog.text and "OSError" in caplog.text
    finally:
        q.close()
        assert worker.stop(30)


def test_a_refitted_models_old_bundle_stays_until_learned_json_no_longer_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(config_mod.parse({"learn": {"enabled": False}, "state": {"dir": str(tmp_path)}}), models=())
    worker = Worker(cfg, Intake(10), create(), lambda t, p: None)
    old = tmp_path / "models" / "s-old"
    old.mkdir(parents=True)
    worker._stale_bundles.append(old)

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_atomic", disk_full)
    assert not worker._save_learned_index() and old.is_dir()  # a crash now restores from it
    monkeypatch.undo()
    assert worker._save_learned_index() and not old.exists()
    assert json.loads((tmp_path / "learned.json").read_text()) == {}


def test_a_model_that_fails_costs_only_its_own_readings(caplog: pytest.LogCaptureFixture) -> None:
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/a/+", str(PLANT_MODEL)), ModelRoute("sensors/b/+", str(PLANT_MODEL))))
    metrics = create()
    q = Intake(100)
    worker = Worker(cfg, q, metrics, lambda t, p: None)
    worker.install(cfg, load_models(cfg))

    def broken(*args: object, **kwargs: object) -> None:
        raise FloatingPointError("a bug in one model's path")

    worker.models.routes[0][1].process = broken  # type: ignore[method-assign]
    payload = json.dumps({"values": {"temperature": 30.0, "vibration": 2.9, "pressure": 30.0, "flow": 0.58}}).encode()
    for stream in ("sensors/a/1", "sensors/b/1", "sensors/a/2", "sensors/b/2", "sensors/b/3"):
        q.put(Raw(stream, stream, payload, time.time()))
    worker.step(0.0)
    assert metrics.registry.get_sample_value("anomaly_detector_readings_total") == 3
    assert metrics.registry.get_sample_value("anomaly_detector_dropped_readings_total",
                                             {"reason": "internal_error"}) == 2
    assert "error scoring 2 reading(s) with model plant" in caplog.text


def _plant_worker(raw: dict[str, Any] | None = None, routes: tuple[ModelRoute, ...] | None = None,
                  learner: Any = None) -> tuple[Worker, Intake, Any, list[tuple[str, bytes]]]:
    """A worker on the shipped plant model (learning off unless ``raw`` says otherwise),
    installed; its intake, metrics and the alerts it published."""
    cfg = replace(config_mod.parse({"learn": {"enabled": False}, **(raw or {})}),
                  models=routes if routes is not None else (ModelRoute("sensors/plant/+", str(PLANT_MODEL)),))
    published: list[tuple[str, bytes]] = []
    metrics = create()
    q = Intake(1000)
    worker = Worker(cfg, q, metrics, lambda t, p: published.append((t, p)) or True, learner=learner)
    worker.install(cfg, load_models(cfg))
    return worker, q, metrics, published


def _in_episode(worker: Worker, q: Intake, stream: str) -> float:
    """Feed ``stream`` plant readings ending inside a pressure fault's episode; returns
    the last one's ts."""
    msgs = plant_messages(stream, 200, seed=5, fault_at=170)
    for topic, payload in msgs:
        q.put(Raw(topic, topic, payload, time.time()))
    while q:
        worker.step(0.0)
    return float(json.loads(msgs[-1][1])["ts"])


def _alerts(published: list[tuple[str, bytes]], event: str) -> list[dict[str, Any]]:
    return [body for body in (json.loads(p) for _, p in published) if body["event"] == event]


def test_a_reload_to_a_model_of_another_shape_ends_the_open_episodes(bundle_dir: Path) -> None:
    # The shipped model (32 units) swapped for the test one (12): the states cannot carry
    # over and the streams start over; the one in an episode says so, or its subscriber's
    # alert would stay open for ever.
    worker, q, metrics, published = _plant_worker()
    cfg = worker.cfg
    last_ts = _in_episode(worker, q, "sensors/plant/bad")
    for topic, payload in plant_messages("sensors/plant/good", 50, seed=6):
        q.put(Raw(topic, topic, payload, time.time()))
    worker.step(0.0)
    assert [a["stream"] for a in _alerts(published, "anomaly_start")] == ["sensors/plant/bad"]
    assert not _alerts(published, "anomaly_end")

    other = replace(cfg, models=(ModelRoute("sensors/plant/+", str(bundle_dir)),))
    worker.install(other, load_models(other))
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "sensors/plant/bad" and end["reason"] == "model_changed"
    assert end["ts"] == last_ts and end["score"] is None and end["features"] == {}
    assert end["model"]["name"] == "plant"  # the model whose episode it was
    assert published[-1][0] == "anomalies/sensors/plant/bad"
    assert metrics.registry.get_sample_value("anomaly_detector_alerts_total", {"event": "anomaly_end"}) == 1
    assert worker.models.routes[0][1].n_streams == 0  # they start over


def test_a_reload_that_removes_a_route_ends_its_open_episodes(bundle_dir: Path) -> None:
    # The route of a stream in an episode removed by a reload (the stream now matches
    # another route): its old state is gone with the old engine, and so is its episode.
    # A route kept with the same model keeps its episode open, and says nothing.
    plant = ModelRoute("sensors/plant/+", str(PLANT_MODEL))
    line = ModelRoute("sensors/line/+", str(PLANT_MODEL))
    worker, q, _, published = _plant_worker(routes=(plant, line))
    cfg = worker.cfg
    _in_episode(worker, q, "sensors/plant/bad")
    _in_episode(worker, q, "sensors/line/bad")
    assert len(_alerts(published, "anomaly_start")) == 2

    catch_all = ModelRoute("sensors/#", str(bundle_dir))
    other = replace(cfg, models=(line, catch_all))
    worker.install(other, load_models(other))
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "sensors/plant/bad" and end["reason"] == "model_changed"
    assert worker.models.routes[0][1].n_streams == 1  # the line's stream kept its state
    worker.install(other, load_models(other))  # the same routes again: nothing ends
    assert len(_alerts(published, "anomaly_end")) == 1


def test_a_refit_of_another_shape_ends_the_streams_open_episode(tmp_path: Path, bundle_dir: Path) -> None:
    # A learned model refitted with another [model] shape (a config changed since it was
    # learned): the stream starts over, and its open episode ends with an alert.
    from detector import bundle as bundle_mod
    from detector.learn import FitResult

    old, new = tmp_path / "models" / "s-old", tmp_path / "models" / "s-new"
    shutil.copytree(PLANT_MODEL, old)
    shutil.copytree(bundle_dir, new)

    class Refitted:  # the learner's side of a finished refit: only poll() is reached
        def poll(self) -> list[FitResult]:
            return [FitResult("site/pump", new, None, 1.0)]

    worker, q, metrics, published = _plant_worker({"state": {"dir": str(tmp_path)}, "learn": {"enabled": True}},
                                                  routes=(), learner=Refitted())
    cfg = worker.cfg
    worker.models.learned["site/pump"] = worker_mod.learned_engine(bundle_mod.load(old), cfg)
    _in_episode(worker, q, "site/pump")
    assert [a["stream"] for a in _alerts(published, "anomaly_start")] == ["site/pump"]
    worker._collect_learned()
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "site/pump" and end["reason"] == "model_changed" and end["model"]["name"] == "plant"
    assert worker.models.learned["site/pump"].bundle.path == new
    assert metrics.registry.get_sample_value("anomaly_detector_refits_total") == 1


def test_a_silent_streams_episode_ends_at_idle_timeout_though_its_model_gets_no_reading() -> None:
    # An engine evicts idle streams only when it scores; the worker's sweep does it for
    # engines that get no reading any more, so the open alert ends on time.
    worker, q, metrics, published = _plant_worker({"engine": {"idle_timeout_s": 2.0}})
    last_ts = _in_episode(worker, q, "sensors/plant/quiet")
    worker._between_batches()
    assert not _alerts(published, "anomaly_end")
    time.sleep(2.1)
    worker._between_batches()
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "sensors/plant/quiet" and end["reason"] == "idle" and end["ts"] == last_ts
    assert metrics.registry.get_sample_value("anomaly_detector_evicted_streams_total", {"reason": "idle"}) == 1
    assert metrics.registry.get_sample_value("anomaly_detector_streams") == 0


def test_long_bundle_names_never_share_a_checkpoint_file(tmp_path: Path) -> None:
    # The name was cut at 80 characters after the route's index was appended: two routes
    # on a bundle folder of 73+ characters wrote one file, and a restart lost one's states.
    long = tmp_path / ("pump-model-line-a-temperature-pressure-flow-vibration-retrained-2026-11-24-v3" + "x" * 10)
    shutil.copytree(PLANT_MODEL, long)
    routes = (ModelRoute("sensors/linea/+", str(long)), ModelRoute("sensors/lineb/+", str(long)),
              ModelRoute("sensors/plant/+", str(PLANT_MODEL)))
    cfg = replace(config_mod.parse({"learn": {"enabled": False}, "state": {"dir": str(tmp_path / "state")}}),
                  models=routes)
    worker = Worker(cfg, Intake(10), create(), lambda t, p: True)
    worker.install(cfg, load_models(cfg))
    names = [p.name for p, _ in worker._checkpoint_items()]
    assert len(set(names)) == 3 and all(len(n) <= 84 for n in names)
    assert names[0].endswith("-0.npz") and names[1].endswith("-1.npz")
    assert names[2] == "route-plant-2.npz"  # short names as they always were: old checkpoints still restore


@pytest.mark.parametrize("text", ['{"sensors/a/t": "models/a", ', "[]", '"models/a"'])
def test_an_unreadable_learned_json_is_moved_aside_not_a_crash(tmp_path: Path, text: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "learned.json").write_text(text)
    cfg = config_mod.parse({"state": {"dir": str(state)}})
    worker = Worker(cfg, Intake(10), create(), lambda t, p: True)
    with caplog.at_level(logging.ERROR, logger="detector.worker"):
        assert worker.restore_learned() == 0
    assert "unreadable" in caplog.text and "learned.json.corrupt-" in caplog.text
    [aside] = [p for p in state.iterdir() if p.name.startswith("learned.json.corrupt-")]
    assert aside.read_text() == text and not (state / "learned.json").exists()  # kept, not overwritten later


def test_a_bad_learned_json_entry_is_skipped_and_the_others_load(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    shutil.copytree(PLANT_MODEL, state / "models" / "a")
    (state / "learned.json").write_text(json.dumps({"sensors/a/t": "models/a", "sensors/b/t": None}))
    cfg = config_mod.parse({"state": {"dir": str(state)}})
    worker = Worker(cfg, Intake(10), create(), lambda t, p: True)
    with caplog.at_level(logging.ERROR, logger="detector.worker"):
        assert worker.restore_learned() == 1
    assert list(worker.models.learned) == ["sensors/a/t"]
    assert "'sensors/b/t' is not a bundle folder" in caplog.text


def test_engine_rejections_and_feature_mismatches_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Counted but never logged: an operator could not tell which stream misbehaves.
    worker, q, metrics, _ = _plant_worker()
    now = time.time()
    good = json.loads(plant_messages("sensors/plant/p1", 1, seed=1)[0][1])
    for payload in (good, good, {"ts": now, "values": {"zzz": 1.0}}):  # the second a duplicate
        q.put(Raw("sensors/plant/p1", "sensors/plant/p1", json.dumps(payload).encode(), now))
    with caplog.at_level(logging.WARNING, logger="detector.mqtt"):
        while q:
            worker.step(0.0)
    for reason in ("duplicate", "feature_mismatch"):
        assert metrics.registry.get_sample_value("anomaly_detector_invalid_readings_total", {"reason": reason}) == 1
        assert f"invalid reading(s) on 'sensors/plant/p1': {reason}" in caplog.text


def test_a_stream_too_wide_to_learn_from_is_not_buffered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 6,000 keys in one reading made a learn buffer of ~1 MB per new id (docs: ~1.2 KB).
    from detector.learn import Learner

    cfg = replace(config_mod.parse({"state": {"dir": str(tmp_path)}}), models=())
    metrics = create()
    q = Intake(100)
    learner = Learner(cfg, tmp_path / "models", 100)
    worker = Worker(cfg, q, metrics, lambda t, p: True, learner=learner)
    worker.install(cfg, load_models(cfg))
    try:
        wide = {"values": {f"f{i}": 0.0 for i in range(worker_mod.MAX_LEARN_FEATURES + 1)}}
        narrow = {"values": {"a": 1.0, "b": 2.0}}
        for stream, payload in (("wide/1", wide), ("narrow/1", narrow)):
            q.put(Raw(stream, stream, json.dumps(payload).encode(), time.time()))
        with caplog.at_level(logging.WARNING, logger="detector.mqtt"):
            while q:
                worker.step(0.0)
        assert learner.pending() == 1  # the narrow one only
        assert metrics.registry.get_sample_value("anomaly_detector_dropped_readings_total",
                                                 {"reason": "no_model"}) == 1
        assert metrics.registry.get_sample_value("anomaly_detector_dropped_readings_total",
                                                 {"reason": "learning"}) == 1
        assert "not learning 'wide/1': 257 features" in caplog.text
    finally:
        learner.close()


def test_a_checkpoint_that_no_longer_fits_at_start_ends_its_open_episodes(tmp_path: Path, bundle_dir: Path) -> None:
    # The bundle in a route's folder replaced by one of another shape while the daemon was
    # stopped: the streams start fresh, and an episode open at the stop ends with an alert.
    model = tmp_path / "plant"
    shutil.copytree(PLANT_MODEL, model)
    state = {"state": {"dir": str(tmp_path / "state")}}
    worker, q, _, _ = _plant_worker(state, routes=(ModelRoute("sensors/plant/+", str(model)),))
    last_ts = _in_episode(worker, q, "sensors/plant/bad")
    assert worker.checkpoint()

    shutil.rmtree(model)
    shutil.copytree(bundle_dir, model)
    again, _, _, published = _plant_worker(state, routes=(ModelRoute("sensors/plant/+", str(model)),))
    assert again.restore() == 0
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "sensors/plant/bad" and end["reason"] == "model_changed" and end["ts"] == last_ts
    assert end["model"]["name"] == "plant"


def test_a_route_taking_over_a_learned_stream_ends_its_open_episode(tmp_path: Path) -> None:
    # The learned model's episode used to end as "idle" a day later, while the new route
    # scored the stream; it ends at the reload now, and the learned model lets the stream go.
    from detector import bundle as bundle_mod

    shutil.copytree(PLANT_MODEL, tmp_path / "models" / "pump")
    worker, q, _, published = _plant_worker({"state": {"dir": str(tmp_path)}, "learn": {"enabled": True}},
                                            routes=())
    learned = worker_mod.learned_engine(bundle_mod.load(tmp_path / "models" / "pump"), worker.cfg)
    worker.models.learned["site/pump"] = learned
    last_ts = _in_episode(worker, q, "site/pump")
    assert [a["stream"] for a in _alerts(published, "anomaly_start")] == ["site/pump"]

    routed = replace(worker.cfg, models=(ModelRoute("site/+", str(PLANT_MODEL)),))
    worker.install(routed, load_models(routed))
    [end] = _alerts(published, "anomaly_end")
    assert end["stream"] == "site/pump" and end["reason"] == "model_changed" and end["ts"] == last_ts
    assert learned.n_streams == 0 and worker._route("site/pump") is worker.models.routes[0][1]
