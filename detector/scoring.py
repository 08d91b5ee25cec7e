"""Per-reading error arithmetic shared by training (calibration) and the streaming engine.

Keeping it in one place is what makes a calibrated score mean the same thing at training
time and at scoring time.
"""

from __future__ import annotations

import numpy as np

from detector.prep import INPUT_CLIP
from detector.runtime import NumpyRuntime, Runtime

# Largest step, in training standard deviations, between a forecast and what the LSTM
# state is fed (forecast kind).
INNOVATION_CLIP = 3.0


def ewma_alpha(span: int) -> float:
    """Weight of the newest error in the smoothed error (span 1 = no smoothing)."""
    return 2.0 / (span + 1.0)


def observe(rt: Runtime, kind: str, x: np.ndarray, y_prev: np.ndarray, h: np.ndarray,
            c: np.ndarray, missing: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reconstruct scaled float32 readings ``x`` (rows, features): (se, d, y, h, c).

    ``d = x - y`` is the residual and ``se = d**2`` the per-feature squared error.
    ``forecast`` uses ``y_prev``, the decoder's output for the state *before* the reading
    (it never sees what it reconstructs), and leaves the state to :func:`advance`;
    ``reconstruct`` feeds the reading and decodes the state after it. A missing value
    (NaN) adds no error: ``forecast`` fills it with its own prediction, ``reconstruct``
    with the training mean. ``missing`` is ``isnan(x)`` if the caller computed it already.
    """
    if missing is None:
        missing = np.isnan(x)
    any_missing = bool(missing.any())
    if kind == "forecast":
        y = y_prev
        if any_missing:
            x = np.where(missing, y, x)
    else:
        if any_missing:
            x = np.nan_to_num(x)
        fed = np.clip(x, -INPUT_CLIP, INPUT_CLIP).astype(np.float32, copy=False)
        h, c, y = rt.step(fed, h, c)
    d = x - y
    se = d * d
    return se, d, y, h, c


def advance(rt: Runtime, kind: str, d: np.ndarray, y: np.ndarray, h: np.ndarray, c: np.ndarray,
            hold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feed the readings to the state (forecast kind; ``reconstruct`` already did):
    (h, c, forecast of the next reading).

    The state sees each reading pulled to within INNOVATION_CLIP of the forecast
    (``y + clip(d)``), and a reading in ``hold`` (flagged) is replaced by the forecast
    itself: an outlier cannot drag the state away, so one fault does not derail the
    forecasts after it, while a moderate level shift is still followed within a few
    readings.
    """
    if kind != "forecast":
        return h, c, y
    # minimum/maximum rather than np.clip: two bare ufunc calls cost less than clip's
    # Python-level dispatch, which is most of the price at batch 1.
    x_in = np.maximum(d, -INNOVATION_CLIP)
    np.minimum(x_in, INNOVATION_CLIP, out=x_in)
    if hold is not None and hold.any():
        x_in[hold] = 0.0
    x_in += y
    return rt.step(x_in, h, c)


def stream_errors(rt: NumpyRuntime, kind: str, scaled: np.ndarray, h: np.ndarray,
                  c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream one series (rows, features) from state (h, c), each of shape (1, hidden).

    Returns (per-row error, h after each row, c after each row)."""
    n = len(scaled)
    errs = np.empty(n)
    hs = np.empty((n, rt.hidden), dtype=np.float32)
    cs = np.empty((n, rt.hidden), dtype=np.float32)
    y = rt.decode(h)
    for t in range(n):
        se, d, y, h, c = observe(rt, kind, scaled[t: t + 1], y, h, c)
        h, c, y = advance(rt, kind, d, y, h, c)
        errs[t] = float(se.mean())
        hs[t], cs[t] = h[0], c[0]
    return errs, hs, cs


def smooth(errors: np.ndarray, span: int) -> np.ndarray:
    """The engine's smoothed error, over a whole series, starting from its first value."""
    alpha = ewma_alpha(span)
    out = np.empty(len(errors))
    m = errors[0] if len(errors) else 0.0
    for i, e in enumerate(errors):
        m = m + alpha * (e - m)
        out[i] = m
    return out
