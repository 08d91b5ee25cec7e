"""Per-reading cost of the engine's step, per runtime and batch size, against the ceilings.

    python bench/step.py [--model models/plant] [--threads 1] [--hidden 64]

Measures, in one run on this machine:
  * ``step``: one recurrent step for B streams (observe + advance: the LSTM cell and the
    decoder), per runtime (numpy, onnx, auto, keras), for B = 1, 64, 1024, 10000;
  * ``engine``: ``Engine.process`` for B streams (adds slot lookup, scaling, scoring,
    episodes: what the daemon's worker pays per micro-batch);
  * ``predict``: ``model.predict`` on one reading, the naive per-reading daemon;
  * the float32 matmul rate (a large square sgemm) as the ceiling for the batched step.
Figures are medians over repeats; this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def _median_time(fn, min_time: float = 0.3, max_reps: int = 2000) -> float:
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "plant")
    ap.add_argument("--threads", type=int, default=1, help="BLAS and TensorFlow threads")
    ap.add_argument("--batches", default="1,64,1024,10000")
    args = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import tensorflow as tf

    # Thread counts are fixed before TensorFlow starts (it refuses changes afterwards).
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from detector import bundle
    from detector.config import EngineConfig
    from detector.engine import Engine
    from detector.scoring import advance, observe

    b = bundle.load(args.model)
    f = len(b.features)
    batches = [int(x) for x in args.batches.split(",")]
    rng = np.random.default_rng(0)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
          f"python {platform.python_version()}, numpy {np.__version__}; threads {args.threads}")
    print(f"# model: {b.name} {b.version}: {b.kind}, {f} features, hidden {b.manifest['hidden']}, "
          f"bottleneck {b.manifest['bottleneck']}")

    n = 2048
    a = rng.standard_normal((n, n), dtype=np.float32)
    bm = rng.standard_normal((n, n), dtype=np.float32)
    peak = max(2 * n**3 / _median_time(lambda: a @ bm, min_time=1.0) for _ in range(3))
    print(f"float32 matmul {n}x{n}: {peak / 1e9:.1f} GFLOP/s (ceiling: best of 3 medians)")

    hid, code = b.manifest["hidden"], b.manifest["bottleneck"]
    flops = 2 * (f + hid) * 4 * hid + 2 * hid * code + 2 * code * f
    print(f"step: {flops} FLOP per reading in matmuls\n")
    print(f"{'what':28s} {'batch':>6s} {'us/reading':>11s} {'readings/s':>12s} {'% of matmul':>12s}")
    results = {}
    for rt_name in ("numpy", "onnx", "auto", "keras"):
        rt = b.runtime(rt_name, args.threads)
        for bs in batches:
            if rt_name == "keras" and bs > 1024:
                continue
            x = rng.standard_normal((bs, f)).astype(np.float32)
            h = np.repeat(b.weights["init_h"], bs, axis=0)
            c = np.repeat(b.weights["init_c"], bs, axis=0)

            y0 = np.zeros((bs, f), dtype=np.float32)

            def one_step() -> None:
                se, y, xf, h1, c1 = observe(rt, b.kind, x, y0, h, c)
                advance(rt, b.kind, xf, y, h1, c1)

            t = _median_time(one_step, min_time=0.5 if rt_name == "numpy" else 1.0)
            per = t / bs
            results[(rt_name, bs)] = per
            print(f"{'step (' + rt_name + ')':28s} {bs:6d} {per * 1e6:11.3f} {1 / per:12.0f} "
                  f"{100 * flops / per / peak:11.1f}%")
    for bs in batches:
        eng = Engine(b, engine=EngineConfig(threads=args.threads))
        ids = [f"sensors/s{i}" for i in range(bs)]
        vals = b.scaler.mean + b.scaler.scale * rng.standard_normal((bs, f))
        clock = [1.0]

        def engine_step() -> None:
            clock[0] += 1.0
            eng.process(ids, np.full(bs, clock[0]), vals, now=clock[0])

        engine_step()
        per = _median_time(engine_step, min_time=0.5) / bs
        results[("engine", bs)] = per
        print(f"{'engine.process (auto)':28s} {bs:6d} {per * 1e6:11.3f} {1 / per:12.0f} "
              f"{100 * flops / per / peak:11.1f}%")

    from detector import model

    net = model.load(str(b.path / "model.keras"))
    one = rng.standard_normal((1, 1, f)).astype(np.float32)
    net.predict(one, verbose=0)
    t_pred = _median_time(lambda: net.predict(one, verbose=0), min_time=2.0, max_reps=200)
    print(f"{'model.predict per reading':28s} {1:6d} {t_pred * 1e6:11.1f} {1 / t_pred:12.0f}")
    print(f"\nbatch 1: numpy step {t_pred / results[('numpy', 1)]:.0f}x faster than model.predict, "
          f"engine.process {t_pred / results[('engine', 1)]:.0f}x; "
          f"at batch {batches[-1]}: engine.process {t_pred / results[('engine', batches[-1])]:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
