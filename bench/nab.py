"""NAB realKnownCause, end to end: learn from the stream, then NAB's scoring.

For every file: fit a fresh model on its probationary rows (``min(floor(0.15 n), 750)``,
what ``replay --train-rows <probation>`` does), stream every row through the engine the
daemon uses, write SCORES.csv; then score all files at once with ``detector.evaluate``
(one threshold per profile over the corpus, normalised against the null detector) and
print the three profile scores, the per-file detections and the wall time.

    python bench/nab.py [--data ../shared/data/nab/realKnownCause] [--windows .../windows.json]
                        [--out DIR] [--plot DIR] [--json OUT] [--set model.kind=forecast ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from skab import with_sets  # bench/ is on sys.path when this runs as a script

from detector import config, evaluate, train
from detector.data import read_table
from detector.replay import score_table, write_scores

SHARED = Path(__file__).resolve().parents[1] / "../shared/data/nab"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "realKnownCause")
    ap.add_argument("--windows", type=Path, default=SHARED / "windows.json")
    ap.add_argument("--profiles", type=Path, default=SHARED / "profiles.json")
    ap.add_argument("--out", type=Path, help="keep the SCORES files here (default: a temporary directory)")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="one PNG per file")
    ap.add_argument("--json", type=Path, metavar="OUT", help="full results as JSON")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    cfg = with_sets(config.Config(), args.set)
    files = sorted(args.data.glob("*.csv"))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nab-") as tmp:
        out = args.out or Path(tmp) / "scores"
        paths = []
        for f in files:
            t1 = time.monotonic()
            table = read_table(f)
            probation = evaluate.probation_rows(len(table))
            b = train.fit([table.head(probation)], Path(tmp) / f.stem, cfg, log=lambda m: None)
            t2 = time.monotonic()
            s = score_table(table, b, cfg)
            paths.append(out / f.name)
            write_scores(paths[-1], table, s)
            rejected = Counter(s.rejected.values())
            print(f"{f.name}: {len(table)} rows, fit on {probation} ({t2 - t1:.0f} s), streamed "
                  f"({time.monotonic() - t2:.1f} s), {int(s.flag.sum())} flagged, "
                  f"{sum(e.event == 'anomaly_start' for e in s.events)} episodes"
                  + (f", not scored: {dict(rejected)}" if rejected else ""), file=sys.stderr)
        series = evaluate.load(paths, [args.windows])
        profiles = evaluate.load_profiles(args.profiles) if args.profiles.is_file() else None
        report = evaluate.evaluate(series, profiles, skip_rows="probation")
        if args.plot:
            evaluate.plot(series, report, args.plot)
    if args.json:
        import json

        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(evaluate.format_report(report))
    print(f"\nconfig: {' '.join(args.set) or 'defaults'}; {len(files)} files, "
          f"{sum(len(s.score) for s in series)} rows, wall time {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
