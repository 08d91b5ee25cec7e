"""``anomaly-detector demo``: embedded broker + simulated plant + the daemon, alerts printed.

Everything runs in this one process on loopback: the daemon (the same code as ``run``,
with the shipped ``models/plant``), its embedded broker, a simulator publishing pumps on
``sensors/plant/pump-<i>`` with faults injected now and then, and a subscriber that
prints each alert next to the fault that caused it. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import socket
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from detector import config as config_mod
from detector import plant
from detector.cli import whole_number
from detector.daemon import Daemon, setup_logging
from detector.errors import InputError

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "plant"


def _free_port(preferred: int) -> int:
    """``preferred`` when it is free (a clean demo on the usual ports), else any free one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _print_alert(msg: mqtt.MQTTMessage) -> None:
    try:
        a = json.loads(msg.payload)
        top = max(a["features"], key=a["features"].get)
        print(f"{_clock(a['ts'])}  ALERT {a['event']:13s} {a['stream']:24s} score {a['score']:.4f}  "
              f"mostly {top} ({a['features'][top]:.0%} of the error)", flush=True)
    except (ValueError, KeyError, TypeError):
        print(f"alert on {msg.topic}: {msg.payload!r}", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=4, help="simulated pumps (default 4)")
    p.add_argument("--rate", type=float, default=5.0, help="readings per second per pump (default 5)")
    p.add_argument("--fault-every", type=float, default=30.0, metavar="S",
                   help="mean seconds between injected faults per pump (default 30)")
    p.add_argument("--duration", type=float, metavar="S", help="stop S seconds after the daemon is ready (default: Ctrl-C)")
    p.add_argument("--mqtt-port", type=whole_number(1, 65535), default=1883, help="embedded broker port (default 1883, "
                                                                "or a free one if taken)")
    p.add_argument("--metrics-port", type=whole_number(1, 65535), default=9108, help="metrics port (default 9108, "
                                                                   "or a free one if taken)")


def run(args: argparse.Namespace) -> int:
    from detector.simulate import SimConfig, SimError, Simulator

    try:  # judged before anything starts: a bad value is one line and exit 2
        SimConfig(streams=args.streams, rate=args.rate, fault_every=args.fault_every,
                  duration=args.duration).validate()
    except SimError as err:
        raise InputError("demo", str(err)) from None
    state = Path(tempfile.mkdtemp(prefix="anomaly-detector-demo-"))
    base = config_mod.Config()
    cfg = dataclasses.replace(
        base,
        mqtt=dataclasses.replace(base.mqtt, host="embedded", port=_free_port(args.mqtt_port)),
        metrics=dataclasses.replace(base.metrics, port=_free_port(args.metrics_port)),
        models=(config_mod.ModelRoute("sensors/plant/+", str(SHIPPED)),),
        learn=dataclasses.replace(base.learn, enabled=False),
        state=dataclasses.replace(base.state, dir=str(state)),
        log=dataclasses.replace(base.log, level="warning"),
    )
    setup_logging(cfg)
    daemon = Daemon(cfg, None, on_ready=lambda: _start_side(daemon, args, SimConfig, Simulator))
    print(f"demo: embedded MQTT broker on 127.0.0.1:{cfg.mqtt.port}; "
          f"metrics on http://127.0.0.1:{cfg.metrics.port}/metrics; state in {state} (removed at the end)", flush=True)
    print(f"demo: {args.streams} simulated pumps on sensors/plant/pump-<i>, {args.rate:g} readings/s each, "
          f"model {SHIPPED}; alerts on anomalies/#. Ctrl-C to stop.", flush=True)
    try:
        code = daemon.run()
    finally:
        shutil.rmtree(state, ignore_errors=True)  # a demo's state is not worth keeping
    print("demo: stopped", flush=True)
    return code


def _start_side(daemon: Daemon, args: argparse.Namespace, sim_config: type, simulator: type) -> None:
    """Once the daemon is up: the alert printer and the simulated plant."""
    port = daemon.cfg.mqtt.port
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sub.on_message = lambda c, u, m: _print_alert(m)
    sub.on_connect = lambda c, u, f, r, p=None: c.subscribe(f"{daemon.cfg.alerts.topic_prefix}/#", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()

    def on_fault(stream: str, fault: plant.Fault, ts: float) -> None:
        print(f"{_clock(ts)}  fault {fault.kind:8s} injected  {stream:24s} on {plant.FEATURES[fault.feature]}"
              f" for {fault.length} reading(s)", flush=True)

    sim = simulator(sim_config(port=port, streams=args.streams, rate=args.rate,
                               fault_every=args.fault_every), on_fault)
    stop = daemon.stop_requested

    def simulate() -> None:
        try:
            sim.run(stop)
        except Exception as err:  # the demo goes on showing what it has; say why it stopped
            print(f"demo: the simulator stopped: {err}", flush=True)

    threading.Thread(target=simulate, name="simulator", daemon=True).start()
    if args.duration:  # counted from here: a slow start does not eat into the simulation
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True  # a Ctrl-C before it fires must not wait for it
        timer.start()
