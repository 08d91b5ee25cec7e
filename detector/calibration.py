"""From reconstruction error to a score in [0, 1] that means the same for every model.

The score of an error is its probability of being exceeded by normal data, turned around:
``score = P(E_normal < e)``, estimated on held-out normal data when the model is trained.
Below the tail the empirical distribution is used as it is; in the tail (the top
``TAIL_FRACTION`` of held-out errors) a peaks-over-threshold fit extrapolates, as SPOT
(Siffer et al., KDD 2017) does, so that errors larger than anything seen in training
still get distinct scores instead of all sitting at ``1 - 1/n``. The fit is exponential
in log-error, i.e. a Pareto tail in error: heavy enough not to cry wolf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAIL_FRACTION = 0.05
_SQRT_HALF = math.sqrt(0.5)
N_QUANTILES = 201
_EPS = 1e-12


@dataclass(frozen=True)
class Calibration:
    probs: np.ndarray  # levels of the stored quantiles, up to 1 - TAIL_FRACTION
    quantiles: np.ndarray  # log-error at those levels
    tail_beta: float  # mean excess of log-error over the tail threshold
    n: int  # held-out errors it was fitted on

    @classmethod
    def fit(cls, errors: np.ndarray) -> "Calibration":
        errors = np.asarray(errors, dtype=np.float64)
        errors = errors[np.isfinite(errors)]
        if len(errors) < 10:
            raise ValueError(f"calibration needs at least 10 held-out errors, got {len(errors)}")
        s = np.log(errors + _EPS)
        probs = np.linspace(0.0, 1.0 - TAIL_FRACTION, N_QUANTILES)
        q = np.quantile(s, probs)
        excess = s[s > q[-1]] - q[-1]
        # With few held-out points the tail may hold one or two values; a floor on beta
        # keeps the extrapolation from calling every slightly-high error a certainty.
        spread = float(q[-1] - q[len(q) // 2])
        beta = max(float(excess.mean()) if len(excess) else 0.0, 0.25 * spread, 0.05)
        return cls(probs, np.maximum.accumulate(q), beta, int(len(errors)))

    def score(self, errors: np.ndarray) -> np.ndarray:
        s = np.log(np.asarray(errors, dtype=np.float64) + _EPS)
        s[np.isnan(s)] = np.inf  # an error that cannot be computed is not evidence of normal
        out = np.interp(s, self.quantiles, self.probs)
        u = self.quantiles[-1]
        tail = s > u
        if tail.any():
            out[tail] = 1.0 - TAIL_FRACTION * np.exp(-(s[tail] - u) / self.tail_beta)
        return out

    def error_at(self, score: float) -> float:
        """The error whose score is ``score``: the threshold in error units, for alerts."""
        if score <= self.probs[-1]:
            s = float(np.interp(score, self.probs, self.quantiles))
        else:
            s = float(self.quantiles[-1] - self.tail_beta * np.log((1.0 - score) / TAIL_FRACTION))
        return float(np.exp(s) - _EPS)

    def log_stats(self) -> tuple[float, float]:
        """Centre and spread of held-out log-error, robustly: the median and half the
        16th-84th percentile range (one standard deviation for a normal distribution):
        where a stream's long-run statistics start (see :func:`likelihood`)."""
        lo, mid, hi = np.interp([0.1587, 0.5, 0.8413], self.probs, self.quantiles)
        return float(mid), max(float(hi - lo) / 2.0, 1e-3)

    def to_json(self) -> dict:
        return {"probs": self.probs.tolist(), "quantiles": self.quantiles.tolist(),
                "tail_beta": self.tail_beta, "tail_fraction": TAIL_FRACTION, "n": self.n}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        return cls(np.asarray(d["probs"], dtype=np.float64),
                   np.asarray(d["quantiles"], dtype=np.float64), float(d["tail_beta"]), int(d["n"]))


# ---- per-stream anomaly likelihood ---------------------------------------------------

# Log-errors are clipped to this range before they enter the running statistics, so a
# NaN or infinite reading cannot poison a stream's state.
LOG_ERROR_RANGE = (float(np.log(_EPS)), 30.0)


# Up to this many values libm's erfc, called once per value, costs less than the
# polynomial's ~30 numpy calls (4 against 24 µs for one stream's step); beyond it the
# polynomial's vector operations win (58 against 223 µs for 2,048 values).
_LIBM_MAX = 64
_libm_erfc = np.frompyfunc(math.erfc, 1, 1)


def norm_sf(x: np.ndarray) -> np.ndarray:
    """Gaussian upper tail Q(x) = P(N(0,1) > x), elementwise, with relative error below
    1.2e-7 everywhere (libm's erfc for small arrays, Numerical Recipes' for large ones), so
    tiny tail probabilities stay distinct."""
    x = np.asarray(x, dtype=np.float64)
    if x.size <= _LIBM_MAX:
        return 0.5 * np.asarray(_libm_erfc(x * _SQRT_HALF), dtype=np.float64)
    z = np.abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 0.5 * erfc, 1.0 - 0.5 * erfc)


def log_error(errors: np.ndarray) -> np.ndarray:
    """Log of the (smoothed) error, finite: what the likelihood statistics are kept on."""
    s = np.log(np.asarray(errors, dtype=np.float64) + _EPS)
    s = np.where(np.isnan(s), LOG_ERROR_RANGE[1], s)
    return np.minimum(np.maximum(s, LOG_ERROR_RANGE[0]), LOG_ERROR_RANGE[1])


Z_TAIL = 1.6448536269514722  # the standard normal's 95th percentile: where the tail starts


def likelihood(recent: np.ndarray, mean: np.ndarray, var: np.ndarray, excess: np.ndarray,
               min_std: float | np.ndarray) -> np.ndarray:
    """Anomaly likelihood of the recent average log-error under the stream's long-run
    statistics of it: mean, variance, and mean excess over its 95th percentile.

    Below ``mean + Z_TAIL * std`` the distribution is taken as Gaussian (as Numenta's
    anomaly likelihood does); beyond it as the stream's own exponential tail (as SPOT's
    peaks over threshold): ``1 - TAIL_FRACTION * exp(-(recent - u) / excess)``, so a
    stream whose normal errors have heavy tails needs a larger excursion for the same
    score, and scores compare across streams. std is floored at ``min_std``, the excess
    at a quarter of std."""
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), min_std)
    u = mean + Z_TAIL * std
    beta = np.maximum(excess, 0.25 * std)
    body = 1.0 - norm_sf((recent - mean) / std)
    tail = 1.0 - TAIL_FRACTION * np.exp(-np.maximum(recent - u, 0.0) / beta)
    return np.where(recent > u, tail, body)


def follow(dev: np.ndarray, var: np.ndarray, excess: np.ndarray, a: np.ndarray,
           min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """One step of a stream's long-run statistics after a deviation ``dev`` from the
    mean, at rate ``a``: the exponentially weighted variance, and the mean excess over
    the 95th percentile (updated only by readings in the tail, at the rate that makes it
    an average over them)."""
    new_var = (1.0 - a) * (var + a * dev * dev)
    over = dev - Z_TAIL * np.maximum(np.sqrt(var), min_std)
    a_ex = np.where(over > 0, np.minimum(a / TAIL_FRACTION, 1.0), 0.0)
    return new_var, excess + a_ex * (over - excess)


def likelihood_level(mean: np.ndarray, var: np.ndarray, excess: np.ndarray,
                     min_std: float | np.ndarray, p: float | np.ndarray) -> np.ndarray:
    """The recent average log-error whose :func:`likelihood` is ``p`` (a number, or one
    per stream): a threshold in error units (``exp`` of it) for alerts."""
    from statistics import NormalDist

    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), min_std)
    p = np.asarray(p, dtype=np.float64)
    beta = np.maximum(excess, 0.25 * std)
    body = np.vectorize(NormalDist().inv_cdf, otypes=[float])(np.clip(p, 1e-300, 1.0 - TAIL_FRACTION))
    tail = Z_TAIL + beta / std * np.log(TAIL_FRACTION / np.maximum(1.0 - p, 1e-300))
    return mean + std * np.where(p <= 1.0 - TAIL_FRACTION, body, tail)
