"""Timestamps as the contract reads them, for files and payloads alike."""

from __future__ import annotations

from datetime import datetime, timezone

# 1e11 s is the year 5138 and 1e11 ms is 1973: no realistic timestamp is ambiguous. Each
# finer unit starts 1000 times higher (microseconds above 1e14, nanoseconds above 1e17:
# what InfluxDB and Telegraf write), so none of them is read as a year in the far future.
MS_THRESHOLD = 1e11


def epoch_seconds(v: float) -> float:
    """Epoch seconds from seconds, milliseconds, microseconds or nanoseconds, told apart
    by size."""
    a = abs(v)
    if a <= MS_THRESHOLD:
        return v
    if a <= MS_THRESHOLD * 1e3:
        return v / 1e3
    if a <= MS_THRESHOLD * 1e6:
        return v / 1e6
    return v / 1e9


def iso_epoch(text: str) -> float:
    """ISO 8601 to epoch seconds; a time without a zone is UTC. Raises ValueError."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
