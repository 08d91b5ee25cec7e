"""config.toml: typed sections, defaults, and errors that name the key at fault.

Every key lives in a dataclass below with its default and its allowed range; the shipped
``config.toml`` documents each one. Unknown keys and wrong types are errors, never
silently ignored: a typo in a threshold must not leave the daemon running on a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
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
    seed: int = field(default=0, metadata=_check(lambda v: 0 <= v < 2**32, "must be 0 to 2**32 - 1"))


@dataclass(frozen=True)
class ScoreConfig:
    """Turning errors into scores, flags and episodes (applied at scoring time)."""

    threshold: float = field(default=0.999, metadata=_unit())
    clear_threshold: float = field(default=0.995, metadata=_unit())
    min_flagged: int = field(default=1, metadata=_positive())
    clear_readings: int = field(default=50, metadata=_positive())
    settle_readings: int = field(default=10, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    method: str = field(default="likelihood", metadata=_check(
        lambda v: v in ("likelihood", "calibrated"), 'must be "likelihood" or "calibrated"'))
    window: int = field(default=5, metadata=_positive())
    history: int = field(default=2000, metadata=_positive())
    flagged_weight: float = field(default=0.1, metadata=_check(lambda v: 0.0 <= v <= 1.0,
                                                               "must be between 0 and 1"))
    min_spread: float = field(default=0.5, metadata=_positive())
    hold_readings: int = field(default=10, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    report: str = field(default="onset", metadata=_check(
        lambda v: v in ("onset", "every"), 'must be "onset" or "every"'))
    spike_readings: int = field(default=10, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    day_test: bool = True
    day_offset_hours: float = field(default=0.0, metadata=_check(lambda v: -24.0 < v < 24.0,
                                                                  "must be between -24 and 24"))


@dataclass(frozen=True)
class EngineConfig:
    runtime: str = field(default="auto", metadata=_check(
        lambda v: v in ("auto", "numpy", "onnx", "keras"), 'must be "auto", "numpy", "onnx" or "keras"'))
    threads: int = field(default=1, metadata=_positive())
    max_streams: int = field(default=100_000, metadata=_positive())
    idle_timeout_s: float = field(default=86_400.0, metadata=_positive())
    max_future_s: float = field(default=300.0, metadata=_check(lambda v: v >= 0, "must be >= 0"))


def _one_of(*choices: Any) -> dict[str, Any]:
    return _check(lambda v: v in choices, "must be one of " + ", ".join(repr(c) for c in choices))


def _port() -> dict[str, Any]:
    return _check(lambda v: 0 <= v <= 65535, "must be a port number (0-65535)")


def _valid_stream_template(v: str) -> bool:
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
    except ValueError:
        return False
    # Plain fields only: a format spec or conversion ("{0:d}", "{topic:>99999}") would fail
    # or blow up per message at run time, where this check cannot name the key any more.
    # ASCII digits only: str.format takes "²" for a key, not an index ("{²}" fails per message).
    return bool(fields) and all((f == "topic" or (f.isascii() and f.isdigit())) and not spec and not conv
                                for f, spec, conv in fields)


# MQTT strings are UTF-8 of at most 65535 bytes, and Mosquitto refuses NUL, control
# characters and non-characters in topics (mosquitto_validate_utf8). Surrogates cannot
# come from TOML, which is UTF-8 text.
# The body of a regex character class, shared with alerts.alert_topic.
MQTT_FORBIDDEN = ("\x00-\x1f\x7f-\x9f\ufdd0-\ufdef"
                  + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(17)))
_NOT_MQTT = re.compile(f"[{MQTT_FORBIDDEN}]")


def _mqtt_text(v: str, max_bytes: int = 65535) -> bool:
    return 0 < len(v.encode("utf-8")) <= max_bytes and not _NOT_MQTT.search(v)


def _topic_filter(v: str) -> bool:
    """A valid subscription filter: ``+`` and ``#`` only as whole levels, ``#`` last."""
    if not _mqtt_text(v):
        return False
    levels = v.split("/")
    return all(lv in ("+", "#") or ("+" not in lv and "#" not in lv) for lv in levels) \
        and "#" not in levels[:-1]


def _topic_filters() -> dict[str, Any]:
    return _check(lambda v: len(v) > 0 and all(_topic_filter(t) for t in v),
                  "must be a non-empty list of MQTT topic filters ('+' and '#' only as whole "
                  "levels, '#' last; no control characters)")


def _topic_name(max_bytes: int = 65535) -> dict[str, Any]:
    return _check(lambda v: _mqtt_text(v, max_bytes) and not set("+#") & set(v) and not v.startswith("$"),
                  f"must be an MQTT topic: 1-{max_bytes} bytes, no '+' or '#', no control characters, "
                  "not starting with '$' (broker topics)")


def _not_empty() -> dict[str, Any]:
    return _check(lambda v: v != "", "must not be empty")


@dataclass(frozen=True)
class MqttConfig:
    host: str = field(default="embedded", metadata=_not_empty())
    port: int = field(default=1883, metadata=_port())
    topics: tuple[str, ...] = field(default=("sensors/#",), metadata=_topic_filters())
    # Not empty: paho refuses an empty id with a persistent session, and a generated one
    # would make every restart a new session.
    client_id: str = field(default="anomaly-detector", metadata=_check(
        _mqtt_text, "must be 1-65535 bytes of UTF-8 without control characters"))
    stream_id: str = field(default="{topic}", metadata=_check(_valid_stream_template,
        "must be a format string using {topic} and/or topic levels {0}, {1}, ..."))
    protocol: str = field(default="3.1.1", metadata=_one_of("3.1.1", "5"))
    qos: int = field(default=1, metadata=_one_of(0, 1, 2))
    keepalive_s: int = field(default=60, metadata=_check(lambda v: 0 < v <= 65535,
                                                         "must be 1-65535 (MQTT's 16-bit field)"))
    persistent_session: bool = False
    username: str = ""
    password_file: str = ""
    password_env: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    reconnect_min_s: float = field(default=1.0, metadata=_positive())
    reconnect_max_s: float = field(default=60.0, metadata=_positive())
    max_payload_bytes: int = field(default=65536, metadata=_positive())


@dataclass(frozen=True)
class AlertsConfig:
    # Half the topic length at most, so every stream id keeps room after the prefix.
    topic_prefix: str = field(default="anomalies", metadata=_topic_name(32767))
    status_topic: str = field(default="anomaly-detector/status", metadata=_topic_name())
    max_queued: int = field(default=10_000, metadata=_check(lambda v: 0 < v <= 65535,  # alerts held while away
                            "must be 1-65535 (MQTT's 16-bit packet ids)"))


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    # "" would listen on every interface: say "0.0.0.0" (or "::", IPv6 and IPv4) to mean that.
    address: str = field(default="127.0.0.1", metadata=_check(
        lambda v: v != "", 'must not be empty (use "0.0.0.0" to listen on every interface)'))
    port: int = field(default=9108, metadata=_port())


@dataclass(frozen=True)
class ModelRoute:
    """One ``[[models]]`` entry: streams whose topic matches ``match`` use ``path``."""

    match: str = field(metadata=_check(_topic_filter, "must be an MQTT topic filter ('+' and '#' only "
                                                      "as whole levels, '#' last)"))
    path: str = field(metadata=_not_empty())


@dataclass(frozen=True)
class LearnConfig:
    enabled: bool = True
    warmup_readings: int = field(default=500, metadata=_check(lambda v: v >= 40, "must be >= 40"))
    max_concurrent: int = field(default=1, metadata=_positive())
    timeout_s: float = field(default=600.0, metadata=_positive())
    retry_after_s: float = field(default=300.0, metadata=_positive())
    refit_interval_s: float = field(default=86400.0, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    refit_window: int = field(default=5000, metadata=_check(lambda v: v >= 40, "must be >= 40"))
    new_normal_readings: int = field(default=1000, metadata=_positive())


@dataclass(frozen=True)
class StateConfig:
    dir: str = field(default="state", metadata=_not_empty())
    checkpoint_interval_s: float = field(default=30.0, metadata=_positive())


@dataclass(frozen=True)
class WorkerConfig:
    queue_size: int = field(default=100_000, metadata=_positive())
    queue_bytes: int = field(default=32 << 20, metadata=_positive())
    max_batch: int = field(default=65536, metadata=_positive())
    max_wait_ms: float = field(default=100.0, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    linger_ms: float = field(default=1.0, metadata=_check(lambda v: 0 <= v <= 1000, "must be 0 to 1000"))
    overload: str = field(default="drop_oldest", metadata=_one_of("drop_oldest", "drop_newest"))
    shutdown_timeout_s: float = field(default=10.0, metadata=_positive())


@dataclass(frozen=True)
class LogConfig:
    format: str = field(default="text", metadata=_one_of("text", "json"))
    level: str = field(default="info", metadata=_one_of("debug", "info", "warning", "error"))
    invalid_interval_s: float = field(default=10.0, metadata=_check(lambda v: v >= 0, "must be >= 0"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    engine: EngineConfig = EngineConfig()
    mqtt: MqttConfig = MqttConfig()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()
    models: tuple[ModelRoute, ...] = ()
    learn: LearnConfig = LearnConfig()
    state: StateConfig = StateConfig()
    worker: WorkerConfig = WorkerConfig()
    log: LogConfig = LogConfig()
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the config: relative ones are relative to the config file's folder,
        so a service finds its models wherever it was started from."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# What a SIGHUP reload applies (docs/operations.md, "What a reload applies"); any other
# setting is read once, at start.
RELOADED = frozenset({"models", "score", "engine", "alerts.topic_prefix", "worker.max_batch",
                      "worker.max_wait_ms", "state.checkpoint_interval_s", "learn.enabled"})


def needs_restart(old: Config, new: Config) -> list[str]:
    """The settings that differ between ``old`` and ``new`` but a reload does not apply
    (``[section] key``): a reload says so instead of letting an edit look applied."""
    changed = []
    for sec in dataclasses.fields(Config):
        if sec.metadata.get("internal") or sec.name in RELOADED:
            continue
        a, b = getattr(old, sec.name), getattr(new, sec.name)
        changed += [f"[{sec.name}] {key.name}" for key in dataclasses.fields(a)
                    if f"{sec.name}.{key.name}" not in RELOADED and getattr(a, key.name) != getattr(b, key.name)]
    return changed


def _show(value: Any) -> str:
    """A value for a one-line message: repr escapes newlines; long values are cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(name: str) -> str:
    """A TOML key as the user would write it; quoted (escaped, one line) when not bare."""
    return name if re.fullmatch(r"[A-Za-z0-9_.-]+", name) else json.dumps(name)


def _coerce(where: str, value: Any, kind: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(where, f"expected a list of strings, got {_show(value)}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise InputError(where, f"expected {kind.__name__}, got {type(value).__name__} {_show(value)}")
    # TOML has nan and inf; no key means either (an infinite wait or interval would
    # overflow the timer it feeds, nan compares false to every bound).
    if kind is float and not math.isfinite(value):
        raise InputError(where, f"expected a finite number, got {value!r}")
    return value


def _section(path: str, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: [{name}]", f"must be a table, got {type(raw).__name__} {_show(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = f"{path}: [{name}] {_key(key)}"
        if key not in known:
            raise InputError(where, f"unknown key (known: {', '.join(sorted(known))})")
        value = _coerce(where, value, hints[key])
        meta = known[key].metadata
        if "check" in meta and not meta["check"](value):
            raise InputError(where, f"{_show(value)} {meta['text']}")
        values[key] = value
    missing = [f.name for f in known.values()
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise InputError(f"{path}: [{name}]", f"missing key(s): {', '.join(missing)}")
    return cls(**values)


def parse(raw: dict[str, Any], path: str = "config", base_dir: Path = Path(".")) -> Config:
    sections = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(Config)
    built: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in sections:
            raise InputError(f"{path}: [{_key(name)}]",
                             f"unknown section (known: {', '.join(sorted(sections))})")
        if name == "models":
            if not isinstance(body, list):
                raise InputError(f"{path}: models", "must be an array of tables: [[models]]")
            built[name] = tuple(_section(path, f"models.{i}", ModelRoute, entry)
                                for i, entry in enumerate(body))
        else:
            built[name] = _section(path, name, hints[name], body)
    cfg = Config(**built, base_dir=base_dir)
    if cfg.score.clear_threshold > cfg.score.threshold:
        raise InputError(f"{path}: [score] clear_threshold",
                         "must not be above [score] threshold")
    if cfg.train.burn_in >= cfg.train.seq_len:
        raise InputError(f"{path}: [train] burn_in", "must be below [train] seq_len (no step would be trained)")
    if cfg.mqtt.port == 0 and cfg.mqtt.host != "embedded":
        raise InputError(f"{path}: [mqtt] port", "0 (any free port) only with host = \"embedded\"; "
                                                 "a broker's port is 1-65535")
    if cfg.mqtt.reconnect_min_s > cfg.mqtt.reconnect_max_s:
        raise InputError(f"{path}: [mqtt] reconnect_min_s", "must not be above [mqtt] reconnect_max_s")
    if cfg.mqtt.password_file and cfg.mqtt.password_env:
        raise InputError(f"{path}: [mqtt] password_file", "give password_file or password_env, not both")
    if cfg.worker.queue_bytes < cfg.mqtt.max_payload_bytes:
        raise InputError(f"{path}: [worker] queue_bytes", f"must be at least [mqtt] max_payload_bytes "
                                                          f"({cfg.mqtt.max_payload_bytes}): one message must fit")
    if bool(cfg.mqtt.cert_file) != bool(cfg.mqtt.key_file):
        raise InputError(f"{path}: [mqtt] cert_file", "cert_file and key_file go together")
    if not cfg.mqtt.tls and (cfg.mqtt.ca_file or cfg.mqtt.cert_file or cfg.mqtt.key_file):
        raise InputError(f"{path}: [mqtt] tls", "ca_file/cert_file/key_file are set but tls = false: "
                                                "the connection would not be encrypted")
    if (cfg.mqtt.password_file or cfg.mqtt.password_env) and not cfg.mqtt.username:
        raise InputError(f"{path}: [mqtt] username", "needed with password_file/password_env: "
                                                     "MQTT sends a password only with a user name")
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
    return parse(raw, str(p), p.resolve().parent)
