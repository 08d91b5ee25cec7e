"""Reading tables and the explicit NaN / gap / order policy for training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.calibration import Calibration
from detector.data import read_table
from detector.errors import InputError
from detector.prep import segments


def test_semicolon_csv_time_column_and_label_columns(tmp_path: Path) -> None:
    p = tmp_path / "skab_like.csv"
    p.write_text("datetime;a;b;anomaly;changepoint\n"
                 "2020-03-09 10:14:33;1.0;2.0;0;0\n"
                 "2020-03-09 10:14:34;;2.5;1;1\n")
    t = read_table(p)
    assert t.features == ["a", "b"] and t.time_column == "datetime"
    assert t.times[1] - t.times[0] == 1.0
    assert np.isnan(t.values[1, 0])
    assert t.labels["anomaly"].tolist() == [0, 1]


def test_epoch_times_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"ts": [1_700_000_000.0, 1_700_000_060.0], "v": [1.5, 2.5]}), p)
    t = read_table(p)
    assert t.features == ["v"] and t.times.tolist() == [1_700_000_000.0, 1_700_000_060.0]


def test_unknown_time_column_is_named(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("timestamp,v\n2020-01-01,1\n")
    with pytest.raises(InputError, match="time column 'when' not found"):
        read_table(p, time_column="when")


def test_nan_policy_fills_short_runs_and_splits_on_long_runs_and_gaps() -> None:
    v = np.arange(30, dtype=float).reshape(-1, 1)
    v[5] = np.nan  # short run: filled
    v[10:14] = np.nan  # 4 > max_fill 2: dropped, split
    t = np.arange(30, dtype=float)
    t[20:] += 100  # a gap before row 20
    t[25] = t[24]  # duplicate time: dropped
    segs, rep = segments(v, t, max_fill=2, gap_factor=10, source="x")
    assert rep.cells_filled == 1 and rep.rows_dropped_missing == 4
    assert rep.gaps == 1 and rep.rows_dropped_order == 1 and rep.segments == 3
    assert [len(s) for s in segs] == [10, 6, 9]
    assert segs[0][5, 0] == 4.0


def test_calibration_is_monotone_bounded_and_extrapolates_the_tail() -> None:
    rng = np.random.default_rng(0)
    cal = Calibration.fit(rng.chisquare(4, 2000))
    e = np.logspace(-3, 3, 200)
    s = cal.score(e)
    assert np.all(np.diff(s) >= 0) and s.min() >= 0 and s.max() <= 1
    assert 0.45 < cal.score(np.array([np.median(rng.chisquare(4, 2000))]))[0] < 0.55
    # Beyond everything seen, scores still separate: no plateau at 1 - 1/n.
    assert cal.score(np.array([40.0]))[0] < cal.score(np.array([80.0]))[0] < 1.0
    for level in (0.9, 0.999):
        assert np.isclose(cal.score(np.array([cal.error_at(level)]))[0], level, atol=1e-6)
