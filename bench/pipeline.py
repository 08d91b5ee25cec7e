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
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from e2e import load_messages  # noqa: E402

from detector import config as config_mod  # noqa: E402
from detector.config import ModelRoute  # noqa: E402
from detector.ingest import MqttLink  # noqa: E402
from detector.intake import Intake  # noqa: E402
from detector.metrics import create  # noqa: E402
from detector.worker import Worker, load_models  # noqa: E402

PLANT = ROOT / "models" / "plant"


def messages(streams: int, per_stream: int, batch: int, t0: float) -> list[mqtt.MQTTMessage]:
    out = []
    for topic, payload, _ in load_messages(streams, per_stream, batch, "sensors/plant", t0):
        m = mqtt.MQTTMessage(topic=topic.encode())
        m.payload = payload
        out.append(m)
    return out


def run(streams: int, per_stream: int, batch: int, repeat: int) -> tuple[float, float]:
    """Min over ``repeat`` runs of (receive + queue, worker) CPU µs per reading."""
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}), models=(ModelRoute("sensors/plant/+", str(PLANT)),))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
