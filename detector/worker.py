"""The worker: queue → batched stateful step per model → alerts and metrics.

One thread owns every engine, so engines need no locks: readings are taken from the
intake in micro-batches, routed to the engine of their stream's model (the first
``[[models]]`` entry whose topic filter matches, else the stream's own learned model,
else the learner), scored with one ``Engine.process`` call per model, and the episode
events are published. Reloads, learned-model swaps and checkpoints happen between
batches, on this same thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from paho.mqtt.client import topic_matches_sub

from detector import bundle, checkpoint
from detector.alerts import alert_payload, alert_topic
from detector.config import Config
from detector.engine import Engine
from detector.intake import Intake, Item
from detector.metrics import Metrics

log = logging.getLogger("detector.worker")

Publish = Callable[[str, bytes], object]
LEARN = "learn"


@dataclass
class Models:
    """What the worker scores with: one engine per configured bundle, one per learned
    stream. Built at start and on reload."""

    routes: list[tuple[str, Engine]] = field(default_factory=list)  # (topic filter, engine)
    learned: dict[str, Engine] = field(default_factory=dict)  # stream id -> its own engine


def load_models(cfg: Config) -> dict[Path, bundle.Bundle]:
    """Every configured bundle, checked; a bad one is an InputError naming it."""
    return {cfg.resolve(r.path): bundle.load(cfg.resolve(r.path)) for r in cfg.models}


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
        self._engine_paths: dict[int, Path] = {}
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._reload: Config | None = None
        self._next_checkpoint = time.monotonic() + cfg.state.checkpoint_interval_s
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.state_dir = cfg.resolve(cfg.state.dir)

    # ---- models ------------------------------------------------------------------
    def install(self, cfg: Config, bundles: dict[Path, bundle.Bundle]) -> None:
        """Use ``bundles`` for ``cfg``'s routes, keeping the state of every stream whose
        route (same ``match``, or same bundle) keeps a model of the same shape: a reload or
        a model swap must not make every stream start over."""
        by_match = {m: e for m, e in self.models.routes}
        by_path = {self._engine_paths[id(e)]: e for _, e in self.models.routes}
        routes = []
        paths: dict[int, Path] = {}
        for r in cfg.models:
            path = cfg.resolve(r.path)
            eng = Engine(bundles[path], cfg.score, cfg.engine)
            prev = by_match.get(r.match) or by_path.get(path)
            if prev is not None:
                try:
                    eng.restore(prev.snapshot())
                except ValueError as err:
                    log.warning("model %s changed shape; its streams start over: %s", path, err)
            paths[id(eng)] = path
            routes.append((r.match, eng))
        self.models.routes = routes
        self._engine_paths = paths
        self.cfg = cfg
        self._route_cache.clear()
        self.metrics.model_info.clear()
        for _, eng in self.models.routes:
            self.metrics.model_info.labels(model=eng.bundle.name, version=eng.bundle.version,
                                           runtime=eng.rt.name).set(1)
        self._learned_info()

    def _learned_info(self) -> None:
        """Learned models are one per stream: one ``model_info`` series for all of them
        (no per-stream labels), and their number in ``learned_models``."""
        n = len(self.models.learned)
        self.metrics.learned_models.set(n)
        if n:
            rt = next(iter(self.models.learned.values())).rt.name
            self.metrics.model_info.labels(model="learned", version="per-stream", runtime=rt).set(1)

    def _engines(self) -> list[Engine]:
        return [e for _, e in self.models.routes] + list(self.models.learned.values())

    def _route(self, stream: str) -> Engine | str | None:
        hit = self._route_cache.get(stream)
        if hit is not None or stream in self._route_cache:
            return hit
        target: Engine | str | None = self.models.learned.get(stream)
        if target is None:
            target = next((e for pattern, e in self.models.routes if topic_matches_sub(pattern, stream)), None)
        if target is None and self.learner is not None and self.cfg.learn.enabled:
            target = LEARN
        if len(self._route_cache) > 4 * self.cfg.engine.max_streams:
            self._route_cache.clear()  # bounded: a flood of ids must not grow it forever
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
        wait = self.cfg.worker.max_wait_ms / 1000.0
        while True:
            self.heartbeat = time.monotonic()
            items = self.intake.take(self.cfg.worker.max_batch, wait if not self._stop.is_set() else 0.0)
            if items:
                try:
                    self.process(items)
                except Exception:  # one bad batch must not end scoring for good
                    log.exception("error scoring a batch of %d readings", len(items))
                    self.metrics.dropped.labels(reason="internal_error").inc(len(items))
            elif self._stop.is_set():
                break
            self._between_batches()
        self.checkpoint()

    def _between_batches(self) -> None:
        if self._reload is not None:
            cfg, self._reload = self._reload, None
            try:
                self.install(cfg, load_models(cfg))
                log.info("reloaded: %d model route(s)", len(cfg.models))
            except Exception as err:  # keep the models we have
                log.error("reload failed, keeping the current models: %s", err)
                self.metrics.reload_failures.inc()
        if self.learner is not None:
            self._collect_learned()
        if time.monotonic() >= self._next_checkpoint:
            self.checkpoint()
            self._next_checkpoint = time.monotonic() + self.cfg.state.checkpoint_interval_s

    # ---- scoring -----------------------------------------------------------------
    def process(self, items: list[Item]) -> None:
        groups: dict[int, tuple[Engine, list[Item]]] = {}
        for it in items:
            target = self._route(it.reading.stream)
            if isinstance(target, Engine):
                groups.setdefault(id(target), (target, []))[1].append(it)
            elif target == LEARN:
                self._learn(it)
                self.metrics.dropped.labels(reason="learning").inc()  # collected, not scored
            else:
                self.metrics.dropped.labels(reason="no_model").inc()
        now = time.time()
        for eng, group in groups.values():
            self._score(eng, group, now)
        self.metrics.streams.set(sum(e.n_streams for e in self._engines()))

    def _values(self, eng: Engine, it: Item) -> np.ndarray | None:
        r = it.reading
        if r.value is not None:
            return np.array([r.value]) if eng.n_features == 1 else None
        row = np.full(eng.n_features, np.nan)
        idx = eng.feature_index
        for name, v in r.values.items():  # type: ignore[union-attr]
            j = idx.get(name)
            if j is None:
                return None
            row[j] = v
        return row

    def _score(self, eng: Engine, group: list[Item], now: float) -> None:
        rows, keep = [], []
        for it in group:
            row = self._values(eng, it)
            if row is None:
                self.metrics.invalid.labels(reason="feature_mismatch").inc()
                continue
            rows.append(row)
            keep.append(it)
        if not keep:
            return
        streams = [it.reading.stream for it in keep]
        ts = np.fromiter((it.reading.ts for it in keep), dtype=np.float64, count=len(keep))
        evicted_before = dict(eng.evicted)
        res = eng.process(streams, ts, np.vstack(rows), now=now)
        for reason in res.rejected.values():
            self.metrics.invalid.labels(reason=reason).inc()
        for reason, n in eng.evicted.items():
            if n > evicted_before.get(reason, 0):
                self.metrics.evicted.labels(reason=reason).inc(n - evicted_before.get(reason, 0))
        self.metrics.readings.inc(res.scored)
        flagged = int(res.flag.sum())
        if flagged:
            self.metrics.anomalous.inc(flagged)
        self.metrics.batch_size.observe(len(keep))
        done = time.time()
        for i, it in enumerate(keep):
            if i not in res.rejected:
                self.metrics.processing.observe(done - it.received)
        for ev in res.events:
            self.publish(alert_topic(self.cfg.alerts.topic_prefix, ev.stream), alert_payload(ev, eng.rt.name))
            self.metrics.alerts.labels(event=ev.event).inc()
            log.info("%s %s score %.4f (model %s)", ev.event, ev.stream, ev.score, ev.model["name"])

    # ---- learn-from-stream -------------------------------------------------------
    def _learn(self, it: Item) -> None:
        r = it.reading
        if r.value is not None:
            features, values = ["value"], np.array([r.value])
        else:
            features = sorted(r.values)  # type: ignore[arg-type]
            values = np.array([r.values[f] for f in features])  # type: ignore[index]
        self.learner.add(r.stream, r.ts, values, features)  # type: ignore[union-attr]

    def _collect_learned(self) -> None:
        for res in self.learner.poll():  # type: ignore[union-attr]
            if res.bundle_path is None:
                log.warning("learning a model for %s failed: %s", res.stream, res.error)
                continue
            try:
                b = bundle.load(res.bundle_path)
            except Exception as err:
                log.warning("learned model for %s unusable: %s", res.stream, err)
                continue
            self.models.learned[res.stream] = Engine(b, self.cfg.score, self.cfg.engine)
            self._route_cache.pop(res.stream, None)
            self._learned_info()
            self._save_learned_index()
            log.info("learned a model for %s in %.0f s: %s", res.stream, res.seconds, res.bundle_path)

    def _save_learned_index(self) -> None:
        index = {s: str(e.bundle.path) for s, e in self.models.learned.items()}
        path = self.state_dir / "learned.json"
        tmp = path.with_name(".learned.json.tmp")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        tmp.replace(path)

    def restore_learned(self) -> int:
        path = self.state_dir / "learned.json"
        if not path.exists():
            return 0
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable %s: %s", path, err)
            return 0
        for stream, bpath in index.items():
            try:
                self.models.learned[stream] = Engine(bundle.load(bpath), self.cfg.score, self.cfg.engine)
            except Exception as err:
                log.warning("learned model for %s not restored: %s", stream, err)
        self._learned_info()
        return len(self.models.learned)

    # ---- checkpoints -------------------------------------------------------------
    def _checkpoint_path(self, key: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)[:80]
        return self.state_dir / "checkpoints" / f"{safe}.npz"

    def _checkpoint_items(self) -> list[tuple[Path, Engine]]:
        items = [(self._checkpoint_path("route-" + self._engine_paths[id(e)].name + f"-{i}"), e)
                 for i, (_, e) in enumerate(self.models.routes)]
        items += [(e.bundle.path / "streams.npz", e) for e in self.models.learned.values()]
        return items

    def checkpoint(self) -> bool:
        ok = True
        for path, eng in self._checkpoint_items():
            try:
                checkpoint.save(path, eng.snapshot())
            except OSError as err:
                ok = False
                self.metrics.checkpoint_failures.inc()
                log.error("checkpoint %s failed (scoring goes on): %s", path, err)
        return ok

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
        return restored
