"""Small helpers shared by the tests that drive a real daemon process."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import paho.mqtt.client as mqtt

T = TypeVar("T")
DEADLINE = 60.0


def wait_for(pred: Callable[[], T], what: str, deadline: float = DEADLINE, every: float = 0.1) -> T:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` after
    ``deadline`` seconds (generous: no timing is asserted, only that it happens)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str) -> float:
    """The value of the series ``name`` (exactly, labels included) in /metrics text."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def publish_all(port: int, items: list[tuple[str, bytes]]) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait until the broker has them all."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for info in [pub.publish(t, p, qos=1) for t, p in items]:
        info.wait_for_publish(timeout=30)
    pub.loop_stop()
    pub.disconnect()
