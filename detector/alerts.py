"""Alert messages: the topic and JSON payload of ``anomaly_start`` / ``anomaly_end``."""

from __future__ import annotations

import json
import math

from detector.engine import Event


def alert_topic(prefix: str, stream: str) -> str:
    """``<prefix>/<stream id>``. Stream ids come from topics the daemon subscribed to, so
    they hold no wildcards; any ``+``/``#``/NUL that gets here anyway (a template, a
    mapped id) is replaced, so no id can publish outside the alert namespace or to a
    wildcard topic."""
    safe = stream.replace("+", "_").replace("#", "_").replace("\x00", "_")
    return f"{prefix}/{safe}"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def alert_payload(event: Event, runtime: str) -> bytes:
    body = event.to_json()
    body["score"] = round(event.score, 6)
    body["error"] = _finite(event.error)
    body["threshold"] = _finite(event.threshold)
    body["model"] = dict(event.model, runtime=runtime)
    return json.dumps(body, separators=(",", ":")).encode()
