"""evaluate: point metrics, the NAB score (hand-computed cases), label matching, the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from detector import evaluate as ev
from detector.data import Table

T0 = 1_400_000_000  # epoch seconds; rows one minute apart
STD = ev.PROFILES["standard"]


def stamp(i: int) -> str:
    return datetime.fromtimestamp(T0 + 60 * i, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def series(score: list[float] | np.ndarray, windows: list[tuple[int, int]],
           flag: np.ndarray | None = None) -> ev.Series:
    score = np.asarray(score, dtype=float)
    n = len(score)
    t = Table("s.csv", ["value"], np.zeros((n, 1)), T0 + 60.0 * np.arange(n),
              [stamp(i) for i in range(n)], "timestamp")
    return ev.Series("s.csv", t, score, score >= 0.5 if flag is None else flag, ev.mask(n, windows), windows)


def write_scores(path: Path, score: np.ndarray, flag: np.ndarray, cols: tuple[str, ...] = ("score", "anomaly"),
                 stamps: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value", "error", *cols])
        for i in range(len(score)):
            cell = {"score": f"{score[i]:.6f}", "anomaly": int(flag[i])}
            w.writerow([stamps[i] if stamps else stamp(i), 1.0, 0.1, *(cell[c] for c in cols)])
    return path


def S(x: float) -> float:  # NAB's scaled sigmoid, written out independently
    return -1.0 if x >= 3 else 2 / (1 + math.exp(5 * x)) - 1


# -- the building blocks ------------------------------------------------------------------

def test_scaled_sigmoid_matches_nab_documented_values() -> None:
    # The values quoted in NAB's sweeper.py docstring.
    assert float(ev.scaled_sigmoid(-1.0)) == pytest.approx(0.98661, abs=1e-5)
    assert float(ev.scaled_sigmoid(-0.5)) == pytest.approx(0.84828, abs=1e-5)
    assert float(ev.scaled_sigmoid(0.0)) == 0.0
    assert float(ev.scaled_sigmoid(1.0)) == pytest.approx(-0.98661, abs=1e-5)
    assert float(ev.scaled_sigmoid(3.0)) == -1.0 and float(ev.scaled_sigmoid(50.0)) == -1.0


@pytest.mark.parametrize("n,p", [(10, 1), (100, 15), (4033, 604), (5000, 750), (22695, 750), (19, 2)])
def test_probation_is_15_percent_capped_at_750(n: int, p: int) -> None:
    assert ev.probation_rows(n) == p


def test_point_metrics_hand_case() -> None:
    pred = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    label = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    m = ev.point_metrics(pred, label)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 4)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert m["F1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["FAR"] == pytest.approx(2 / 6) and m["MAR"] == pytest.approx(1 / 4)
    none = ev.point_metrics(np.zeros(4, bool), np.array([0, 1, 0, 0], bool))
    assert none["F1"] == 0.0 and none["FAR"] == 0.0 and none["MAR"] == 1.0


def test_runs_are_label_windows() -> None:
    assert ev.runs(np.array([0, 1, 1, 0, 0, 1, 0, 1])) == [(1, 2), (5, 5), (7, 7)]
    assert ev.runs(np.zeros(3)) == []


# -- NAB score on hand-computed series ----------------------------------------------------

def hand_case() -> ev.Series:
    # 20 rows: probation = 3 rows; one window, rows 10..14 (5 rows).
    score = np.zeros(20)
    score[1] = 1.0  # in the probationary period: never counts
    score[12], score[13] = 0.9, 0.95  # inside the window; the later row scores higher
    score[5] = 0.8  # before any window: full fpWeight
    score[16] = 0.7  # after the window: decayed penalty
    return series(score, [(10, 14)])


def test_earliest_detection_credit_fp_penalties_and_probation() -> None:
    f = hand_case()
    at = {th: ev.nab_file(f, th, STD)["raw"] for th in (0.95, 0.9, 0.8, 0.7)}
    assert at[0.95] == pytest.approx(S(-2 / 5) / S(-1))  # row 13 alone
    assert at[0.9] == pytest.approx(S(-3 / 5) / S(-1))  # row 12 is earlier: it alone counts
    assert at[0.8] == pytest.approx(at[0.9] - 0.11)  # + FP before the window
    assert at[0.7] == pytest.approx(at[0.8] + 0.11 * S((16 - 14) / 4))  # + FP 2 rows after it
    assert S(0.5) == pytest.approx(-0.848284, abs=1e-6)
    d = ev.nab_file(f, 0.9, STD)
    assert d["probation"] == 3 and d["fp_rows"] == 0
    assert d["windows"][0]["detected"] == stamp(12)


def test_threshold_optimisation_picks_the_best_and_normalises() -> None:
    r = ev.nab_corpus([hand_case()], ev.PROFILES)
    std = r["profiles"]["standard"]
    assert r["windows"] == 1 and std["threshold"] == pytest.approx(0.9)
    assert std["raw"] == pytest.approx(S(-0.6) / S(-1))
    assert std["score"] == pytest.approx(100 * (std["raw"] + 1) / 2)
    # Missing the window costs 2 in reward_low_FN_rate, so detecting matters more there.
    assert r["profiles"]["reward_low_FN_rate"]["null"] == -2.0


def test_missed_window_costs_fn_weight() -> None:
    score = np.zeros(40)
    score[10] = 1.0  # first row of the first window
    f = series(score, [(10, 14), (25, 29)])
    assert ev.nab_file(f, 0.5, STD)["raw"] == pytest.approx(1.0 - 1.0)
    assert ev.nab_file(f, 0.5, ev.PROFILES["reward_low_FN_rate"])["raw"] == pytest.approx(1.0 - 2.0)
    r = ev.nab_corpus([f], {"standard": STD})["profiles"]["standard"]
    assert r["score"] == pytest.approx(50.0)
    assert [w["detected"] is None for w in r["files"][0]["windows"]] == [False, True]


def test_perfect_detector_scores_100_and_null_0_every_profile() -> None:
    files = []
    for n, wins in ((300, [(100, 120), (200, 230)]), (500, [(300, 340)]), (120, [(60, 61), (90, 90)])):
        perfect = np.zeros(n)
        for s, _ in wins:
            perfect[s] = 1.0
        files.append((perfect, wins))
    r = ev.nab_corpus([series(p, w) for p, w in files], ev.PROFILES)
    for v in r["profiles"].values():
        assert v["score"] == pytest.approx(100.0)
    null = ev.nab_corpus([series(np.zeros(len(p)), w) for p, w in files], ev.PROFILES)
    for v in null["profiles"].values():
        assert v["score"] == pytest.approx(0.0) and v["threshold"] is None
    assert null["windows"] == 5


def test_windows_inside_probation_are_not_counted() -> None:
    score = np.zeros(100)
    score[5] = score[50] = 1.0  # 5 is in the 15-row probation, like its window
    r = ev.nab_corpus([series(score, [(3, 8), (50, 60)])], {"standard": STD})
    assert r["windows"] == 1 and r["profiles"]["standard"]["score"] == pytest.approx(100.0)


def test_corpus_sweep_agrees_with_direct_scoring_at_every_threshold() -> None:
    rng = np.random.default_rng(7)
    files = [series(np.round(rng.random(n), 2), w) for n, w in
             ((400, [(100, 140), (300, 330)]), (250, [(60, 90)]), (150, []))]
    r = ev.nab_corpus(files, ev.PROFILES)
    for name, cost in ev.PROFILES.items():
        brute = max([-cost["fnWeight"] * 3] + [sum(ev.nab_file(f, th, cost)["raw"] for f in files)
                                               for th in np.unique(np.concatenate([f.score for f in files]))])
        got = r["profiles"][name]
        assert got["raw"] == pytest.approx(brute)
        assert sum(d["raw"] for d in got["files"]) == pytest.approx(got["raw"])


# -- files, labels, CLI ------------------------------------------------------------------

def cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    return ev.run(p.parse_args(list(argv)))


def one_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def nab_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    score = np.zeros(200)
    score[100] = 0.9
    score[150] = 0.6  # a false positive after the window
    flag = score > 0.5
    s = write_scores(tmp_path / "machine.csv", score, flag)
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"realKnownCause/machine.csv": [[stamp(95) + ".000000", stamp(110)]],
                                   "other/else.csv": []}))
    return tmp_path, s, windows


def test_cli_windows_json_report_json_and_plot(nab_files: tuple[Path, Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    d, s, windows = nab_files
    assert cli("--scores", str(s), "--labels", str(windows), "--json", str(d / "r.json"),
               "--plot", str(d / "plots")) == 0
    out = capsys.readouterr().out
    assert "reward_low_FN_rate" in out and "first detection" in out
    r = json.loads((d / "r.json").read_text())
    assert r["point"]["tp"] == 1 and r["point"]["fp"] == 1 and r["point"]["fn"] == 15
    std = r["nab"]["profiles"]["standard"]
    assert std["threshold"] == pytest.approx(0.9) and std["files"][0]["fp_rows"] == 0
    assert std["score"] == pytest.approx(100 * (1 + S(-11 / 16) / S(-1)) / 2)
    assert (d / "plots" / "machine.png").stat().st_size > 1000


def test_cli_label_column_by_row_and_by_timestamp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flag = np.zeros(50, dtype=bool)
    flag[20:30] = True
    s = write_scores(tmp_path / "s.csv", flag * 0.9, flag)
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["datetime", "x", "fault"])
        for i in range(60):  # 10 more rows than scored: matched by timestamp
            w.writerow([stamp(i - 5), 1.0, int(25 <= i - 5 < 35)])
    assert cli("--scores", str(s), "--labels", str(tmp_path / "data.csv"), "--label-column", "fault",
               "--json", str(tmp_path / "r.json"), "--skip-rows", "10") == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["point"]["tp"], r["point"]["fp"], r["point"]["fn"]) == (5, 5, 5)
    assert r["point"]["rows"] == 40
    capsys.readouterr()


def test_cli_several_files_total_is_concatenated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = []
    for k in range(2):
        lab = np.zeros(30, dtype=bool)
        lab[10:20] = True
        flag = np.roll(lab, 5 * k)
        args += ["--scores", str(write_scores(tmp_path / f"{k}.csv", flag * 1.0, flag))]
        data = tmp_path / f"d{k}.csv"
        with open(data, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "x", "anomaly"])
            w.writerows([stamp(i), 0.5, int(lab[i])] for i in range(30))
        args += ["--labels", str(data)]
    assert cli(*args, "--json", str(tmp_path / "r.json")) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert [f["point"]["F1"] for f in r["files"]] == [1.0, 0.5]
    assert (r["point"]["tp"], r["point"]["fp"], r["point"]["fn"]) == (15, 5, 5)
    assert "TOTAL" in capsys.readouterr().out


def test_cli_nab_key_maps_an_unmatched_name(nab_files: tuple[Path, Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    d, s, windows = nab_files
    renamed = d / "SCORES.csv"
    renamed.write_text(s.read_text())
    one_error(capsys, cli("--scores", str(renamed), "--labels", str(windows)), "SCORES.csv", "--nab-key")
    assert cli("--scores", str(renamed), "--labels", str(windows),
               "--nab-key", "SCORES.csv=realKnownCause/machine.csv") == 0
    capsys.readouterr()


def test_cli_bad_inputs_exit_2_with_one_line(nab_files: tuple[Path, Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    d, s, windows = nab_files
    one_error(capsys, cli("--scores", str(d / "nope.csv"), "--labels", str(windows)), "nope.csv")
    one_error(capsys, cli("--scores", str(s), "--labels", str(d / "nope.json")), "nope.json")
    noscore = write_scores(d / "noscore.csv", np.zeros(5), np.zeros(5), cols=("anomaly",))
    one_error(capsys, cli("--scores", str(noscore), "--labels", str(windows)), "noscore.csv", "score")
    one_error(capsys, cli("--scores", str(s), "--labels", str(windows), "--nab-key", "machine.csv=x/y.csv"),
              "unknown window key", "x/y.csv")
    bad = d / "bad.json"
    bad.write_text("{not json")
    one_error(capsys, cli("--scores", str(s), "--labels", str(bad)), "bad.json", "JSON")
    far = d / "far.json"
    far.write_text(json.dumps({"machine.csv": [["2030-01-01 00:00:00", "2030-01-02 00:00:00"]]}))
    one_error(capsys, cli("--scores", str(s), "--labels", str(far)), "far.json", "matches no rows")
    short = d / "short.csv"
    with open(short, "w", newline="") as fh:
        csv.writer(fh).writerows([["x", "anomaly"]] + [[1.0, 0]] * 7)
    one_error(capsys, cli("--scores", str(s), "--labels", str(short)), "machine.csv", "200 scored rows", "7 label")
    nolabel = d / "nolabel.csv"
    nolabel.write_text("timestamp,x\n" + "".join(f"{stamp(i)},1\n" for i in range(200)))
    one_error(capsys, cli("--scores", str(s), "--labels", str(nolabel)), "nolabel.csv", "--label-column")
    one_error(capsys, cli("--scores", str(s), "--scores", str(s), "--labels", str(short),
                          "--labels", str(short), "--labels", str(short)), "--labels")
    prof = d / "prof.json"
    prof.write_text(json.dumps({"standard": {"tpWeight": 1}}))
    one_error(capsys, cli("--scores", str(s), "--labels", str(windows), "--profiles", str(prof)), "prof.json")
    nan = write_scores(d / "nan.csv", np.array([0.1, np.nan, 0.2]), np.zeros(3))
    one_error(capsys, cli("--scores", str(nan), "--labels", str(windows), "--nab-key",
                          "nan.csv=realKnownCause/machine.csv"), "nan.csv:3", "score")
