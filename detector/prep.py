"""Preparing training data: scaling, and the explicit policy for NaNs, gaps and time order.

Training policy (every count is printed and stored in the bundle's manifest):

* A missing value (NaN) is filled with the feature's last valid value when the run of
  missing values is at most ``max_fill`` rows long; a longer run, or a leading one, drops
  those rows and splits the data there.
* A time step longer than ``gap_factor`` times the median step is a gap: the data are
  split there, so no training window runs across it.
* A row whose timestamp is not after the previous row's (duplicate or out of order) is
  dropped, as the streaming engine drops it.

A training window never spans a split, so the LSTM never learns a jump that was a hole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from detector.errors import InputError

# Inputs further than this many standard deviations from the training mean are clipped
# before they reach the LSTM, so one wild reading cannot saturate the cell state for long.
INPUT_CLIP = 10.0


@dataclass(frozen=True)
class Scaler:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "Scaler":
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        # A feature constant in training gets unit scale: any later movement still shows
        # as error, in the sensor's own units, instead of dividing by zero.
        tiny = std <= 1e-9 * np.maximum(1.0, np.abs(mean))
        return cls(mean.astype(np.float64), np.where(tiny, 1.0, std).astype(np.float64))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64))


@dataclass
class PrepReport:
    rows_in: int = 0
    rows_used: int = 0
    cells_filled: int = 0
    rows_dropped_missing: int = 0
    rows_dropped_order: int = 0
    gaps: int = 0
    segments: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.rows_used}/{self.rows_in} rows used in {self.segments} segment(s); "
                f"{self.cells_filled} missing cells filled, "
                f"{self.rows_dropped_missing} rows dropped for long missing runs, "
                f"{self.rows_dropped_order} for duplicate/out-of-order time, "
                f"{self.gaps} time gap(s) split")


def _nan_runs(col: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of NaN in a column."""
    nan = np.concatenate(([False], np.isnan(col), [False]))
    edges = np.flatnonzero(nan[1:] != nan[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _fill_forward(values: np.ndarray, max_fill: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Forward-fill short NaN runs; returns (values, usable-row mask, cells filled)."""
    out = values.copy()
    usable = np.ones(len(values), dtype=bool)
    filled = 0
    for j in range(values.shape[1]):
        for start, stop in _nan_runs(values[:, j]):
            if start > 0 and stop - start <= max_fill:
                out[start:stop, j] = out[start - 1, j]
                filled += stop - start
            else:
                # The whole run goes, not only its tail: a filled head would be a flat
                # line that never happened.
                usable[start:stop] = False
    return out, usable, filled


def segments(values: np.ndarray, times: np.ndarray, max_fill: int, gap_factor: float,
             source: str) -> tuple[list[np.ndarray], PrepReport]:
    """Split raw training rows into clean contiguous segments, per the module's policy."""
    rep = PrepReport(rows_in=len(values))
    order_ok = np.ones(len(times), dtype=bool)
    last = -np.inf
    for i, t in enumerate(times):
        if t <= last:
            order_ok[i] = False
        else:
            last = t
    rep.rows_dropped_order = int((~order_ok).sum())
    values, times = values[order_ok], times[order_ok]
    filled, usable, rep.cells_filled = _fill_forward(values, max_fill)
    rep.rows_dropped_missing = int((~usable).sum())
    steps = np.diff(times)
    median = float(np.median(steps)) if len(steps) else 0.0
    is_gap = np.zeros(len(times), dtype=bool)
    if median > 0:
        is_gap[1:] = steps > gap_factor * median
    rep.gaps = int(is_gap.sum())
    out: list[np.ndarray] = []
    start = None
    for i in range(len(filled) + 1):
        boundary = i == len(filled) or not usable[i] or is_gap[i]
        if boundary and start is not None:
            out.append(filled[start:i])
            start = None
        if i < len(filled) and usable[i] and start is None:
            start = i
    rep.segments = len(out)
    rep.rows_used = int(sum(len(s) for s in out))
    if rep.rows_used == 0:
        raise InputError(source, "no usable rows after the missing-value policy "
                                 f"(max_fill={max_fill}): {rep.summary()}")
    return out, rep
