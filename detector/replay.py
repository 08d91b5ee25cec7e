"""Replay: stream a table through the engine the daemon uses and write ``SCORES.csv``."""

from __future__ import annotations

import csv
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from detector import bundle, train
from detector.config import Config
from detector.data import Table, align_features, read_table
from detector.engine import Engine, Scored
from detector.errors import InputError


def score_table(table: Table, b: bundle.Bundle, cfg: Config) -> Scored:
    """Every row, in order, as one stream through a fresh engine, state carried."""
    engine = Engine(b, cfg.score, cfg.engine)
    stream = Path(table.source).stem or "replay"
    now = float(np.nanmax(table.times)) if len(table) else 0.0
    return engine.process([stream] * len(table), table.times, table.values, now=now)


def write_scores(path: Path, table: Table, scored: Scored) -> None:
    def num(v: float) -> str:
        return "" if math.isnan(v) else repr(float(v))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", *table.features, "error", "score", "anomaly"])
            for i in range(len(table)):
                w.writerow([table.time_text[i], *(num(v) for v in table.values[i]),
                            num(scored.error[i]), num(scored.score[i]), int(scored.flag[i])])
    except OSError as err:
        raise InputError(str(path), f"cannot write: {err.strerror or err}") from None


def run(data: Path, out: Path, cfg: Config, model: Path | None = None, train_rows: int | None = None,
        features: list[str] | None = None, time_column: str | None = None,
        save_model: Path | None = None, log: Callable[[str], None] = train._stderr) -> Scored:
    if model is not None:
        b = bundle.load(model)
        table = align_features(read_table(data, features or b.features, time_column), b.features)
    else:
        assert train_rows is not None
        table = read_table(data, features, time_column)
        if train_rows > len(table):
            raise InputError(str(data), f"--train-rows {train_rows} but the file has {len(table)} rows")
        with tempfile.TemporaryDirectory(prefix="anomaly-detector-") as tmp:
            dest = save_model or Path(tmp) / Path(data).stem
            fit_log = log if save_model else (  # not "wrote" a folder deleted right after
                lambda m: log(m.replace(f"wrote {dest}", "fitted a model (not kept; --save-model DIR keeps it)")))
            b = train.fit([table.head(train_rows)], dest, cfg, name=Path(data).stem, log=fit_log)
    scored = score_table(table, b, cfg)
    write_scores(out, table, scored)
    reasons = Counter(scored.rejected.values())
    log(f"wrote {out}: {len(table)} rows, {int(scored.flag.sum())} flagged, "
        f"{sum(e.event == 'anomaly_start' for e in scored.events)} episode(s)"
        + (f"; rows not scored: {dict(reasons)}" if reasons else ""))
    return scored

