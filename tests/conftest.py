"""Shared fixtures: synthetic plant data written as CSV, and one small real trained model."""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from detector import config, plant  # noqa: E402


def write_csv(path: Path, times: np.ndarray, values: np.ndarray, features: list[str],
              labels: np.ndarray | None = None, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(["timestamp", *features] + (["anomaly"] if labels is not None else []))
        for i, t in enumerate(times):
            ts = datetime.fromtimestamp(float(t), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            row = [ts, *(f"{v:.6g}" for v in values[i])]
            if labels is not None:
                row.append(int(labels[i]))
            w.writerow(row)
    return path


@pytest.fixture(scope="session")
def small_cfg() -> config.Config:
    """A model small and quick enough for tests, still a real trained Keras LSTM."""
    cfg = config.Config()
    return replace(cfg, model=replace(cfg.model, hidden=12, bottleneck=4),
                   train=replace(cfg.train, epochs=6, seq_len=32, batch_size=32))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    times, values = plant.normal(1200, seed=1)
    write_csv(d / "normal.csv", times, values, plant.FEATURES)
    times, values, labels, _ = plant.with_faults(900, seed=2, n_faults=4, first=200)
    write_csv(d / "faults.csv", times, values, plant.FEATURES, labels, delimiter=";")
    return d


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, small_cfg: config.Config) -> Path:
    from detector import train
    from detector.data import read_table

    out = tmp_path_factory.mktemp("models") / "plant-test"
    train.fit([read_table(data_dir / "normal.csv")], out, small_cfg, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def bundle(bundle_dir: Path):
    from detector import bundle as bundle_mod

    return bundle_mod.load(bundle_dir)

