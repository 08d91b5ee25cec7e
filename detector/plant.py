"""A small simulated plant: correlated sensors with a daily cycle, noise, and faults.

Used to train the shipped model, by the tests (their synthetic data), and by the demo
and load generator. One pump skid: a load that follows a daily cycle drives flow,
pressure and vibration at once, and temperature follows the load with a lag; so a
sensor that stops agreeing with its neighbours is visible even when its own value is
ordinary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ["temperature", "pressure", "flow", "vibration"]
FAULTS = ("spike", "drift", "stuck", "disagree")


@dataclass(frozen=True)
class Fault:
    kind: str
    feature: int
    start: int
    length: int


def normal(n: int, seed: int = 0, period: int = 288, t0: float = 1_700_000_000.0,
           step_s: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normal readings: (times, values (n, 4)). ``period`` readings make a day."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    phase = rng.uniform(0, 2 * np.pi)
    ar = np.zeros(n)
    for i in range(1, n):  # slow random load changes on top of the cycle
        ar[i] = 0.95 * ar[i - 1] + rng.normal(0, 0.015)
    load = 0.6 + 0.25 * np.sin(2 * np.pi * t / period + phase) + ar
    lagged = np.empty(n)
    acc = load[0]
    for i in range(n):  # temperature follows the load with a lag
        acc += 0.1 * (load[i] - acc)
        lagged[i] = acc
    values = np.column_stack([
        20.0 + 12.0 * lagged + rng.normal(0, 0.15, n),
        2.0 + 1.5 * load + rng.normal(0, 0.03, n),
        50.0 * load + rng.normal(0, 0.5, n),
        0.4 + 0.3 * load + rng.normal(0, 0.01, n),
    ])
    return t0 + step_s * t, values


def inject(values: np.ndarray, fault: Fault, rng: np.random.Generator) -> np.ndarray:
    """Apply a fault in place; returns the 0/1 label vector of the rows it touched."""
    n = len(values)
    s, e = fault.start, min(fault.start + fault.length, n)
    col = values[:, fault.feature]
    sd = float(np.std(col)) or 1.0
    if fault.kind == "spike":
        e = s + 1
        col[s] += 8.0 * sd * rng.choice([-1.0, 1.0])
    elif fault.kind == "drift":
        col[s:e] += np.linspace(0.0, 4.0 * sd, e - s)
    elif fault.kind == "stuck":
        col[s:e] = col[s]
    elif fault.kind == "disagree":
        # The sensor keeps an ordinary level and noise but loses its link to the load.
        col[s:e] = float(np.mean(col)) + rng.normal(0, 0.3 * sd, e - s)
    else:
        raise ValueError(f"unknown fault {fault.kind!r}")
    labels = np.zeros(n, dtype=np.int8)
    labels[s:e] = 1
    return labels


def with_faults(n: int, seed: int = 0, n_faults: int = 4, first: int = 0,
                period: int = 288) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Fault]]:
    """Normal data with ``n_faults`` non-overlapping faults after row ``first``:
    (times, values, labels, faults)."""
    times, values = normal(n, seed, period)
    rng = np.random.default_rng(seed + 1)
    labels = np.zeros(n, dtype=np.int8)
    slots = np.linspace(first, n, n_faults + 1).astype(int)
    faults = []
    for k in range(n_faults):
        lo, hi = slots[k], slots[k + 1]
        length = max(1, min(60, (hi - lo) // 3))
        f = Fault(FAULTS[k % len(FAULTS)], int(rng.integers(0, len(FEATURES))),
                  int(rng.integers(lo + (hi - lo) // 4, hi - length)), length)
        labels |= inject(values, f, rng)
        faults.append(f)
    return times, values, labels, faults
