"""Training a bundle: prepare, fit with early stopping, calibrate, check parity, write.

The steps, in order (each reported on stderr as it happens):

1. read the tables and apply the NaN/gap policy of :mod:`detector.prep`;
2. hold out the last ``validation_fraction`` of rows (in time order) as validation;
3. fit the scaler on the training rows only;
4. fit the Keras model on overlapping windows, early-stopping on the validation loss;
5. stream every row through the numpy step (as the engine will) and calibrate the score on
   the smoothed errors of the held-out rows;
6. export the step for ONNX Runtime and check that the numpy and ONNX steps reproduce
   the Keras model (max abs difference);
7. write the bundle and its report.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from detector import __version__, bundle, report
from detector.calibration import Calibration
from detector.config import Config
from detector.data import Table, align_features
from detector.errors import InputError
from detector.prep import INPUT_CLIP, PrepReport, Scaler, segments
from detector.runtime import NumpyRuntime, OnnxRuntime, run_sequence
from detector.scoring import smooth, stream_errors

PARITY_LIMIT = 1e-5
MIN_ROWS = 40

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _split(segs: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The last ``fraction`` of rows (in time order) for validation; whole segments move
    when they fit, the segment at the cut is split."""
    total = sum(len(s) for s in segs)
    n_val = max(int(round(total * fraction)), 1)
    train, val = list(segs), []
    while n_val > 0 and train:
        last = train.pop()
        if len(last) <= n_val:
            val.insert(0, last)
            n_val -= len(last)
        else:
            train.append(last[:-n_val])
            val.insert(0, last[-n_val:])
            n_val = 0
    return train, val


def _pairs(seg: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(model inputs, targets) for one scaled segment."""
    if kind == "forecast":
        return seg[:-1], seg[1:]
    return seg, seg


def _windows(segs: list[np.ndarray], kind: str, seq_len: int,
             burn_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping windows (inputs, targets, per-step weights); short tails are padded with
    zero weight, and the first ``burn_in`` steps of each window, run from a zero state that
    the stream never has, carry no weight."""
    xs, ys, ws = [], [], []
    stride = max(1, seq_len // 8)
    for seg in segs:
        inp, tgt = _pairs(seg, kind)
        n = len(inp)
        if n <= burn_in:
            continue
        starts = list(range(0, max(n - seq_len, 0) + 1, stride))
        if starts[-1] + seq_len < n:
            starts.append(n - seq_len)
        for s in starts:
            e = min(s + seq_len, n)
            x = np.zeros((seq_len, inp.shape[1]), dtype=np.float32)
            y = np.zeros_like(x)
            w = np.zeros(seq_len, dtype=np.float32)
            x[: e - s], y[: e - s] = inp[s:e], tgt[s:e]
            w[burn_in: e - s] = 1.0
            xs.append(x)
            ys.append(y)
            ws.append(w)
    if not xs:
        raise ValueError("no training window: every segment is shorter than burn_in")
    return np.stack(xs), np.stack(ys), np.stack(ws)


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(str(out), f"cannot write the bundle there: {err.strerror or err}") from None


def _scale(segs: list[np.ndarray], scaler: Scaler) -> list[np.ndarray]:
    return [np.clip(scaler.transform(s), -INPUT_CLIP, INPUT_CLIP).astype(np.float32) for s in segs]


def fit(tables: list[Table], out: Path, cfg: Config, name: str | None = None,
        log: Log = _stderr) -> bundle.Bundle:
    """Train on ``tables`` (same features) and write the bundle to ``out``."""
    t0 = time.monotonic()
    mc, tc = cfg.model, cfg.train
    features = tables[0].features
    tables = [align_features(t, features) for t in tables]
    segs: list[np.ndarray] = []
    prep = PrepReport()
    for t in tables:
        s, rep = segments(t.values, t.times, tc.max_fill, tc.gap_factor, t.source)
        log(f"{t.source}: {rep.summary()}")
        segs.extend(s)
        for k, v in rep.to_json().items():
            setattr(prep, k, getattr(prep, k) + v)
    if prep.rows_used < MIN_ROWS:
        raise InputError(tables[0].source, f"{prep.rows_used} usable rows; training needs at least {MIN_ROWS}")
    train_segs, val_segs = _split(segs, tc.validation_fraction)
    if not train_segs:
        raise InputError("[train] validation_fraction",
                         f"{tc.validation_fraction:g} of {prep.rows_used} rows leaves none to train on")
    scaler = Scaler.fit(np.concatenate(train_segs))
    tr, va = _scale(train_segs, scaler), _scale(val_segs, scaler)
    burn_in = min(tc.burn_in, max(len(s) for s in tr) // 4)
    seq_len = min(tc.seq_len, max(len(s) for s in tr))
    try:
        x, y, w = _windows(tr, mc.kind, seq_len, burn_in)
    except ValueError:
        raise InputError(tables[0].source, "no stretch of rows long enough to train on: gaps and missing "
                                           "values split the data into single rows (features sampled "
                                           "at different rates?); raise [train] max_fill or choose "
                                           "--features") from None
    _writable(out)  # the data judged usable: the place to write to next, before the training
    try:
        xv, yv, wv = _windows(va, mc.kind, min(seq_len, max(len(s) for s in va)), min(burn_in, 2))
    except ValueError:
        xv = None
    log(f"training {mc.kind} LSTM autoencoder: {len(features)} feature(s), hidden {mc.hidden}, "
        f"bottleneck {mc.bottleneck}; {len(x)} windows of {seq_len} steps, "
        f"{sum(len(s) for s in va)} validation rows")

    try:
        from detector import model as kmodel  # TensorFlow loads here, not before
    except ImportError as err:  # a scoring-only install (docs/install.md)
        raise InputError("train", f"training needs TensorFlow and Keras ({err}): "
                                  "pip install 'tensorflow-cpu>=2.21,<2.22' 'keras>=3.10,<4'") from None

    keras = kmodel.keras
    keras.utils.set_random_seed(tc.seed)
    try:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    except Exception:  # already initialised in this process: determinism was set then
        pass
    net = kmodel.build(len(features), mc.hidden, mc.bottleneck)
    net.compile(optimizer=keras.optimizers.Adam(tc.learning_rate, clipnorm=1.0), loss="mse")
    monitor = "val_loss" if xv is not None else "loss"

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            val = f" val_loss {logs['val_loss']:.4f}" if "val_loss" in logs else ""
            log(f"epoch {epoch + 1}/{tc.epochs}: loss {logs.get('loss', float('nan')):.4f}{val}")

    hist = net.fit(
        x, y, sample_weight=w, batch_size=tc.batch_size, epochs=tc.epochs, verbose=0, shuffle=True,
        validation_data=(xv, yv, wv) if xv is not None else None,
        callbacks=[keras.callbacks.EarlyStopping(monitor=monitor, patience=tc.patience,
                                                 restore_best_weights=True), Progress()])
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    if not all(np.isfinite(v) for v in history.get("loss", [])):
        raise InputError("[train] learning_rate", f"training diverged (loss {history['loss'][-1]}) at "
                                                  f"learning_rate {tc.learning_rate:g}: lower it")
    weights = kmodel.export_weights(net)
    rt = NumpyRuntime(weights)

    # Start state for new streams: the mean state over the training stream, a typical
    # state rather than the zero state the network never sees in a live stream.
    zeros = np.zeros((1, mc.hidden), dtype=np.float32)
    hs, cs = [], []
    for seg in tr:
        _, h_seq, c_seq = stream_errors(rt, mc.kind, seg, zeros, zeros)
        hs.append(h_seq[burn_in:] if len(seg) > 2 * burn_in else h_seq)
        cs.append(c_seq[burn_in:] if len(seg) > 2 * burn_in else c_seq)
    init_h = np.concatenate(hs).mean(axis=0, keepdims=True).astype(np.float32)
    init_c = np.concatenate(cs).mean(axis=0, keepdims=True).astype(np.float32)

    # Calibrate on held-out rows, streamed exactly as the engine will stream them:
    # from the warm-up state, through the training rows, into the validation rows.
    all_scaled = _scale(segs, scaler)
    n_train = sum(len(s) for s in tr)
    errs_all = []
    for seg in all_scaled:
        e, *_ = stream_errors(rt, mc.kind, seg, init_h, init_c)
        errs_all.append(smooth(e, mc.smoothing))
    smoothed = np.concatenate(errs_all)
    val_errors = smoothed[n_train:]
    calib = Calibration.fit(val_errors if len(val_errors) >= 10 else smoothed)

    # Parity: each exported step, run reading by reading, against the Keras model over
    # the same sequences, several streams at once.
    from detector.onnx_export import step_model

    onnx_step = step_model(weights)
    probe = x[: min(4, len(x))]
    keras_out = keras.ops.convert_to_numpy(net(probe, training=False))
    parity = {}
    for step_rt in (rt, OnnxRuntime(onnx_step, mc.hidden, len(features))):
        step_out, _, _ = run_sequence(step_rt, probe)
        parity[step_rt.name] = float(np.max(np.abs(keras_out - step_out)))
        if parity[step_rt.name] > PARITY_LIMIT:
            raise RuntimeError(f"{step_rt.name} step differs from Keras by "
                               f"{parity[step_rt.name]:.2e} (limit {PARITY_LIMIT})")

    created = datetime.now(timezone.utc)
    name = name or out.name
    manifest: dict[str, Any] = {
        "name": name,
        "version": created.strftime("%Y%m%dT%H%M%SZ"),
        "created": created.isoformat(timespec="seconds"),
        "kind": mc.kind,
        "features": features,
        "time_column": tables[0].time_column,
        "hidden": mc.hidden,
        "bottleneck": mc.bottleneck,
        "smoothing": mc.smoothing,
        "scaler": scaler.to_json(),
        "calibration": calib.to_json(),
        "training": {
            "sources": [t.source for t in tables],
            "prep": prep.to_json(),
            "train_rows": n_train,
            "validation_rows": int(len(val_errors)),
            "windows": int(len(x)),
            "seq_len": seq_len,
            "burn_in": burn_in,
            "epochs_run": len(history.get("loss", [])),
            "best_" + monitor: float(min(history[monitor])),
            "config": asdict(tc),
            "seconds": round(time.monotonic() - t0, 1),
        },
        "parity": {"max_abs_diff": max(parity.values()), "by_runtime": parity, "limit": PARITY_LIMIT,
                   "sequences": int(len(probe)),
                   "steps": int(probe.shape[1])},
        "versions": {"anomaly_detector": __version__, "keras": keras.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    weights.update(init_h=init_h, init_c=init_c)
    bundle.write(out, net, weights, onnx_step, manifest)
    result = bundle.load(out)
    report.write(out, result, history, val_errors)
    log(f"wrote {out} (val errors p50 {np.median(val_errors):.4g}, "
        f"parity {max(parity.values()):.1e}, {time.monotonic() - t0:.1f} s)")
    return result
