"""What a learned stream's next model is fitted on: normal readings, never a young
episode, and a long one once it has become the new normal."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from detector import plant
from detector.refit import RefitPlan
from helpers import SMALL_FIT, Daemon, publish_all, wait_for
from mqtt_broker import start_test_broker


def _feed(plan: RefitPlan, stream: str, start: int, n: int, episode: bool, level: float = 0.0) -> None:
    ts = np.arange(start, start + n, dtype=np.float64)
    values = np.column_stack([ts, np.full(n, level)])
    plan.observe(stream, ts, values, np.full(n, episode))


def test_window_keeps_the_latest_normal_readings_in_order() -> None:
    plan = RefitPlan(window=50, interval_s=10, new_normal_readings=20, min_readings=30)
    plan.start("s", 2, now=0.0)
    _feed(plan, "s", 0, 120, episode=False)
    assert plan.due(now=9.9) == []
    [(stream, times, values)] = plan.due(now=10.0)
    assert stream == "s"
    np.testing.assert_array_equal(times, np.arange(70, 120))
    np.testing.assert_array_equal(values[:, 0], times)
    assert plan.due(now=15.0) == []  # next one an interval later
    assert len(plan.due(now=20.0)) == 1


def test_a_short_episode_is_never_learned() -> None:
    plan = RefitPlan(window=100, interval_s=1, new_normal_readings=20, min_readings=10)
    plan.start("s", 2, now=0.0)
    _feed(plan, "s", 0, 30, episode=False)
    _feed(plan, "s", 30, 19, episode=True, level=9.0)  # a fault, shorter than new_normal
    _feed(plan, "s", 49, 10, episode=False)
    [(_, times, values)] = plan.due(now=1.0)
    assert len(times) == 40 and not (values[:, 1] == 9.0).any()


def test_a_lasting_episode_becomes_the_new_normal() -> None:
    plan = RefitPlan(window=100, interval_s=1, new_normal_readings=20, min_readings=10)
    plan.start("s", 2, now=0.0)
    _feed(plan, "s", 0, 30, episode=False)
    _feed(plan, "s", 30, 50, episode=True, level=9.0)  # a set-point change that stays
    [(_, times, values)] = plan.due(now=1.0)
    np.testing.assert_array_equal(times, np.arange(0, 80))  # all of it, in order
    assert (values[30:, 1] == 9.0).all()


def test_incomplete_rows_are_skipped_and_too_little_data_waits() -> None:
    plan = RefitPlan(window=100, interval_s=1, new_normal_readings=20, min_readings=10)
    plan.start("s", 2, now=0.0)
    ts = np.arange(9, dtype=np.float64)
    values = np.column_stack([ts, np.where(ts % 2 == 0, np.nan, 1.0)])
    plan.observe("s", ts, values, np.zeros(9, dtype=bool))
    assert plan.due(now=1.0) == []  # 4 complete rows < 10
    plan.observe("other", ts, values, np.zeros(9, dtype=bool))  # not started: ignored
    assert len(plan) == 1


def test_the_daemon_refits_a_learned_model_and_keeps_the_stream_state(tmp_path: Path) -> None:
    broker = start_test_broker()
    d = Daemon(tmp_path, broker.port, learn="""warmup_readings = 200
refit_interval_s = 2.0
refit_window = 300
new_normal_readings = 50""", extra=SMALL_FIT)
    d.start()
    try:
        times, values = plant.normal(700, seed=41)
        t0 = time.time() - 700
        msgs = [("sensors/site/flow", json.dumps({"ts": t0 + i, "value": float(values[i, 3])}).encode())
                for i in range(700)]
        publish_all(broker.port, msgs[:200])
        wait_for(lambda: "learned a model for sensors/site/flow" in d.logtext(), "a learned model", 300)
        first = tmp_path / "state" / json.loads((tmp_path / "state" / "learned.json").read_text())["sensors/site/flow"]
        publish_all(broker.port, msgs[200:500])  # 300 normal readings: a window to refit on
        wait_for(lambda: "refitted the model of sensors/site/flow" in d.logtext(), "a refit", 300)
        assert d.value("anomaly_detector_refits_total") >= 1
        assert d.value("anomaly_detector_learned_models") == 1
        second = tmp_path / "state" / json.loads((tmp_path / "state" / "learned.json").read_text())["sensors/site/flow"]
        assert second != first and second.is_dir() and not first.exists()
        # The stream kept its state across the swap (the engine restarts only its settle
        # count, as for any model change): written next to the new bundle at once.
        saved = dict(np.load(Path(second) / "streams.npz"))
        assert saved["streams"].tolist() == ["sensors/site/flow"]
        seen = int(re.search(r"on its last (\d+) normal readings", d.logtext())[1])  # type: ignore[index]
        assert saved["last_ts"][0] >= t0 + 200 + seen - 1  # at least the readings the refit saw
        assert np.abs(saved["h"]).sum() > 0
        publish_all(broker.port, msgs[500:])
        wait_for(lambda: d.value("anomaly_detector_readings_total") >= 500, "every later reading scored")
        assert d.value("anomaly_detector_readings_total") == 500
    finally:
        assert d.stop() == 0
        broker.stop()
    assert "Traceback" not in d.logtext()
