"""Decode MQTT payloads into readings (CONTRACT.md, "MQTT in").

`decode` runs on the worker thread for every message, so it must be cheap and must
never raise: a bad payload becomes a `Rejected` whose reason is a Prometheus label value
and whose detail is one line for a rate-limited log. Accepted forms:

- a bare number, JSON or plain text, surrounding ASCII whitespace allowed: ``21.5``;
- ``{"value": 21.5}`` or ``{"values": {"temperature": 21.5, ...}}``, each with an optional
  ``"ts"``. Other keys are ignored, so publishers may add metadata (unit, seq, ...);
- a batch: a JSON array of the above; items are judged one by one, valid ones kept in order.

``ts`` is epoch seconds (above 1e11 milliseconds, above 1e14 microseconds, above 1e17
nanoseconds) or an ISO 8601 string (naive means UTC, ``Z`` accepted). Absent or ``null``
means the receive time (in a batch, plus 1 µs per position). Far past or future times
pass: the engine's policy decides about those. Feature names are not checked here: the
worker matches them against the model.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import orjson

from detector.timeparse import MS_THRESHOLD, epoch_seconds, iso_epoch

TOO_LARGE = "too_large"          # payload over max_bytes; judged before any decoding
EMPTY = "empty"                  # zero bytes or whitespace only (e.g. a retained-message clear)
NOT_UTF8 = "not_utf8"            # not valid UTF-8
BAD_JSON = "bad_json"            # neither a plain number nor valid JSON (or nested too deep)
BAD_VALUE = "bad_value"          # a number was expected: got NaN/inf, string, bool, null, object
BAD_TIMESTAMP = "bad_timestamp"  # ts unparseable, non-finite, bool, or not a number/string
BAD_SHAPE = "bad_shape"          # wrong structure: value/values, nested or empty/huge batch
INTERNAL_ERROR = "internal_error"  # a bug in this module; costs one message, not the thread

# All reasons, so the metrics code can create every label child up front (counters at 0).
REASONS: tuple[str, ...] = (TOO_LARGE, EMPTY, NOT_UTF8, BAD_JSON, BAD_VALUE,
                            BAD_TIMESTAMP, BAD_SHAPE, INTERNAL_ERROR)

_DETAIL_MAX = 160
_BOM = b"\xef\xbb\xbf"
# The standard library's decoder, for what orjson refuses: it takes NaN, Infinity and
# numbers beyond double range (judged bad_value, not bad_json) and names a syntax fault.
# One decoder for every message: json.loads(..., parse_int=float) builds a new one per call.
_JSON = json.JSONDecoder(parse_int=float)


# Not frozen: a frozen dataclass's __init__ costs 6x more (1.4 vs 0.2 µs), once per reading.
@dataclass(slots=True)
class Reading:
    stream: str                       # the stream id (the caller passes it; usually the topic)
    ts: float                         # epoch seconds
    value: float | None               # single-value forms: bare number, {"value": x}
    values: dict[str, float] | None   # multivariate form {"values": {...}}


@dataclass(slots=True)
class Message:
    """The readings of one decoded MQTT message, in payload order, as columns: one
    stream, one receive time. The worker scores a message whole and never needs a
    `Reading` object per reading, so a batch of a hundred readings is a few lists, not
    a hundred objects. Reading ``i`` has ``values[i]`` (the multivariate form) or
    ``value[i]`` (a single number); a column is None when no reading has that form."""

    stream: str
    received: float                               # time.time() when the message arrived
    ts: list[float]                               # epoch seconds
    values: list[dict[str, float] | None] | None
    value: list[float | None] | None

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def of(cls, readings: Sequence[Reading], received: float) -> Message:
        """The message holding ``readings`` (at least one, all of one stream)."""
        values = [r.values for r in readings]
        value = [r.value for r in readings]
        return cls(readings[0].stream, received, [r.ts for r in readings],
                   None if values.count(None) == len(values) else values,
                   None if value.count(None) == len(value) else value)

    def readings(self) -> list[Reading]:
        n = len(self.ts)
        values = self.values if self.values is not None else repeat(None, n)
        value = self.value if self.value is not None else repeat(None, n)
        return [Reading(self.stream, t, v, vs) for t, v, vs in zip(self.ts, value, values)]

    def split(self, k: int) -> Message:
        """Cut this message's readings from the ``k``-th on into a new message."""
        def cut(column: list[Any] | None) -> list[Any] | None:
            if column is None:
                return None
            tail = column[k:]
            del column[k:]
            return tail
        return Message(self.stream, self.received, cut(self.ts), cut(self.values),  # type: ignore[arg-type]
                       cut(self.value))


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str   # one of REASONS
    detail: str   # one line: what was wrong
    count: int = 1  # readings it stands for (a whole batch refused at once: its items)


class _Invalid(Exception):
    """Carries a rejection out of nested validation; never leaves this module."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode(stream: str, payload: bytes, received: float, max_bytes: int = 65536,
           max_batch: int = 10000) -> tuple[list[Reading], list[Rejected]]:
    """Turn one MQTT payload into readings (in payload order) and rejections. Never raises."""
    msg, rejected = decode_message(stream, payload, received, max_bytes, max_batch)
    return (msg.readings() if msg is not None else []), rejected


def decode_message(stream: str, payload: bytes, received: float, max_bytes: int = 65536,
                   max_batch: int = 10000) -> tuple[Message | None, list[Rejected]]:
    """:func:`decode` as the worker takes it: the valid readings as one `Message` (None if
    there are none) and the rejections. Never raises."""
    try:
        return _decode(stream, payload, received, max_bytes, max_batch)
    except Exception as exc:  # noqa: BLE001 - a bug here must cost one message, not the thread
        return None, [_reject(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")]


def oversize(payload: bytes, max_bytes: int) -> Rejected | None:
    """The rejection of a payload over ``max_bytes``, judged before any decoding."""
    if len(payload) > max_bytes:
        return _reject(TOO_LARGE, f"{len(payload)} bytes, limit {max_bytes}")
    return None


def _decode(stream: str, payload: bytes, received: float, max_bytes: int,
            max_batch: int) -> tuple[Message | None, list[Rejected]]:
    too_large = oversize(payload, max_bytes)
    if too_large is not None:
        return None, [too_large]
    text = payload.strip()
    if not text:
        return None, [_reject(EMPTY, "empty payload")]
    # Fast path for the commonest payload, a bare number. float() also takes Python-only
    # spellings: '1_000' is left to the JSON path (which rejects it), nan/inf are caught below.
    if text[:1] not in (b"{", b"[") and b"_" not in text:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return Message(stream, received, [received], None, [number]), []
            return None, [_reject(BAD_VALUE, f"payload is {number!r}, not a finite number")]
    # Some publishers prepend a BOM, which JSON refuses.
    body = text[3:] if text.startswith(_BOM) else text
    try:
        # orjson parses a batch of readings 3-4x faster than the standard library: on a
        # busy broker decoding is most of the daemon's time, all of it under the GIL.
        doc: Any = orjson.loads(body)
    except (ValueError, RecursionError):
        try:
            source = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, [_reject(NOT_UTF8, str(exc))]
        try:
            # parse_int=float: huge ints become inf (rejected as bad_value) instead of
            # hitting the int digit limit, and every JSON number arrives as a float.
            doc = _JSON.decode(source)
        except (ValueError, RecursionError) as exc:
            return None, [_reject(BAD_JSON, f"{type(exc).__name__}: {exc}")]
    if isinstance(doc, list):
        return _batch(stream, doc, received, max_batch)
    if doc.__class__ is dict and "value" not in doc:
        # The commonest message judged inline, without a Reading (this runs for every
        # single-reading message): {"ts": <epoch seconds>, "values": {<name>: <finite
        # float>, ...}}. Anything else takes the full path, which gives the same answer.
        values, ts = doc.get("values"), doc.get("ts")
        if values.__class__ is dict and values and ts.__class__ is float and -MS_THRESHOLD <= ts <= MS_THRESHOLD:
            for x in values.values():
                if x.__class__ is not float or x - x != 0.0:  # x - x is NaN for NaN and ±inf
                    break
            else:
                return Message(stream, received, [ts], [values], None), []
    try:
        r = _item(stream, doc, received)
    except _Invalid as bad:
        return None, [_reject(bad.reason, bad.detail)]
    if r.values is not None:  # built here, not by Message.of: this runs for every single-reading message
        return Message(stream, received, [r.ts], [r.values], None), []
    return Message(stream, received, [r.ts], None, [r.value]), []


def item_count(payload: bytes) -> int:
    """How many readings ``payload`` holds, without judging them: the items of a JSON
    array, else 1. For counting the readings of a message dropped before it was decoded
    (overload, shutdown); never raises."""
    body = payload.strip()
    if body[:1] != b"[":
        return 1
    try:
        doc = orjson.loads(body)
    except (ValueError, RecursionError):
        return 1  # not JSON: one invalid reading
    return max(len(doc), 1) if isinstance(doc, list) else 1


_TS = operator.itemgetter("ts")
_VALUES = operator.itemgetter("values")


def _batch(stream: str, items: list[Any], received: float,
           max_batch: int) -> tuple[Message | None, list[Rejected]]:
    if not items:
        return None, [_reject(BAD_SHAPE, "empty batch")]
    if len(items) > max_batch:
        # Its items counted, as a dropped message's are (item_count): the counts add up.
        return None, [_reject(BAD_SHAPE, f"batch of {len(items)} items, limit {max_batch}", len(items))]
    columns = _common_batch(items)
    if columns is not None:
        return Message(stream, received, columns[0], columns[1], None), []
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, list):
                raise _Invalid(BAD_SHAPE, "nested array")
            # Without ts, receive time + 1 µs per position: distinct and in order, not duplicates.
            readings.append(_item(stream, item, received + i * 1e-6))
        except _Invalid as bad:
            rejected.append(_reject(bad.reason, f"item {i}: {bad.detail}"))
    return (Message.of(readings, received) if readings else None), rejected


def _common_batch(items: list[Any]) -> tuple[list[float], list[dict[str, float]]] | None:
    """The columns (ts, values) of a batch whose every item is the commonest form,
    ``{"ts": <epoch seconds>, "values": {<name>: <finite number>, ...}}``, else None (the
    item-by-item path then gives the same answers). Judged a column at a time by map, set,
    min, max and sum, which run in C: this runs for every reading of every batch, and the
    item-by-item checks cost more than parsing the JSON."""
    try:
        ts = list(map(_TS, items))  # KeyError: no ts; TypeError: an item is not an object
        values = list(map(_VALUES, items))
    except (KeyError, TypeError):
        return None
    if any(map(dict.__contains__, items, repeat("value"))):  # "value" and "values": bad_shape
        return None
    # Epoch seconds: floats below the milliseconds threshold (JSON integers, strings and
    # milliseconds take the full path). A sum that is not finite has a NaN or inf in it
    # (the standard library's path admits them) or overflowed: the full path judges it.
    if set(map(type, ts)) != {float} or not (-MS_THRESHOLD <= min(ts) and max(ts) <= MS_THRESHOLD) \
            or not math.isfinite(sum(ts)):
        return None
    if set(map(type, values)) != {dict} or not all(values):
        return None
    numbers = list(chain.from_iterable(map(dict.values, values)))
    kinds = set(map(type, numbers))
    if not kinds <= {float, int} or not math.isfinite(sum(numbers)):
        return None  # bool is neither float nor int here: type() is exact
    if int in kinds:  # JSON integers become floats, as on the full path
        values = [{name: float(x) for name, x in v.items()} for v in values]
    return ts, values


def _item(stream: str, doc: Any, received: float) -> Reading:
    if isinstance(doc, dict):
        return _object(stream, doc, received)
    return Reading(stream, received, _number("payload", doc), None)


def _object(stream: str, obj: dict[str, Any], received: float) -> Reading:
    has_value, has_values = "value" in obj, "values" in obj
    if has_value and has_values:
        raise _Invalid(BAD_SHAPE, "object has both 'value' and 'values'")
    if not (has_value or has_values):
        raise _Invalid(BAD_SHAPE, "object has neither 'value' nor 'values'")
    ts = _timestamp(obj.get("ts"), received)
    if has_value:
        return Reading(stream, ts, _number("value", obj["value"]), None)
    return Reading(stream, ts, None, _values(obj["values"]))


def _values(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise _Invalid(BAD_SHAPE, f"'values' is {_describe(raw)}, not an object")
    if not raw:
        raise _Invalid(BAD_SHAPE, "'values' is empty")
    for x in raw.values():  # the common case first, inline: this runs for every reading
        if x.__class__ is not float or x - x != 0.0:
            break
    else:
        return raw  # the JSON parser built this dict for us alone, and every value is a float
    return {name: _number(f"values[{name!r}]", x) for name, x in raw.items()}


def _timestamp(raw: Any, received: float) -> float:
    if raw is None:
        return received
    if raw.__class__ is float or raw.__class__ is int:  # bool is neither
        if not math.isfinite(raw):
            raise _Invalid(BAD_TIMESTAMP, f"ts is {raw!r}, not finite")
        return epoch_seconds(float(raw))
    if isinstance(raw, str):
        try:
            return iso_epoch(raw)
        except (ValueError, OverflowError) as exc:
            raise _Invalid(BAD_TIMESTAMP, f"ts {raw[:40]!r} is not ISO 8601 ({exc})") from None
    raise _Invalid(BAD_TIMESTAMP, f"ts is {_describe(raw)}, not epoch seconds or ISO 8601")


def _number(what: str, x: Any) -> float:
    """``x`` as a finite float, else bad_value naming ``what``. orjson keeps JSON integers
    as int (the standard library's path makes them floats); bool is excluded by the exact
    class checks, NaN/Infinity (standard library path only) by isfinite."""
    if x.__class__ is float:
        if math.isfinite(x):
            return x
    elif x.__class__ is int:
        return float(x)  # orjson turns integers beyond 64 bits into floats: no overflow here
    raise _bad_value(what, x)


def _bad_value(what: str, x: Any) -> _Invalid:
    return _Invalid(BAD_VALUE, f"{what} is {_describe(x)}, not a finite number")


def _describe(x: Any) -> str:
    if x is None or isinstance(x, bool):
        return json.dumps(x)
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, list):
        return "an array"
    if isinstance(x, str):
        return f"the string {x[:40]!r}"
    return repr(x)


def _reject(reason: str, detail: str, count: int = 1) -> Rejected:
    # Details go to a log line and may quote attacker-controlled text: one line, bounded.
    detail = " ".join(detail[:2 * _DETAIL_MAX].split())
    if len(detail) > _DETAIL_MAX:
        detail = detail[:_DETAIL_MAX - 3] + "..."
    return Rejected(reason, detail, count)
