"""The streaming engine on a real trained model: scores, flags, episodes, policies."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from detector import plant
from detector.alerts import alert_payload
from detector.config import EngineConfig, ScoreConfig
from detector.engine import Engine, _codes, _rounds


CALIBRATED = ScoreConfig(method="calibrated", threshold=0.999, clear_threshold=0.99)


def _normal_rows(n: int, seed: int) -> np.ndarray:
    return plant.normal(n, seed=seed)[1]


def test_normal_data_scores_low_and_a_spike_scores_high(bundle) -> None:
    vals = _normal_rows(400, seed=5)
    spiked = vals.copy()
    spiked[300, 2] += 40.0  # flow, ~20 standard deviations
    # The model-calibrated score (the per-stream likelihood has its own tests in
    # test_likelihood.py).
    eng = Engine(bundle, CALIBRATED)
    res = eng.process(["pump"] * 400, np.arange(400.0), spiked, now=1e6)
    assert np.all((res.score >= 0) & (res.score <= 1)) and np.all(np.isfinite(res.score))
    assert res.score[300] > 0.999
    assert res.flag[300]
    # The spike's error is carried by the feature that spiked.
    assert int(np.argmax(res.shares[300])) == 2
    # Normal stretch: few flags (the calibration puts 0.1 % of normal data above 0.999).
    assert res.flag[50:290].mean() < 0.05
    starts = [e for e in res.events if e.event == "anomaly_start"]
    assert any(e.ts == 300.0 and e.features["flow"] > 0.5 for e in starts)


def test_episode_hysteresis_start_then_end_after_clear_readings(bundle) -> None:
    vals = _normal_rows(300, seed=6)
    vals[150:170, 1] += 15.0  # pressure far off for 20 readings
    cfg = replace(CALIBRATED, clear_readings=5)
    eng = Engine(bundle, cfg)
    res = eng.process(["p"] * 300, np.arange(300.0), vals, now=1e6)
    ev = [(e.event, e.ts) for e in res.events if 140 <= e.ts <= 200]
    assert ev[0] == ("anomaly_start", 150.0)
    assert ev[1][0] == "anomaly_end" and ev[1][1] >= 170 + 5 - 1
    assert res.in_episode[150:170].all()
    end = next(e for e in res.events if e.event == "anomaly_end" and e.ts >= 170)
    assert end.model == {"name": bundle.name, "version": bundle.version}
    assert end.threshold > 0 and set(end.features) == set(bundle.features)


def test_warmup_suppresses_flags_for_new_streams(bundle) -> None:
    vals = _normal_rows(30, seed=7)
    vals[2, 0] += 100.0
    res = Engine(bundle, ScoreConfig(settle_readings=10)).process(["w"] * 30, np.arange(30.0), vals, now=1e6)
    assert res.score[2] > 0.999 and not res.flag[2]


def test_duplicate_out_of_order_future_and_missing_readings_are_rejected(bundle) -> None:
    v = _normal_rows(6, seed=8)
    nan_row = np.full(len(bundle.features), np.nan)
    eng = Engine(bundle)
    res = eng.process(["a"] * 6, [10.0, 10.0, 9.0, 11.0, 1e9, 12.0],
                      np.vstack([v[0], v[1], v[2], v[3], v[4], nan_row]), now=100.0)
    assert res.rejected == {1: "duplicate", 2: "out_of_order", 4: "future_timestamp", 5: "missing_values"}
    assert res.scored == 2 and np.isnan(res.error[1]) and res.score[1] == 0.0
    assert eng.column("count")[eng.slot_of["a"]] == 2


def test_partially_missing_reading_is_scored_on_the_present_features(bundle) -> None:
    v = _normal_rows(3, seed=9)
    v[1, 3] = np.nan
    res = Engine(bundle).process(["m"] * 3, [1.0, 2.0, 3.0], v, now=10.0)
    assert not res.rejected and np.isfinite(res.error).all()
    assert res.shares[1, 3] == 0.0


def test_readings_of_one_stream_in_one_batch_keep_their_order(bundle) -> None:
    v = _normal_rows(8, seed=10)
    mixed = Engine(bundle).process(["x", "y", "x", "y", "x", "y", "x", "y"], np.repeat(np.arange(4.0), 2),
                                   np.vstack([v[:4], v[:4]])[[0, 4, 1, 5, 2, 6, 3, 7]], now=10.0)
    alone = Engine(bundle).process(["x"] * 4, np.arange(4.0), v[:4], now=10.0)
    np.testing.assert_allclose(mixed.error[[0, 2, 4, 6]], alone.error, rtol=1e-6)
    np.testing.assert_allclose(mixed.error[[1, 3, 5, 7]], alone.error, rtol=1e-6)


def test_idle_streams_are_evicted_and_start_fresh(bundle) -> None:
    eng = Engine(bundle, engine=EngineConfig(idle_timeout_s=60.0))
    v = _normal_rows(2, seed=11)
    eng.process(["old", "new"], [1.0, 1.0], v, now=1000.0)
    eng.process(["new"], [2.0], v[:1], now=1050.0)
    assert eng.evict_idle(1070.0) == 1
    assert set(eng.slot_of) == {"new"} and eng.evicted["idle"] == 1
    res = eng.process(["old"], [0.5], v[:1], now=1071.0)  # earlier ts is fine: fresh state
    assert not res.rejected and eng.column("count")[eng.slot_of["old"]] == 1


def test_a_stream_evicted_in_an_episode_ends_it_with_the_reason(bundle) -> None:
    # A sensor that goes silent (or is pushed out at max_streams) while anomalous: its
    # episode is ended by an anomaly_end that says why, so no alert stays open for ever.
    cfg = replace(CALIBRATED, clear_readings=5)
    vals = _normal_rows(200, seed=12)
    vals[150:, 1] += 15.0  # pressure far off from reading 150 to the end: still in the episode
    eng = Engine(bundle, cfg, EngineConfig(idle_timeout_s=60.0, max_streams=2))
    res = eng.process(["a"] * 200, np.arange(200.0), vals, now=1000.0)
    assert res.in_episode[-1] and next(e.event for e in res.events if e.ts >= 150) == "anomaly_start"
    eng.process(["b"] * 200, np.arange(200.0), vals, now=1000.0)  # in an episode too
    res = eng.process(["c"], [1.0], vals[:1], now=1030.0)  # makes room: "a" or "b" goes
    [gone] = [e for e in res.events if e.event == "anomaly_end"]
    assert gone.stream in {"a", "b"} and gone.reason == "max_streams" and gone.ts == 199.0
    assert np.isnan(gone.score) and gone.features == {} and gone.model == res.events[0].model
    kept = ({"a", "b"} - {gone.stream}).pop()
    res = eng.process(["c"], [2.0], vals[:1], now=1100.0)  # the other one is idle now
    assert [(e.event, e.stream, e.reason) for e in res.events] == [("anomaly_end", kept, "idle")]
    body = json.loads(alert_payload(res.events[0], "numpy"))
    assert body["reason"] == "idle" and body["score"] is None and body["threshold"] is None
    normal_end = Engine(bundle, cfg).process(["p"] * 200, np.arange(200.0), _with_pressure_fault(), now=1e6)
    assert [e.reason for e in normal_end.events if e.event == "anomaly_end"][:1] == ["normal"]


def _with_pressure_fault() -> np.ndarray:
    vals = _normal_rows(200, seed=6)
    vals[100:120, 1] += 15.0
    return vals


def test_max_streams_bounds_state_and_evicts_least_recently_seen(bundle) -> None:
    eng = Engine(bundle, engine=EngineConfig(max_streams=200))
    v = _normal_rows(1, seed=12)
    for k in range(10):
        ids = [f"s{k}-{i}" for i in range(100)]
        eng.process(ids, np.ones(100), np.repeat(v, 100, axis=0), now=float(k))
        assert eng.n_streams <= 200
    assert eng.evicted["max_streams"] >= 800
    assert all(sid.startswith(("s9-", "s8-")) for sid in eng.slot_of)
    assert len(eng.h) <= 200
    # Below the first allocation (64 slots) too: ten streams at most, the oldest go first.
    small = Engine(bundle, engine=EngineConfig(max_streams=10))
    for k in range(3):
        ids = [f"t{k}-{i}" for i in range(10)]
        small.process(ids, np.ones(10), np.repeat(v, 10, axis=0), now=float(k))
    assert small.n_streams == 10 and len(small.h) == 10 and small.evicted["max_streams"] == 20
    assert all(sid.startswith("t2-") for sid in small.slot_of)


def test_restore_into_a_smaller_engine_keeps_the_most_recent_streams_it_can_hold(bundle) -> None:
    v = _normal_rows(1, seed=14)
    big = Engine(bundle)
    for k in range(3):  # stream s<k>-* last seen at k
        big.process([f"s{k}-{i}" for i in range(50)], np.ones(50), np.repeat(v, 50, axis=0), now=float(k))
    held = Engine(bundle, engine=EngineConfig(max_streams=60))
    held.process(["old"], np.ones(1), v, now=-1.0)
    snap = big.snapshot()
    assert held.restore(snap) == 60
    # Restored in snapshot order; making room evicts the least recently seen ("old", then s0-*).
    assert held.n_streams == 60 and all(sid.startswith(("s1-", "s2-")) for sid in held.slot_of)
    for sid, slot in held.slot_of.items():
        k = list(snap["streams"]).index(sid)
        assert held.column("last_seen")[slot] == snap["last_seen"][k]
        assert np.array_equal(held.h[slot], snap["h"][k])


def test_calibrated_threshold_is_reported_in_error_units(bundle) -> None:
    eng = Engine(bundle, replace(ScoreConfig(), threshold=0.999))
    assert np.isclose(bundle.calibration.score(np.array([eng.threshold_error]))[0], 0.999, atol=1e-6)


def test_a_state_does_not_restore_into_a_model_of_other_features_of_the_same_shape(bundle) -> None:
    # Same number of features and hidden size, other sensors: the state means nothing for
    # them, so the streams start over (and the worker ends their open episodes).
    first = Engine(bundle)
    first.process(["a"], [1.0], _normal_rows(1, seed=3), now=100.0)
    other = Engine(replace(bundle, manifest={**bundle.manifest, "features": [f"x_{f}" for f in bundle.features]}))
    with pytest.raises(ValueError, match="does not fit"):
        other.restore(first.snapshot())
    snap = first.snapshot()
    del snap["features"]  # a checkpoint written before snapshots named their features
    assert other.restore(snap) == 1


def test_snapshot_restore_continues_exactly_where_it_left_off(bundle, tmp_path) -> None:
    vals = _normal_rows(60, seed=13)
    ids = ["a", "b", "c"]
    straight = Engine(bundle)
    first = Engine(bundle)
    for t in range(30):
        straight.process(ids, np.full(3, float(t)), vals[t: t + 3], now=100.0)
        first.process(ids, np.full(3, float(t)), vals[t: t + 3], now=100.0)
    path = tmp_path / "state.npz"
    snap = first.snapshot()
    # Counts and flags keep their own dtypes in checkpoints, whatever the engine holds them in.
    assert snap["count"].dtype == np.int64 and snap["in_episode"].dtype == np.bool_
    assert snap["lt_var"].dtype == np.float64 and snap["h"].dtype == np.float32
    np.savez(path, **snap)
    with np.load(path, allow_pickle=False) as npz:
        snap = {k: npz[k] for k in npz.files}
    second = Engine(bundle)
    assert second.restore(snap) == 3
    for t in range(30, 57):
        a = straight.process(ids, np.full(3, float(t)), vals[t: t + 3], now=100.0)
        b = second.process(ids, np.full(3, float(t)), vals[t: t + 3], now=100.0)
        np.testing.assert_array_equal(a.error, b.error)
        np.testing.assert_array_equal(a.score, b.score)
    dup = second.process(["a"], [56.0], vals[:1], now=100.0)
    assert dup.rejected == {0: "duplicate"}  # last timestamps survived the round trip


def test_rounds_hold_each_streams_kth_reading_in_batch_order() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        streams = [f"s{k}" for k in rng.integers(0, rng.integers(1, 30), size=rng.integers(1, 200))]
        want: list[list[int]] = []
        seen: Counter[str] = Counter()
        for i, s in enumerate(streams):  # the definition, one reading at a time
            if seen[s] == len(want):
                want.append([])
            want[seen[s]].append(i)
            seen[s] += 1
        codes, distinct = _codes(streams)
        assert [r.tolist() for r in _rounds(codes, len(distinct))] == want
        assert [distinct[c] for c in codes] == streams
