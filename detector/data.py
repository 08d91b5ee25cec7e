"""Reading sensor tables (CSV, Parquet): the time column, the feature columns, the labels.

Policy, as the contract states it: the delimiter is sniffed (``,`` or ``;``); the time
column is ``--time-column`` or the first column named like a time or holding ISO 8601
dates; features are ``--features`` or every numeric column except the time column and
known label columns. Empty cells, ``nan`` and non-finite numbers are *missing* (NaN) and
left for :mod:`detector.prep` to handle explicitly; any other text in a number column is
an error naming the file, line and column.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.errors import InputError
from detector.timeparse import epoch_seconds, iso_epoch

LABEL_COLUMNS = frozenset({"anomaly", "changepoint", "label", "labels", "is_anomaly"})
TIME_NAMES = frozenset({"timestamp", "time", "datetime", "date", "ts"})
_MISSING = frozenset({"", "nan", "na", "null", "none"})


@dataclass
class Table:
    source: str
    features: list[str]
    values: np.ndarray  # (rows, features) float64, NaN where missing
    times: np.ndarray  # (rows,) float64 epoch seconds (row index when there is no time column)
    time_text: list[str]  # the time cells as written, for SCORES.csv
    time_column: str | None
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.times)

    def head(self, n: int) -> "Table":
        return Table(self.source, self.features, self.values[:n], self.times[:n],
                     self.time_text[:n], self.time_column,
                     {k: v[:n] for k, v in self.labels.items()})


def parse_time(text: str) -> float:
    """Epoch seconds (or milli-, micro-, nanoseconds, told apart by size) or ISO 8601; naive means UTC."""
    s = text.strip()
    try:
        v = float(s)
    except ValueError:
        return iso_epoch(s)
    if not math.isfinite(v):
        raise ValueError(f"time {text!r} is not finite")
    return epoch_seconds(v)


def _is_iso_time(text: str) -> bool:
    s = text.strip()
    try:
        float(s)
        return False
    except ValueError:
        pass
    try:
        parse_time(s)
        return True
    except ValueError:
        return False


def _number(text: str) -> float | None:
    """A number, NaN for a missing cell, None for text."""
    s = text.strip()
    if s.lower() in _MISSING:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else math.nan


def _pick_time_column(header: list[str], first: list[str], wanted: str | None,
                      source: str) -> int | None:
    if wanted is not None:
        if wanted not in header:
            raise InputError(source, f"time column {wanted!r} not found (columns: {', '.join(header)})")
        return header.index(wanted)
    for i, name in enumerate(header):
        if name.strip().lower() in TIME_NAMES or (i < len(first) and _is_iso_time(first[i])):
            return i
    return None


def _assemble(source: str, header: list[str], rows: list[list[str]], line_of: list[int],
              features: list[str] | None, time_column: str | None) -> Table:
    if not rows:
        raise InputError(source, "no data rows")
    ti = _pick_time_column(header, rows[0], time_column, source)
    lowered = [h.strip().lower() for h in header]
    if features is not None:
        missing = [f for f in features if f not in header]
        if missing:
            raise InputError(source, f"feature column(s) not found: {', '.join(missing)} "
                                     f"(columns: {', '.join(header)})")
        fidx = [header.index(f) for f in features]
    else:
        fidx = []
        for i, name in enumerate(lowered):
            if i == ti or name in LABEL_COLUMNS:
                continue
            first = next((r[i] for r in rows if r[i].strip().lower() not in _MISSING), None)
            if first is not None and _number(first) is not None:
                fidx.append(i)
        if not fidx:
            raise InputError(source, "no numeric feature column "
                                     f"(columns: {', '.join(header)})")
    values = np.empty((len(rows), len(fidx)), dtype=np.float64)
    for r, row in enumerate(rows):
        for j, i in enumerate(fidx):
            v = _number(row[i])
            if v is None:
                raise InputError(f"{source}:{line_of[r]}",
                                 f"column {header[i]!r}: {row[i]!r} is not a number")
            values[r, j] = v
    if ti is None:
        times = np.arange(len(rows), dtype=np.float64)
        time_text = [str(i) for i in range(len(rows))]
    else:
        time_text = [row[ti] for row in rows]
        times = np.empty(len(rows), dtype=np.float64)
        for r, t in enumerate(time_text):
            try:
                times[r] = parse_time(t)
            except ValueError:
                raise InputError(f"{source}:{line_of[r]}",
                                 f"column {header[ti]!r}: {t!r} is not a time") from None
    labels = {}
    for i, name in enumerate(lowered):
        if name in LABEL_COLUMNS and i not in fidx:
            col = np.array([_number(row[i]) for row in rows], dtype=object)
            if all(v is not None for v in col):
                labels[name] = np.nan_to_num(col.astype(np.float64)).astype(np.int8)
    return Table(source, [header[i] for i in fidx], values, times, time_text,
                 None if ti is None else header[ti], labels)


def read_csv(path: Path, features: list[str] | None = None,
             time_column: str | None = None) -> Table:
    source = str(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except OSError as err:
        raise InputError(source, f"cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(source, "not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError(source, "empty file (expected a header row)")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise InputError(f"{source}:1", f"unreadable CSV header: {err}") from None
    if len(set(header)) != len(header):
        raise InputError(source, "duplicate column names in the header")
    rows: list[list[str]] = []
    line_of: list[int] = []
    try:
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise InputError(f"{source}:{lineno}",
                                 f"{len(row)} fields, the header has {len(header)}")
            rows.append(row)
            line_of.append(lineno)
    except csv.Error as err:  # a field over the csv module's limit (131072 characters), a stray NUL
        raise InputError(f"{source}:{reader.line_num}", f"unreadable CSV: {err}") from None
    return _assemble(source, header, rows, line_of, features, time_column)


def read_parquet(path: Path, features: list[str] | None = None,
                 time_column: str | None = None) -> Table:
    source = str(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(source, "reading Parquet needs pyarrow: "
                                 "pip install 'anomaly-detector[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise InputError(source, f"cannot read Parquet: {err}") from None
    header = [str(n) for n in table.column_names]
    cols = []
    for name in header:
        col = table.column(name)
        if hasattr(col.type, "unit") and "timestamp" in str(col.type):
            cols.append([("" if v is None else v.isoformat()) for v in col.to_pylist()])
        else:
            cols.append(["" if v is None else str(v) for v in col.to_pylist()])
    rows = [list(r) for r in zip(*cols)]
    return _assemble(source, header, rows, list(range(1, len(rows) + 1)), features, time_column)


def read_table(path: str | Path, features: list[str] | None = None,
               time_column: str | None = None) -> Table:
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return read_parquet(p, features, time_column)
    return read_csv(p, features, time_column)


def align_features(table: Table, features: list[str]) -> Table:
    """Reorder a table's columns to a model's feature list; missing ones are an error."""
    if table.features == features:
        return table
    missing = [f for f in features if f not in table.features]
    if missing:
        raise InputError(table.source, f"the model needs feature(s) missing here: "
                                       f"{', '.join(missing)} (file has: {', '.join(table.features)})")
    idx = [table.features.index(f) for f in features]
    return Table(table.source, list(features), table.values[:, idx], table.times,
                 table.time_text, table.time_column, table.labels)
