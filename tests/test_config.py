"""Config: every invalid value is refused at start, on one line that names ``[section] key``.

The sections are walked by introspecting :mod:`detector.config`'s dataclasses, so a key
added later is covered without touching this file: each key gets a value of the wrong
type; each key with a validator gets values its validator refuses (found by trying a
list of hostile values of the right type); every float key gets nan and inf. Each case
goes through ``config.parse`` and, written as a TOML file, through the real
``check-config`` command (in-process for the many, as a subprocess for a few).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from detector import cli, config
from detector.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

# A [[models]] entry needs both keys; cases for it start from this valid one.
ROUTE = {"match": "sensors/plant/+", "path": str(ROOT / "models" / "plant")}

# Text keys where any string is acceptable ("" means "not set"); every other key of a
# non-bool type must have a validator, so that a key added later gets one on purpose.
FREE_TEXT = {("mqtt", "username"), ("mqtt", "password_file"), ("mqtt", "password_env"),
             ("mqtt", "ca_file"), ("mqtt", "cert_file"), ("mqtt", "key_file")}

# Values of the right type that validators may refuse: bounds, specials, MQTT wildcards
# and characters a broker refuses.
CANDIDATES: dict[Any, list[Any]] = {
    int: [-(2**63), -1, 0, 1, 3, 39, 40, 65535, 65536, 2**32, 2**63 - 1],
    float: [-1e300, -1.0, 0.0, 1e-300, 0.5, 1.0, 1.5, 10.0, 1e300],
    str: ["", "x", "anything-else", "5", "3.1.1", "text", "auto", "forecast", "likelihood",
          "drop_oldest", "info", "+", "#", "a/#/b", "a+/b", "a/b#", "$SYS/x", "a\x00b", "a\x01b",
          "a\x7fb", "\ufffe", "x" * 70_000, "{topic}", "{0}", "{topic:d}", "{0!r}", "{topic.x}",
          "{}", "{", "{name}", "sensors/#", "sensors/+/x"],
    tuple: [[], [""], ["#"], ["sensors/#"], ["a/#/b"], ["a+"], ["a/+/b"], ["a\x00"], ["$SYS/#"],
            ["x" * 70_000]],
}

# A value of another type for each declared type (TOML has no null, so "missing" is the
# only other way to leave a key out; that is covered by the defaults).
WRONG_TYPE: dict[Any, list[Any]] = {
    int: ["7", 7.5, True, [7]],
    float: ["7.5", True, [7.5], {"x": 1}],
    str: [7, 7.5, True, ["x"], {"x": "y"}],
    bool: ["true", 1, 0.0, [True]],
    tuple: ["sensors/#", [1], [["a"]], {"a": "b"}],
}


def _kind(hint: Any) -> Any:
    return tuple if typing.get_origin(hint) is tuple else hint


def all_keys() -> list[tuple[str, str, Any, dataclasses.Field[Any]]]:
    """(section, key, type, field) for every key of every section."""
    out = []
    hints = typing.get_type_hints(config.Config)
    for sec in dataclasses.fields(config.Config):
        if sec.metadata.get("internal"):
            continue
        cls = config.ModelRoute if sec.name == "models" else hints[sec.name]
        types = typing.get_type_hints(cls)
        out += [(sec.name, f.name, _kind(types[f.name]), f) for f in dataclasses.fields(cls)]
    return out


KEYS = all_keys()


def raw_with(section: str, key: str, value: Any) -> dict[str, Any]:
    if section == "models":
        return {"models": [dict(ROUTE, **{key: value})]}
    return {section: {key: value}}


def where(section: str, key: str) -> str:
    return f"[{'models.0' if section == 'models' else section}] {key}"


def refused(raw: dict[str, Any], *needles: str) -> str:
    with pytest.raises(InputError) as info:
        config.parse(raw, "cfg.toml")
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# --- TOML writing, for the command-line cases (tomllib only reads) --------------------

def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, str):
        # JSON string escapes are TOML's, except that TOML also wants DEL escaped.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_text(raw: dict[str, Any]) -> str:
    lines = []
    for sec, body in raw.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{sec}]]")
                lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{sec}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def check_config_main(tmp: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    path = tmp / "bad.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    assert cli.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in (str(path), *needles):
        assert n in lines[0], lines[0]


# --- every key ------------------------------------------------------------------------

def test_the_walk_sees_every_section_and_key() -> None:
    sections = {s for s, *_ in KEYS}
    assert sections == {f.name for f in dataclasses.fields(config.Config) if not f.metadata.get("internal")}
    assert len(KEYS) >= 70  # the sections hold ~75 keys today; a broken walk would see few
    assert ("mqtt", "max_payload_bytes", int, config.MqttConfig.__dataclass_fields__["max_payload_bytes"]) in KEYS


def test_every_number_and_text_key_is_validated() -> None:
    missing = [f"[{s}] {k}" for s, k, kind, f in KEYS
               if kind is not bool and "check" not in f.metadata and (s, k) not in FREE_TEXT]
    assert missing == [], f"keys without a validator: {missing}"


@pytest.mark.parametrize("section, key, kind", [(s, k, t) for s, k, t, _ in KEYS],
                         ids=[f"{s}.{k}" for s, k, _, _ in KEYS])
def test_wrong_type_is_refused_naming_the_key(section: str, key: str, kind: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for value in WRONG_TYPE[kind]:
        refused(raw_with(section, key, value), where(section, key), "expected")
    check_config_main(tmp_path, raw_with(section, key, WRONG_TYPE[kind][0]), capsys, where(section, key))


VALIDATED = [(s, k, t, f) for s, k, t, f in KEYS if "check" in f.metadata]


@pytest.mark.parametrize("section, key, kind, fld", VALIDATED, ids=[f"{s}.{k}" for s, k, _, _ in VALIDATED])
def test_out_of_range_is_refused_naming_the_key(section: str, key: str, kind: Any, fld: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    check = fld.metadata["check"]
    coerce = tuple if kind is tuple else (lambda v: v)
    bad = [v for v in CANDIDATES[kind] if not check(coerce(v))]
    good = [v for v in CANDIDATES[kind] if check(coerce(v))]
    assert bad, f"no candidate value is out of range for [{section}] {key}: add one to CANDIDATES"
    for value in bad:
        msg = refused(raw_with(section, key, value), where(section, key))
        assert len(msg) < 600, msg  # a 70,000-character value is shown cut
    for value in good:  # accepted alone, or refused by a cross-key rule naming a key
        try:
            config.parse(raw_with(section, key, value), "cfg.toml")
        except InputError as err:
            assert "\n" not in str(err) and "] " in str(err), str(err)
    check_config_main(tmp_path, raw_with(section, key, bad[0]), capsys, where(section, key))


FLOATS = [(s, k) for s, k, t, _ in KEYS if t is float]


@pytest.mark.parametrize("section, key", FLOATS, ids=[f"{s}.{k}" for s, k in FLOATS])
def test_non_finite_floats_are_refused(section: str, key: str) -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        refused(raw_with(section, key, value), where(section, key))


def test_ints_are_accepted_for_float_keys() -> None:
    assert config.parse({"worker": {"max_wait_ms": 2}}).worker.max_wait_ms == 2.0
    assert type(config.parse({"worker": {"max_wait_ms": 2}}).worker.max_wait_ms) is float


# --- keys, sections and cross-key rules ------------------------------------------------

@pytest.mark.parametrize("raw, needles", [
    ({"mqtt": {"hots": "x"}}, ["[mqtt] hots", "unknown key", "host"]),
    ({"mqtts": {}}, ["[mqtts]", "unknown section"]),
    ({"base_dir": {}}, ["[base_dir]", "unknown section"]),  # internal, not a section
    ({"models": [dict(ROUTE, paht="x")]}, ["[models.0] paht", "unknown key"]),
    ({"models": [{"match": "a/#"}]}, ["[models.0]", "missing key(s): path"]),
    ({"models": {"match": "a/#", "path": "x"}}, ["models", "array of tables"]),
    ({"mqtt": 5}, ["[mqtt]", "must be a table"]),
    ({"mqtt": {"a\nb": 1}}, ['[mqtt] "a\\nb"', "unknown key"]),
    ({"a\u2028b\x00": {}}, ["unknown section"]),
    ({"score": {"threshold": 0.9, "clear_threshold": 0.95}}, ["[score] clear_threshold"]),
    ({"mqtt": {"reconnect_min_s": 10.0, "reconnect_max_s": 5.0}}, ["[mqtt] reconnect_min_s"]),
    ({"worker": {"queue_bytes": 1000}}, ["[worker] queue_bytes", "max_payload_bytes (65536)"]),
    ({"mqtt": {"password_file": "p", "password_env": "P"}}, ["[mqtt] password_file"]),
    ({"mqtt": {"cert_file": "c.pem"}}, ["[mqtt] cert_file"]),
    ({"train": {"seq_len": 16, "burn_in": 16}}, ["[train] burn_in"]),
    ({"mqtt": {"ca_file": "ca.pem"}}, ["[mqtt] tls", "not be encrypted"]),
    ({"mqtt": {"password_env": "P"}}, ["[mqtt] username", "user name"]),
])
def test_unknown_keys_sections_and_cross_key_rules(raw: dict[str, Any], needles: list[str]) -> None:
    refused(raw, *needles)


def test_valid_values_pass() -> None:
    cfg = config.parse({"mqtt": {"topics": ["sensors/+/x", "#", "$SYS/broker/+"], "stream_id": "{1}/{topic}",
                                 "keepalive_s": 65535, "client_id": "é-1"},
                        "alerts": {"topic_prefix": "plant/alerts", "status_topic": "a/b/"},
                        "models": [ROUTE], "train": {"seed": 2**32 - 1}})
    assert cfg.mqtt.topics == ("sensors/+/x", "#", "$SYS/broker/+")
    assert cfg.models[0].match == "sensors/plant/+"


def test_shipped_config_parses_to_the_defaults_but_its_model_route() -> None:
    # config.toml documents every key with its default: a value there that differs from
    # the built-in one (it said runtime = "numpy" while the default was "auto") misleads
    # whoever copies it.
    shipped, defaults = config.load(ROOT / "config.toml"), config.parse({})
    assert shipped.models and not defaults.models
    assert dataclasses.replace(shipped, models=(), base_dir=defaults.base_dir) == defaults
    # ... and every key is there, written out (a missing one parses to its default too).
    raw = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    for section in dataclasses.fields(config.Config):
        if section.metadata.get("internal") or section.name == "models":
            continue
        keys = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert keys <= set(raw.get(section.name, {})), (section.name, keys - set(raw.get(section.name, {})))


@pytest.mark.parametrize("text, needle", [
    ("[mqtt]\nport = 70000\n", "[mqtt] port: 70000 must be a port number"),
    ("[worker]\nmax_wait_ms = inf\n", "[worker] max_wait_ms: expected a finite number"),
    ("[mqtt]\ntopics = [\"sensors/#/x\"]\n", "[mqtt] topics:"),
    ("[alerts]\ntopic_prefix = \"$SYS\"\n", "[alerts] topic_prefix:"),
    ("[mqtt]\nstream_id = \"{topic:>999999}\"\n", "[mqtt] stream_id:"),
    ("[mqtt]\nstream_id = \"{\u00b2}\"\n", "[mqtt] stream_id:"),  # a digit to isdigit(), a key to format
    ("[learn]\nwarmup_readings = 10\n", "[learn] warmup_readings: 10 must be >= 40"),
    ("[log]\nlevel = 3\n", "[log] level: expected str"),
    ("[[models]]\nmatch = \"a/#/b\"\npath = \"models/plant\"\n", "[models.0] match:"),
    ("[nope]\n", "[nope]: unknown section"),
])
def test_check_config_command_exits_2_with_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "detector", "check-config", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in lines[0] and needle in lines[0], lines[0]


def test_port_0_only_with_the_embedded_broker() -> None:
    assert config.parse({"mqtt": {"port": 0}}).mqtt.port == 0  # embedded: any free port
    with pytest.raises(InputError, match=r"\[mqtt\] port.*only with host"):
        config.parse({"mqtt": {"host": "broker.example", "port": 0}})


def test_a_reload_names_the_changed_settings_it_does_not_apply() -> None:
    old = config.parse({})
    new = config.parse({"mqtt": {"topics": ["plant/#"]}, "alerts": {"max_queued": 5, "topic_prefix": "x"},
                        "score": {"threshold": 0.9995}, "worker": {"max_wait_ms": 9, "queue_size": 10}})
    assert config.needs_restart(old, new) == ["[mqtt] topics", "[alerts] max_queued", "[worker] queue_size"]
    assert config.needs_restart(old, old) == []
