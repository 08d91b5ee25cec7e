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

from dataclasses import dataclass

import numpy as np

TAIL_FRACTION = 0.05
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

    def to_json(self) -> dict:
        return {"probs": self.probs.tolist(), "quantiles": self.quantiles.tolist(),
                "tail_beta": self.tail_beta, "tail_fraction": TAIL_FRACTION, "n": self.n}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        return cls(np.asarray(d["probs"], dtype=np.float64),
                   np.asarray(d["quantiles"], dtype=np.float64), float(d["tail_beta"]), int(d["n"]))
