"""SKAB valve1, outlier protocol: fit on each file's first 400 rows, stream the rest.

Predictions of all files are concatenated and scored against the ``anomaly`` column as
binary classification (F1, FAR = false alarm rate, MAR = missed alarm rate), for two
readings of the output: the point flag (SCORES.csv ``anomaly``) and the alert episode.

    python bench/skab.py [--data ../shared/data/skab/valve1] [--set model.kind=forecast ...]
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

from detector import config, train
from detector.data import read_table
from detector.replay import score_table

TRAIN_ROWS = 400


def binary_scores(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(pred & label))
    fp = int(np.sum(pred & ~label))
    fn = int(np.sum(~pred & label))
    tn = int(np.sum(~pred & ~label))
    prec = tp / max(tp + fp, 1)
    rec = tp / max(tp + fn, 1)
    return {"F1": 2 * prec * rec / max(prec + rec, 1e-12), "FAR": fp / max(fp + tn, 1),
            "MAR": fn / max(fn + tp, 1)}


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
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    cfg = with_sets(config.Config(), args.set)
    files = sorted(args.data.glob("*.csv"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    flags, episodes, labels = [], [], []
    t0 = time.monotonic()
    for f in files:
        table = read_table(f)
        with tempfile.TemporaryDirectory() as tmp:
            b = train.fit([table.head(TRAIN_ROWS)], Path(tmp) / f.stem, cfg, log=lambda m: None)
        s = score_table(table, b, cfg)
        rest = slice(TRAIN_ROWS, None)
        flags.append(s.flag[rest])
        episodes.append(s.in_episode[rest])
        labels.append(table.labels["anomaly"][rest].astype(bool))
        r = binary_scores(s.flag[rest], labels[-1])
        print(f"{f.name}: point F1 {r['F1']:.3f} FAR {r['FAR']:.3f} MAR {r['MAR']:.3f}", file=sys.stderr)
    lab = np.concatenate(labels)
    print(f"config: {' '.join(args.set) or 'defaults'}; {len(files)} files, {time.monotonic() - t0:.0f} s, "
          f"OMP/TF threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    for name, pred in (("point flag", flags), ("episode", episodes)):
        r = binary_scores(np.concatenate(pred), lab)
        print(f"  {name:10s} F1 {r['F1']:.3f}  FAR {r['FAR'] * 100:.1f} %  MAR {r['MAR'] * 100:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
