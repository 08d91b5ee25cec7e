"""Model bundles on disk: ``model.keras``, ``manifest.json``, ``weights.npz``, ``step.onnx``.

The Keras model is the source of truth; ``weights.npz`` is its exported step for the
numpy runtime (no pickle: ``allow_pickle=False``), plus the warm-up state new streams
start from; ``step.onnx`` is the same step for ONNX Runtime. The manifest carries features, scaling, calibration, the training summary,
the parity figure measured when the bundle was written, versions, and the SHA-256 of
both binary files, so a truncated or swapped file is refused with a clear message before
anything is scored with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.calibration import Calibration
from detector.errors import InputError
from detector.prep import Scaler
from detector.runtime import AutoRuntime, KerasRuntime, NumpyRuntime, OnnxRuntime, Runtime

FORMAT = "anomaly-detector-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KERAS_FILE = "model.keras"
WEIGHTS_FILE = "weights.npz"
ONNX_FILE = "step.onnx"
RUNTIMES = ("auto", "numpy", "onnx", "keras")
_WEIGHT_KEYS = ("kernel", "recurrent_kernel", "bias", "code_kernel", "code_bias",
                "out_kernel", "out_bias", "init_h", "init_c")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    weights: dict[str, np.ndarray]
    scaler: Scaler
    calibration: Calibration

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def features(self) -> list[str]:
        return list(self.manifest["features"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def smoothing(self) -> int:
        return int(self.manifest["smoothing"])

    def runtime(self, name: str = "auto", threads: int = 1) -> Runtime:
        """The step for this bundle: ``numpy``, ``onnx``, ``keras`` (the reference), or
        ``auto``: numpy for small batches, ONNX Runtime for large ones (see
        :class:`detector.runtime.AutoRuntime`), numpy alone when ONNX is not available."""
        if name == "numpy":
            return NumpyRuntime(self.weights)
        if name in ("onnx", "auto"):
            onnx_path = self.path / ONNX_FILE
            try:
                fast = OnnxRuntime(onnx_path.read_bytes(), int(self.weights["init_h"].shape[-1]),
                                   len(self.features), threads)
            except ImportError:
                if name == "onnx":
                    raise InputError("runtime", "onnx runtime needs onnxruntime: pip install onnxruntime") from None
                return NumpyRuntime(self.weights)
            except OSError as err:
                if name == "onnx":
                    raise InputError(str(onnx_path), f"cannot read: {err.strerror or err}") from None
                return NumpyRuntime(self.weights)
            except Exception as err:  # onnxruntime raises its own types for a bad graph
                raise InputError(str(onnx_path), f"cannot load ONNX step: {err}") from None
            return fast if name == "onnx" else AutoRuntime(NumpyRuntime(self.weights), fast)
        if name == "keras":
            from detector import model

            try:
                return KerasRuntime(model.load(str(self.path / KERAS_FILE)))
            except Exception as err:  # Keras raises many types for a bad archive
                raise InputError(str(self.path / KERAS_FILE), f"cannot load Keras model: {err}") from None
        raise InputError("runtime", f"unknown runtime {name!r} ({', '.join(RUNTIMES)})")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(out: Path, keras_model: Any, weights: dict[str, np.ndarray], onnx_step: bytes,
          manifest: dict[str, Any]) -> None:
    """Write a bundle; files land under temporary names and are renamed into place last,
    so a reader never sees a half-written bundle."""
    out.mkdir(parents=True, exist_ok=True)
    missing = [k for k in _WEIGHT_KEYS if k not in weights]
    if missing:
        raise ValueError(f"weights lack {missing}")
    tmp_keras = out / f".{KERAS_FILE}.tmp.keras"
    keras_model.save(tmp_keras)
    tmp_npz = out / f".{WEIGHTS_FILE}.tmp.npz"
    np.savez(tmp_npz, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    tmp_onnx = out / f".{ONNX_FILE}.tmp"
    tmp_onnx.write_bytes(onnx_step)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    files={KERAS_FILE: sha256(tmp_keras), WEIGHTS_FILE: sha256(tmp_npz),
                           ONNX_FILE: sha256(tmp_onnx)})
    os.replace(tmp_keras, out / KERAS_FILE)
    os.replace(tmp_npz, out / WEIGHTS_FILE)
    os.replace(tmp_onnx, out / ONNX_FILE)
    fd, tmp_manifest = tempfile.mkstemp(dir=out, prefix=".manifest.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    os.chmod(tmp_manifest, 0o644)  # mkstemp makes it private; a bundle is not secret
    os.replace(tmp_manifest, out / MANIFEST)


def _require(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise InputError(where, problem)


def load(path: str | Path, features: list[str] | None = None) -> Bundle:
    """Load and check a bundle; ``features``, when given, must match the manifest's."""
    root = Path(path)
    mpath = root / MANIFEST
    _require(root.is_dir(), str(root), "model bundle directory not found")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(str(mpath), "missing: not a model bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(str(mpath), f"unreadable manifest: {err}") from None
    _require(isinstance(manifest, dict) and manifest.get("format") == FORMAT, str(mpath),
             f"not an {FORMAT} manifest")
    _require(manifest.get("format_version") == FORMAT_VERSION, str(mpath),
             f"format_version {manifest.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    for key in ("name", "version", "kind", "features", "smoothing", "scaler", "calibration", "files"):
        _require(key in manifest, str(mpath), f"missing key {key!r}")
    feats = manifest["features"]
    _require(isinstance(feats, list) and feats and all(isinstance(f, str) for f in feats),
             str(mpath), "'features' must be a non-empty list of names")
    if features is not None and list(features) != feats:
        raise InputError(str(mpath), f"features {feats} do not match the expected {list(features)}")
    _require(isinstance(manifest["files"], dict) and KERAS_FILE in manifest["files"]
             and WEIGHTS_FILE in manifest["files"], str(mpath), "'files' must list the bundle's files")
    for fname in manifest["files"]:
        fpath = root / fname
        _require(fpath.is_file(), str(fpath), "missing from the bundle")
        _require(sha256(fpath) == manifest["files"].get(fname), str(fpath),
                 "checksum does not match the manifest (corrupt or replaced file)")
    try:
        with np.load(root / WEIGHTS_FILE, allow_pickle=False) as npz:
            weights = {k: npz[k] for k in _WEIGHT_KEYS}
        scaler = Scaler.from_json(manifest["scaler"])
        calibration = Calibration.from_json(manifest["calibration"])
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise InputError(str(root), f"inconsistent bundle: {err}") from None
    n_feat = len(feats)
    _require(weights["kernel"].shape[0] == n_feat and weights["out_kernel"].shape[1] == n_feat
             and len(scaler.mean) == n_feat, str(mpath),
             f"manifest lists {n_feat} features but the weights have "
             f"{weights['kernel'].shape[0]} inputs and {weights['out_kernel'].shape[1]} outputs")
    return Bundle(root, manifest, weights, scaler, calibration)
