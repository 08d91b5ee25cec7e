"""A stream's last N readings in fixed memory: what a fit is trained on.

The learner collects a new stream's first readings in one, and the refit plan a learned
stream's recent normal readings: both must stay bounded whatever a stream sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Ring:
    times: np.ndarray   # (capacity,) epoch seconds
    values: np.ndarray  # (capacity, features)
    n: int = 0          # readings ever pushed; the ring holds the last min(n, size)
    size: int = 0       # the capacity it grows to (0: as given)

    def __post_init__(self) -> None:
        self.size = self.size or len(self.times)

    @classmethod
    def empty(cls, size: int, n_features: int) -> Ring:
        # Grown as readings come, not allocated whole: a flood of new stream ids with a
        # reading each must not cost each id a full buffer (~20 KB at 500 x 4).
        first = min(size, 8)
        return cls(np.zeros(first), np.zeros((first, n_features)), 0, size)

    @classmethod
    def full(cls, times: np.ndarray, values: np.ndarray) -> Ring:
        """A ring holding exactly these readings, oldest first."""
        times = np.asarray(times, dtype=np.float64)
        return cls(times, np.asarray(values, dtype=np.float64).reshape(len(times), -1), len(times))

    def __len__(self) -> int:
        return min(self.n, self.size)

    def push(self, ts: float, row: np.ndarray) -> None:
        cap = len(self.times)
        if self.n == cap < self.size:  # full below its size: double (readings stay in order)
            more = min(2 * cap, self.size) - cap
            self.times = np.concatenate((self.times, np.zeros(more)))
            self.values = np.concatenate((self.values, np.zeros((more, self.values.shape[1]))))
            cap += more
        i = self.n % cap
        self.times[i], self.values[i] = ts, row
        self.n += 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """The readings held, oldest first (copies)."""
        size = len(self.times)  # past it only once grown to self.size
        start = self.n % size if self.n > size else 0
        idx = (start + np.arange(len(self))) % size
        return self.times[idx], self.values[idx]
