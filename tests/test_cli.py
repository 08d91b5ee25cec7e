"""The real command line, as a user runs it: train, replay, bad input, config checks."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SMALL = ["--epochs", "3"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detector", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def error_after_progress(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """``one_line_error`` for train, which logs its progress (the data's summary) first."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("anomaly-detector: error: ") and all(n in last for n in needles), last


@pytest.fixture(scope="module")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "config.toml"
    p.write_text("[model]\nhidden = 8\nbottleneck = 4\n[train]\nseq_len = 32\n", encoding="utf-8")
    return p


def read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_train_then_replay_writes_bundle_and_report(tmp_path: Path, data_dir: Path,
                                                           small_config: Path) -> None:
    out = tmp_path / "models" / "pump"
    proc = run("train", "--data", str(data_dir / "normal.csv"), "--out", str(out),
               "--config", str(small_config), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/3" in proc.stderr
    for name in ("model.keras", "manifest.json", "weights.npz", "report.txt", "report.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["features"] == ["temperature", "pressure", "flow", "vibration"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run("replay", "--model", str(out), "--data", str(data_dir / "faults.csv"),
               "--out", str(tmp_path / "quick.csv"))
    assert proc.returncode == 0, proc.stderr
    assert len(read_scores(tmp_path / "quick.csv")) == 900


def test_replay_flags_injected_faults(tmp_path: Path, data_dir: Path, bundle_dir: Path) -> None:
    scores = tmp_path / "SCORES.csv"
    proc = run("replay", "--model", str(bundle_dir), "--data", str(data_dir / "faults.csv"),
               "--out", str(scores))
    assert proc.returncode == 0, proc.stderr
    rows = read_scores(scores)
    assert list(rows[0]) == ["timestamp", "temperature", "pressure", "flow", "vibration",
                             "error", "score", "anomaly"]
    assert len(rows) == 900
    s = np.array([float(r["score"]) for r in rows])
    assert np.all(np.isfinite(s)) and s.min() >= 0 and s.max() <= 1
    flags = np.array([int(r["anomaly"]) for r in rows])
    with open(data_dir / "faults.csv", newline="") as fh:
        labels = np.array([int(r["anomaly"]) for r in csv.DictReader(fh, delimiter=";")])
    # Injected faults are caught, and far more often inside them than outside.
    assert flags[labels == 1].mean() > 5 * max(flags[labels == 0].mean(), 0.01)


def test_replay_train_rows_is_deterministic(tmp_path: Path, data_dir: Path, small_config: Path) -> None:
    outs = []
    for k in range(2):
        out = tmp_path / f"s{k}.csv"
        proc = run("replay", "--train-rows", "300", "--data", str(data_dir / "faults.csv"),
                   "--out", str(out), "--config", str(small_config), "--seed", "7", *SMALL)
        assert proc.returncode == 0, proc.stderr
        assert "fitted a model (not kept" in proc.stderr and "wrote /tmp/anomaly-detector-" not in proc.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("content, needle", [
    ("", "empty file"),
    ("timestamp,name\n2020-01-01 00:00:00,pump\n", "no numeric feature column"),
    ("timestamp,a\n2020-01-01 00:00:00,1.0\n2020-01-01 00:00:01,abc\n", ":3: column 'a': 'abc' is not a number"),
    ("timestamp,a\n", "no data rows"),
    ("timestamp,a,b\n2020-01-01 00:00:00,1.0\n", ":2: 2 fields, the header has 3"),
])
def test_bad_csv_exits_2_with_one_line_naming_file_and_problem(tmp_path: Path, content: str,
                                                                needle: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(content, encoding="utf-8")
    proc = run("train", "--data", str(bad), "--out", str(tmp_path / "m"))
    one_line_error(proc, str(bad), needle)


def test_more_bad_input_exits_2_with_one_line(tmp_path: Path, data_dir: Path, bundle_dir: Path) -> None:
    normal = str(data_dir / "normal.csv")
    # a cell over the csv module's limit
    big = tmp_path / "big.csv"
    big.write_text("timestamp,a\n2020-01-01 00:00:00," + "1" * 200_000 + "\n", encoding="utf-8")
    one_line_error(run("replay", "--model", str(bundle_dir), "--data", str(big), "--out", str(tmp_path / "s.csv")),
                   f"{big}:2", "unreadable CSV")
    # features sampled at different rates: after the missing-value policy only single rows
    rates = tmp_path / "rates.csv"
    rates.write_text("timestamp,temp,pressure\n" + "".join(
        f"2020-01-01 00:{i // 60:02d}:{i % 60:02d},{i % 7},{i % 5 if i % 10 == 0 else ''}\n" for i in range(600)),
        encoding="utf-8")
    error_after_progress(run("train", "--data", str(rates), "--out", str(tmp_path / "m")),
                         f"{rates}: no stretch of rows", "max_fill")
    assert not (tmp_path / "m").exists()
    # outputs that cannot be written: refused before any training or scoring
    (tmp_path / "afile").write_text("", encoding="utf-8")
    error_after_progress(run("train", "--data", normal, "--out", str(tmp_path / "afile")), "afile", "cannot write")
    one_line_error(run("replay", "--model", str(bundle_dir), "--data", normal, "--out", str(tmp_path)),
                   "is a directory")
    # arguments that --model would ignore, and values out of range
    one_line_error(run("replay", "--model", str(bundle_dir), "--data", normal, "--out", str(tmp_path / "s.csv"),
                       "--seed", "3"), "--seed", "only with --train-rows")
    for args, needle in ((("train", "--data", normal, "--out", str(tmp_path / "m"), "--seed", "-1"), "--seed"),
                         (("demo", "--mqtt-port", "70000"), "--mqtt-port"),
                         (("demo", "--streams", "0"), "streams must be >= 1"),
                         (("simulate", "--seed", "-1"), "seed must be")):
        proc = run(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr


def test_training_that_diverges_is_one_line_naming_the_learning_rate(tmp_path: Path, data_dir: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[model]\nhidden = 8\nbottleneck = 4\n[train]\nseq_len = 32\nlearning_rate = 1e30\n",
                   encoding="utf-8")
    proc = run("train", "--data", str(data_dir / "normal.csv"), "--out", str(tmp_path / "m"), "--config", str(cfg),
               "--epochs", "2")
    error_after_progress(proc, "[train] learning_rate: training diverged")


def test_missing_feature_is_named(tmp_path: Path, data_dir: Path, bundle_dir: Path) -> None:
    proc = run("train", "--data", str(data_dir / "normal.csv"), "--out", str(tmp_path / "m"),
               "--features", "flow,humidity")
    one_line_error(proc, "normal.csv", "humidity")
    only_three = tmp_path / "three.csv"
    lines = (data_dir / "normal.csv").read_text().splitlines()
    only_three.write_text("\n".join(",".join(ln.split(",")[:4]) for ln in lines) + "\n")
    proc = run("replay", "--model", str(bundle_dir), "--data", str(only_three), "--out", str(tmp_path / "s.csv"))
    one_line_error(proc, "three.csv", "vibration")


def test_corrupt_or_mismatched_bundles_are_refused(tmp_path: Path, data_dir: Path, bundle_dir: Path) -> None:
    scores = str(tmp_path / "s.csv")
    data = str(data_dir / "faults.csv")

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(run("replay", "--model", str(broken), "--data", data, "--out", scores),
                   "model.keras", "checksum")

    mismatch = tmp_path / "mismatch"
    shutil.copytree(bundle_dir, mismatch)
    m = json.loads((mismatch / "manifest.json").read_text())
    m["features"] = ["temperature", "pressure", "flow"]
    (mismatch / "manifest.json").write_text(json.dumps(m))
    one_line_error(run("replay", "--model", str(mismatch), "--data", data, "--out", scores),
                   "manifest.json", "3 features")

    garbled = tmp_path / "garbled"
    shutil.copytree(bundle_dir, garbled)
    (garbled / "manifest.json").write_text("{not json")
    one_line_error(run("replay", "--model", str(garbled), "--data", data, "--out", scores),
                   "manifest.json", "unreadable manifest")

    one_line_error(run("replay", "--model", str(tmp_path / "nope"), "--data", data, "--out", scores),
                   "nope", "not found")


def test_keras_archive_corrupted_but_checksum_updated_is_still_refused(tmp_path: Path, bundle_dir: Path) -> None:
    """The keras runtime loads the archive itself (safe_mode=True); a broken one is one line."""
    from detector import bundle as bundle_mod
    from detector.errors import InputError

    broken = tmp_path / "b"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.keras").write_bytes(b"garbage")
    m = json.loads((broken / "manifest.json").read_text())
    m["files"]["model.keras"] = bundle_mod.sha256(broken / "model.keras")
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="cannot load Keras model"):
        bundle_mod.load(broken).runtime("keras")


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[score]\nthreshold = 0.995\n")
    proc = run("check-config", "--config", str(good))
    assert proc.returncode == 0 and "ok" in proc.stdout
    for text, needle in [
        ("[score]\nthreshhold = 0.9\n", "[score] threshhold: unknown key"),
        ("[score]\nthreshold = 'high'\n", "[score] threshold: expected float"),
        ("[score]\nthreshold = 1.5\n", "[score] threshold: 1.5 must be between 0 and 1"),
        ("[nonsense]\n", "[nonsense]: unknown section"),
        ("[model\n", "not valid TOML"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        one_line_error(run("check-config", "--config", str(bad)), str(bad), needle)


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = run("check-config", "--config", str(root / "config.toml"))
    assert proc.returncode == 0, proc.stderr


def test_every_command_has_help() -> None:
    for cmd in ("train", "replay", "check-config"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "usage: anomaly-detector" in proc.stdout
