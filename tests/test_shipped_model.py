"""The model shipped in models/plant: loads, its runtimes agree, and it catches plant faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector import bundle, plant
from detector.engine import Engine
from detector.runtime import AutoRuntime, OnnxRuntime, run_sequence

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "plant"


@pytest.fixture(scope="module")
def shipped() -> bundle.Bundle:
    return bundle.load(SHIPPED, features=plant.FEATURES)


def test_runtimes_agree_on_the_shipped_model(shipped: bundle.Bundle) -> None:
    rng = np.random.default_rng(3)
    seqs = rng.normal(0, 1.5, size=(40, 50, 4)).astype(np.float32)  # 40 streams: auto uses ONNX
    ref, _, _ = run_sequence(shipped.runtime("numpy"), seqs)
    for name, kind in (("onnx", OnnxRuntime), ("auto", AutoRuntime)):
        rt = shipped.runtime(name)
        assert isinstance(rt, kind)
        out, _, _ = run_sequence(rt, seqs)
        assert float(np.max(np.abs(out - ref))) <= 1e-5


def test_shipped_model_catches_plant_faults_and_stays_quiet_on_normal_data(shipped: bundle.Bundle) -> None:
    times, values, labels, faults = plant.with_faults(3000, seed=3, n_faults=8, first=300)
    res = Engine(shipped).process(["plant"] * len(times), times, values, now=float(times[-1]))
    caught = [f for f in faults if res.in_episode[f.start: f.start + f.length].any()]
    assert len(caught) >= 6, [(f.kind, f.feature) for f in faults if f not in caught]
    t2, v2 = plant.normal(3000, seed=11)
    quiet = Engine(shipped).process(["plant"] * len(t2), t2, v2, now=float(t2[-1]))
    assert quiet.flag.mean() < 0.01


def test_wrong_features_are_refused(tmp_path: Path) -> None:
    from detector.errors import InputError

    with pytest.raises(InputError, match="do not match"):
        bundle.load(SHIPPED, features=["temperature"])
