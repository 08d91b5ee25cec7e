"""Timestamps as the contract reads them, for files and payloads alike."""

from __future__ import annotations

from datetime import datetime, timezone

# 1e11 s is the year 5138 and 1e11 ms is 1973: no realistic timestamp is ambiguous.
MS_THRESHOLD = 1e11


def epoch_seconds(v: float) -> float:
    """Epoch seconds from seconds or milliseconds, told apart by size."""
    return v / 1000.0 if abs(v) > MS_THRESHOLD else v


def iso_epoch(text: str) -> float:
    """ISO 8601 to epoch seconds; a time without a zone is UTC. Raises ValueError."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
