"""Detection quality on ../shared/data in one command: SKAB valve1 and NAB realKnownCause.

Runs ``bench/skab.py`` (outlier protocol: fit on each file's first 400 rows, stream the
rest, point F1/FAR/MAR of the ``anomaly`` flags) and ``bench/nab.py`` (fit on each file's
probationary rows, stream everything, NAB score of the ``score`` column for the three
profiles, threshold optimised over the corpus) with the same configuration, one after the
other, each in its own process with one BLAS/TensorFlow thread, and prints both reports
with their wall times. docs/quality.md records the figures.

    python bench/quality.py [--set score.window=10 ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ONE_THREAD = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    env = {**os.environ, **ONE_THREAD, "TF_CPP_MIN_LOG_LEVEL": "2"}
    sets = [a for s in args.set for a in ("--set", s)]
    status = 0
    for script in ("skab.py", "nab.py"):
        print(f"==== python bench/{script} {' '.join(sets)}", flush=True)
        t0 = time.monotonic()
        # Per-file progress goes to stderr; the summaries to stdout.
        r = subprocess.run([sys.executable, str(HERE / script), *sets], env=env,
                           stderr=subprocess.DEVNULL, check=False)
        print(f"==== {script}: wall time {time.monotonic() - t0:.0f} s (fits included)\n", flush=True)
        status = status or r.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
