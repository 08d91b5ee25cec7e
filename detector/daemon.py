"""``anomaly-detector run``: the service lifecycle around ingest, worker and metrics.

Start: load and check every configured model (a bad one stops the start with one line),
start the embedded broker when ``[mqtt] host = "embedded"``, serve metrics, restore the
checkpoint, connect, and tell systemd ``READY=1`` once subscribed.

Signals: SIGTERM/SIGINT stop intake, drain the queue, checkpoint, publish ``offline``,
disconnect and exit 0 within ``[worker] shutdown_timeout_s``; SIGHUP reloads the config
and models between two batches, keeping every stream's state.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector import config as config_mod
from detector import sdnotify
from detector.config import Config
from detector.errors import InputError
from detector.intake import Intake
from detector.ingest import MqttLink
from detector.metrics import Metrics, MetricsServer, create
from detector.worker import Worker, load_models

log = logging.getLogger("detector")

STARTUP_WAIT_S = 10.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(cfg: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log.level.upper())
    logging.getLogger("detector").setLevel(cfg.log.level.upper())


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None, metrics: Metrics | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.on_ready = on_ready
        self.config_path = config_path
        self.metrics = metrics or create()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.broker: Any = None
        self.server: MetricsServer | None = None
        self.learner: Any = None

    # ---- start -------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        bundles = load_models(cfg)
        state_dir = cfg.resolve(cfg.state.dir)
        try:  # before anything starts: a state dir that cannot exist is a config error, not a crash loop
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError("[state] dir", f"cannot create {state_dir}: {err.strerror or err}") from None
        host, port, protocol = cfg.mqtt.host, cfg.mqtt.port, None
        if host == "embedded":
            from detector.broker import EmbeddedBroker

            self.broker = EmbeddedBroker("127.0.0.1", port)
            try:
                self.broker.start()
            except RuntimeError as err:
                raise InputError("[mqtt] port", str(err)) from None
            host, port, protocol = "127.0.0.1", self.broker.port, "3.1.1"  # amqtt speaks 3.1.1
            log.info("embedded MQTT broker listening on 127.0.0.1:%d", port)
        if cfg.learn.enabled:
            from detector.learn import Learner

            self.learner = Learner(cfg, state_dir / "models", cfg.learn.warmup_readings,
                                   max_concurrent=cfg.learn.max_concurrent, timeout_s=cfg.learn.timeout_s,
                                   retry_after_s=cfg.learn.retry_after_s, max_streams=cfg.engine.max_streams)
        self.intake = Intake(cfg.worker.queue_size, cfg.worker.queue_bytes, cfg.worker.overload)
        self.link = MqttLink(cfg, host, port, self.intake, self.metrics, protocol)
        self.worker = Worker(cfg, self.intake, self.metrics, self.link.publish, self.learner)
        self.worker.install(cfg, bundles)
        learned = self.worker.restore_learned()
        restored = self.worker.restore()
        log.info("%d model route(s), %d learned model(s), %d stream state(s) restored",
                 len(cfg.models), learned, restored)
        # Computed at scrape time: a stuck worker cannot freeze these at a healthy value.
        self.metrics.queue_depth.set_function(self.worker.waiting)
        self.metrics.healthy.set_function(lambda: float(self.health()[0]))
        if cfg.metrics.enabled:
            try:
                self.server = MetricsServer(self.metrics, cfg.metrics.address, cfg.metrics.port, self.health)
            except OSError as err:
                raise InputError(f"[metrics] {cfg.metrics.address}:{cfg.metrics.port}",
                                 f"cannot listen: {err.strerror or err}") from None
            self.server.start()
            address = f"[{cfg.metrics.address}]" if ":" in cfg.metrics.address else cfg.metrics.address  # IPv6
            log.info("metrics on http://%s:%d/metrics", address, self.server.port)
        self.worker.start()
        self.link.start()

    def health(self) -> tuple[bool, str]:
        if not self.worker.alive():
            return False, "worker not running"
        if not self.link.connected.is_set():
            return False, "broker disconnected"
        if not self.link.subscribed.is_set():
            return False, "not subscribed yet"
        return True, "ok"

    # ---- run ---------------------------------------------------------------------
    def _signals(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stop_requested.set()

        def reload(signum: int, frame: object) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def run(self) -> int:
        # The network thread and the worker share the GIL; the default 5 ms switch interval
        # let one make the other wait that long, several times per reading under load
        # (p99 receive -> scored 35 ms at 8k readings/s; 1 ms: 16 ms, same throughput).
        sys.setswitchinterval(0.001)
        # What exists now (modules, models, config: ~32k objects) lives as long as the
        # process: frozen out of the collector's scans, so a full collection, which a steady
        # inflow triggers now and then, no longer stops both threads for 8-18 ms.
        gc.freeze()
        self._signals()
        self.start()
        deadline = time.monotonic() + STARTUP_WAIT_S
        while not (self.link.subscribed.wait(0.1) or self.stop_requested.is_set()):
            if time.monotonic() > deadline:
                log.warning("not subscribed after %.0f s; running, and reconnecting in the background",
                            STARTUP_WAIT_S)
                break
        sdnotify.notify("READY=1")
        log.info("running")
        if self.on_ready is not None:
            self.on_ready()
        watchdog = sdnotify.watchdog_interval()
        tick = min(watchdog or 1.0, 1.0)
        while not self.stop_requested.wait(tick):
            if watchdog is not None and self.worker.alive():
                sdnotify.notify("WATCHDOG=1")
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()
        return self.shutdown()

    def _reload(self) -> None:
        sdnotify.notify("RELOADING=1")
        try:
            cfg = config_mod.load(self.config_path) if self.config_path else self.cfg
        except Exception as err:  # a broken edit must not take the service down
            log.error("reload: keeping the running config: %s", err)
            self.metrics.reload_failures.inc()
        else:
            self.worker.request_reload(cfg)
            log.info("reload requested")
        sdnotify.notify("READY=1")

    def shutdown(self) -> int:
        sdnotify.notify("STOPPING=1")
        # One budget for every step, so the whole stop fits in shutdown_timeout_s whatever
        # the broker does (an unreachable or hung broker included: see MqttLink.stop).
        timeout = self.cfg.worker.shutdown_timeout_s
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        log.info("stopping: draining about %d queued reading(s)", round(self.worker.waiting()))
        if self.cfg.mqtt.persistent_session:
            # No unsubscribe: the subscription in the broker's session is what keeps the
            # readings published while we are stopped, for the next start.
            self.intake.close()
        else:
            self.link.stop_intake()
        if not self.worker.stop(max(left(), 0.1)):
            log.error("worker did not finish within %.0f s; about %d queued reading(s) were not scored "
                      "(QoS 1 ones are not redelivered: they were acknowledged on arrival)",
                      timeout, round(self.worker.waiting()))
        if self.learner is not None:
            self.learner.close(min(left(), 2.0))  # fits are killed, not waited for
        self.link.stop(left())
        if self.server is not None:
            self.server.stop()
        if self.broker is not None:
            self.broker.stop()
        log.info("stopped")
        return 0
