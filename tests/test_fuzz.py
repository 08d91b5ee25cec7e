"""Hostile and broken input: property-based tests (hypothesis) of the payload decoder, the
alert topic and the ingest and scoring path, then the real daemon against a hostile
publisher through a real Mosquitto.

The properties: no exception escapes; every rejected reading has a reason from the
known set (``metrics.INVALID_REASONS``), the one the contract's policy gives; valid
readings decode exactly; an alert topic is always a valid publish topic inside the alert
namespace, whatever the stream id. ``tests/test_payloads.py`` keeps the decoder's
example-based tests and its seeded random fuzz.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from detector import config as config_mod
from detector.alerts import alert_topic
from detector.config import Config, ModelRoute
from detector.errors import InputError
from detector.ingest import MqttLink
from detector.intake import Intake
from detector.metrics import INVALID_REASONS, create
from detector.payloads import REASONS, Message, Reading, decode
from detector.worker import Worker, load_models
from helpers import PLANT_MODEL, Daemon, Listener, plant_messages, publish_all, sample, wait_for
from mqtt_broker import start_test_broker

RECEIVED = 1_700_000_000.5
FEATURES = ["temperature", "pressure", "flow", "vibration"]  # models/plant


def fuzz(n: int) -> Any:
    """Settings for a property: ``n`` examples, no per-example deadline (the machine is
    shared), no example database written into the repository."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_result(readings: list[Reading], rejected: list[Any]) -> None:
    """What holds for every decode, whatever the input."""
    assert readings or rejected
    for r in readings:
        assert type(r) is Reading and type(r.ts) is float and math.isfinite(r.ts)
        assert (r.value is None) != (r.values is None)
        assert r.value is None or (type(r.value) is float and math.isfinite(r.value))
        assert r.values is None or (r.values and all(type(v) is float and math.isfinite(v)
                                                    for v in r.values.values()))
    for r in rejected:
        assert r.reason in REASONS and r.reason in INVALID_REASONS and r.reason != "internal_error"
        assert "\n" not in r.detail and "\r" not in r.detail and 0 < len(r.detail) <= 160


# --- JSON building blocks, each with what the decoder must make of it ------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
# JSON text of a number the decoder must take, and its exact value.
good_number = st.one_of(
    finite.map(lambda x: (json.dumps(x), x)),
    st.integers(-(10**300), 10**300).map(lambda i: (str(i), float(i))),
)
# JSON text of a scalar that is not a finite number (bad as a payload or batch item too).
bad_scalar = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "true", "false", "null",
                     '"21.5"', '""', '"NaN"']),
    st.integers(10**309, 10**400).map(str),
    st.text(max_size=20).map(json.dumps),
)
# ... and anything else that is no number where a "value" or a "values" entry must be.
bad_number = st.one_of(bad_scalar, st.sampled_from(["{}", '{"value": 1}', "[1]", "[]"]))
any_json = st.recursive(
    st.none() | st.booleans() | finite | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)
extra_keys = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("value", "values", "ts")),
                             any_json, max_size=3)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso(dt: datetime, z: bool) -> tuple[str, float]:
    text = dt.isoformat()
    if z and text.endswith("+00:00"):
        text = text[:-6] + "Z"
    aware = dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
    td = aware - EPOCH  # exact integer arithmetic: no float in the oracle
    return text, td.days * 86400 + td.seconds + td.microseconds / 1e6


iso_ts = st.builds(
    _iso,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.none() | st.just(timezone.utc)
                 | st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))),
    st.booleans(),
).map(lambda pair: (json.dumps(pair[0]), pair[1]))


def _seconds(t: float) -> float:
    """The contract's reading of a numeric ts: seconds up to 1e11, then milli-, micro- and
    nanoseconds, each unit from 1000 times higher."""
    a = abs(t)
    return float(t) if a <= 1e11 else t / 1e3 if a <= 1e14 else t / 1e6 if a <= 1e17 else t / 1e9


# JSON text of a ts and the epoch seconds it means; None: no "ts" key (the receive time).
good_ts = st.one_of(
    st.none(),
    st.just(("null", RECEIVED)),
    finite.map(lambda t: (json.dumps(t), _seconds(t))),  # far past/future too
    st.integers(-(10**19), 10**19).map(lambda t: (str(t), _seconds(t))),
    iso_ts,
)


def _not_iso(s: str) -> bool:
    try:
        datetime.fromisoformat(s)
    except ValueError:
        return True
    return False


bad_ts = st.one_of(
    st.sampled_from(["true", "false", "NaN", "Infinity", "-Infinity", "1e400", "[]", "[1]", "{}",
                     '"yesterday"', '""', '"1700000000"', '"2024-13-01"', '"2024-01-01T24:00:00"']),
    st.text(max_size=30).filter(_not_iso).map(json.dumps),
)


@st.composite
def good_item(draw: st.DrawFn, top: bool = True) -> tuple[str, Reading]:
    """A valid reading in any accepted form: (JSON text, the Reading it must decode to)."""
    form = draw(st.sampled_from(["bare", "value", "values"]))
    if form == "bare":
        text, x = draw(good_number)
        return text, Reading("s", RECEIVED, x, None)
    ts = draw(good_ts)
    extra = draw(extra_keys)
    parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()]
    if ts is not None:
        parts.append(f'"ts": {ts[0]}')
    t = RECEIVED if ts is None else ts[1]
    if form == "value":
        text, x = draw(good_number)
        parts.append(f'"value": {text}')
        reading = Reading("s", t, x, None)
    else:
        names = draw(st.lists(st.text(max_size=12), min_size=1, max_size=5, unique=True))
        nums = [draw(good_number) for _ in names]
        body = ", ".join(f"{json.dumps(n)}: {v[0]}" for n, v in zip(names, nums))
        parts.append(f'"values": {{{body}}}')
        reading = Reading("s", t, None, {n: v[1] for n, v in zip(names, nums)})
    order = draw(st.permutations(parts))
    return "{" + ", ".join(order) + "}", reading


@st.composite
def bad_item(draw: st.DrawFn) -> tuple[str, str]:
    """An invalid reading with exactly one defect: (JSON text, the reason it must get)."""
    kind = draw(st.sampled_from(["bare", "value", "values", "ts", "neither", "both", "values_shape"]))
    if kind == "bare":
        return draw(bad_scalar), "bad_value"
    if kind == "value":
        return f'{{"value": {draw(bad_number)}}}', "bad_value"
    if kind == "values":
        good = [f'"g{i}": {draw(good_number)[0]}' for i in range(draw(st.integers(0, 3)))]
        good.insert(draw(st.integers(0, len(good))), f'"bad": {draw(bad_number)}')
        return '{"values": {' + ", ".join(good) + "}}", "bad_value"
    if kind == "ts":
        inner = draw(st.sampled_from(['"value": 1', '"values": {"a": 1}']))
        return f'{{{inner}, "ts": {draw(bad_ts)}}}', "bad_timestamp"
    if kind == "neither":
        extra = draw(extra_keys)
        ts = draw(good_ts)
        body = dict(extra, **({"ts": json.loads(ts[0])} if ts else {}))
        return json.dumps(body), "bad_shape"
    if kind == "both":
        return '{"value": 1, "values": {"a": 1}}', "bad_shape"
    shape = draw(st.sampled_from(["{}", "[]", "[1]", "1", "null", '"a"']))
    return f'{{"values": {shape}}}', "bad_shape"


# --- decode: properties ------------------------------------------------------------------

@fuzz(400)
@given(payload=st.binary(max_size=300), max_bytes=st.integers(0, 400))
def test_random_bytes_never_raise(payload: bytes, max_bytes: int) -> None:
    readings, rejected = decode("s", payload, RECEIVED, max_bytes=max_bytes)
    check_result(readings, rejected)
    if len(payload) > max_bytes:
        assert readings == [] and [r.reason for r in rejected] == ["too_large"]


class Tripwire(bytes):
    """A payload that fails the test if anything looks at its content."""

    def _touched(self, *args: object, **kwargs: object) -> Any:
        raise AssertionError("payload content looked at")

    strip = decode = __getitem__ = __iter__ = split = startswith = _touched  # type: ignore[assignment]


@fuzz(100)
@given(payload=st.binary(min_size=1, max_size=2000), data=st.data())
def test_too_large_is_judged_before_decoding(payload: bytes, data: st.DataObject) -> None:
    limit = data.draw(st.integers(0, len(payload) - 1))
    readings, rejected = decode("s", Tripwire(payload), RECEIVED, max_bytes=limit)
    assert readings == [] and [r.reason for r in rejected] == ["too_large"]  # not internal_error


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@fuzz(300)
@given(payload=st.binary(min_size=1, max_size=200).filter(_invalid_utf8))
def test_invalid_utf8_is_not_utf8(payload: bytes) -> None:
    assume(payload.strip())
    readings, rejected = decode("s", payload, RECEIVED)
    assert readings == [] and [r.reason for r in rejected] == ["not_utf8"]


@fuzz(25)
@given(depth=st.integers(2000, 100_000), opener=st.sampled_from(["[", '{"a":', '{"value":', '[{"values":']),
       closed=st.booleans())
def test_deep_nesting_is_bad_json_not_a_crash(depth: int, opener: str, closed: bool) -> None:
    # json.loads gives up with RecursionError near the interpreter's recursion limit (1000
    # frames) whatever the thread's stack depth; the decoder turns that into bad_json.
    closer = {"[": "]", '{"a":': "}", '{"value":': "}", '[{"values":': "}]"}[opener]
    text = opener * depth + ("1" + closer * depth if closed else "")
    readings, rejected = decode("s", text.encode(), RECEIVED, max_bytes=len(text))
    assert readings == [] and [r.reason for r in rejected] == ["bad_json"]
    readings, rejected = decode("s", text.encode(), RECEIVED, max_bytes=len(text) - 1)
    assert [r.reason for r in rejected] == ["too_large"]


@fuzz(250)
@given(item=good_item(), pad=st.sampled_from(["", " ", "\n", "\t \r\n"]))
def test_valid_readings_decode_exactly(item: tuple[str, Reading], pad: str) -> None:
    text, expected = item
    readings, rejected = decode("s", (pad + text + pad).encode(), RECEIVED, max_bytes=1 << 20)
    assert rejected == []
    assert len(readings) == 1
    got = readings[0]
    assert got.value == expected.value and got.values == expected.values
    assert got.ts == pytest.approx(expected.ts, rel=1e-15, abs=1e-6)


@fuzz(300)
@given(item=bad_item())
def test_each_defect_gets_its_reason(item: tuple[str, str]) -> None:
    text, reason = item
    readings, rejected = decode("s", text.encode(), RECEIVED)
    assert readings == [] and [r.reason for r in rejected] == [reason], text


@fuzz(120)
@given(items=st.lists(st.one_of(good_item().map(lambda g: ("ok", g)), bad_item().map(lambda b: ("bad", b))),
                      min_size=1, max_size=25))
def test_batch_keeps_valid_items_in_order_and_rejects_each_bad_one(items: list[tuple[str, Any]]) -> None:
    text = "[" + ", ".join(it[1][0] for it in items) + "]"
    readings, rejected = decode("s", text.encode(), RECEIVED, max_bytes=1 << 22)
    check_result(readings, rejected)
    # Items without ts take the receive time plus 1 µs per position in the batch.
    want = [(pos, it[1][1]) for pos, it in enumerate(items) if it[0] == "ok"]
    assert [(r.value, r.values) for r in readings] == [(w.value, w.values) for _, w in want]
    assert all(r.ts == pytest.approx(w.ts + (pos * 1e-6 if w.ts == RECEIVED else 0.0), rel=1e-15, abs=1e-7)
               for r, (pos, w) in zip(readings, want))
    assert [r.reason for r in rejected] == [it[1][1] for it in items if it[0] == "bad"]


@fuzz(200)
@given(doc=any_json)
def test_any_json_document_never_raises(doc: Any) -> None:
    check_result(*decode("s", json.dumps(doc).encode(), RECEIVED))


# --- the alert topic -------------------------------------------------------------------

def mosquitto_accepts(topic: bytes) -> bool:
    """A publish topic as Mosquitto judges it (mosquitto_validate_utf8 + the pub checks):
    1-65535 bytes of valid UTF-8, no NUL, no C0/C1 control characters, no surrogates or
    non-characters, no wildcards."""
    if not 0 < len(topic) <= 65535 or b"+" in topic or b"#" in topic:
        return False
    try:
        text = topic.decode("utf-8")  # strict: refuses surrogates and overlong forms
    except UnicodeDecodeError:
        return False
    for ch in text:
        cp = ord(ch)
        if cp <= 0x1F or 0x7F <= cp <= 0x9F or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFF) in (0xFFFE, 0xFFFF):
            return False
    return True


SPECIAL = st.sampled_from(["+", "#", "$", "/", "//", "\x00", "\x01", "\x7f", "\x9f", "\ud800", "\udfff",
                           "\ufffe", "\U0001ffff", "\ufdd0", "é", "\u2028", "$SYS/", "a/+/b", "#/", " "])
stream_ids = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates too
    st.lists(st.one_of(SPECIAL, st.text(max_size=5)), max_size=12).map("".join),
    # Very long ids, around and beyond the 65535-byte topic limit, in 1- to 4-byte characters.
    st.tuples(st.sampled_from(["x", "é", "\u20ac", "\U0001f600", "+", "\x00", "a/"]),
              st.integers(16_000, 70_000)).map(lambda t: t[0] * t[1]),
)
def _prefix_ok(p: str) -> bool:
    try:
        config_mod.parse({"alerts": {"topic_prefix": p}})
    except InputError:
        return False
    return True


# Prefixes the config accepts (test_config.py checks that it refuses the others).
prefixes = st.one_of(st.sampled_from(["anomalies", "plant/alerts", "a", "é/ü", "anomalies/"]),
                     st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(_prefix_ok))
CLIENT = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # never connected


@fuzz(250)
@given(prefix=prefixes, stream=stream_ids)
def test_alert_topic_stays_inside_its_namespace(prefix: str, stream: str) -> None:
    topic = alert_topic(prefix, stream)
    assert topic.startswith(prefix + "/")
    assert "+" not in topic and "#" not in topic and "\x00" not in topic
    raw = topic.encode("utf-8")
    assert mosquitto_accepts(raw)
    assert topic == alert_topic(prefix, stream)  # deterministic: one stream, one topic
    # paho takes it: it checks wildcards and length, and encodes, before finding out that
    # this client is not connected.
    assert CLIENT.publish(topic, b"x", qos=0).rc == mqtt.MQTT_ERR_NO_CONN
    if mosquitto_accepts((prefix + "/" + stream).encode("utf-8", "surrogatepass")):
        assert topic == f"{prefix}/{stream}"  # an ordinary id is left as it is


@fuzz(30)
@given(core=st.sampled_from(["x", "é", "\U0001f600"]), n=st.integers(66_000, 70_000), k=st.integers(0, 100))
def test_long_stream_ids_keep_distinct_topics(core: str, n: int, k: int) -> None:
    a, b = core * n + str(k), core * n + str(k + 1)  # differ only past the cut
    ta, tb = alert_topic("anomalies", a), alert_topic("anomalies", b)
    assert ta != tb and len(ta.encode()) <= 65535 and len(tb.encode()) <= 65535


# --- the ingest path: paho's on_message with real messages, real metrics and intake ----

mqtt_level = st.text(st.characters(codec="utf-8", exclude_characters="+#/", exclude_categories=("Cc", "Cs")),
                     max_size=8)
topics = st.lists(mqtt_level, min_size=1, max_size=6).map("/".join).filter(
    lambda t: 0 < len(t.encode()) <= 65535)
payloads = st.one_of(
    st.binary(max_size=200),
    good_item().map(lambda g: g[0].encode()),
    bad_item().map(lambda b: b[0].encode()),
    st.lists(st.one_of(good_item().map(lambda g: g[0]), bad_item().map(lambda b: b[0])), max_size=8).map(
        lambda xs: ("[" + ",".join(xs) + "]").encode()),
)


def make_link(cfg: Config, intake: Intake) -> tuple[MqttLink, Any]:
    metrics = create()
    return MqttLink(cfg, "127.0.0.1", 1, intake, metrics), metrics


def count(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"anomaly_detector_{name}", labels)
    return 0.0 if value is None else value


@fuzz(60)
@given(messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=20),
       template=st.sampled_from(["{topic}", "{1}", "{0}/{2}", "x/{topic}/{3}"]),
       max_bytes=st.sampled_from([64, 65536]))
def test_on_message_and_worker_count_every_reading_and_never_raise(messages: list[tuple[str, bytes]],
                                                                   template: str, max_bytes: int) -> None:
    cfg = config_mod.parse({"mqtt": {"stream_id": template, "max_payload_bytes": max_bytes},
                            "log": {"invalid_interval_s": 3600.0}})
    intake = Intake(10_000)
    link, metrics = make_link(cfg, intake)
    expected: Counter[str] = Counter()
    queued = 0
    for topic, payload in messages:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        link._on_message(link.client, None, msg)
        levels = topic.split("/")
        try:
            stream = topic if template == "{topic}" else template.format(*levels, topic=topic)
        except IndexError:
            expected["bad_topic"] += 1
            continue
        readings, rejected = decode(stream, payload, RECEIVED, max_bytes)
        expected.update(r.reason for r in rejected)
        queued += len(readings)
    # paho's thread queued the payloads; the worker decodes them
    worker = Worker(cfg, intake, metrics, lambda t, p: None)
    got: list[Message] = []
    while taken := worker._take(0.0):
        got += taken
    for reason in INVALID_REASONS:
        assert count(metrics, "invalid_readings_total", reason=reason) == expected[reason], reason
    assert count(metrics, "invalid_readings_total", reason="internal_error") == 0
    assert sum(map(len, got)) == queued and len(intake) == 0
    assert all(isinstance(m, Message) and all(math.isfinite(t) for t in m.ts) for m in got)


# --- the scoring path: the real worker and engine with the shipped plant model ----------

@pytest.fixture(scope="module")
def plant_worker() -> Iterator[tuple[Worker, Any, list[tuple[str, bytes]]]]:
    cfg = replace(config_mod.parse({"learn": {"enabled": False}}),
                  models=(ModelRoute("sensors/plant/+", str(PLANT_MODEL)),))
    published: list[tuple[str, bytes]] = []
    metrics = create()
    worker = Worker(cfg, Intake(100), metrics, lambda t, p: published.append((t, p)))
    worker.install(cfg, load_models(cfg))
    yield worker, metrics, published


reading_kind = st.sampled_from(["ok", "ok", "ok", "missing_one", "extra_feature", "unknown_only",
                                "single_value", "dup", "past", "future", "far_past"])


_EXAMPLE = iter(range(10**9))  # hypothesis replays examples: each gets fresh stream ids


@fuzz(60)
@given(plan=st.lists(st.tuples(st.integers(0, 3), reading_kind, st.floats(-3, 3)), min_size=1, max_size=60))
def test_worker_rejects_by_policy_and_scores_the_rest(plan: list[tuple[int, str, float]],
                                                      plant_worker: Any) -> None:
    """Duplicated, out-of-order, future and mismatched readings are counted by reason;
    a multivariate reading missing a feature is scored on the others; nothing else is
    lost: scored + rejected == sent."""
    worker, metrics, published = plant_worker
    before = {r: count(metrics, "invalid_readings_total", reason=r) for r in INVALID_REASONS}
    scored_before = count(metrics, "readings_total")
    now = time.time()
    last: dict[str, float] = {}
    clock: dict[str, float] = {}
    expected: Counter[str] = Counter()
    runs: list[list[Reading]] = []
    example = next(_EXAMPLE)
    for k, kind, x in plan:
        stream = f"sensors/plant/fuzz-{example}-{k}"
        t = clock.get(stream, now - 10_000.0) + 1.0
        values = dict(zip(FEATURES, [x, 1.0 + x / 10, 50.0 + x, 0.5]))
        value = None
        if kind == "missing_one":
            del values[FEATURES[k % 4]]
        elif kind == "extra_feature":
            values["humidity"] = 1.0
        elif kind == "unknown_only":
            values = {"humidity": 1.0}
        elif kind == "single_value":
            values, value = None, x  # one value for a four-feature model
        elif kind == "dup":
            t = last.get(stream, t)
        elif kind == "past":
            t = last.get(stream, t) - 5.0
        elif kind == "future":
            t = now + 86_400.0
        elif kind == "far_past":
            t = -1e12
        if kind not in ("dup", "past", "future", "far_past"):
            clock[stream] = t
        # The policy, as the contract and engine.py state it.
        if kind in ("extra_feature", "unknown_only", "single_value"):
            expected["feature_mismatch"] += 1
        elif stream in last and t == last[stream]:
            expected["duplicate"] += 1
        elif stream in last and t < last[stream]:
            expected["out_of_order"] += 1
        elif t > now + 300:
            expected["future_timestamp"] += 1
        else:
            expected["scored"] += 1
            last[stream] = t
        # Consecutive readings of one stream arrive as one message (a batch), the others alone.
        if runs and runs[-1][0].stream == stream:
            runs[-1].append(Reading(stream, t, value, values))
        else:
            runs.append([Reading(stream, t, value, values)])
    worker.process([Message.of(run, now) for run in runs])
    got = {r: count(metrics, "invalid_readings_total", reason=r) - before[r] for r in INVALID_REASONS}
    assert got == {r: float(expected[r]) for r in INVALID_REASONS}
    assert count(metrics, "readings_total") - scored_before == expected["scored"]
    assert all(t.startswith("anomalies/sensors/plant/fuzz-") for t, _ in published)


# --- end to end: a hostile publisher beside a good stream ------------------------------

@pytest.fixture(scope="module")
def broker() -> Iterator[Any]:
    handle = start_test_broker()
    yield handle
    handle.stop()


def hostile_messages(now: float, limit: int) -> tuple[list[tuple[str, bytes]], Counter[str], int]:
    """Every kind of broken input, on streams routed to the plant model: the messages,
    the invalid readings they must cause by reason, and how many of them are valid."""
    plant = "sensors/plant/"
    reading = {"temperature": 20.0, "pressure": 1.0, "flow": 50.0, "vibration": 0.5}

    def r(ts: Any, **kw: Any) -> bytes:
        return json.dumps({"ts": ts, "values": dict(reading, **kw)}).encode()

    msgs: list[tuple[str, bytes]] = []
    want: Counter[str] = Counter()

    def add(topic: str, payload: bytes, *reasons: str) -> None:
        msgs.append((plant + topic, payload))
        want.update(reasons)

    add("h-size", b"[" + b"1," * limit + b"1]", "too_large")  # valid JSON, but too big
    add("h-size", b" " * (limit + 1), "too_large")
    add("h-empty", b"", "empty")
    add("h-empty", b" \r\n\t", "empty")
    add("h-utf8", b'{"value": "\xff"}', "not_utf8")
    add("h-utf8", b"\xc3\x28\xa0\xa1", "not_utf8")
    add("h-json", b"{", "bad_json")
    add("h-json", b"[" * 2000 + b"]" * 2000, "bad_json")  # nesting deeper than json.loads goes
    add("h-json", b"[" * 4000, "bad_json")
    add("h-json", b"1_000", "bad_json")
    for v in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"21.5"', b"true", b"false", b"null", b"{}"):
        add("h-value", b'{"ts": 1, "values": {"temperature": ' + v + b"}}", "bad_value")
    add("h-value", b"nan", "bad_value")
    add("h-value", b"[1, NaN, null, true]", "bad_value", "bad_value", "bad_value")  # 1: feature_mismatch
    want["feature_mismatch"] += 1
    for ts in (b'"yesterday"', b"true", b"[1]", b'"2024-13-40"', b"NaN"):
        add("h-ts", b'{"value": 1, "ts": ' + ts + b"}", "bad_timestamp")
    for shape in (b"{}", b'{"ts": 1}', b'{"value": 1, "values": {"a": 1}}', b'{"values": []}', b"[]"):
        add("h-shape", shape, "bad_shape")
    add("h-shape", b"[[1], [2]]", "bad_shape", "bad_shape")
    add("h-features", r(now - 100, humidity=3.0), "feature_mismatch")  # an unknown feature
    add("h-features", b'{"values": {"humidity": 3}}', "feature_mismatch")
    add("h-features", b"21.5", "feature_mismatch")  # one value for a four-feature model
    # Valid but odd: extra fields, a missing feature (scored on the other three), a far-past
    # first reading; then duplicates, out-of-order and future readings on those streams.
    valid = 0
    add("h-extra", json.dumps({"ts": now - 50, "unit": "C", "seq": [1, {"x": None}],
                               "values": reading}).encode())
    valid += 1
    missing = dict(reading)
    del missing["flow"]
    add("h-missing", json.dumps({"ts": now - 50, "values": missing}).encode())
    valid += 1
    add("h-order", r(0))  # far past, but the stream's first reading: scored
    valid += 1
    add("h-order", r(now - 40))
    valid += 1
    add("h-order", r(now - 40), "duplicate")
    add("h-order", r(now - 60), "out_of_order")
    add("h-order", r(-1e9), "out_of_order")
    add("h-order", r(now + 86_400), "future_timestamp")
    add("h-order", r("9999-12-31T00:00:00Z"), "future_timestamp")
    add("h-order", json.dumps([{"ts": now - 30, "values": reading}, {"ts": now - 30, "values": reading},
                               {"ts": now - 35, "values": reading}]).encode(), "duplicate", "out_of_order")
    valid += 1
    return msgs, want, valid


def test_hostile_publisher_is_counted_by_reason_and_a_good_stream_is_unaffected(tmp_path: Path, broker: Any) -> None:
    limit = 4096
    d = Daemon(tmp_path, broker.port, mqtt=f"max_payload_bytes = {limit}")
    d.start()
    try:
        now = time.time()
        hostile, want, hostile_valid = hostile_messages(now, limit)
        good = plant_messages("sensors/plant/good", 600, seed=31)
        # Both at once, from two clients: the good stream is published meanwhile.
        t = threading.Thread(target=publish_all, args=(broker.port, good))
        t.start()
        for k in range(3):  # the hostile mix three times, each on streams of its own
            publish_all(broker.port, [(topic.replace("/h-", f"/h{k}-"), p) for topic, p in hostile])
        t.join()
        total_invalid = 3 * sum(want.values())
        expected_scored = len(good) + 3 * hostile_valid

        def settled() -> str | None:
            text = d.metrics()
            seen = sample(text, "anomaly_detector_readings_total") + sum(
                sample(text, f'anomaly_detector_invalid_readings_total{{reason="{r}"}}') for r in INVALID_REASONS)
            return text if seen >= expected_scored + total_invalid else None

        text = wait_for(settled, "every hostile and good reading counted")
        time.sleep(0.5)  # anything extra (it must not come) would show now
        text = d.metrics()
        got = {r: sample(text, f'anomaly_detector_invalid_readings_total{{reason="{r}"}}') for r in INVALID_REASONS}
        assert got == {r: 3.0 * want[r] for r in INVALID_REASONS}
        assert sample(text, "anomaly_detector_readings_total") == expected_scored
        assert sample(text, 'anomaly_detector_dropped_readings_total{reason="internal_error"}') == 0
        assert sample(text, 'anomaly_detector_dropped_readings_total{reason="queue_full"}') == 0
        assert d.healthz() == 200 and d.proc is not None and d.proc.poll() is None
        assert "Traceback" not in d.logtext()
    finally:
        assert d.stop() == 0


def test_stream_ids_from_a_template_cannot_publish_outside_the_alert_namespace(tmp_path: Path,
                                                                               broker: Any) -> None:
    """``[mqtt] stream_id = "plant/{2}"`` puts a publisher-chosen topic level into the id:
    ``$`` levels, empty levels, odd characters, a level as long as a topic may be (the
    alert topic would be over MQTT's 65535 bytes). Every such stream gets its alert under
    ``anomalies/``, and every alert the daemon counts is one received there."""
    d = Daemon(tmp_path, broker.port, mqtt='stream_id = "plant/{2}"',
               models=f'[[models]]\nmatch = "plant/+"\npath = "{PLANT_MODEL}"\n')
    listen = Listener(broker.port, ["#"])
    d.start()
    try:
        levels = ["$SYS", "$share", "", "..", "a b", "é\u2028", "%2F", "\\", "x" * (65535 - len("sensors/plant/"))]
        msgs = []
        for i, level in enumerate(levels):
            batch = [json.loads(p) for _, p in plant_messages("x", 40, seed=40 + i, fault_at=20)]
            msgs.append((f"sensors/plant/{level}", json.dumps(batch).encode()))
        msgs.append(("sensors/short", b"1"))  # too few levels for {2}: bad_topic
        publish_all(broker.port, msgs)
        streams = {f"plant/{lv}" for lv in levels}

        def alerted() -> dict[str, str] | None:
            got = {}
            for m in listen.on("anomalies/"):
                body = json.loads(m.payload)
                got.setdefault(body["stream"], m.topic)
            return got if streams <= set(got) else None

        got = wait_for(alerted, "an alert for every hostile stream")
        for stream, topic in got.items():
            assert topic == alert_topic("anomalies", stream)
            assert len(topic.encode()) <= 65535
        longest = got["plant/" + levels[-1]]
        assert len(longest.encode()) == 65535 and re.search(r"~[0-9a-f]{16}$", longest)
        text = d.metrics()
        ours = [m for m in listen.messages if not m.topic.startswith("sensors/")]
        assert all(m.topic.startswith("anomalies/") or m.topic == "anomaly-detector/status" for m in ours)
        alerts = sum(sample(text, f'anomaly_detector_alerts_total{{event="{e}"}}')
                     for e in ("anomaly_start", "anomaly_end"))
        assert alerts == len(listen.on("anomalies/"))
        assert sample(text, 'anomaly_detector_invalid_readings_total{reason="bad_topic"}') == 1
        assert sample(text, 'anomaly_detector_dropped_readings_total{reason="internal_error"}') == 0
        assert sample(text, "anomaly_detector_readings_total") == 40 * len(levels)
    finally:
        listen.close()
        assert d.stop() == 0
