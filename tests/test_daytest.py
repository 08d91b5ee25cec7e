"""The per-day test (``[score] day_test``): a day that departs from its weekday's recent days."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from detector import daytest, plant
from detector.config import ScoreConfig
from detector.engine import Engine

HOURS = 24
MONDAY = 4  # day 4 since 1970-01-01 (a Thursday) was a Monday


def _weekly(days: int, seed: int, holiday: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hourly readings of one feature: 100 on weekdays, 60 at weekends, noise 3; the day
    ``holiday`` (a weekday) at the weekend level."""
    rng = np.random.default_rng(seed)
    day = MONDAY + np.arange(days * HOURS) // HOURS
    level = np.where(np.array([daytest.weekday(d) for d in day]) < 5, 100.0, 60.0)
    if holiday is not None:
        level[day == MONDAY + holiday] = 60.0
    return day * 86_400.0 + 3600.0 * (np.arange(days * HOURS) % HOURS), level + rng.normal(0, 3.0, len(day))


def _judge(ts: np.ndarray, vals: np.ndarray) -> dict[float, float]:
    """Each ended day's probability, by day, through close_day as the engine calls it."""
    total, count = np.zeros(1), np.zeros(1)
    means, spread2, judged = np.full((7, 1), np.nan), np.zeros(1), np.zeros(1)
    out: dict[float, float] = {}
    days = daytest.day_index(ts, 0.0)
    for k, d in enumerate(days):
        if k and d != days[k - 1]:
            prev = days[k - 1]
            p = daytest.close_day(total, count, means[daytest.weekday(prev)], spread2, judged)
            out[prev] = daytest.combined(p)[0]
            total[:], count[:] = 0.0, 0.0
        total += vals[k]
        count += 1
    return out


def test_a_weekday_at_the_weekend_level_is_judged_and_ordinary_days_are_not() -> None:
    ts, vals = _weekly(42, seed=1, holiday=30)  # a Friday in week 5
    p = _judge(ts, vals)
    holiday = MONDAY + 30
    assert p[holiday] < 1e-6
    ordinary = [v for d, v in p.items() if d != holiday and np.isfinite(v)]
    assert len(ordinary) > 20 and min(ordinary) > 1e-4  # judged, and none is news
    # Weekends are their weekdays' normal, not departures from the weekdays.
    assert all(v > 1e-3 for d, v in p.items() if daytest.weekday(d) >= 5 and np.isfinite(v))
    # The first two weeks set the weekday means and the spread: nothing is judged there.
    assert all(not np.isfinite(v) for d, v in p.items() if d < MONDAY + 8)


def test_a_day_with_an_infinite_value_judges_nothing_and_poisons_nothing() -> None:
    ts, vals = _weekly(35, seed=2)
    vals[20 * HOURS + 5] = np.inf
    p = _judge(ts, vals)
    assert not np.isfinite(p[MONDAY + 20])
    assert all(v > 1e-4 for d, v in p.items() if d > MONDAY + 20 and np.isfinite(v))


def test_the_engine_flags_the_day_at_its_end_and_names_the_feature(bundle) -> None:
    """Plant readings every 5 minutes for 24 days; on day 20 the flow runs at 85 % all day,
    ramping in over two hours so that no single reading jumps: the reading that opens
    day 21 starts an episode, carried by flow, only with the per-day test on."""
    per_day = 288
    n = 24 * per_day
    t0 = (MONDAY + 7) * 86_400.0
    ts, vals = plant.normal(n, seed=5, t0=t0, step_s=300.0)
    flow = plant.FEATURES.index("flow")
    ramp = np.clip(np.arange(per_day) / 24.0, 0.0, 1.0) * np.clip((per_day - np.arange(per_day)) / 24.0, 0.0, 1.0)
    vals[20 * per_day: 21 * per_day, flow] *= 1.0 - 0.15 * ramp
    closing = 21 * per_day
    starts = {}
    for on in (True, False):
        eng = Engine(bundle, replace(ScoreConfig(), day_test=on))
        res = eng.process(["s"] * n, ts, vals, now=ts[-1])
        starts[on] = [e for e in res.events if e.event == "anomaly_start" and e.ts == ts[closing]]
        if on:
            assert res.score[closing] >= ScoreConfig().threshold
    assert not starts[False]
    assert len(starts[True]) == 1
    feats = starts[True][0].features
    assert max(feats, key=feats.get) == "flow"


def test_day_state_survives_snapshot_and_restore(bundle) -> None:
    ts, vals = plant.normal(3 * 288, seed=6, t0=(MONDAY + 7) * 86_400.0, step_s=300.0)
    a = Engine(bundle)
    a.process(["s"] * len(ts), ts, vals, now=ts[-1])
    snap = a.snapshot()
    b = Engine(bundle)
    b.restore(snap)
    slot_a, slot_b = a.slot_of["s"], b.slot_of["s"]
    for name in ("day_sum", "day_count", "weekday_mean", "day_spread2", "day_judged"):
        np.testing.assert_array_equal(getattr(a, name)[slot_a], getattr(b, name)[slot_b])
    assert a.column("day")[slot_a] == b.column("day")[slot_b] == daytest.day_index(ts[-1:], 0.0)[0]
