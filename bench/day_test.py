"""A per-day test on top of the engine's scores, offline: what it would add to NAB.

Not in the daemon yet (docs/quality.md, "A per-day test"). For each file of
``bench/nab.py --out DIR``'s SCORES, every calendar day's mean value is compared with an
average of the same weekday's past means (each weekday follows its own days with weight
``--profile-weight``); the difference, in units of a spread that follows the judged days
(weight ``--spread-weight``; the first 7 differences set it), gives a two-sided Gaussian
tail probability at the first reading of the next day. That reading's score becomes
``1 - min(K * min(p_error, p_day), 1)`` with ``p_error = (1 - score) / 2`` (the engine's
two tests, Bonferroni), and the files are scored by ``detector.evaluate`` as
``bench/nab.py`` does. State per stream and feature: 7 weekday means, a spread, the day's
running sum and count.

    python bench/nab.py --out /tmp/nab-scores
    python bench/day_test.py /tmp/nab-scores [--profile-weight 0.3] [--spread-weight 0.1] [--bonferroni 3]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from datetime import date, datetime
from pathlib import Path

import numpy as np

from detector import evaluate
from detector.calibration import norm_sf

SHARED = Path(__file__).resolve().parents[1] / "../shared/data/nab"
WARMUP_DAYS = 7  # differences that set the starting spread


def day_probabilities(times: list[datetime], values: np.ndarray, profile_weight: float,
                      spread_weight: float) -> tuple[np.ndarray, list[tuple[date, float]]]:
    """Per row: the tail probability of the day that ended just before it (1 elsewhere),
    and each judged day's z."""
    p = np.ones(len(values))
    judged: list[tuple[date, float]] = []
    weekday_mean: dict[int, float] = {}
    spread2: float | None = None
    warmup: list[float] = []
    day, total, count = None, 0.0, 0
    for i, t in enumerate(times):
        if day is not None and t.date() != day:
            mean = total / count
            wd = day.weekday()
            if wd not in weekday_mean:
                weekday_mean[wd] = mean
            else:
                diff = mean - weekday_mean[wd]
                if spread2 is None:
                    warmup.append(diff)
                    if len(warmup) == WARMUP_DAYS:
                        spread2 = float(np.mean(np.square(warmup)))
                else:
                    z = diff / math.sqrt(max(spread2, 1e-300))
                    p[i] = min(1.0, 2.0 * float(norm_sf(np.array([abs(z)]))[0]))
                    judged.append((day, z))
                    # An unusual day barely moves the spread it is judged by.
                    spread2 += spread_weight * (diff * diff - spread2) * (0.1 if p[i] < 1e-3 else 1.0)
                weekday_mean[wd] += profile_weight * diff
            total, count = 0.0, 0
        day = t.date()
        total += float(values[i])
        count += 1
    return p, judged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scores", type=Path, help="bench/nab.py --out DIR")
    ap.add_argument("--windows", type=Path, default=SHARED / "windows.json")
    ap.add_argument("--profile-weight", type=float, default=0.3)
    ap.add_argument("--spread-weight", type=float, default=0.1)
    ap.add_argument("--bonferroni", type=float, default=3.0, help="K: tests the minimum is taken over")
    args = ap.parse_args()
    files = sorted(args.scores.glob("*.csv"))
    if not files:
        print(f"error: no SCORES files in {args.scores} (run bench/nab.py --out DIR first)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="day-test-") as tmp:
        out = []
        for f in files:
            with open(f, newline="") as fh:
                rows = list(csv.reader(fh))
            head, body = rows[0], rows[1:]
            ti, vi, si = head.index("timestamp"), head.index("value"), head.index("score")
            times = [datetime.fromisoformat(r[ti]) for r in body]
            p_day, judged = day_probabilities(times, np.array([float(r[vi]) for r in body]),
                                              args.profile_weight, args.spread_weight)
            p_error = (1.0 - np.array([float(r[si]) for r in body])) / 2.0
            score = 1.0 - np.minimum(args.bonferroni * np.minimum(p_error, p_day), 1.0)
            for r, s in zip(body, score.tolist()):
                r[si] = repr(s)
            top = sorted(judged, key=lambda dz: -abs(dz[1]))[:3]
            print(f"{f.name}: {len(judged)} days judged; largest |z|: "
                  + ", ".join(f"{d} {z:+.1f}" for d, z in top), file=sys.stderr)
            out.append(Path(tmp) / f.name)
            with open(out[-1], "w", newline="") as fh:
                csv.writer(fh).writerows([head, *body])
        argv = [a for f in out for a in ("--scores", str(f))]
        argv += ["--labels", str(args.windows), "--skip-rows", "probation"]
        ev = argparse.ArgumentParser(prog="evaluate")
        evaluate.add_arguments(ev)
        return evaluate.run(ev.parse_args(argv))  # inside the with: the files must still exist


if __name__ == "__main__":
    raise SystemExit(main())
