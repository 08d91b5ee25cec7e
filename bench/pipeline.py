"""The daemon's pipeline in one process, without a broker: what one GIL allows.

    OPENBLAS_NUM_THREADS=1 python bench/pipeline.py [--streams 1000] [--readings 100] [--repeat 6]

Feeds pre-built MQTT messages (``bench/e2e.py``'s ``load_messages``: four plant features,
1,000 streams) to the daemon's own ``MqttLink._on_message`` (topic to stream, queue) and then
to its worker (``Worker.step``, as the daemon's worker thread runs it: decode, rows, batched
stateful step, scores, metrics) with the shipped plant model, and reports CPU microseconds
per reading for each half, for single-reading messages and batches of 100. Every reading
must be scored. The minimum over ``--repeat`` runs is reported: on a shared machine the
minimum is the figure least disturbed by others.
Both halves share the GIL in the daemon (the first on paho's thread, the second on the
worker's), so 1e6 / (sum) readings/s is the single-process ceiling that the end-to-end
rate (bench/e2e.py) approaches. paho's own packet handling is not in it: the messages
are handed to ``on_message`` ready-made.
Then the cost of streams the daemon has not seen: a worker step of 38 single-reading
messages for held streams against one for new streams (route lookup, slot set-up), and
the time to restore 100,000 streams from a checkpoint's arrays (a restart).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from e2e import load_messages  # noqa: E402

from detector import config as config_mod  # noqa: E402
from detector.config import ModelRoute  # noqa: E402
from detector.engine import Engine  # noqa: E402
from detector.ingest import MqttLink  # noqa: E402
from detector.intake import Intake, Raw  # noqa: E402
from detector.metrics import create  # noqa: E402
from detector.worker import Worker, load_models  # noqa: E402

PLANT = ROOT / "models" / "plant"


def plant_config() -> config_mod.Config:
    """The defaults, learning off, every sensors/plant/+ stream on the shipped plant model."""
    return replace(config_mod.parse({"learn": {"enabled": False}}), models=(ModelRoute("sensors/plant/+", str(PLANT)),))


def messages(streams: int, per_stream: int, batch: int, t0: float) -> list[mqtt.MQTTMessage]:
    out = []
    for topic, payload, _ in load_messages(streams, per_stream, batch, "sensors/plant", t0):
        m = mqtt.MQTTMessage(topic=topic.encode())
        m.payload = payload
        out.append(m)
    return out


def run(streams: int, per_stream: int, batch: int, repeat: int) -> tuple[float, float]:
    """Min over ``repeat`` runs of (receive + queue, worker) CPU µs per reading."""
    cfg = plant_config()
    worker: Worker | None = None
    receive_us, worker_us = [], []
    t0 = time.time() - (repeat + 1) * per_stream * 0.001
    for k in range(repeat):
        metrics = create()
        intake = Intake(10_000_000)
        link = MqttLink(cfg, "127.0.0.1", 1, intake, metrics)
        if worker is None:  # one worker throughout: its streams keep their state, as in the daemon
            worker = Worker(cfg, intake, metrics, lambda topic, payload: None)
            worker.install(cfg, load_models(cfg))
        worker.intake, worker.metrics = intake, metrics
        msgs = messages(streams, per_stream, batch, t0 + k * per_stream * 0.001)
        n = streams * per_stream
        c0 = time.process_time()
        for m in msgs:
            link._on_message(link.client, None, m)
        c1 = time.process_time()
        while worker.step(0.0):
            pass
        c2 = time.process_time()
        scored = metrics.registry.get_sample_value("anomaly_detector_readings_total")
        if scored != n:
            raise SystemExit(f"scored {scored} of {n} readings")
        receive_us.append(1e6 * (c1 - c0) / n)
        worker_us.append(1e6 * (c2 - c1) / n)
    return min(receive_us), min(worker_us)


def stream_setup(per_step: int, steps: int, restore_n: int) -> tuple[float, float, float]:
    """(worker CPU µs per step of ``per_step`` single-reading messages for streams it holds,
    the same for streams it has never seen, seconds to restore ``restore_n`` streams from
    a snapshot): medians over ``steps`` steps, the two kinds alternated."""
    cfg = plant_config()
    intake = Intake(10_000_000)
    worker = Worker(cfg, intake, create(), lambda topic, payload: None)
    worker.install(cfg, load_models(cfg))
    t0 = time.time() - 10_000.0

    def step(ids: list[str], i: int) -> float:
        for m in messages(len(ids), 1, 1, t0 + i):
            stream = ids[int(m.topic.rsplit("/s", 1)[1])]
            intake.put(Raw(stream, stream, m.payload, time.time()))
        c = time.thread_time()
        worker.step(0.0)
        return time.thread_time() - c

    held = [f"sensors/plant/h{k}" for k in range(1000)]
    for i in range(3):  # every held stream past its first readings
        for j in range(0, 1000, per_step):
            step(held[j: j + per_step], i)
    old_us, new_us = [], []
    for k in range(steps):
        j = (k * per_step) % (1000 - per_step)
        old_us.append(1e6 * step(held[j: j + per_step], 3 + k))
        new_us.append(1e6 * step([f"sensors/plant/n{k}-{m}" for m in range(per_step)], 0))
    eng = worker.models.routes[0][1]
    eng.process([f"r{k}" for k in range(restore_n)], np.full(restore_n, t0),
                np.tile(eng.bundle.scaler.mean, (restore_n, 1)), now=t0)
    snap = eng.snapshot()
    c = time.perf_counter()
    Engine(eng.bundle, cfg.score, cfg.engine).restore(snap)
    return statistics.median(old_us), statistics.median(new_us), time.perf_counter() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--readings", type=int, default=100, help="readings per stream per run (batched messages)")
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; {args.streams} streams, "
          f"min of {args.repeat} runs")
    print(f"{'messages':12s} {'receive+queue µs':>16s} {'worker µs':>10s} {'total µs':>9s} {'readings/s':>11s}")
    for batch, per in ((1, max(1, args.readings // 5)), (100, args.readings)):
        d, w = run(args.streams, per, batch, args.repeat)
        label = "single" if batch == 1 else f"batch of {batch}"
        print(f"{label:12s} {d:16.2f} {w:10.2f} {d + w:9.2f} {1e6 / (d + w):11,.0f}")
    held, new, restore_s = stream_setup(38, 200, 100_000)
    print(f"\nworker step of 38 single-reading messages (median of 200): {held:.0f} µs for held streams, "
          f"{new:.0f} µs for new ones ({(new - held) / 38:.1f} µs per new stream); "
          f"restoring 100,000 streams from a snapshot: {restore_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
