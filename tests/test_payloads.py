"""The MQTT payload decoder: every accepted form, every rejection reason, and that it never raises."""

from __future__ import annotations

import json
import math
import random

import pytest

from detector.payloads import REASONS, Reading, Rejected, decode

RECEIVED = 1_700_000_000.25
TS_2024 = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def one(payload: bytes | str, **kw: int) -> Reading:
    raw = payload.encode() if isinstance(payload, str) else payload
    readings, rejected = decode("sensors/a", raw, RECEIVED, **kw)
    assert rejected == [] and len(readings) == 1, (readings, rejected)
    return readings[0]


def reason(payload: bytes | str, **kw: int) -> str:
    raw = payload.encode() if isinstance(payload, str) else payload
    readings, rejected = decode("sensors/a", raw, RECEIVED, **kw)
    assert readings == [] and len(rejected) == 1, (readings, rejected)
    assert rejected[0].reason in REASONS
    assert "\n" not in rejected[0].detail and 0 < len(rejected[0].detail) <= 160
    return rejected[0].reason


# --- accepted forms ---------------------------------------------------------------

@pytest.mark.parametrize("payload, expected", [
    ("21.5", 21.5), ("-3", -3.0), ("0", 0.0), ("1e3", 1000.0), ("  21.5\r\n", 21.5),
    ("\t-0.5 ", -0.5), ("+7", 7.0), (".5", 0.5), ("1e-400", 0.0), ("\ufeff21.5", 21.5),
])
def test_bare_number(payload: str, expected: float) -> None:
    r = one(payload)
    assert r == Reading("sensors/a", RECEIVED, expected, None)
    assert type(r.value) is float


def test_value_object_without_ts_takes_received() -> None:
    assert one('{"value": 21.5}') == Reading("sensors/a", RECEIVED, 21.5, None)


def test_value_object_int_is_float() -> None:
    r = one('{"value": 3}')
    assert r.value == 3.0 and type(r.value) is float


def test_value_object_with_ts_seconds() -> None:
    assert one('{"value": 1, "ts": 1700000000}').ts == 1_700_000_000.0
    assert one('{"value": 1, "ts": 1700000000.5}').ts == 1_700_000_000.5


def test_ts_null_means_received() -> None:
    assert one('{"value": 1, "ts": null}').ts == RECEIVED


def test_extra_keys_ignored() -> None:
    r = one('{"value": 2, "unit": "C", "seq": 7, "meta": {"x": [1]}}')
    assert r == Reading("sensors/a", RECEIVED, 2.0, None)


def test_multivariate() -> None:
    r = one('{"ts": 1704067200, "values": {"temperature": 21.5, "pressure": 1}}')
    assert r == Reading("sensors/a", TS_2024, None, {"temperature": 21.5, "pressure": 1.0})
    assert all(type(v) is float for v in r.values.values())


def test_feature_names_not_validated() -> None:
    assert one('{"values": {"": 1, "a b/c": 2, "\\u00e9": 3}}').values == {"": 1.0, "a b/c": 2.0, "é": 3.0}


@pytest.mark.parametrize("ms", [1_704_067_200_000, 1_704_067_200_000.0])
def test_millisecond_ts(ms: float) -> None:
    assert one(json.dumps({"value": 1, "ts": ms})).ts == TS_2024
    assert one(json.dumps({"value": 1, "ts": 1_704_067_200_123})).ts == pytest.approx(TS_2024 + 0.123)


def test_ms_threshold() -> None:
    assert one('{"value": 1, "ts": 1e11}').ts == 1e11            # at the threshold: seconds
    assert one('{"value": 1, "ts": 100000000001}').ts == 100_000_000.001


def test_microsecond_and_nanosecond_ts() -> None:
    # What InfluxDB and Telegraf write: read as their units, not as milliseconds of a
    # year in the far future.
    assert one('{"value": 1, "ts": 1704067200123456}').ts == pytest.approx(TS_2024 + 0.123456)
    assert one('{"value": 1, "ts": 1704067200123456789}').ts == pytest.approx(TS_2024 + 0.123457, abs=1e-5)
    assert one('{"value": 1, "ts": 1e14}').ts == 1e11            # milliseconds up to 1e14


@pytest.mark.parametrize("iso, expected", [
    ("2024-01-01T00:00:00Z", TS_2024),
    ("2024-01-01T00:00:00", TS_2024),                 # naive = UTC
    ("2024-01-01 00:00:00", TS_2024),
    ("2024-01-01T01:00:00+01:00", TS_2024),
    ("2024-01-01T00:00:00.250Z", TS_2024 + 0.25),
    ("2024-01-01T00:00:00.123456789Z", TS_2024 + 0.123456),
    ("2024-01-01", TS_2024),
])
def test_iso_ts(iso: str, expected: float) -> None:
    assert one(json.dumps({"value": 1, "ts": iso})).ts == pytest.approx(expected)


def test_far_timestamps_pass() -> None:
    assert one('{"value": 1, "ts": 0}').ts == 0.0
    assert one('{"value": 1, "ts": -5}').ts == -5.0
    assert one('{"value": 1, "ts": "9999-12-31T23:59:59Z"}').ts == 253_402_300_799.0
    assert one('{"value": 1, "ts": "0001-01-01T00:00:00Z"}').ts == -62_135_596_800.0


def test_batch_order_with_mixed_items() -> None:
    payload = json.dumps([
        {"value": 1, "ts": 10}, "bad", 2.5, [3], {"values": {"a": 4}, "ts": "2024-01-01T00:00:00Z"},
        {"value": None}, {"value": 5, "ts": True}, {"nothing": 1}, 6,
    ])
    readings, rejected = decode("s", payload.encode(), RECEIVED)
    assert readings == [
        Reading("s", 10.0, 1.0, None), Reading("s", RECEIVED + 2e-6, 2.5, None),
        Reading("s", TS_2024, None, {"a": 4.0}), Reading("s", RECEIVED + 8e-6, 6.0, None),
    ]  # without ts: the receive time plus 1 µs per position, so they stay distinct and in order
    assert [r.reason for r in rejected] == ["bad_value", "bad_shape", "bad_value", "bad_timestamp", "bad_shape"]
    assert [r.detail.split(":")[0] for r in rejected] == ["item 1", "item 3", "item 5", "item 6", "item 7"]


def test_batch_with_nan_item_keeps_others() -> None:
    readings, rejected = decode("s", b"[1, NaN, {\"value\": 2}]", RECEIVED)
    assert [r.value for r in readings] == [1.0, 2.0]
    assert [r.reason for r in rejected] == ["bad_value"]


# Items one step off the commonest form, which a batch of them all judges column by column.
_NEAR_COMMON = [
    '{"ts": 1700000000.5, "values": {"a": 1.5, "b": -2.0}}',
    '{"ts": 1700000000.5, "values": {"a": 1, "b": 2}}',           # integers
    '{"ts": 1700000000500.0, "values": {"a": 1.5}}',              # milliseconds
    '{"ts": 1700000000, "values": {"a": 1.5}}',                   # integer seconds
    '{"ts": "2024-01-01T00:00:00Z", "values": {"a": 1.5}}',
    '{"ts": null, "values": {"a": 1.5}}', '{"values": {"a": 1.5}}',
    '{"ts": 1700000000.5, "values": {"a": true}}', '{"ts": 1700000000.5, "values": {"a": "1"}}',
    '{"ts": 1700000000.5, "values": {"a": NaN}}', '{"ts": 1700000000.5, "values": {"a": 1e999}}',
    '{"ts": 1e308, "values": {"a": 1.0}}', '{"ts": true, "values": {"a": 1.0}}',
    '{"ts": 1700000000.5, "values": {"a": 1e308, "b": 1e308}}',  # finite, but their sum is not
    '{"ts": 1700000000.5, "values": {}}', '{"ts": 1700000000.5, "values": [1.5]}',
    '{"ts": 1700000000.5, "values": {"a": 1.5}, "value": 2.0}', '{"ts": 1700000000.5, "value": 2.0}',
    '{"ts": 1700000000.5, "values": {"a": {"b": 1.0}}}', '[1.5]', '1.5', '"x"', 'null',
]


@pytest.mark.parametrize("seed", range(40))
def test_batch_judged_as_its_items_are_one_by_one(seed: int) -> None:
    # A batch is judged whole when every item is the commonest form, else item by item:
    # either way each item must get the answer it gets alone (without ts: receive time
    # plus 1 µs per position).
    rng = random.Random(seed)
    common = _NEAR_COMMON[0]
    items = [common] * rng.randint(1, 5) if seed % 2 else \
        [rng.choice(_NEAR_COMMON) if rng.random() < 0.3 else common for _ in range(rng.randint(1, 8))]
    readings, rejected = decode("s", f"[{', '.join(items)}]".encode(), RECEIVED)
    want: list[Reading] = []
    reasons: list[str] = []
    for i, item in enumerate(items):
        if item.startswith("["):
            reasons.append("bad_shape")  # nested array: only a batch's item can be one
            continue
        alone, why = decode("s", item.encode(), RECEIVED + i * 1e-6)
        want += alone
        reasons += [r.reason for r in why]
    assert readings == want and [r.reason for r in rejected] == reasons
    assert all(type(v) is float for r in readings for v in (r.values or {}).values())


def test_batch_at_max_batch() -> None:
    readings, rejected = decode("s", json.dumps(list(range(5))).encode(), RECEIVED, max_batch=5)
    assert [r.value for r in readings] == [0.0, 1.0, 2.0, 3.0, 4.0] and rejected == []


def test_stream_passed_through() -> None:
    assert one(b"1").stream == "sensors/a"


# --- rejections ---------------------------------------------------------------------

def test_too_large_before_decoding() -> None:
    assert reason(b"1" * 65537) == "too_large"
    assert reason(b"\xff" * 100, max_bytes=10) == "too_large"     # not judged as not_utf8
    assert reason(b"1" * (1 << 20)) == "too_large"
    assert one(b" " * 10 + b"1", max_bytes=11).value == 1.0       # exactly at the limit


@pytest.mark.parametrize("payload", [b"", b"   ", b"\r\n\t"])
def test_empty(payload: bytes) -> None:
    assert reason(payload) == "empty"


@pytest.mark.parametrize("payload", [b"\xff", b"\xc3\x28", b'{"value": "\xe9"}', b"\xed\xa0\x80", b"\x80abc"])
def test_not_utf8(payload: bytes) -> None:
    assert reason(payload) == "not_utf8"


@pytest.mark.parametrize("payload", [
    "abc", "{", "[1, 2", '{"value": 1,}', "1_000", "0x10", "21.5 C", "1 2", "{'value': 1}",
    "\u00a021.5", "\u0661\u0662",
])
def test_bad_json(payload: str) -> None:
    assert reason(payload) == "bad_json"


def test_deep_nesting_is_rejected() -> None:
    depth = 100_000
    assert reason(b"[" * depth + b"]" * depth, max_bytes=1 << 20) == "bad_json"
    assert reason(b'{"a":' * depth + b"1" + b"}" * depth, max_bytes=1 << 20) == "bad_json"
    # Near the interpreter's recursion limit json may or may not give up, depending on how
    # deep the caller's stack already is; either way the payload is rejected.
    assert reason(b"[" * 1000 + b"]" * 1000, max_bytes=1 << 20) in ("bad_json", "bad_shape")


@pytest.mark.parametrize("payload", [
    "nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "infinity", " INF ",
    "1e400", "-1e400", "1" * 400, '"21.5"', "true", "false", "null",
    '{"value": NaN}', '{"value": Infinity}', '{"value": -Infinity}', '{"value": 1e400}',
    '{"value": true}', '{"value": false}', '{"value": null}', '{"value": "1"}', '{"value": {}}',
    '{"value": [1]}', '{"values": {"a": "1"}}', '{"values": {"a": 1, "b": true}}',
    '{"values": {"a": null}}', '{"values": {"a": NaN}}', '{"values": {"a": [1]}}',
    '{"value": ' + "9" * 5000 + "}",
])
def test_bad_value(payload: str) -> None:
    assert reason(payload) == "bad_value"


@pytest.mark.parametrize("ts", [
    '"yesterday"', '"2024-13-01"', '"2024-01-01T24:00:00"', '""', '"1700000000"', "true", "false",
    "NaN", "Infinity", "-Infinity", "1e400", "[1]", '{"s": 1}',
])
def test_bad_timestamp(ts: str) -> None:
    assert reason('{"value": 1, "ts": ' + ts + "}") == "bad_timestamp"
    assert reason('{"values": {"a": 1}, "ts": ' + ts + "}") == "bad_timestamp"


@pytest.mark.parametrize("payload", [
    "{}", '{"ts": 1}', '{"value": 1, "values": {"a": 1}}', '{"values": {}}', '{"values": [1, 2]}',
    '{"values": 1}', '{"values": null}', '{"Value": 1}', "[]", "[[1]]", "[[]]",
])
def test_bad_shape(payload: str) -> None:
    assert reason(payload) == "bad_shape"


def test_batch_over_max_batch_rejected_whole() -> None:
    assert reason(json.dumps(list(range(11))), max_batch=10) == "bad_shape"
    assert reason(json.dumps([1] * 10_001)) == "bad_shape"


def test_internal_error_safety_net() -> None:
    # Not bytes at all: a caller bug, yet still no exception.
    readings, rejected = decode("s", None, RECEIVED)  # type: ignore[arg-type]
    assert readings == [] and [r.reason for r in rejected] == ["internal_error"]


def test_detail_is_one_bounded_line() -> None:
    key = "k\n" * 5000
    assert reason(json.dumps({"values": {key: "x"}})) == "bad_value"
    assert reason(json.dumps({"value": 1, "ts": "x\u2028y" * 5000})) == "bad_timestamp"


def test_reasons_are_snake_case_labels() -> None:
    assert len(set(REASONS)) == len(REASONS)
    assert all(r.isidentifier() and r == r.lower() for r in REASONS)


# --- never raises -------------------------------------------------------------------

def check(payload: bytes, max_bytes: int = 65536) -> None:
    readings, rejected = decode("s", payload, RECEIVED, max_bytes=max_bytes)
    assert readings or rejected
    for r in readings:
        assert type(r) is Reading and math.isfinite(r.ts)
        assert (r.value is None) != (r.values is None)
        assert r.value is None or (type(r.value) is float and math.isfinite(r.value))
        assert r.values is None or (r.values and all(type(v) is float and math.isfinite(v)
                                                    for v in r.values.values()))
    for r in rejected:
        assert type(r) is Rejected and r.reason in REASONS and "\n" not in r.detail


def test_random_bytes_never_raise() -> None:
    rng = random.Random(0)
    alphabet = b'0123456789.eE+-_ \t\n[]{}:,"\\tsvaluenfiyNIZT\xff\xc3\x80'
    for _ in range(3000):
        n = rng.randrange(0, 64)
        if rng.random() < 0.5:
            check(bytes(rng.randrange(256) for _ in range(n)))
        else:
            check(bytes(rng.choice(alphabet) for _ in range(n)))


def test_mutated_valid_payloads_never_raise() -> None:
    rng = random.Random(0)
    seeds = [b"21.5", b'{"value": 21.5, "ts": 1700000000}',
             b'{"ts": "2024-01-01T00:00:00Z", "values": {"temperature": 21.5, "pressure": 1.02}}',
             b'[1, {"value": 2}, {"values": {"a": 3}, "ts": 1704067200000}]']
    for _ in range(3000):
        buf = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(buf) + 1)
            op = rng.random()
            if op < 0.4 and i < len(buf):
                buf[i] = rng.randrange(256)
            elif op < 0.7:
                buf.insert(i, rng.randrange(256))
            elif i < len(buf):
                del buf[i]
        check(bytes(buf))


def test_hostile_payloads_never_raise() -> None:
    for payload in [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000,
                    b"1e400", b"-" * 1000, b"\x00" * 100, b"\xef\xbb\xbf", b'"\\ud800"',
                    b'{"value": 1, "ts": "\\ud800"}', b'{"values": {"\\ud800": 1}}',
                    b"9" * 60_000, b"0." + b"0" * 60_000 + b"1", b'"' + b"a" * 60_000 + b'"']:
        check(payload, max_bytes=1 << 21)
    check(bytes(random.Random(1).randbytes(1 << 20)), max_bytes=1 << 21)


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A random JSON document biased towards the keys and values the decoder looks at."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False, "", "1", "2024-01-01T00:00:00Z", "2024-01-01", "bad"])
    if kind == 1:
        return rng.randrange(-10**20, 10**20) * 10 ** rng.randrange(0, 30)
    if kind == 2:
        return rng.choice([0.5, -1e308, 1e-320, float("nan"), float("inf"), -float("inf"), 1e11 + 1])
    if kind in (3, 4, 5):
        return rng.uniform(-1e13, 1e13)
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    keys = ["value", "values", "ts", "x", "a"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def test_random_json_never_raises() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        check(json.dumps(random_json(rng)).encode())


def test_a_batch_over_the_limit_counts_every_item_it_refuses() -> None:
    # Counted as one invalid reading, while the same message dropped at the queue counts
    # its items (item_count): the readings did not add up.
    readings, rejected = decode("s", json.dumps([1.0] * 10001).encode(), 0.0, max_bytes=1 << 20)
    assert readings == [] and [(r.reason, r.count) for r in rejected] == [("bad_shape", 10001)]
