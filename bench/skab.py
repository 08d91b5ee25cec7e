"""SKAB valve1, outlier protocol: fit on each file's first 400 rows, stream the rest.

Predictions of all files are concatenated and scored against the ``anomaly`` column as
binary classification (F1, FAR = false alarm rate, MAR = missed alarm rate), for two
readings of the output: the point flag (SCORES.csv ``anomaly``) and the alert episode.
The point-flag figures are ``anomaly-detector evaluate``'s (``detector.evaluate``) on the
SCORES files written here, with the first 400 rows of each file left out.

    python bench/skab.py [--data ../shared/data/skab/valve1] [--out DIR] [--set model.kind=forecast ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from detector import config, evaluate, train
from detector.data import read_table
from detector.replay import score_table, write_scores

TRAIN_ROWS = 400


def with_sets(cfg: config.Config, sets: list[str]) -> config.Config:
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sec = getattr(cfg, section)
        kind = type(getattr(sec, name))
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sec, **{name: kind(value)})})
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/skab/valve1")
    ap.add_argument("--out", type=Path, help="keep the SCORES files here (default: a temporary directory)")
    ap.add_argument("--report", action="store_true", help="also print evaluate's full report (NAB score too)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    cfg = with_sets(config.Config(), args.set)
    files = sorted(args.data.glob("*.csv"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    episodes, labels, paths = [], [], []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "scores"
        for f in files:
            table = read_table(f)
            b = train.fit([table.head(TRAIN_ROWS)], Path(tmp) / f.stem, cfg, log=lambda m: None)
            s = score_table(table, b, cfg)
            paths.append(out / f.name)
            write_scores(paths[-1], table, s)
            rest = slice(TRAIN_ROWS, None)
            episodes.append(s.in_episode[rest])
            labels.append(table.labels["anomaly"][rest].astype(bool))
            r = evaluate.point_metrics(s.flag[rest], labels[-1])
            print(f"{f.name}: point F1 {r['F1']:.3f} FAR {r['FAR']:.3f} MAR {r['MAR']:.3f}", file=sys.stderr)
        series = evaluate.load(paths, files, label_column="anomaly")
        report = evaluate.evaluate(series, skip_rows=TRAIN_ROWS)
    print(f"config: {' '.join(args.set) or 'defaults'}; {len(files)} files, {time.monotonic() - t0:.0f} s, "
          f"OMP/TF threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    ep = evaluate.point_metrics(np.concatenate(episodes), np.concatenate(labels))
    for name, r in (("point flag", report["point"]), ("episode", ep)):
        print(f"  {name:10s} F1 {r['F1']:.3f}  FAR {r['FAR'] * 100:.1f} %  MAR {r['MAR'] * 100:.1f} %")
    if args.report:
        print(evaluate.format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
