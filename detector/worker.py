"""The worker: queue → decode → batched stateful step per model → alerts and metrics.

One thread owns every engine, so engines need no locks: messages are taken from the
intake in micro-batches and decoded here, and their readings routed to the engine of
their stream's model (the first ``[[models]]`` entry whose topic filter matches, else
the stream's own learned model, else the learner), scored with one ``Engine.process``
call per model, and the episode events are published. Reloads, learned-model swaps and
checkpoints happen between batches, on this same thread (a periodic checkpoint's files
are written by a helper thread).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import operator
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, repeat
from pathlib import Path

import numpy as np
from paho.mqtt.matcher import MQTTMatcher

from detector import bundle, checkpoint
from detector.alerts import alert_payload, alert_topic
from detector.config import Config, needs_restart
from detector.engine import Engine, Event, snapshot_episode_ends
from detector.intake import Intake, Raw
from detector.metrics import Metrics, observe_many
from detector.payloads import Message, Reading, decode_message
from detector.ratelog import RateLimitedLog
from detector.refit import RefitPlan

log = logging.getLogger("detector.worker")
# Bad input is reported under the MQTT side's name, where it came from.
input_log = logging.getLogger("detector.mqtt")

Publish = Callable[[str, bytes], object]
LEARN = "learn"
# Events of one step logged a line each; the rest of a step's events are summed up in one line.
LOGGED_EVENTS = 20
# Seconds between two full collections of the cyclic collector, at least (see step).
FULL_GC_INTERVAL_S = 60.0
_ORDER = operator.itemgetter(0)
_STREAM, _RECEIVED, _TS, _VALUES, _VALUE = map(operator.attrgetter, ("stream", "received", "ts", "values", "value"))


@dataclass
class Models:
    """What the worker scores with: one engine per configured bundle, one per learned
    stream. Built at start and on reload."""

    routes: list[tuple[str, Engine]] = field(default_factory=list)  # (topic filter, engine)
    learned: dict[str, Engine] = field(default_factory=dict)  # stream id -> its own engine, in memory
    # Learned models of streams gone silent: on disk only (still in learned.json), loaded
    # again when their stream sends, so memory follows the live streams, not all ever seen.
    unloaded: dict[str, Path] = field(default_factory=dict)  # stream id -> its bundle


def load_models(cfg: Config) -> dict[Path, bundle.Bundle]:
    """Every configured bundle, checked; a bad one is an InputError naming it."""
    return {cfg.resolve(r.path): bundle.load(cfg.resolve(r.path)) for r in cfg.models}


def learned_engine_runtime(cfg: Config) -> str:
    """The runtime of learned models' engines. One only ever steps one stream, a batch of
    one, which "auto" serves with numpy anyway: not building ONNX Runtime's session too
    saves memory: a learned stream's bundle and engine take ~120 KiB instead of ~310 (a
    plant-sized model, 300 of them measured in one process)."""
    return "numpy" if cfg.engine.runtime == "auto" else cfg.engine.runtime


def learned_engine(b: bundle.Bundle, cfg: Config) -> Engine:
    """The engine of one stream's learned model."""
    return Engine(b, cfg.score, replace(cfg.engine, runtime=learned_engine_runtime(cfg)))


# Features a stream may have to learn a model from; wider readings need a [[models]] route.
MAX_LEARN_FEATURES = 256


def _shown(name: str) -> str:
    """A topic or stream id for a log line: quoted, and cut (a topic level may be 64 KB)."""
    return repr(name) if len(name) <= 160 else repr(name[:157]) + "..."

@dataclass
class Rows:
    """A group's readings as the engine takes them, with where they came from."""

    streams: list[str]
    ts: np.ndarray        # epoch seconds
    values: np.ndarray    # (n, features) in the model's feature order; absent features NaN
    received: np.ndarray  # time.time() of each reading's message
    mismatch: int = 0     # readings naming a feature the model lacks (or one value for many)
    mismatched: str = ""  # the stream of one of them, for the log


class Worker:
    def __init__(self, cfg: Config, intake: Intake, metrics: Metrics, publish: Publish,
                 learner: object | None = None) -> None:
        self.cfg = cfg
        self.intake = intake
        self.metrics = metrics
        self.publish = publish
        self.learner = learner
        self.models = Models()
        self._route_cache: dict[str, Engine | str | None] = {}
        self._matcher = MQTTMatcher()  # the routes' filters: (config order, engine) by filter
        self._learner_evicted = 0
        self._engine_paths: dict[int, Path] = {}
        self.heartbeat = time.monotonic()
        self._invalid_log = RateLimitedLog(input_log, cfg.log.invalid_interval_s)
        self._carry: deque[Message] = deque()  # decoded readings beyond the last step's max_batch
        self._carried = 0
        self._linger = cfg.worker.linger_ms / 1000.0  # like the network thread's: set at start
        self._next_full_gc = 0.0  # monotonic time from which a full collection may run
        self._next_idle_sweep = 0.0  # time.time() of the next sweep for silent streams (at start: the first loop)
        self._loaded_at: dict[str, float] = {}  # learned stream -> time.time() its model came into memory
        self._stale_bundles: list[Path] = []  # refitted models' old bundles, deleted once learned.json is saved
        self._next_stamp = 0.0  # the earliest receive-time stamp a reading without ts may get
        self._per_msg = 1.0  # readings per message, a running mean: how many messages a step takes
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None  # a checkpoint being written in the background
        self._reload: Config | None = None
        self._next_checkpoint = time.monotonic() + cfg.state.checkpoint_interval_s
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.state_dir = cfg.resolve(cfg.state.dir)
        lc = cfg.learn
        self.refits = RefitPlan(lc.refit_window, lc.refit_interval_s, lc.new_normal_readings,
                                lc.warmup_readings) if learner is not None else None

    # ---- models ------------------------------------------------------------------
    def install(self, cfg: Config, bundles: dict[Path, bundle.Bundle]) -> None:
        """Use ``bundles`` for ``cfg``'s routes, keeping the state of every stream whose
        route (same ``match``, or same bundle) keeps a model of the same shape: a reload or
        a model swap must not make every stream start over."""
        old_routes = self.models.routes
        by_match = {m: e for m, e in old_routes}
        by_path = {self._engine_paths[id(e)]: e for _, e in self.models.routes}
        routes = []
        paths: dict[int, Path] = {}
        kept: set[int] = set()  # previous engines whose states a new one took, by id
        for r in cfg.models:
            path = cfg.resolve(r.path)
            eng = Engine(bundles[path], cfg.score, cfg.engine)
            prev = by_match.get(r.match) or by_path.get(path)
            if prev is not None:
                try:
                    eng.restore(prev.snapshot())
                    kept.add(id(prev))
                except ValueError as err:
                    log.warning("model %s changed shape; its streams start over: %s", path, err)
            paths[id(eng)] = path
            routes.append((r.match, eng))
        learned = self.models.learned
        if (cfg.score, cfg.engine) != (self.cfg.score, self.cfg.engine):
            # Learned engines take the new [score] and [engine] too, each keeping its state
            # (same bundle, same shape); all built before anything is swapped.
            learned = {stream: learned_engine(old.bundle, cfg) for stream, old in learned.items()}
            for stream, eng in learned.items():
                eng.restore(self.models.learned[stream].snapshot())
        self.models.routes = routes
        self.models.learned = learned
        # Built once: topic_matches_sub builds a matcher per call (~5 µs a new stream and
        # filter, against ~3 for a lookup here), and a reconnecting fleet brings thousands.
        self._matcher = MQTTMatcher()
        for k, (pattern, eng) in enumerate(routes):
            try:
                self._matcher[pattern]
            except KeyError:  # a filter repeated: its first route is the one that matches
                self._matcher[pattern] = (k, eng)
        self._engine_paths = paths
        self.cfg = cfg
        self._route_cache.clear()
        self.metrics.model_info.clear()
        for _, eng in self.models.routes:
            self.metrics.model_info.labels(model=eng.bundle.name, version=eng.bundle.version,
                                           runtime=eng.rt.name).set(1)
        self._learned_info()
        # A route removed, or its model now of another shape: the old engine's streams start
        # over, so their open alerts end here. Published once the new models are in (a
        # failure above keeps the old ones, and their episodes go on).
        for _, prev in old_routes:
            if id(prev) not in kept:
                kept.add(id(prev))  # one engine may serve several routes: published once
                self._publish(prev, prev.episode_ends("model_changed"))
        # A route that now matches a stream with a learned model takes it over: the learned
        # model's state of it goes (its open episode ends now, not as "idle" a day later,
        # while the route scores the stream), and the model, left without a stream, is
        # unloaded at the next sweep.
        for stream, eng in self.models.learned.items():
            if eng.n_streams and any(True for _ in self._matcher.iter_match(stream)):
                self._publish(eng, eng.drop([stream], "model_changed"))

    def _learned_info(self) -> None:
        """Learned models are one per stream: one ``model_info`` series for all of them
        (no per-stream labels), and the number in memory in ``learned_models``."""
        n = len(self.models.learned)
        self.metrics.learned_models.set(n)
        rt = learned_engine_runtime(self.cfg)
        if n:
            self.metrics.model_info.labels(model="learned", version="per-stream", runtime=rt).set(1)
        else:  # all unloaded: none is loaded, as the series says
            try:
                self.metrics.model_info.remove("learned", "per-stream", rt)
            except KeyError:
                pass

    def _engines(self) -> list[Engine]:
        return [e for _, e in self.models.routes] + list(self.models.learned.values())

    def _route(self, stream: str) -> Engine | str | None:
        hit = self._route_cache.get(stream)
        if hit is not None or stream in self._route_cache:
            return hit
        # The routes in config order first (the contract: first match wins, streams matching
        # none learn), so a route added for a stream that had learned a model takes it over.
        first = min(self._matcher.iter_match(stream), key=_ORDER, default=None)
        target: Engine | str | None = first[1] if first is not None else self.models.learned.get(stream)
        if target is None and stream in self.models.unloaded:  # back after a silence: from disk, not learned again
            target = self._load_learned(stream)
            if target is not None:
                self._loaded_at[stream] = time.time()
                self._learned_info()
                log.info("loaded the learned model of %s again: %s", stream, target.bundle.path)
        if target is None and self.learner is not None and self.cfg.learn.enabled:
            target = LEARN
        if len(self._route_cache) >= self.cfg.engine.max_streams:
            self._route_cache.clear()  # bounded like the stream state: a flood of ids must not grow it
        self._route_cache[stream] = target
        return target

    # ---- the loop ----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> bool:
        """Finish what is queued (the intake is closed first), then stop; True if it did
        within ``timeout``."""
        self._stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def request_reload(self, cfg: Config) -> None:
        self._reload = cfg

    def alive(self) -> bool:
        return self.thread.is_alive() and time.monotonic() - self.heartbeat < 30.0

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            wait = self.cfg.worker.max_wait_ms / 1000.0  # self.cfg: a reload may change it
            msgs = self.step(wait if not self._stop.is_set() else 0.0)
            if not msgs and self._stop.is_set():
                break
            try:
                self._between_batches()
            except Exception:  # a fit that cannot start, a reload gone wrong: keep scoring
                log.exception("error between batches (reload, learning or checkpoint); scoring goes on")
        self.checkpoint()

    def step(self, wait: float) -> list[Message]:
        """Take, decode and score one step's messages, waiting up to ``wait`` seconds when
        there are none; returns them."""
        # A step builds a few objects per reading (decoded JSON, rows) that all live until
        # it ends: with the cyclic collector on, they survived its young passes and were
        # scanned again and again by the older ones (a fifth of a batched step's time,
        # bench/RESULTS.md). Paused for the step, it runs once after it, over what is
        # left: nearly nothing, since reference counting has freed the step's objects.
        collecting = gc.isenabled()
        gc.disable()
        try:
            msgs = self._take(wait)
            if msgs:
                try:
                    self.process(msgs)
                except Exception:  # one bad batch must not end scoring for good
                    n = sum(map(len, msgs))
                    log.exception("error scoring a batch of %d readings", n)
                    self.metrics.dropped.labels(reason="internal_error").inc(n)
        finally:
            if collecting:
                gc.enable()
                if _collect_due(full=time.monotonic() >= self._next_full_gc) == 2:
                    self._next_full_gc = time.monotonic() + FULL_GC_INTERVAL_S
        return msgs

    def _between_batches(self) -> None:
        if self._reload is not None:
            cfg, self._reload = self._reload, None
            try:
                old = self.cfg
                self.install(cfg, load_models(cfg))
                log.info("reloaded: %d model route(s)", len(cfg.models))
                restart = needs_restart(old, cfg)
                if restart:
                    log.warning("reload: changed, but applied only at a restart: %s", ", ".join(restart))
            except Exception as err:  # keep the models we have
                log.error("reload failed, keeping the current models: %s", err)
                self.metrics.reload_failures.inc()
        if self.learner is not None:
            self._collect_learned()
            self._start_refits()
        if time.time() >= self._next_idle_sweep:
            self._sweep_idle()
        if time.monotonic() >= self._next_checkpoint:
            self.checkpoint(background=True)
            self._next_checkpoint = time.monotonic() + self.cfg.state.checkpoint_interval_s

    # ---- decoding ----------------------------------------------------------------
    def _take(self, wait: float) -> list[Message]:
        """The next step's messages, decoded, holding at most ``[worker] max_batch``
        readings: what the last step left over first, then as many messages from the
        intake as the step has room for (the last one split if need be). Waits up to
        ``wait`` seconds when there is nothing."""
        limit = self.cfg.worker.max_batch
        out: list[Message] = []
        n = taken = 0
        carry = self._carry
        while carry and n < limit:
            out.append(carry.popleft())
            n += len(out[-1].ts)
        linger = self._linger if not out else 0.0  # readings carried over: a backlog
        while n < limit and taken < limit:  # taken: a flood of bad payloads still ends the step
            raws = self.intake.take(max(1, int((limit - n) / self._per_msg)), 0.0 if out or taken else wait)
            if not raws:
                break
            if linger:
                # A step costs ~0.5 ms however few readings it holds: at a low rate, scoring
                # each message as it comes kept the worker busy with one-reading steps
                # (~0.8 cores at 1,000 readings/s). Waiting until the first message is
                # linger old lets a step take what came meanwhile; a message that waited
                # that long already (a backlog) adds no wait.
                # At most linger: received is wall-clock time, and a clock stepped back
                # must not hold the worker for the size of the step.
                delay = min(raws[0].received + linger - time.time(), linger)
                linger = 0.0
                if delay > 0:
                    time.sleep(delay)
            taken += len(raws)
            got = 0
            for raw in raws:
                msg = self._decode(raw)
                if msg is not None:
                    out.append(msg)
                    got += len(msg.ts)  # not len(msg): a Python-level __len__ per message
            n += got
            self._per_msg += 0.2 * (max(got / len(raws), 1.0) - self._per_msg)
        extra = n - limit
        while extra > 0:  # back to the carry, newest first, so that it keeps their order
            last = out[-1]
            k = len(last.ts)
            if k <= extra:
                carry.appendleft(out.pop())
                extra -= k
            else:
                carry.appendleft(last.split(k - extra))
                extra = 0
        self._carried = sum(map(len, carry))
        return out

    def _decode(self, raw: Raw) -> Message | None:
        # A reading without ts takes the receive time, a batch's items 1 µs apart. Those
        # stamps never go back here: the next message's start after the positions this
        # one could have used, so two batches received within their length of each other,
        # or a wall clock stepped back, do not make a stream's later readings look out of
        # order and be refused. Under any real rate the receive time is far ahead anyway.
        stamp = max(raw.received, self._next_stamp)
        msg, rejected = decode_message(raw.stream, raw.payload, stamp, self.cfg.mqtt.max_payload_bytes)
        if msg is not None:
            self._next_stamp = stamp + (len(msg.ts) + len(rejected)) * 1e-6
            msg.received = raw.received  # the latency metrics' start: when it really came
        for r in rejected:
            self.metrics.invalid.labels(reason=r.reason).inc(r.count)
            self._invalid_log.warning(r.reason, f"invalid reading on {_shown(raw.topic)}: {r.reason}: {r.detail}")
        return msg

    def waiting(self) -> float:
        """Readings waiting to be scored (``queue_depth``): the decoded ones left over from
        the last step, and the intake's messages at the recent readings per message."""
        return self._carried + len(self.intake) * self._per_msg

    # ---- scoring -----------------------------------------------------------------
    # Everything here runs once per reading at up to tens of thousands of readings a
    # second, on the thread that shares the GIL with paho's: per-reading work is kept to
    # plain list operations, and metrics are updated once per batch.
    def process(self, msgs: list[Message]) -> None:
        groups: dict[int, tuple[Engine, list[Message]]] = {}
        cache = self._route_cache
        learning = no_model = 0
        for msg in msgs:
            stream = msg.stream
            target = cache[stream] if stream in cache else self._route(stream)
            if target.__class__ is Engine:
                key = id(target)
                group = groups.get(key)
                if group is None:
                    groups[key] = group = (target, [])  # type: ignore[assignment]
                group[1].append(msg)
            elif target == LEARN:
                taken = sum(map(self._learn, msg.readings()))
                learning += taken  # collected for a fit, not scored
                no_model += len(msg) - taken
            else:
                no_model += len(msg)
        if learning:
            self.metrics.dropped.labels(reason="learning").inc(learning)
            evicted = self.learner.stats["evicted_capacity"]  # type: ignore[union-attr]
            if evicted > self._learner_evicted:  # collecting streams made room for new ones
                self.metrics.evicted.labels(reason="max_streams").inc(evicted - self._learner_evicted)
                self._learner_evicted = evicted
        if no_model:
            self.metrics.dropped.labels(reason="no_model").inc(no_model)
        now = time.time()
        for eng, group in groups.values():
            try:
                self._score(eng, group, now)
            except Exception:  # one model's failure costs its readings, not the others' in the step
                n = sum(map(len, group))
                log.exception("error scoring %d reading(s) with model %s", n, eng.bundle.name)
                self.metrics.dropped.labels(reason="internal_error").inc(n)
        self.metrics.streams.set(sum(e.n_streams for e in self._engines()))

    @staticmethod
    def _rows(eng: Engine, group: list[Message]) -> Rows:
        """The group's readings in the model's feature order (absent features NaN: the
        engine scores on the others); readings that name a feature the model lacks, or
        give one value to a multi-feature model, are counted in ``mismatch`` and left out."""
        feats = eng.features
        n_feat = len(feats)
        # Column by column across the group's messages, with map and attrgetter (C), not a
        # Python loop: with single-reading messages a group is thousands of messages.
        ts_cols = list(map(_TS, group))
        sizes = list(map(len, ts_cols))
        n = sum(sizes)
        value_cols = list(map(_VALUE, group))
        # Nearly always every reading of a group names every feature (or all are single
        # values for a one-feature model): judged and picked for the whole group by map,
        # itemgetter and fromiter; otherwise reading by reading. A dict with n_feat keys
        # that yields every feature has exactly the model's features.
        try:
            if value_cols.count(None) == len(group):  # every reading is a dict of values
                values = list(chain.from_iterable(map(_VALUES, group)))
                if not all(map(n_feat.__eq__, map(len, values))):
                    raise KeyError
                pick = operator.itemgetter(*feats) if n_feat > 1 else (lambda v: (v[feats[0]],))
                flat: Iterable[float] = chain.from_iterable(map(pick, values))
            elif n_feat == 1 and list(map(_VALUES, group)).count(None) == len(group):  # all numbers
                flat = chain.from_iterable(value_cols)  # type: ignore[arg-type]
            else:
                raise KeyError
            matrix = np.fromiter(flat, dtype=np.float64, count=n * n_feat).reshape(n, n_feat)
        except (KeyError, TypeError):  # a feature missing or unknown; single values among dicts
            return Worker._rows_one_by_one(eng, group)
        streams = list(map(_STREAM, group))
        if n != len(group):
            streams = list(chain.from_iterable(map(repeat, streams, sizes)))
        return Rows(streams, np.fromiter(chain.from_iterable(ts_cols), dtype=np.float64, count=n), matrix,
                    np.repeat(np.fromiter(map(_RECEIVED, group), dtype=np.float64, count=len(group)), sizes))

    @staticmethod
    def _rows_one_by_one(eng: Engine, group: list[Message]) -> Rows:
        """``_rows`` for a group that mixes forms or feature sets."""
        feats, every = eng.features, eng.feature_index.keys()
        n_feat = len(feats)
        nan = math.nan
        rows: list[Sequence[float]] = []
        streams: list[str] = []
        ts: list[float] = []
        received: list[float] = []
        mismatch, mismatched = 0, ""
        for msg in group:
            for r in msg.readings():
                values = r.values
                if values is None:
                    if n_feat != 1:
                        mismatch, mismatched = mismatch + 1, r.stream
                        continue
                    row: Sequence[float] = (r.value,)  # type: ignore[assignment]
                elif values.keys() <= every:
                    row = [values.get(f, nan) for f in feats]
                else:
                    mismatch, mismatched = mismatch + 1, r.stream
                    continue
                rows.append(row)
                streams.append(r.stream)
                ts.append(r.ts)
                received.append(msg.received)
        return Rows(streams, np.array(ts, dtype=np.float64), np.array(rows, dtype=np.float64).reshape(-1, n_feat),
                    np.array(received, dtype=np.float64), mismatch, mismatched)

    def _score(self, eng: Engine, group: list[Message], now: float) -> None:
        got = self._rows(eng, group)
        m = self.metrics
        if got.mismatch:
            m.invalid.labels(reason="feature_mismatch").inc(got.mismatch)
            self._invalid_log.warning("feature_mismatch", f"invalid reading(s) on {_shown(got.mismatched)}: "
                                      f"feature_mismatch: {got.mismatch} whose features are not model "
                                      f"{eng.bundle.name}'s {eng.features}")
        n = len(got.streams)
        if not n:
            return
        streams, ts, values = got.streams, got.ts, got.values
        evicted_before = dict(eng.evicted)
        res = eng.process(streams, ts, values, now=now)
        rejected: dict[str, int] = {}
        example: dict[str, int] = {}
        for i, reason in res.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + 1
            example.setdefault(reason, i)
        for reason, k in rejected.items():
            m.invalid.labels(reason=reason).inc(k)
            self._invalid_log.warning(reason, f"invalid reading(s) on {_shown(streams[example[reason]])}: "
                                      f"{reason}: {k} in this batch (ts {ts[example[reason]]!r})")
        for reason, k in eng.evicted.items():
            if k > evicted_before.get(reason, 0):
                m.evicted.labels(reason=reason).inc(k - evicted_before.get(reason, 0))
        m.readings.inc(res.scored)
        flagged = int(res.flag.sum())
        if flagged:
            m.anomalous.inc(flagged)
        m.batch_size.observe(n)
        scored = np.ones(n, dtype=bool)
        scored[list(res.rejected)] = False
        observe_many(m.processing, time.time() - got.received[scored])
        if self.refits is not None and self.refits.enabled and self.models.learned.get(streams[0]) is eng:
            self.refits.observe(streams[0], ts[scored], values[scored], res.in_episode[scored])
        self._publish(eng, res.events)

    def _publish(self, eng: Engine, events: list[Event]) -> None:
        """Publish ``eng``'s episode events as alerts, counted in ``alerts_total`` and
        logged."""
        m = self.metrics
        for k, ev in enumerate(events):
            # None: refused, the outgoing queue is full (counted in dropped_alerts_total).
            if self.publish(alert_topic(self.cfg.alerts.topic_prefix, ev.stream),
                            alert_payload(ev, eng.rt.name)) is not None:
                m.alerts.labels(event=ev.event).inc()
            if k < LOGGED_EVENTS:
                if ev.reason in ("", "normal"):
                    log.info("%s %s score %.4f (model %s)", ev.event, ev.stream, ev.score, ev.model["name"])
                else:  # no reading ended it: the stream left the engine in the episode
                    why = "its model changed" if ev.reason == "model_changed" else "evicted"
                    log.info("%s %s: %s in an episode (%s; model %s)", ev.event, ev.stream, why, ev.reason,
                             ev.model["name"])
        if len(events) > LOGGED_EVENTS:
            # A fault every stream sees (a shared supply, a network outage) alerts on all of
            # them in one step: one line for the rest, not a line each (30 µs apiece).
            rest = Counter(ev.event for ev in events[LOGGED_EVENTS:])
            log.info("and %s in the same batch (model %s; each one is on its alert topic)",
                     ", ".join(f"{count} more {e}" for e, count in sorted(rest.items())), eng.model_ref["name"])

    def _sweep_idle(self) -> None:
        """Evict streams silent for ``[engine] idle_timeout_s`` from every engine, as an
        engine does itself only when it scores: one that gets no reading any more (a
        learned model's, whose one stream went silent) would otherwise keep them, and
        their open episodes, for ever. Then unload the learned models left with no stream."""
        now = time.time()
        timeout = self.cfg.engine.idle_timeout_s
        self._next_idle_sweep = now + timeout / 10.0  # the engines' own pace
        for eng in self._engines():
            evicted = eng.evict_idle(now)
            if evicted:
                self.metrics.evicted.labels(reason="idle").inc(evicted)
                self._publish(eng, eng.pop_ended())
        # Not used for idle_timeout_s: a model just learned or loaded again has no stream
        # until its stream's next reading is scored. Models restored at start without a
        # stream state count as unused since before the start.
        idle = [s for s, e in self.models.learned.items()
                if not e.n_streams and self._loaded_at.get(s, -math.inf) < now - timeout]
        if idle:
            self._unload_learned(idle)
        self.metrics.streams.set(sum(e.n_streams for e in self._engines()))

    def _unload_learned(self, streams: list[str]) -> None:
        """Drop these streams' learned models from memory, keeping them on disk and in
        ``learned.json``; a stream's next reading loads its model again."""
        self.wait_checkpoint()  # a checkpoint being written must not bring a state file back
        for stream in streams:
            eng = self.models.learned.pop(stream)
            self.models.unloaded[stream] = eng.bundle.path
            self._loaded_at.pop(stream, None)
            self._route_cache.pop(stream, None)
            if self.refits is not None:
                self.refits.forget(stream)  # its window of normal readings goes too (up to refit_window)
            try:
                # No stream state left: a restart must not restore the one from before the silence.
                (eng.bundle.path / "streams.npz").unlink(missing_ok=True)
            except OSError as err:
                log.warning("removing the state file of %s's unloaded model failed: %s", stream, err)
        self._learned_info()
        log.info("unloaded %d learned model(s) whose streams were silent for %.0f s (kept on disk, loaded "
                 "again when they send): %s", len(streams), self.cfg.engine.idle_timeout_s,
                 ", ".join(streams[:LOGGED_EVENTS]) + (", ..." if len(streams) > LOGGED_EVENTS else ""))

    # ---- learn-from-stream -------------------------------------------------------
    def _learn(self, r: Reading) -> bool:
        """Hand ``r`` to the learner; False when no model will be learned from it."""
        if r.value is not None:
            features, values = ["value"], np.array([r.value])
        else:
            if len(r.values) > MAX_LEARN_FEATURES:  # type: ignore[arg-type]
                # A buffer and a fit sized by whatever a writer sends: 6,000 keys made an id
                # cost ~1 MB at its first reading (docs/security.md promises ~1.2 KB).
                self._invalid_log.warning("learn_features", f"not learning {_shown(r.stream)}: {len(r.values)} "  # type: ignore[arg-type]
                                          f"features, at most {MAX_LEARN_FEATURES} are learned from a stream "
                                          f"(give it a [[models]] route)")
                return False
            features = sorted(r.values)  # type: ignore[arg-type]
            values = np.array([r.values[f] for f in features])  # type: ignore[index]
        self.learner.add(r.stream, r.ts, values, features)  # type: ignore[union-attr]
        return True

    def _collect_learned(self) -> None:
        """Swap in finished fits. A failed fit (raised, died, timed out) leaves its stream
        collecting, unscored, with the learner's retry scheduled; every result is counted
        in ``learn_fits_total{result}``. Nothing here may end the worker thread."""
        try:
            results = self.learner.poll()  # type: ignore[union-attr]
        except Exception:  # e.g. no process could be spawned: the learner retries next loop
            log.exception("learn-from-stream: polling the fits failed")
            return
        for res in results:
            if res.bundle_path is None:
                self.metrics.learn_fits.labels(result=res.result).inc()
                log.warning("learning a model for %s failed (%s; retried in %.0f s): %s", res.stream,
                            res.result, self.cfg.learn.retry_after_s, res.error)
                continue
            try:
                eng = learned_engine(bundle.load(res.bundle_path), self.cfg)
            except Exception as err:  # the stream collects again and fits anew
                self.metrics.learn_fits.labels(result="failed").inc()
                log.warning("learned model for %s unusable: %s", res.stream, err)
                continue
            self.metrics.learn_fits.labels(result="ok").inc()
            prev = self.models.learned.get(res.stream)
            if prev is not None:
                self._swap_refit(res.stream, prev, eng)
            # A refit started before its stream went silent may end after its model was unloaded.
            prev_path = prev.bundle.path if prev is not None else self.models.unloaded.pop(res.stream, None)
            self.models.learned[res.stream] = eng
            self._loaded_at[res.stream] = time.time()
            self._route_cache.pop(res.stream, None)
            self._learned_info()
            if prev_path is not None and prev_path != eng.bundle.path:  # one bundle per stream on disk
                # Deleted once learned.json no longer names it: until then (disk full) a
                # crash would restore the stream from it.
                self._stale_bundles.append(prev_path)
            self._save_learned_index()
            if self.refits is not None:
                self.refits.start(res.stream, eng.n_features, time.time())
            if prev_path is not None:
                self.metrics.refits.inc()
                log.info("refitted the model of %s in %.0f s: %s", res.stream, res.seconds, res.bundle_path)
            else:
                log.info("learned a model for %s in %.0f s: %s", res.stream, res.seconds, res.bundle_path)

    def _swap_refit(self, stream: str, prev: Engine, eng: Engine) -> None:
        """A refit replaces a model the stream is already scored with: the stream keeps
        its state (LSTM state, score statistics, episode), written at once next to the new
        bundle so a crash right after the swap restores it from there."""
        try:
            eng.restore(prev.snapshot())
        except ValueError as err:
            log.warning("refitted model of %s changed shape; the stream starts over: %s", stream, err)
            self._publish(prev, prev.episode_ends("model_changed"))  # its open alert ends with its state
        try:
            checkpoint.save(eng.bundle.path / "streams.npz", eng.snapshot())
        except OSError as err:
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint of %s after its refit failed (scoring goes on): %s", stream, err)

    def _save_learned_index(self) -> bool:
        """Write ``learned.json`` atomically when it changed; a failure (disk full) is
        logged and counted as a checkpoint failure, and the next checkpoint tries again."""
        paths = {s: e.bundle.path for s, e in self.models.learned.items()} | self.models.unloaded
        # Sorted: a model moving in or out of memory does not change the file.
        data = json.dumps({s: self._relative(paths[s]) for s in sorted(paths)}, indent=1).encode()
        path = self.state_dir / "learned.json"
        try:
            if not (path.is_file() and path.read_bytes() == data):
                checkpoint.write_atomic(path, data)
        except OSError as err:
            self.metrics.checkpoint_failures.inc()
            log.error("saving %s failed (learned models stay in use): %s", path, err)
            return False
        if self._stale_bundles:  # refitted models' old bundles, no longer named by it
            self.wait_checkpoint()  # a background write must not recreate a folder
            for old in self._stale_bundles:
                shutil.rmtree(old, ignore_errors=True)
            self._stale_bundles.clear()
        return True

    def _relative(self, path: Path) -> str:
        """A learned bundle's path as ``learned.json`` keeps it: relative to the state
        directory (they live in its ``models/``), so the directory can be moved whole."""
        try:
            return Path(path).resolve().relative_to(self.state_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def restore_learned(self) -> int:
        path = self.state_dir / "learned.json"
        if not path.exists():
            return 0
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            problem = "" if isinstance(index, dict) else \
                f"not a JSON object (stream id -> bundle folder) but {type(index).__name__}"
        except (OSError, ValueError) as err:
            problem = str(err)
        if problem:
            # Moved aside, not overwritten by the next save: it names the bundles (still in
            # models/) that an operator may want back; their streams learn again meanwhile.
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            log.error("unreadable %s (kept as %s; its streams learn again): %s", path, aside.name, problem)
            return 0
        for stream, bpath in index.items():
            if not isinstance(bpath, str) or not bpath:
                log.error("%s: entry %r is not a bundle folder (%r); that stream learns again",
                          path.name, stream, bpath)
                continue
            # Relative paths are the state directory's; absolute ones (older files) as written.
            self.models.unloaded[stream] = self.state_dir / bpath
            self._load_learned(stream)
        self._learned_info()
        return len(self.models.learned)

    def _load_learned(self, stream: str) -> Engine | None:
        """Bring ``stream``'s learned model from disk into memory (at start, or when its
        stream sends after its model was unloaded); a bundle that no longer loads is
        forgotten, and the stream learns a model again."""
        path = self.models.unloaded.pop(stream)
        try:
            eng = learned_engine(bundle.load(path), self.cfg)
        except Exception as err:
            log.warning("learned model for %s not loaded (the stream learns again): %s", stream, err)
            return None
        self.models.learned[stream] = eng
        if self.refits is not None:
            self.refits.start(stream, eng.n_features, time.time())
        return eng

    def _start_refits(self) -> None:
        """Hand every learned stream whose refit is due, with its window of normal
        readings, to the learner; the result comes back through ``_collect_learned``."""
        if self.refits is None or not self.refits.enabled or not self.cfg.learn.enabled:
            return
        for stream, times, values in self.refits.due(time.time()):
            eng = self.models.learned.get(stream)
            if eng is not None and self._route(stream) is not eng:
                continue  # a route has taken the stream over: its learned model is idle
            if eng is not None and self.learner.refit(stream, times, values, list(eng.features)):  # type: ignore[union-attr]
                log.info("refitting the model of %s on its last %d normal readings", stream, len(times))

    # ---- checkpoints -------------------------------------------------------------
    def _checkpoint_path(self, name: str, index: int) -> Path:
        """Route ``index``'s state file, named after its bundle folder; the name is cut
        before the index, never the index itself, so two routes with long bundle names
        never share a file (and names below 73 characters are as they always were)."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        return self.state_dir / "checkpoints" / f"{('route-' + safe)[:80 - len(f'-{index}')]}-{index}.npz"

    def _checkpoint_items(self) -> list[tuple[Path, Engine]]:
        items = [(self._checkpoint_path(self._engine_paths[id(e)].name, i), e)
                 for i, (_, e) in enumerate(self.models.routes)]
        items += [(e.bundle.path / "streams.npz", e) for e in self.models.learned.values()]
        return items

    def checkpoint(self, background: bool = False) -> bool:
        """Write every engine's state; True when all of it was written. A file that cannot
        be written (disk full, read-only or unwritable folder) keeps its previous version,
        counts in ``checkpoint_failures_total`` and makes one ERROR line per round; scoring
        goes on and the next round tries again.

        The states are copied here, between two steps, so they are consistent. With
        ``background`` a helper thread writes them (``np.savez``, ``fsync`` per file: tens of
        milliseconds for a few thousand streams, far more with many learned streams),
        so that scoring does not stall; then True means the round was started, and a
        round that finds the previous one still writing is skipped."""
        if background and self._writer is not None and self._writer.is_alive():
            return False
        self.wait_checkpoint()
        snaps = [(path, eng.snapshot()) for path, eng in self._checkpoint_items()]
        index_ok = not (self.models.learned or self.models.unloaded) or self._save_learned_index()
        if background:
            self._writer = threading.Thread(target=self._write_checkpoint, args=(snaps,), name="checkpoint",
                                            daemon=True)
            self._writer.start()
            return index_ok
        return self._write_checkpoint(snaps) and index_ok

    def _write_checkpoint(self, snaps: list[tuple[Path, dict[str, np.ndarray]]]) -> bool:
        failed: list[tuple[Path, OSError]] = []
        for path, snap in snaps:
            try:
                checkpoint.save(path, snap)
            except OSError as err:
                failed.append((path, err))
                self.metrics.checkpoint_failures.inc()
        if failed:
            log.error("checkpoint failed for %d of %d file(s), keeping their previous versions "
                      "(scoring goes on): %s: %s", len(failed), len(snaps), *failed[0])
        return not failed

    def wait_checkpoint(self) -> None:
        """Until a checkpoint being written in the background is done."""
        if self._writer is not None:
            self._writer.join()

    def restore(self) -> int:
        restored = 0
        for path, eng in self._checkpoint_items():
            snap, problem = checkpoint.load(path)
            if problem:
                log.error("%s; starting those streams fresh", problem)
            if snap is None:
                continue
            try:
                restored += eng.restore(snap)
            except (ValueError, KeyError) as err:
                log.error("checkpoint %s does not fit its model; starting fresh: %s", path, err)
                try:  # the model changed while the daemon was stopped: open episodes end
                    ends = snapshot_episode_ends(snap, "model_changed")
                except (KeyError, ValueError):  # not even that much of it is readable
                    ends = []
                self._publish(eng, ends)  # queued by the MQTT client until it connects
        self.metrics.streams.set(sum(e.n_streams for e in self._engines()))  # scraped before any reading
        return restored


def _collect_due(full: bool) -> int | None:
    """The collection the cyclic collector's thresholds call for, if any, now; returns
    its generation. It would otherwise wait for an allocation while the collector is
    enabled, which the step loop may never make, and a cycle that reached the oldest
    generation would never be freed. A full collection only when ``full``: the caller
    spaces them out, as the collector's own rule does by skipping them while few
    long-lived objects are new (which Python does not expose)."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    for generation in ((2, 1, 0) if full else (1, 0)):
        if thresholds[generation] and counts[generation] > thresholds[generation]:
            gc.collect(generation)
            return generation
    return None
