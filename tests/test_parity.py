"""The numpy step, run reading by reading with carried state, is the Keras model."""

from __future__ import annotations

import numpy as np

from detector import model
from detector.engine import Engine
from detector.runtime import KerasRuntime, NumpyRuntime, run_sequence


def test_numpy_step_matches_keras_over_whole_sequences_for_several_streams(bundle) -> None:
    net = model.load(str(bundle.path / "model.keras"))
    rng = np.random.default_rng(0)
    seqs = rng.normal(0, 1.5, size=(5, 300, len(bundle.features))).astype(np.float32)
    keras_out = model.keras.ops.convert_to_numpy(net(seqs, training=False))
    step_out, _, _ = run_sequence(NumpyRuntime(bundle.weights), seqs)
    assert keras_out.shape == step_out.shape == seqs.shape
    assert float(np.max(np.abs(keras_out - step_out))) <= 1e-5


def test_keras_runtime_step_matches_numpy_runtime(bundle) -> None:
    rng = np.random.default_rng(1)
    seqs = rng.normal(0, 1.0, size=(3, 20, len(bundle.features))).astype(np.float32)
    ref, h_ref, c_ref = run_sequence(bundle.runtime("keras"), seqs)
    fast, h_fast, c_fast = run_sequence(bundle.runtime("numpy"), seqs)
    assert isinstance(bundle.runtime("keras"), KerasRuntime)
    assert float(np.max(np.abs(ref - fast))) <= 1e-5
    assert float(np.max(np.abs(c_ref - c_fast))) <= 1e-5


def test_parity_was_measured_when_the_bundle_was_written(bundle) -> None:
    parity = bundle.manifest["parity"]
    assert parity["max_abs_diff"] <= 1e-5
    assert parity["sequences"] >= 2


def test_batched_engine_equals_each_stream_alone(bundle) -> None:
    """Interleaving many streams in one batched step changes no stream's results."""
    rng = np.random.default_rng(2)
    n_streams, n_steps, f = 6, 40, len(bundle.features)
    vals = bundle.scaler.mean + bundle.scaler.scale * rng.normal(0, 1, size=(n_streams, n_steps, f))
    together = Engine(bundle)
    errs_together = np.empty((n_streams, n_steps))
    for t in range(n_steps):
        res = together.process([f"s{i}" for i in range(n_streams)], np.full(n_streams, 100.0 + t),
                               vals[:, t], now=1000.0)
        errs_together[:, t] = res.error
    for i in range(n_streams):
        alone = Engine(bundle)
        res = alone.process([f"s{i}"] * n_steps, 100.0 + np.arange(n_steps), vals[i], now=1000.0)
        np.testing.assert_allclose(res.error, errs_together[i], rtol=1e-5, atol=1e-6)
