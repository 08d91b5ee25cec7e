"""The daemon as users run it: a real process, a real broker, real HTTP scrapes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from detector import plant
from helpers import SMALL_FIT, ROOT, Daemon, Listener, plant_messages, publish_all, sample, scrape, wait_for
from mqtt_broker import free_port, start_test_broker


@pytest.fixture(scope="module")
def broker() -> Iterator[object]:
    handle = start_test_broker()
    yield handle
    handle.stop()


def test_daemon_scores_alerts_exports_metrics_and_shuts_down_cleanly(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, broker.port)
    listen = Listener(broker.port, ["anomalies/#", "anomaly-detector/status"])
    d.start()
    try:
        wait_for(lambda: any(m.payload == b"online" for m in listen.on("anomaly-detector/status")), "online")
        msgs = plant_messages("sensors/plant/pump-1", 400, seed=21, fault_at=300)
        msgs += [("sensors/plant/pump-1", b"not json"), ("sensors/plant/pump-2", b'{"value": NaN}'),
                 ("sensors/plant/pump-3", b'{"values": {"humidity": 3}}')]
        # A normal pump, its readings sent as JSON arrays of 10: scored, and no alert.
        normal = [json.loads(p) for _, p in plant_messages("sensors/plant/pump-2", 300, seed=22)]
        msgs += [("sensors/plant/pump-2", json.dumps(normal[i: i + 10]).encode()) for i in range(0, 300, 10)]
        publish_all(broker.port, msgs)

        def scored() -> str | None:
            code, text = scrape(d.metrics_port)
            return text if sample(text, "anomaly_detector_readings_total") >= 700 else None

        wait_for(scored, "700 readings scored")
        time.sleep(0.2)  # the step that scored the last ones updates its other series after the count
        text = scrape(d.metrics_port)[1]
        assert sample(text, "anomaly_detector_readings_total") == 700
        assert 'anomaly_detector_invalid_readings_total{reason="bad_json"} 1.0' in text
        assert 'anomaly_detector_invalid_readings_total{reason="bad_value"} 1.0' in text
        assert 'anomaly_detector_invalid_readings_total{reason="feature_mismatch"} 1.0' in text
        assert sample(text, "anomaly_detector_streams") == 2
        assert sample(text, "anomaly_detector_mqtt_connected") == 1
        assert 'anomaly_detector_model_info{model="plant"' in text
        assert sample(text, "anomaly_detector_processing_seconds_count") == 700

        starts = wait_for(lambda: [json.loads(m.payload) for m in listen.on("anomalies/sensors/plant/pump-1")
                                   if json.loads(m.payload)["event"] == "anomaly_start"], "an alert")
        fault = starts[-1]
        assert set(fault) >= {"stream", "event", "ts", "score", "error", "threshold", "features", "model"}
        assert fault["stream"] == "sensors/plant/pump-1" and fault["score"] >= 0.999
        assert max(fault["features"], key=fault["features"].get) == "pressure"
        assert fault["model"]["name"] == "plant"

        assert not listen.on("anomalies/sensors/plant/pump-2")  # normal data: no alert

        # SIGHUP swaps in another version of the model and keeps every stream's state.
        swapped = tmp_path / "plant-v2"
        shutil.copytree(ROOT / "models" / "plant", swapped)
        manifest = json.loads((swapped / "manifest.json").read_text())
        manifest["version"] = "v2-test"
        (swapped / "manifest.json").write_text(json.dumps(manifest))
        d.config.write_text(d.config.read_text().replace(str(ROOT / "models" / "plant"), str(swapped)))
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.logtext(), "reload")
        text = scrape(d.metrics_port)[1]
        assert 'version="v2-test"' in text
        assert sample(text, "anomaly_detector_streams") == 2
    finally:
        code = d.stop()
        listen.close()
    assert code == 0
    status = [m.payload for m in listen.on("anomaly-detector/status")]
    assert status[-1] == b"offline"
    assert "Traceback" not in d.logtext()
    ckpt = tmp_path / "state" / "checkpoints" / "route-plant-v2-0.npz"
    before = dict(np.load(ckpt))
    assert sorted(before["streams"].tolist()) == ["sensors/plant/pump-1", "sensors/plant/pump-2"]

    # A restart restores the checkpoint: each stream's state is what it was at shutdown.
    # The swapped model's config, read before d2 writes its own default one over it (same
    # tmp_path): with the first model, d2 restored whatever an earlier periodic checkpoint
    # of that model held, and passed only when one had run after the readings.
    swapped_config = d.config.read_text()
    d2 = Daemon(tmp_path, broker.port)
    d2.config.write_text(swapped_config.replace(str(d.metrics_port), str(d2.metrics_port)))
    d2.start()
    try:
        wait_for(lambda: "2 stream state(s) restored" in d2.logtext(), "restore")
        # The retained status is back to online once it has resubscribed.
        late = Listener(broker.port, ["anomaly-detector/status"])
        # [-1:]: were the retained message read before the new "online" reached the broker,
        # the old "offline" comes first, then the live "online".
        wait_for(lambda: [m.payload for m in late.on("anomaly-detector/status")][-1:] == [b"online"], "online again")
        late.close()
    finally:
        assert d2.stop() == 0
    after = dict(np.load(ckpt))
    for key in ("streams", "h", "c", "pred", "smoothed", "count", "last_ts", "in_episode"):
        np.testing.assert_array_equal(before[key], after[key])


def test_broker_restart_mid_stream_reconnects_resubscribes_and_goes_on(tmp_path: Path) -> None:
    own = start_test_broker()  # this test restarts its broker: not the shared one
    if own.kind != "mosquitto":
        own.stop()
        pytest.skip("restarting the broker mid-test needs mosquitto")
    d = Daemon(tmp_path, own.port)
    d.start()
    try:
        msgs = plant_messages("sensors/plant/pump-9", 200, seed=23)
        publish_all(own.port, msgs[:100])
        wait_for(lambda: sample(scrape(d.metrics_port)[1], "anomaly_detector_readings_total") >= 100, "first 100")
        own.restart(down_for=2.0)
        wait_for(lambda: sample(scrape(d.metrics_port)[1], "anomaly_detector_mqtt_connected") == 0
                 or "disconnected" in d.logtext(), "the outage noticed")
        wait_for(lambda: scrape(d.metrics_port, "/healthz")[0] == 200, "reconnected")
        publish_all(own.port, msgs[100:])
        wait_for(lambda: sample(scrape(d.metrics_port)[1], "anomaly_detector_readings_total") >= 200,
                 "scoring after the restart")
        text = scrape(d.metrics_port)[1]
        assert sample(text, "anomaly_detector_readings_total") == 200
        rejected = [ln for ln in text.splitlines()
                    if ln.startswith("anomaly_detector_invalid_readings_total{") and not ln.endswith(" 0.0")]
        assert not rejected  # nothing lost or rejected
    finally:
        assert d.stop() == 0
        own.stop()


def test_corrupt_checkpoint_is_moved_aside_and_the_daemon_starts_fresh(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "state" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "route-plant-0.npz").write_bytes(b"this is not a zip file")
    d = Daemon(tmp_path, broker.port)
    d.start()
    assert d.stop() == 0
    assert "unreadable checkpoint moved to" in d.logtext()
    assert any(p.name.startswith("route-plant-0.npz.corrupt-") for p in ckpt.iterdir())


def test_bad_config_and_bad_model_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'x'\n")
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "[mqtt] port" in proc.stderr and "Traceback" not in proc.stderr
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[[models]]\nmatch = "a/#"\npath = "{tmp_path / "nope"}"\n')
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_state_dir_that_cannot_be_created_is_one_line_not_a_crash_loop(tmp_path: Path) -> None:
    # exit 1 with a traceback made systemd restart it again and again; check-config said ok.
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[mqtt]\nport = 0\n[state]\ndir = "{tmp_path / "afile" / "state"}"\n')
    for cmd in ("run", "check-config"):
        proc = subprocess.run([sys.executable, "-m", "detector", cmd, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2 and "[state] dir" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_stream_with_no_model_learns_one_and_is_then_scored(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, broker.port, learn="warmup_readings = 200", extra=SMALL_FIT)
    d.start()
    try:
        times, values = plant.normal(600, seed=31)
        t0 = time.time() - 600
        first = [("sensors/site/temp", json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode())
                 for i in range(200)]
        publish_all(broker.port, first)
        wait_for(lambda: "learned a model for sensors/site/temp" in d.logtext(), "a learned model", 300)
        rest = [("sensors/site/temp", json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode())
                for i in range(200, 300)]
        publish_all(broker.port, rest)
        text = wait_for(lambda: (lambda t: t if sample(t, "anomaly_detector_readings_total") >= 100 else None)(
            scrape(d.metrics_port)[1]), "learned stream scored")
        assert sample(text, "anomaly_detector_readings_total") == 100
        assert 'anomaly_detector_dropped_readings_total{reason="learning"} 200.0' in text
        assert sample(text, "anomaly_detector_learned_models") == 1
        assert 'model="learned"' in text
    finally:
        assert d.stop() == 0
    index = json.loads((tmp_path / "state" / "learned.json").read_text())
    # Relative to the state directory, so that the directory can be moved whole: a daemon
    # whose state lives elsewhere now scores the stream with the learned model at once.
    assert list(index) == ["sensors/site/temp"] and not Path(index["sensors/site/temp"]).is_absolute()
    assert (tmp_path / "state" / index["sensors/site/temp"]).is_dir()
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "state").rename(moved / "state")
    d = Daemon(moved, broker.port, learn="warmup_readings = 200", extra=SMALL_FIT)
    d.start()
    try:
        assert d.value("anomaly_detector_learned_models") == 1
        later = [("sensors/site/temp", json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode())
                 for i in range(300, 320)]
        publish_all(broker.port, later)
        wait_for(lambda: d.value("anomaly_detector_readings_total") >= 20, "scored with the moved model")
        assert d.value('anomaly_detector_dropped_readings_total{reason="learning"}') == 0
    finally:
        assert d.stop() == 0



def test_a_learned_model_whose_stream_goes_silent_is_unloaded_and_loaded_again_from_disk(
        tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    # One model in memory per stream ever seen would grow for ever: a silent stream's
    # model leaves memory with its state, and comes back from disk, not from a new fit.
    d = Daemon(tmp_path, broker.port, learn="warmup_readings = 200",
               extra=SMALL_FIT + "[engine]\nidle_timeout_s = 5.0\n")
    d.start()
    stream = "sensors/site/quiet"
    try:
        _, values = plant.normal(400, seed=32)
        t0 = time.time() - 400
        msgs = [(stream, json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode()) for i in range(400)]
        publish_all(broker.port, msgs[:200])
        wait_for(lambda: f"learned a model for {stream}" in d.logtext(), "a learned model", 300)
        publish_all(broker.port, msgs[200:300])
        wait_for(lambda: d.value("anomaly_detector_readings_total") >= 100, "learned stream scored")
        assert d.value("anomaly_detector_learned_models") == 1

        # Silent for idle_timeout_s: its state is evicted and its model unloaded, kept on disk.
        wait_for(lambda: d.value("anomaly_detector_learned_models") == 0, "the silent stream's model unloaded")
        assert "unloaded 1 learned model(s) whose streams were silent for 5 s" in d.logtext()
        assert d.value('anomaly_detector_evicted_streams_total{reason="idle"}') == 1
        assert 'model="learned"' not in d.metrics()  # model_info: none loaded
        index = json.loads((tmp_path / "state" / "learned.json").read_text())
        bundle_dir = tmp_path / "state" / index[stream]
        assert list(index) == [stream] and (bundle_dir / "manifest.json").is_file()
        assert not (bundle_dir / "streams.npz").exists()  # no state to restore after a restart

        # Back: scored at once by the model loaded from disk, no reading collected, no fit.
        publish_all(broker.port, msgs[300:])
        wait_for(lambda: d.value("anomaly_detector_readings_total") >= 200, "scored again")
        assert d.value("anomaly_detector_readings_total") == 200
        assert d.value('anomaly_detector_dropped_readings_total{reason="learning"}') == 200
        assert d.value('anomaly_detector_learn_fits_total{result="ok"}') == 1
        assert d.logtext().count(f"learned a model for {stream}") == 1
        assert f"loaded the learned model of {stream} again: " in d.logtext() and bundle_dir.name in d.logtext()
    finally:
        assert d.stop() == 0
    assert json.loads((tmp_path / "state" / "learned.json").read_text()) == index
    assert "Traceback" not in d.logtext()

def test_demo_runs_prints_alerts_and_stops_cleanly() -> None:
    proc = subprocess.run([sys.executable, "-m", "detector", "demo", "--duration", "20", "--rate", "20",
                           "--fault-every", "3", "--mqtt-port", str(free_port()),
                           "--metrics-port", str(free_port())],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "fault " in proc.stdout and "ALERT anomaly_start" in proc.stdout
    assert proc.stdout.rstrip().endswith("demo: stopped")
    assert "Traceback" not in proc.stderr
