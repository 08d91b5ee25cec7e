"""config.toml: typed sections, defaults, and errors that name the key at fault.

Every key lives in a dataclass below with its default and its allowed range; the shipped
``config.toml`` documents each one. Unknown keys and wrong types are errors, never
silently ignored: a typo in a threshold must not leave the daemon running on a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from detector.errors import InputError


def _check(pred: Callable[[Any], bool], text: str) -> dict[str, Any]:
    return {"check": pred, "text": text}


def _positive() -> dict[str, Any]:
    return _check(lambda v: v > 0, "must be > 0")


def _unit() -> dict[str, Any]:
    return _check(lambda v: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a newly trained model (a bundle keeps the shape it was trained with)."""

    kind: str = field(default="forecast", metadata=_check(
        lambda v: v in ("forecast", "reconstruct"), 'must be "forecast" or "reconstruct"'))
    hidden: int = field(default=32, metadata=_positive())
    bottleneck: int = field(default=8, metadata=_positive())
    smoothing: int = field(default=1, metadata=_positive())


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=40, metadata=_positive())
    batch_size: int = field(default=32, metadata=_positive())
    seq_len: int = field(default=64, metadata=_check(lambda v: v >= 4, "must be >= 4"))
    burn_in: int = field(default=8, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    validation_fraction: float = field(default=0.2, metadata=_unit())
    patience: int = field(default=5, metadata=_positive())
    learning_rate: float = field(default=3e-3, metadata=_positive())
    max_fill: int = field(default=5, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    gap_factor: float = field(default=10.0, metadata=_check(lambda v: v > 1, "must be > 1"))
    seed: int = 0


@dataclass(frozen=True)
class ScoreConfig:
    """Turning errors into scores, flags and episodes (applied at scoring time)."""

    threshold: float = field(default=0.999, metadata=_unit())
    clear_threshold: float = field(default=0.99, metadata=_unit())
    min_flagged: int = field(default=1, metadata=_positive())
    clear_readings: int = field(default=10, metadata=_positive())
    settle_readings: int = field(default=10, metadata=_check(lambda v: v >= 0, "must be >= 0"))


@dataclass(frozen=True)
class EngineConfig:
    runtime: str = field(default="auto", metadata=_check(
        lambda v: v in ("auto", "numpy", "onnx", "keras"), 'must be "auto", "numpy", "onnx" or "keras"'))
    threads: int = field(default=1, metadata=_positive())
    max_streams: int = field(default=100_000, metadata=_positive())
    idle_timeout_s: float = field(default=86_400.0, metadata=_positive())
    max_future_s: float = field(default=300.0, metadata=_check(lambda v: v >= 0, "must be >= 0"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    engine: EngineConfig = EngineConfig()


def _coerce(where: str, value: Any, kind: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise InputError(where, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section(path: str, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: [{name}]", "must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = f"{path}: [{name}] {key}"
        if key not in known:
            raise InputError(where, f"unknown key (known: {', '.join(sorted(known))})")
        value = _coerce(where, value, hints[key])
        meta = known[key].metadata
        if "check" in meta and not meta["check"](value):
            raise InputError(where, f"{value!r} {meta['text']}")
        values[key] = value
    return cls(**values)


def parse(raw: dict[str, Any], path: str = "config") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, body in raw.items():
        if name not in sections:
            raise InputError(f"{path}: [{name}]",
                             f"unknown section (known: {', '.join(sorted(sections))})")
        built[name] = _section(path, name, hints[name], body)
    cfg = Config(**built)
    if cfg.score.clear_threshold > cfg.score.threshold:
        raise InputError(f"{path}: [score] clear_threshold",
                         "must not be above [score] threshold")
    return cfg


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(str(p), f"cannot read config: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(str(p), "config is not UTF-8 text") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(str(p), f"not valid TOML: {err}") from None
    return parse(raw, str(p))
