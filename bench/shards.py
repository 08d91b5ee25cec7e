"""Is one daemon process the wall for latency? The same paced load, scored by 1 or N daemons.

    python bench/shards.py [--rates 10000 15000 25000] [--shards 1 2] [--streams 1000]
                           [--count 200] [--repeat 2]

The design proposed for more than one core: several daemon processes, each scoring its own
share of the streams (here by topic, ``sensors/plant<k>/#`` to daemon k; in production
by a topic filter per process, or a front process hashing stream ids). This measures it
before it is built. For each rate and repeat, the settings of ``--shards`` run in turn on
one Mosquitto: the paced load of ``bench/e2e.py`` (single-reading messages from 1,000
streams, evenly spread in time, stamped as published) spread over the daemons, and then:

  * receive → scored p50 / p90 / p99 over all the daemons' ``processing_seconds``;
  * the CPU (cores, while readings were being scored) of the daemons, the broker and the
    load generator: what the two cores are shared between (the kernel's loopback TCP,
    charged to no process, comes on top).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/ is on sys.path when this runs as a script; e2e puts tests/ there too.
from e2e import PACED, ROOT, Daemon, cpu_s, quantile, scrape
from mqtt_broker import start_test_broker


def run_point(port: int, broker_pid: int | None, shards: int, rate: float, streams: int, count: int,
              tag: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        daemons = []
        try:
            for k in range(shards):
                (Path(tmp) / str(k)).mkdir()
                daemons.append(Daemon(Path(tmp) / str(k), port,
                                      prefix=f"sensors/plant{k}" if shards > 1 else "sensors/plant"))
            time.sleep(1.0)
            before = [scrape(d.metrics_port) for d in daemons]
            # CPU counts only while readings are being scored: the load generator builds its
            # packets first, at 100 % of a core, before its clock starts.
            # (time, scored, CPU s of: the daemons, the broker, the load generator)
            samples: list[tuple[float, ...]] = []
            done = threading.Event()
            load = subprocess.Popen([sys.executable, "-c", PACED, str(port), str(streams), str(count), str(rate),
                                     "10", tag, str(shards)], stdout=subprocess.DEVNULL, cwd=ROOT)

            def cpu_of(pid: int | None) -> float:
                try:
                    return cpu_s(pid) if pid else 0.0
                except OSError:  # the load generator has exited
                    return float("nan")

            def sample() -> None:
                while not done.is_set():
                    n = sum(scrape(d.metrics_port).get("anomaly_detector_readings_total", 0.0) for d in daemons)
                    samples.append((time.monotonic(), n, sum(cpu_s(d.proc.pid) for d in daemons),
                                    cpu_of(broker_pid), cpu_of(load.pid)))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample)
            sampler.start()
            if load.wait(900):
                raise RuntimeError(f"the load generator failed: exit status {load.returncode}")
            time.sleep(1.5)
            done.set()
            sampler.join()
            after = [scrape(d.metrics_port) for d in daemons]
        finally:
            for d in daemons:
                d.stop()
    merged_before: dict[str, float] = {}
    merged_after: dict[str, float] = {}
    for b, a in zip(before, after):
        for key, v in a.items():
            merged_after[key] = merged_after.get(key, 0.0) + v
            merged_before[key] = merged_before.get(key, 0.0) + b.get(key, 0.0)
    # The span over which the scored count moved: first and last sample that changed it.
    moving = [i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]]
    first, last = (moving[0] - 1, moving[-1]) if moving else (0, len(samples) - 1)
    (t0, _, c0, m0, g0), (t1, _, c1, m1, g1) = samples[first], samples[last]
    wall = t1 - t0
    if math.isnan(g1):  # the load generator had exited by the last sample: its last reading counts
        g1 = max((g for *_, g in samples if not math.isnan(g)), default=g0)
    return {"p50": quantile(merged_before, merged_after, 0.5), "p90": quantile(merged_before, merged_after, 0.9),
            "p99": quantile(merged_before, merged_after, 0.99),
            "scored": merged_after["anomaly_detector_readings_total"]
            - merged_before.get("anomaly_detector_readings_total", 0.0),
            "daemons": (c1 - c0) / max(wall, 1e-9), "broker": (m1 - m0) / max(wall, 1e-9),
            "load": (g1 - g0) / max(wall, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[10000.0, 15000.0, 25000.0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="daemon processes per run, in turn")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--count", type=int, default=200, help="readings per stream per run")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    broker = start_test_broker()
    broker_pid = broker.pid  # None: the embedded broker, in this process
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"broker: {broker.kind}; {args.streams} streams, {args.count} readings each, single-reading "
          f"messages, paced; medians of {args.repeat} runs (each run's figures in brackets)")
    print(f"{'rate/s':>7s} {'daemons':>7s} {'p50 ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} "
          f"{'cores: daemons':>14s} {'broker':>6s} {'load':>5s}  all scored")
    try:
        for rate in args.rates:
            got: dict[int, list[dict[str, float]]] = {n: [] for n in args.shards}
            for rep in range(args.repeat):
                for n in args.shards:  # alternating, so that a noisy minute skews no setting alone
                    got[n].append(run_point(broker.port, broker_pid, n, rate, args.streams, args.count,
                                            f"r{int(rate)}-{rep}-{n}-"))
            for n, runs in got.items():
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                ok = all(r["scored"] == args.streams * args.count for r in runs)
                print(f"{rate:7.0f} {n:7d} {1000 * med['p50']:7.2f} {1000 * med['p90']:7.2f} {1000 * med['p99']:7.2f} "
                      f"{med['daemons']:14.2f} {med['broker']:6.2f} {med['load']:5.2f}  {ok}   "
                      f"(p99 {', '.join(f'{1000 * p99:.1f}' for p99 in (r['p99'] for r in runs))} ms)", flush=True)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
