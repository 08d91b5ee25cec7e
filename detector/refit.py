"""Adaptation: what a learned stream's next model is fitted on, and when.

Sensors drift and plants change set points; a model learned from a stream's first
readings slowly stops describing it. For every stream scored by its own learned model the
worker keeps here a window of its most recent readings *judged normal* and, every
``[learn] refit_interval_s``, hands that window to the learner for a fresh fit, which the
worker then swaps in keeping the stream's state.

What counts as normal (the point of this module):

* a reading outside any anomaly episode goes into the window;
* readings inside an episode are held back, never learned from while the episode is
  young: learning a fault would teach the model to call it normal;
* an episode that lasts ``new_normal_readings`` readings is no longer a fault but the new
  normal (a set-point change, a replaced sensor): its held-back readings, and the rest of
  it, go into the window, so the next refit learns the new level;
* an episode that ends earlier is dropped, held-back readings and all.

Memory is bounded per stream: the window and the held-back readings are fixed-size rings.
One thread (the worker) owns a RefitPlan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detector.ring import Ring


@dataclass
class _Window:
    ring: Ring  # the last `window` normal readings
    held_times: list[float] = field(default_factory=list)  # the current episode's readings
    held_values: list[np.ndarray] = field(default_factory=list)
    episode_len: int = 0
    due_at: float = 0.0


class RefitPlan:
    def __init__(self, window: int, interval_s: float, new_normal_readings: int, min_readings: int) -> None:
        self.window = int(window)
        self.interval_s = float(interval_s)
        self.new_normal = int(new_normal_readings)
        self.min_readings = min(int(min_readings), self.window)
        self._streams: dict[str, _Window] = {}

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def start(self, stream: str, n_features: int, now: float) -> None:
        """Begin (or begin again, after a swap) a stream's window; the first refit is due
        one interval from ``now``."""
        self._streams[stream] = _Window(Ring.empty(self.window, n_features), due_at=now + self.interval_s)

    def forget(self, stream: str) -> None:
        self._streams.pop(stream, None)

    def __len__(self) -> int:
        return len(self._streams)

    def observe(self, stream: str, ts: np.ndarray, values: np.ndarray, in_episode: np.ndarray) -> None:
        """Scored readings of ``stream`` in order, with whether each was inside an anomaly
        episode after it was scored."""
        w = self._streams.get(stream)
        if w is None:
            return
        for t, row, bad in zip(ts.tolist(), values, in_episode.tolist()):
            if not bad:
                w.held_times.clear()
                w.held_values.clear()
                w.episode_len = 0
                if np.isfinite(row).all():  # a window of complete rows: training wants them
                    w.ring.push(t, row)
                continue
            w.episode_len += 1
            if w.episode_len > self.new_normal:
                if np.isfinite(row).all():
                    w.ring.push(t, row)
                continue
            if np.isfinite(row).all():
                w.held_times.append(t)
                w.held_values.append(np.array(row, dtype=np.float64))
            if w.episode_len == self.new_normal:  # it lasted: the new normal
                for ht, hv in zip(w.held_times, w.held_values):
                    w.ring.push(ht, hv)
                w.held_times.clear()
                w.held_values.clear()

    def due(self, now: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The streams whose refit is due, with the window to fit on; each one's next refit
        is scheduled an interval later (a fit that fails is retried by the learner)."""
        out = []
        for stream, w in self._streams.items():
            if now < w.due_at:
                continue
            w.due_at = now + self.interval_s
            if len(w.ring) >= self.min_readings:
                times, values = w.ring.ordered()
                out.append((stream, times, values))
        return out
