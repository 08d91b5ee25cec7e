"""The streaming engine: per-stream state slots and one batched step for many streams.

Give it readings ``(stream_id, ts, values)`` for any number of streams; every stream with
a reading advances by one LSTM step, all of them in one batched call of the runtime. Per
reading it returns the error, each feature's share of it, a calibrated score in [0, 1],
the flag, and episode events with hysteresis. No MQTT, no threads: the daemon's worker
calls :meth:`Engine.process` once per micro-batch.

The decision rule (``[score]``): an episode starts at ``min_flagged`` readings in a row
scoring at least ``threshold`` and ends after ``clear_readings`` in a row below
``clear_threshold``; a reading is flagged when it belongs to an episode (a run of normal
readings inside one only while it is shorter than half the episode before it). With
``report = "onset"`` the score of an episode's later readings is capped at
``clear_threshold``: the score peaks once, at the onset (docs/quality.md). Habituation
(``spike_readings``): outside an episode a reading's probability is multiplied by 1 + the
decaying count of recent spikes (episodes at most ``spike_readings`` long) of the features
that carry its error, so a spike that keeps recurring in one sensor stops being news.

Policies:

* **Order.** Several readings of one stream in one call are applied in the order given
  (they go into successive rounds of the batched step). A reading whose ``ts`` equals
  the stream's last scored ``ts`` is rejected as ``duplicate``; one before it as
  ``out_of_order``; one more than ``max_future_s`` after ``now`` as ``future_timestamp``;
  one with every value missing as ``missing_values``. Rejected readings change no state.
* **Missing values.** A reading with some features NaN is scored on the others (see
  :func:`detector.scoring.step`).
* **New streams** start from the bundle's warm-up state (the mean state over training)
  and are never flagged during their first ``settle_readings`` readings.
* **Bounded memory.** A stream not seen for ``idle_timeout_s`` (engine clock: the
  ``now`` given to :meth:`process`) is evicted; at ``max_streams`` the least recently
  seen streams make room (1 % of them at a time, so a flood of new ids costs one sweep
  per hundred, not one per reading). Evictions are counted by reason.
"""

from __future__ import annotations

import math
import operator
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from detector.bundle import Bundle
from detector.config import EngineConfig, ScoreConfig
from detector.calibration import TAIL_FRACTION, follow, likelihood, likelihood_level, log_error
from detector.daytest import close_day, combined, day_index, weekday
from detector.runtime import NumpyRuntime, Runtime
from detector.scoring import advance, ewma_alpha, observe


@dataclass(frozen=True)
class Event:
    stream: str
    event: str  # "anomaly_start" or "anomaly_end"
    ts: float
    score: float
    error: float
    threshold: float
    features: dict[str, float]
    model: dict[str, str]
    # Why an episode ended: "normal" (clear_readings normal readings in a row), "idle" or
    # "max_streams" (the stream was evicted while in it: nobody watches it any more, and
    # an alert left open would stay open for ever), "model_changed" (its state cannot go
    # on: a model of another shape or features, its route removed, or a route took it
    # from its learned model; the stream starts over). Empty for anomaly_start.
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        body = {"stream": self.stream, "event": self.event, "ts": self.ts, "score": self.score,
                "error": self.error, "threshold": self.threshold, "features": self.features,
                "model": self.model}
        if self.reason:
            body["reason"] = self.reason
        return body


@dataclass
class Scored:
    """Results for one :meth:`Engine.process` call, one row per reading, in input order."""

    error: np.ndarray  # (n,) raw reconstruction error; NaN where rejected
    score: np.ndarray  # (n,) in [0, 1]; 0 where rejected
    flag: np.ndarray  # (n,) bool: the reading is flagged
    in_episode: np.ndarray  # (n,) bool: the stream is in an anomaly episode after it
    shares: np.ndarray  # (n, features) each feature's share of the error
    rejected: dict[int, str] = field(default_factory=dict)  # index -> reason
    events: list[Event] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return len(self.error) - len(self.rejected)


# Starting spread of the recent average of log-errors, as a fraction of single errors'.
RECENT_SPREAD = 0.5

# A stream's scalar state is one column of a float64 matrix, a row per quantity: a step
# gathers and writes back all of it with one indexing call each instead of ~20 (at small
# batches the number of numpy calls, not their size, is the cost), and its arithmetic runs
# on contiguous rows of what it gathered. Counts and flags are held as floats (exact up to
# 2**53); snapshots give them their own dtypes back. The two likelihood tests (the recent
# average of log-errors, and the single log-error) sit side by side in (recent, log_error),
# (lt_var, lt_var1) and (lt_excess, lt_excess1), so that one call judges and updates both.
_SCALARS: tuple[tuple[str, type, float], ...] = (
    ("smoothed", np.float64, 0.0), ("count", np.int64, 0), ("last_ts", np.float64, -np.inf),
    ("last_seen", np.float64, -np.inf), ("in_episode", np.bool_, 0), ("flagged_run", np.int64, 0),
    ("normal_run", np.int64, 0), ("episode_age", np.int64, 0), ("spike_at", np.int64, 0),
    ("lt_mean", np.float64, 0.0), ("recent", np.float64, 0.0), ("log_error", np.float64, 0.0),
    ("lt_var", np.float64, 1.0), ("lt_var1", np.float64, 1.0),
    ("lt_excess", np.float64, 1.0), ("lt_excess1", np.float64, 1.0), ("day", np.float64, np.nan))
(_SMOOTHED, _COUNT, _LAST_TS, _LAST_SEEN, _IN_EPISODE, _FLAGGED_RUN, _NORMAL_RUN, _EPISODE_AGE,
 _SPIKE_AT, _LT_MEAN, _RECENT, _LOG_ERROR, _LT_VAR, _LT_VAR1, _LT_EXCESS, _LT_EXCESS1, _DAY) = range(len(_SCALARS))
_COLUMN = {name: k for k, (name, _, _) in enumerate(_SCALARS)}
_DTYPE = {name: dtype for name, dtype, _ in _SCALARS}
_SCALAR_FILL = np.array([fill for _, _, fill in _SCALARS], dtype=np.float64)


class Engine:
    def __init__(self, b: Bundle, score: ScoreConfig = ScoreConfig(),
                 engine: EngineConfig = EngineConfig(), runtime: Runtime | None = None) -> None:
        self.bundle = b
        self.cfg = score
        self.ecfg = engine
        self.rt = runtime if runtime is not None else b.runtime(engine.runtime, engine.threads)
        self.kind = b.kind
        self.features = b.features
        self.n_features = len(self.features)
        self.feature_index = {f: i for i, f in enumerate(self.features)}
        self.alpha = ewma_alpha(b.smoothing)
        self.threshold_error = b.calibration.error_at(score.threshold)
        # Per-stream likelihood: long-run log-error statistics start from the held-out
        # errors' and then follow the stream (see detector.calibration.likelihood).
        self._lt0_mean, lt0_std = b.calibration.log_stats()
        # Two sets of long-run statistics share one mean: the spread of single log-errors
        # (start: the held-out errors') and that of their recent average (start: half of
        # it; averaging shrinks the spread, less than for independent errors because
        # neighbouring errors are correlated). Both then follow the stream.
        self._lt0_var1 = lt0_std ** 2
        self._lt0_excess1 = b.calibration.tail_beta
        self._min_std1 = score.min_spread * lt0_std
        self._lt0_var = (RECENT_SPREAD * lt0_std) ** 2
        self._lt0_excess = RECENT_SPREAD * b.calibration.tail_beta
        self._min_std = score.min_spread * RECENT_SPREAD * lt0_std
        self._min_stds = np.array([[self._min_std], [self._min_std1]])  # (recent, single)
        self._day_test = score.day_test and score.method == "likelihood"
        self._alpha_recent = ewma_alpha(score.window)
        self._alpha_history = 1.0 / score.history
        self.model_ref = {"name": b.name, "version": b.version}
        self._mean = b.scaler.mean
        self._scale = b.scaler.scale
        self._init_h = b.weights["init_h"].reshape(-1).astype(np.float32)
        self._init_c = b.weights["init_c"].reshape(-1).astype(np.float32)
        # The forecast for a new stream's first reading: the decoder on the warm-up state.
        self._init_pred = NumpyRuntime(b.weights).decode(self._init_h[None, :])[0]
        self._reset_row = _SCALAR_FILL.copy()
        for name, value in (("recent", self._lt0_mean), ("lt_mean", self._lt0_mean),
                            ("lt_var", self._lt0_var), ("lt_excess", self._lt0_excess),
                            ("lt_var1", self._lt0_var1), ("lt_excess1", self._lt0_excess1)):
            self._reset_row[_COLUMN[name]] = value
        self.slot_of: dict[str, int] = {}
        self._stream_of: list[str | None] = []
        self._free: list[int] = []
        self.evicted: Counter[str] = Counter()
        self._ended: list[Event] = []  # anomaly_end of streams evicted in an episode, for process
        self._next_idle_sweep = -np.inf
        self._grow(min(64, self.ecfg.max_streams))  # never more slots than max_streams

    # ---- state slots -------------------------------------------------------------
    def _grow(self, cap: int) -> None:
        old = len(self._stream_of)

        def extend(arr: np.ndarray | None, fill: np.ndarray) -> np.ndarray:
            new = np.empty((cap, *fill.shape), dtype=fill.dtype)
            new[:] = fill
            if arr is not None:
                new[:old] = arr
            return new

        get = self.__dict__.get
        hid, nf = self.rt.hidden, self.n_features
        self.h = extend(get("h"), np.zeros(hid, dtype=np.float32))
        self.c = extend(get("c"), np.zeros(hid, dtype=np.float32))
        self.pred = extend(get("pred"), np.zeros(nf, dtype=np.float32))
        self.spike_rate = extend(get("spike_rate"), np.zeros(nf))
        self.onset_shares = extend(get("onset_shares"), np.zeros(nf))
        # The per-day test (detector.daytest): the day's running sum and count, the 7
        # weekday means, the spread and the days judged, per feature; float32 except the sum:
        # that keeps a stream within issue 6's 1 KB (7 digits are plenty for a day's mean).
        self.day_sum = extend(get("day_sum"), np.zeros(nf))
        self.day_count = extend(get("day_count"), np.zeros(nf, dtype=np.float32))
        self.weekday_mean = extend(get("weekday_mean"), np.full((7, nf), np.nan, dtype=np.float32))
        self.day_spread2 = extend(get("day_spread2"), np.zeros(nf, dtype=np.float32))
        self.day_judged = extend(get("day_judged"), np.zeros(nf, dtype=np.float32))
        state = np.empty((len(_SCALARS), cap))
        state[:] = _SCALAR_FILL[:, None]
        if old:
            state[:, :old] = self.state
        self.state = state
        self._stream_of.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))

    def _reset_slots(self, slots: np.ndarray) -> None:
        self.h[slots] = self._init_h
        self.c[slots] = self._init_c
        self.pred[slots] = self._init_pred
        self.spike_rate[slots] = 0.0
        self.onset_shares[slots] = 0.0
        self.day_sum[slots] = self.day_count[slots] = self.day_spread2[slots] = self.day_judged[slots] = 0.0
        self.weekday_mean[slots] = np.nan
        self.state[:, slots] = self._reset_row[:, None]

    def _episode_ends(self, slots: np.ndarray, reason: str) -> list[Event]:
        """An ``anomaly_end`` for each of ``slots``' streams that is in an episode, for an
        episode that ends because the stream leaves this engine (``reason``)."""
        return _left_in_episode([self._stream_of[slot] for slot in slots.tolist()],
                                self.state[_LAST_TS, slots].tolist(), (self.state[_IN_EPISODE, slots] > 0.0).tolist(),
                                self.model_ref, reason)

    def episode_ends(self, reason: str) -> list[Event]:
        """The ``anomaly_end`` of every stream held that is in an episode, for the caller to
        publish when this engine's states are dropped (a model of another shape replaces
        it, or its route is removed): a subscriber's alert must not stay open for ever.
        Changes no state."""
        return self._episode_ends(np.flatnonzero(self.state[_IN_EPISODE] > 0.0), reason)

    def _release(self, slots: np.ndarray, reason: str) -> None:
        self._ended.extend(self._episode_ends(slots, reason))  # its episode ends with it, said so
        self._free_slots(slots)
        self.evicted[reason] += len(slots)

    def _free_slots(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            sid = self._stream_of[slot]
            if sid is None:
                continue
            del self.slot_of[sid]
            self._stream_of[slot] = None
            self.state[_LAST_SEEN, slot] = -np.inf
            self._free.append(slot)

    def drop(self, streams: Sequence[str], reason: str) -> list[Event]:
        """Forget ``streams``' states (those held) because another model scores them now,
        not an eviction; returns the ``anomaly_end`` of those in an episode, to publish."""
        slots = np.array([self.slot_of[s] for s in streams if s in self.slot_of], dtype=np.int64)
        ends = self._episode_ends(slots, reason)
        self._free_slots(slots)
        return ends

    def _new_slots(self, sids: Sequence[str], seen: float | np.ndarray) -> np.ndarray:
        """Slots for streams not held yet, reset to the model's start state and last seen at
        ``seen`` (one time, or one per stream); making room for them may evict the least
        recently seen streams, never one of these unless they alone fill max_streams."""
        slots = np.empty(len(sids), dtype=np.int64)
        seen_at = np.broadcast_to(np.asarray(seen, dtype=np.float64), (len(sids),)).tolist()
        for j, sid in enumerate(sids):
            if not self._free:
                self._make_room()
            slot = self._free.pop()
            self.slot_of[sid] = slot
            self._stream_of[slot] = sid
            # Seen at once, so that making room for the next ones does not evict it; the
            # rest of its state is reset below for all of them together (eight array writes
            # per batch, not per stream: 1,000 new streams often arrive in a few steps).
            self.state[_LAST_SEEN, slot] = seen_at[j]
            slots[j] = slot
        if len(slots):
            self._reset_slots(slots)
            self.state[_LAST_SEEN, slots] = seen_at
        return slots

    def _make_room(self) -> None:
        if len(self.slot_of) >= self.ecfg.max_streams:
            live = np.flatnonzero(np.array([s is not None for s in self._stream_of]))
            k = max(1, self.ecfg.max_streams // 100)
            oldest = live[np.argpartition(self.state[_LAST_SEEN, live], min(k, len(live)) - 1)[:k]]
            self._release(oldest, "max_streams")
        else:
            self._grow(min(max(2 * len(self._stream_of), 64), self.ecfg.max_streams))

    def evict_idle(self, now: float) -> int:
        """Evict streams not seen since ``now - idle_timeout_s``; returns how many."""
        stale = np.flatnonzero(self.state[_LAST_SEEN] < now - self.ecfg.idle_timeout_s)
        stale = np.array([s for s in stale.tolist() if self._stream_of[s] is not None], dtype=np.int64)
        if len(stale):
            self._release(stale, "idle")
        return len(stale)

    @property
    def n_streams(self) -> int:
        return len(self.slot_of)

    def column(self, name: str) -> np.ndarray:
        """One per-stream scalar (``count``, ``in_episode``, ``lt_mean``, ...) for every
        slot: a float64 view, writable."""
        return self.state[_COLUMN[name]]

    def _array(self, name: str) -> np.ndarray:
        return self.column(name) if name in _COLUMN else getattr(self, name)

    # ---- checkpoints -------------------------------------------------------------
    _STATE_ARRAYS = ("h", "c", "pred", "smoothed", "count", "last_ts", "last_seen", "in_episode",
                     "flagged_run", "normal_run", "episode_age", "recent", "lt_mean", "lt_var",
                     "lt_excess", "lt_var1", "lt_excess1", "spike_rate",
                     "onset_shares", "spike_at", "day", "day_sum", "day_count", "weekday_mean",
                     "day_spread2", "day_judged")

    def snapshot(self) -> dict[str, np.ndarray]:
        """Every live stream's state as plain arrays (for ``np.savez``: no pickle)."""
        live = np.array(sorted(self.slot_of.values()), dtype=np.int64)
        snap = {name: self._array(name)[live] for name in self._STATE_ARRAYS}
        for name in _DTYPE.keys() & snap.keys():
            snap[name] = snap[name].astype(_DTYPE[name])
        snap["streams"] = np.array([self._stream_of[s] for s in live.tolist()], dtype=str)
        snap["model"] = np.array([self.bundle.name, self.bundle.version], dtype=str)
        snap["features"] = np.array(self.features, dtype=str)
        return snap

    def restore(self, snap: dict[str, np.ndarray]) -> int:
        """Load a :meth:`snapshot` taken with a model of the same shape and features (else
        ValueError); returns the number of streams restored. A different model version
        keeps the states (same shape, same features) but each stream settles again before
        it can be flagged."""
        streams = [str(s) for s in snap["streams"].tolist()]
        if snap["h"].shape[1:] != self.h.shape[1:] or snap["pred"].shape[1:] != self.pred.shape[1:]:
            raise ValueError(f"state shape {snap['h'].shape[1:]}/{snap['pred'].shape[1:]} does not fit "
                             f"model {self.bundle.name} ({self.h.shape[1]} hidden, {self.n_features} features)")
        # Same shape, other sensors (a model for other features swapped in): the state
        # means nothing for them. Snapshots from before they named features are trusted.
        if "features" in snap and [str(f) for f in snap["features"].tolist()] != list(self.features):
            raise ValueError(f"state of features {[str(f) for f in snap['features'].tolist()]} does not fit "
                             f"model {self.bundle.name} (features {list(self.features)})")
        same_model = [str(v) for v in snap["model"].tolist()] == [self.bundle.name, self.bundle.version]
        # The most recently seen streams, if not all fit; oldest first, so that making room
        # for them evicts the least recently seen of all.
        order = np.argsort(snap["last_seen"], kind="stable")[-self.ecfg.max_streams:]
        streams = [streams[k] for k in order.tolist()]
        n = len(streams)
        slots = np.fromiter(map(self.slot_of.get, streams, repeat(-1)), dtype=np.int64, count=n)
        new = (slots < 0).nonzero()[0]
        if len(new):
            slots[new] = self._new_slots([streams[j] for j in new.tolist()], snap["last_seen"][order[new]])
        # Array by array, not stream by stream: 100,000 streams restore in a fraction of a
        # second. A stream evicted meanwhile to make room for a later one keeps nothing.
        held = np.fromiter(map(operator.eq, map(self._stream_of.__getitem__, slots.tolist()), streams),
                           dtype=bool, count=n)
        slots = slots[held]
        for name in self._STATE_ARRAYS:
            if name in snap:  # snapshots from before a state array existed keep its reset value
                self._array(name)[slots] = snap[name][order[held]]
        if not same_model:
            self.state[_COUNT, slots] = 0
        return n

    # ---- scoring -----------------------------------------------------------------
    def process(self, streams: Sequence[str], ts: Sequence[float] | np.ndarray,
                values: Sequence[Sequence[float]] | np.ndarray, now: float | None = None) -> Scored:
        """Score one batch of readings; see the module's docstring for the policies."""
        n = len(streams)
        ts_arr = np.asarray(ts, dtype=np.float64).reshape(n)
        vals = np.asarray(values, dtype=np.float64).reshape(n, self.n_features)
        now = time.time() if now is None else now
        if now >= self._next_idle_sweep:
            self.evict_idle(now)
            self._next_idle_sweep = now + self.ecfg.idle_timeout_s / 10.0
        out = Scored(error=np.full(n, np.nan), score=np.zeros(n), flag=np.zeros(n, dtype=bool),
                     in_episode=np.zeros(n, dtype=bool), shares=np.zeros((n, self.n_features)))
        if n:
            self._process(streams, ts_arr, vals, now, out)
        if self._ended:  # evicted before this call's readings were scored: their ends first
            out.events[:0] = self.pop_ended()
        return out

    def pop_ended(self) -> list[Event]:
        """The ``anomaly_end`` of the streams evicted in an episode since the last call
        (:meth:`process` returns them too), for a caller that evicts them itself."""
        ended, self._ended = self._ended, []
        return ended

    def _process(self, streams: Sequence[str], ts_arr: np.ndarray, vals: np.ndarray, now: float,
                 out: Scored) -> None:
        codes, distinct = _codes(streams)
        # Each distinct stream's slot is looked up once per call, not once per reading;
        # round by round (as a stream's readings come) only when this call alone holds more
        # streams than max_streams, or making room evicted one of its own streams.
        slot_of = None
        if len(distinct) <= self.ecfg.max_streams:
            made_room = self.evicted["max_streams"]
            slot_of = self._slots(distinct, now)
            if self.evicted["max_streams"] != made_room and any(
                    self._stream_of[k] != sid for k, sid in zip(slot_of.tolist(), distinct)):
                slot_of = None
        for idx in _rounds(codes, len(distinct)):
            if slot_of is not None:
                slots = slot_of[codes[idx]]
            else:
                slots = self._slots([streams[i] for i in idx.tolist()], now)
            self._step(idx, slots, streams, ts_arr, vals, now, out)

    def _slots(self, sids: Sequence[str], now: float) -> np.ndarray:
        """The slots of ``sids``, new streams given one."""
        get = self.slot_of.get
        slots = np.fromiter(map(get, sids, repeat(-1)), dtype=np.int64, count=len(sids))  # C, not a generator
        new = (slots < 0).nonzero()[0]
        if len(new):
            # Mark the known streams as seen first, so that making room for the new ones
            # does not evict a stream that is in this very batch.
            self.state[_LAST_SEEN, slots[slots >= 0]] = now
            slots[new] = self._new_slots([sids[j] for j in new.tolist()], now)
        return slots

    def _days(self, slots: np.ndarray, ts: np.ndarray, vals: np.ndarray, missing: np.ndarray,
              st: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The per-day test for one round: each reading's day probability (inf where no
        day of its stream ended just before it) and, if any day ended, each reading's
        feature shares of that day's evidence; then the readings join their days."""
        day = day_index(ts, self.cfg.day_offset_hours)
        prev = st[_DAY]
        new = day != prev  # also a stream's first day (NaN)
        p_day = np.full(len(slots), np.inf)
        shares = None
        ended = (new & ~np.isnan(prev)).nonzero()[0]
        if len(ended):  # once a day per stream: a loop is fine
            shares = np.full((len(slots), self.n_features), 1.0 / self.n_features)
            for j in ended.tolist():
                s = slots[j]
                p = close_day(self.day_sum[s], self.day_count[s], self.weekday_mean[s, weekday(prev[j])],
                              self.day_spread2[s], self.day_judged[s])
                p_day[j], shares[j] = combined(p)
        if new.any():
            fresh = slots[new]
            self.day_sum[fresh] = 0.0
            self.day_count[fresh] = 0.0
        self.day_sum[slots] += np.where(missing, 0.0, vals)
        self.day_count[slots] += ~missing
        st[_DAY] = day
        return p_day, shares

    def _step(self, idx: np.ndarray, slots: np.ndarray, streams: Sequence[str], ts_all: np.ndarray,
              vals_all: np.ndarray, now: float, out: Scored) -> None:
        ts, vals = ts_all[idx], vals_all[idx]
        st = np.take(self.state, slots, axis=1)  # written back at the end, once
        last = st[_LAST_TS]
        allnan = np.logical_and.reduce(np.isnan(vals), axis=1)
        bad = (ts <= last) | (ts > now + self.ecfg.max_future_s) | allnan | ~np.isfinite(ts)
        if bad.any():
            for j in np.flatnonzero(bad).tolist():
                if allnan[j]:
                    reason = "missing_values"
                elif not np.isfinite(ts[j]):
                    reason = "bad_timestamp"
                elif ts[j] == last[j]:
                    reason = "duplicate"
                elif ts[j] < last[j]:
                    reason = "out_of_order"
                else:
                    reason = "future_timestamp"
                out.rejected[int(idx[j])] = reason
            keep = ~bad
            idx, slots, ts, vals, st = idx[keep], slots[keep], ts[keep], vals[keep], st[:, keep]
            if len(idx) == 0:
                return
        x = ((vals - self._mean) / self._scale).astype(np.float32)
        missing = np.isnan(x)
        any_missing = bool(missing.any())
        se, d, y, h, c = observe(self.rt, self.kind, x, self.pred[slots], self.h[slots], self.c[slots],
                                 missing)
        present: np.ndarray | int = self.n_features
        if any_missing:
            se[missing] = 0.0
            present = np.maximum(self.n_features - missing.sum(axis=1), 1)
        # Capped: an infinite reading is as anomalous as it gets, but must not turn the
        # smoothed error into inf - inf = NaN.
        err = np.minimum(np.add.reduce(se, axis=1, dtype=np.float64) / present, 1e300)
        capped = np.minimum(se, 1e30)  # an infinite error still gets a share, not NaN
        total = np.add.reduce(capped, axis=1, keepdims=True)
        shares = np.divide(capped, total, out=np.full_like(se, 1.0 / self.n_features), where=total > 0)

        count = st[_COUNT]
        prev = st[_SMOOTHED]
        sm = np.where(count == 0, err, prev + self.alpha * (err - prev))
        st[_SMOOTHED] = sm
        if self.cfg.method == "likelihood":
            # Rows 0 and 1 of tests, var and excess: the recent average of log-errors and
            # the single log-error, each under its own long-run statistics (one shared mean).
            mean = st[_LT_MEAN]
            tests = st[_RECENT: _LOG_ERROR + 1]
            var, excess = st[_LT_VAR: _LT_VAR1 + 1], st[_LT_EXCESS: _LT_EXCESS1 + 1]
            s = log_error(sm)
            tests[0] += self._alpha_recent * (s - tests[0])
            tests[1] = s
            p = 1.0 - likelihood(tests, mean, var, excess, self._min_stds)
            p_min = np.minimum(p[0], p[1])
            if self._day_test:
                # The reading that ends its stream's day also carries the per-day test:
                # Bonferroni over three tests there, over two elsewhere.
                p_day, day_shares = self._days(slots, ts, vals, missing, st)
                k = np.where(np.isfinite(p_day), 3.0, 2.0)
                score = 1.0 - np.minimum(k * np.minimum(p_min, p_day), 1.0)
                if day_shares is not None:  # the alert names the features whose day departed
                    shares = np.where((p_day < p_min)[:, None], day_shares, shares)
            else:
                score = 1.0 - np.minimum(2.0 * p_min, 1.0)
        else:
            score = self.bundle.calibration.score(sm)
        was = st[_IN_EPISODE] > 0.0
        if self.cfg.spike_readings:
            # Habituation: outside an episode, errors in features that recently spiked
            # (short episodes, see below) must be 1 + their decaying count of spikes times
            # less likely to start another episode: a spike that keeps recurring in the same
            # sensor is no longer news (a Bonferroni correction over that sensor's recent
            # spikes), while a fault in another sensor is judged as before. Sustained
            # episodes do not count, so a drift or a fault never hides the next one.
            # The counts are stored as of reading spike_at and decayed here, so that only
            # the rare spike ends write them.
            decay = (1.0 - self._alpha_history) ** np.maximum(count - st[_SPIKE_AT], 0)
            recurrence = 1.0 + np.add.reduce(shares * self.spike_rate[slots], axis=1) * decay
            score = np.where(was, score, 1.0 - np.minimum((1.0 - score) * recurrence, 1.0))
        warm = count >= self.cfg.settle_readings
        above = (score >= self.cfg.threshold) & warm
        if self.cfg.method == "likelihood":
            # Long-run statistics follow the stream, so a new level stops being anomalous
            # after a while. Readings in the tail count in proportion to how likely they
            # are (one at score 1 - TAIL_FRACTION / 10 counts a tenth), never less than
            # flagged_weight: an excursion barely moves the statistics it is judged by,
            # a lasting new level is learnt at flagged_weight's pace.
            w = np.minimum(np.maximum((1.0 - score) / TAIL_FRACTION, self.cfg.flagged_weight), 1.0)
            a = self._alpha_history * w
            new_mean = mean + a * (tests[0] - mean)
            new_var, new_excess = follow(tests - mean, var, excess, a, self._min_stds)
        # A reading at the threshold is replaced by the forecast in what the state is fed, but only
        # for the first hold_readings of a run: past that the state follows the (clipped)
        # readings again, so a long episode cannot leave the forecasts free-running.
        hold = above & (st[_FLAGGED_RUN] < self.cfg.hold_readings)
        h, c, y_next = advance(self.rt, self.kind, d, y, h, c, hold=hold)
        self.h[slots] = h
        self.c[slots] = c
        self.pred[slots] = y_next
        normal = (score < self.cfg.clear_threshold) | ~warm
        flagged_run = np.where(above, st[_FLAGGED_RUN] + 1.0, 0.0)
        normal_run = np.where(normal, st[_NORMAL_RUN] + 1.0, 0.0)
        starts = ~was & (flagged_run >= self.cfg.min_flagged)
        ends = was & (normal_run >= self.cfg.clear_readings)
        now_in = (was | starts) & ~ends

        # The decision: a reading is flagged when it belongs to an episode, including a run
        # of normal readings inside it while that run is shorter than half the episode
        # before it: a collective anomaly stays flagged while its score wavers, and one
        # spike is not followed by clear_readings of flags.
        age = np.where(now_in, np.where(was, st[_EPISODE_AGE] + 1.0, 1.0), 0.0)
        flag = now_in & (2.0 * normal_run < age - normal_run)
        if self.cfg.report == "onset":
            # Report news only: once an episode has started, the readings after it score at
            # most clear_threshold, so the score peaks once at the onset of each episode
            # (what alerts and NAB-style scoring act on) and stays low while the episode
            # goes on; the episode itself is still judged on the full score.
            score = np.where(was, np.minimum(score, self.cfg.clear_threshold), score)
        if self.cfg.spike_readings:
            # A spike: an episode whose unusual part (onset to its last reading at or above
            # clear_threshold) lasted at most spike_readings readings; it counts for the
            # features that carried its onset, and the counts decay with the span of the
            # long-run statistics.
            if starts.any():
                self.onset_shares[slots[starts]] = shares[starts]
            spike = ends & (st[_EPISODE_AGE] + 1.0 - normal_run <= self.cfg.spike_readings)
            if spike.any():
                at = slots[spike]
                self.spike_rate[at] = self.spike_rate[at] * decay[spike, None] + self.onset_shares[at]
                st[_SPIKE_AT, spike] = count[spike]

        out.error[idx] = err
        out.score[idx] = score
        out.flag[idx] = flag
        out.in_episode[idx] = now_in
        out.shares[idx] = shares
        events = (starts | ends).nonzero()[0]
        if len(events):
            if self.cfg.method == "likelihood":
                # The stream's own threshold: the error level (geometric mean of the recent
                # errors) at which it is flagged, under the statistics it was judged by (the
                # recent-average test at its Bonferroni share of the threshold, habituation
                # included).
                share = (1.0 - self.cfg.threshold) / 2.0
                if self.cfg.spike_readings:
                    share = share / recurrence[events]
                thr = np.exp(likelihood_level(mean[events], var[0, events], excess[0, events],
                                              self._min_std, 1.0 - share))
            else:
                thr = np.full(len(events), self.threshold_error)
            for k, j in enumerate(events.tolist()):
                out.events.append(Event(
                    stream=streams[int(idx[j])], event="anomaly_start" if starts[j] else "anomaly_end",
                    ts=float(ts[j]), score=float(score[j]), error=float(err[j]),
                    threshold=float(thr[k]),
                    features={f: round(float(s), 4) for f, s in zip(self.features, shares[j])},
                    model=self.model_ref, reason="" if starts[j] else "normal"))

        if self.cfg.method == "likelihood":  # after the thresholds above, which use the old ones
            st[_LT_MEAN] = new_mean
            var[:] = new_var
            excess[:] = new_excess
        st[_FLAGGED_RUN] = flagged_run
        st[_EPISODE_AGE] = age
        st[_NORMAL_RUN] = normal_run
        st[_IN_EPISODE] = now_in
        st[_COUNT] += 1.0
        st[_LAST_TS] = ts
        st[_LAST_SEEN] = now
        self.state[:, slots] = st


def snapshot_episode_ends(snap: dict[str, np.ndarray], reason: str) -> list[Event]:
    """The ``anomaly_end`` of every stream in an episode in a :meth:`Engine.snapshot` that
    will not be restored (a checkpoint that no longer fits its model at start): its
    streams start over, and their subscribers' alerts must not stay open for ever."""
    name, version = (str(v) for v in snap["model"].tolist())
    return _left_in_episode([str(s) for s in snap["streams"].tolist()], snap["last_ts"].tolist(),
                            [bool(on) for on in snap["in_episode"].tolist()], {"name": name, "version": version},
                            reason)


def _left_in_episode(streams: Sequence[str | None], last_ts: Sequence[float], in_episode: Sequence[bool],
                     model: dict[str, str], reason: str) -> list[Event]:
    """The ``anomaly_end`` of the streams (None: a free slot) in an episode that end
    because they leave their engine, not because a reading cleared them: no reading to
    judge, so each one's last ``ts`` and no score, error, threshold or features."""
    nan = math.nan
    return [Event(sid, "anomaly_end", float(ts), nan, nan, nan, {}, model, reason)
            for sid, ts, on in zip(streams, last_ts, in_episode) if on and sid is not None]


def _codes(streams: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each reading's stream as a small integer (its index in the distinct streams, in
    order of first appearance), and the distinct streams."""
    distinct = list(dict.fromkeys(streams))
    index = {s: i for i, s in enumerate(distinct)}
    # map over a dict's __getitem__ runs in C: a generator costs twice as much per reading.
    return np.fromiter(map(index.__getitem__, streams), dtype=np.int64, count=len(streams)), distinct


def _rounds(codes: np.ndarray, n_distinct: int) -> list[np.ndarray]:
    """Index sets in which every stream appears at most once, preserving per-stream order:
    round r holds each stream's r-th reading of the batch, in batch order. Vectorised:
    with batched messages a batch holds many readings per stream, and a Python loop over
    them cost more than scoring them."""
    n = len(codes)
    if n_distinct == n:
        return [np.arange(n)]
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    by_rank = np.argsort(rank, kind="stable")
    return np.split(by_rank, np.cumsum(np.bincount(rank))[:-1])
