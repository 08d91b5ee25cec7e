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
from detector.intake import Intake, Item
from detector.payloads import Reading


def items(n: int, start: int = 0) -> list[Item]:
    return [Item(Reading("s", float(i), float(i), None), 0.0) for i in range(start, start + n)]


def test_drop_oldest_keeps_the_freshest_and_counts() -> None:
    q = Intake(5, "drop_oldest")
    assert q.put(items(4)) == 0
    assert q.put(items(3, start=4)) == 2
    assert [it.reading.ts for it in q.take(10, 0.0)] == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert q.put(items(8, start=10)) == 3
    assert [it.reading.ts for it in q.take(10, 0.0)] == [13.0, 14.0, 15.0, 16.0, 17.0]


def test_drop_newest_keeps_the_oldest_and_counts() -> None:
    q = Intake(5, "drop_newest")
    assert q.put(items(4)) == 0
    assert q.put(items(3, start=4)) == 2
    assert [it.reading.ts for it in q.take(3, 0.0)] == [0.0, 1.0, 2.0]
    assert len(q) == 2


def test_closed_intake_refuses_but_drains() -> None:
    q = Intake(10)
    q.put(items(3))
    q.close()
    assert q.put(items(2)) == 2
    assert len(q.take(10, 1.0)) == 3 and q.take(10, 1.0) == []


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
