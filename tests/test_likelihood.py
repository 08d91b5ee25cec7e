"""The per-stream anomaly likelihood (``[score] method = "likelihood"``, the default)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from detector import plant
from detector.calibration import likelihood, likelihood_level, log_error, norm_sf
from detector.config import ScoreConfig
from detector.engine import Engine


def test_norm_sf_matches_the_normal_distribution_and_keeps_tiny_tails() -> None:
    xs = np.array([-4.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    ref = np.array([1.0 - NormalDist().cdf(x) for x in xs])
    assert np.allclose(norm_sf(xs), ref, rtol=1e-6, atol=1e-9)
    tiny = norm_sf(np.array([8.0, 10.0, 12.0]))
    assert np.all(tiny > 0) and tiny[0] > tiny[1] > tiny[2]
    # Small arrays take libm's erfc, large ones the polynomial: the same answers.
    many = np.linspace(-6.0, 12.0, 1000)
    small = np.concatenate([norm_sf(many[k: k + 10]) for k in range(0, len(many), 10)])
    assert np.allclose(norm_sf(many), small, rtol=3e-7, atol=0.0)


def test_likelihood_is_a_probability_and_its_level_inverts_it() -> None:
    mean, var, exc = np.array([-3.0]), np.array([0.25]), np.array([0.4])
    xs = np.linspace(-6.0, 10.0, 50)
    L = likelihood(xs, mean, var, exc, 0.1)
    assert np.all((L >= 0) & (L <= 1)) and np.all(np.diff(L) >= 0)
    for p in (0.9, 0.995, 0.99999):
        lvl = likelihood_level(mean, var, exc, 0.1, p)
        assert np.allclose(likelihood(lvl, mean, var, exc, 0.1), p, rtol=1e-6)


def test_log_error_is_finite_for_nan_and_inf() -> None:
    s = log_error(np.array([np.nan, np.inf, 0.0, 1.0]))
    assert np.all(np.isfinite(s)) and s[0] == s[1] == s.max()


def test_spike_is_flagged_and_scores_are_probabilities(bundle) -> None:
    vals = plant.normal(400, seed=5)[1]
    vals[300, 2] += 40.0  # one reading, ~20 standard deviations
    vals[310, 1] = np.inf  # an unreadable value must not poison the stream's statistics
    res = Engine(bundle).process(["s"] * 400, np.arange(400.0), vals, now=1e6)
    assert np.all(np.isfinite(res.score)) and res.score.min() >= 0 and res.score.max() <= 1
    assert res.flag[300] and res.score[300] > 0.999
    assert int(np.argmax(res.shares[300])) == 2
    start = next(e for e in res.events if e.event == "anomaly_start" and e.ts == 300.0)
    assert np.isfinite(start.threshold) and 0 < start.threshold < start.error


def test_a_lasting_new_level_stops_being_anomalous(bundle) -> None:
    """A lasting change (a noisier sensor) is flagged when it starts; the stream's statistics then learn it,
    so it is not flagged for ever (adaptation of the long-run statistics)."""
    vals = plant.normal(6000, seed=11)[1]
    sd = vals[:1000, 1].std()
    vals[1000:, 1] += np.random.default_rng(0).normal(0.0, 2.0 * sd, 5000)  # a noisier sensor
    cfg = ScoreConfig(history=500)
    res = Engine(bundle, cfg).process(["s"] * 6000, np.arange(6000.0), vals, now=1e7)
    assert res.flag[1000:1100].any()
    assert res.flag[5000:].mean() < res.flag[1000:1500].mean() / 2 + 0.01


def test_likelihood_state_survives_snapshot_and_restore(bundle) -> None:
    vals = plant.normal(300, seed=12)[1]
    a = Engine(bundle)
    a.process(["s"] * 200, np.arange(200.0), vals[:200], now=1e6)
    snap = a.snapshot()
    for name in ("recent", "lt_mean", "lt_var", "lt_excess", "lt_var1", "lt_excess1"):
        assert name in snap
    b = Engine(bundle)
    b.restore(snap)
    ra = a.process(["s"] * 100, np.arange(200.0, 300.0), vals[200:], now=1e6)
    rb = b.process(["s"] * 100, np.arange(200.0, 300.0), vals[200:], now=1e6)
    assert np.array_equal(ra.score, rb.score)
