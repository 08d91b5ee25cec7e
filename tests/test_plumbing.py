"""The daemon's small parts: intake overload policy, alert topics, checkpoints, sd_notify."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from detector import checkpoint, sdnotify
from detector.alerts import alert_payload, alert_topic
from detector.engine import Event
from detector.intake import Intake, Message
from detector.payloads import Reading


def message(n: int, start: int = 0, received: float = 0.0) -> Message:
    """One MQTT message holding ``n`` readings stamped start, start + 1, ..."""
    return Message([Reading("s", float(i), float(i), None) for i in range(start, start + n)], received)


def stamps(msgs: list[Message]) -> list[float]:
    return [r.ts for m in msgs for r in m.readings]


def test_drop_oldest_keeps_the_freshest_and_counts() -> None:
    q = Intake(5, "drop_oldest")
    assert q.put(message(4)) == 0
    assert q.put(message(3, start=4)) == 2  # the oldest message loses its first two readings
    assert len(q) == 5
    assert stamps(q.take(10, 0.0)) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert q.put(message(8, start=10)) == 3  # larger than the queue: its newest five stay
    assert stamps(q.take(10, 0.0)) == [13.0, 14.0, 15.0, 16.0, 17.0]
    for start in (20, 21, 22):  # three single readings, then a batch that evicts two
        q.put(message(1, start=start))
    assert q.put(message(4, start=30)) == 2 and len(q) == 5
    assert stamps(q.take(10, 0.0)) == [22.0, 30.0, 31.0, 32.0, 33.0]


def test_drop_newest_keeps_the_oldest_and_counts() -> None:
    q = Intake(5, "drop_newest")
    assert q.put(message(4)) == 0
    assert q.put(message(3, start=4)) == 2
    assert stamps(q.take(3, 0.0)) == [0.0, 1.0, 2.0]
    assert len(q) == 2


def test_take_splits_a_message_and_keeps_its_receive_time() -> None:
    q = Intake(100)
    q.put(message(3, received=7.0))
    q.put(message(4, start=3, received=8.0))
    first = q.take(5, 0.0)
    assert stamps(first) == [0.0, 1.0, 2.0, 3.0, 4.0] and [m.received for m in first] == [7.0, 8.0]
    assert len(q) == 2
    rest = q.take(5, 0.0)
    assert stamps(rest) == [5.0, 6.0] and [m.received for m in rest] == [8.0]
    assert len(q) == 0 and q.take(5, 0.0) == []


def test_closed_intake_refuses_but_drains() -> None:
    q = Intake(10)
    q.put(message(3))
    q.close()
    assert q.put(message(2)) == 2
    assert stamps(q.take(10, 1.0)) == [0.0, 1.0, 2.0] and q.take(10, 1.0) == []


def test_alert_topic_cannot_escape_or_wildcard() -> None:
    assert alert_topic("anomalies", "sensors/pump-1") == "anomalies/sensors/pump-1"
    assert alert_topic("anomalies", "a/+/#") == "anomalies/a/_/_"
    ev = Event("s", "anomaly_start", 1.0, 0.9999, float("inf"), 0.2, {"x": 1.0}, {"name": "m", "version": "v"})
    body = json.loads(alert_payload(ev, "auto"))
    assert body["error"] is None and body["model"] == {"name": "m", "version": "v", "runtime": "auto"}


def test_checkpoint_round_trip_and_corrupt_file_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "a.npz"
    checkpoint.save(path, {"h": np.ones((2, 3), dtype=np.float32), "streams": np.array(["a", "b"])})
    snap, problem = checkpoint.load(path)
    assert problem is None and snap is not None and snap["streams"].tolist() == ["a", "b"]
    assert checkpoint.load(tmp_path / "none.npz") == (None, None)
    path.write_bytes(b"garbage")
    snap, problem = checkpoint.load(path)
    assert snap is None and problem is not None and "moved to" in problem
    assert not path.exists() and len(list(path.parent.glob("a.npz.corrupt-*"))) == 1


def test_sd_notify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(sock_path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        assert sdnotify.notify("READY=1")
        assert server.recv(64) == b"READY=1"
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")
