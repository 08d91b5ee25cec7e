"""A stream's last N readings in fixed memory: what a fit is trained on.

The learner collects a new stream's first readings in one, and the refit plan a learned
stream's recent normal readings: both must stay bounded whatever a stream sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Ring:
    times: np.ndarray   # (size,) epoch seconds
    values: np.ndarray  # (size, features)
    n: int = 0          # readings ever pushed; the ring holds the last min(n, size)

    @classmethod
    def empty(cls, size: int, n_features: int) -> Ring:
        return cls(np.zeros(size), np.zeros((size, n_features)))

    @classmethod
    def full(cls, times: np.ndarray, values: np.ndarray) -> Ring:
        """A ring holding exactly these readings, oldest first."""
        times = np.asarray(times, dtype=np.float64)
        return cls(times, np.asarray(values, dtype=np.float64).reshape(len(times), -1), len(times))

    def __len__(self) -> int:
        return min(self.n, len(self.times))

    def push(self, ts: float, row: np.ndarray) -> None:
        i = self.n % len(self.times)
        self.times[i], self.values[i] = ts, row
        self.n += 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """The readings held, oldest first (copies)."""
        size = len(self.times)
        start = self.n % size if self.n > size else 0
        idx = (start + np.arange(len(self))) % size
        return self.times[idx], self.values[idx]
