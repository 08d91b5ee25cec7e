"""The bounded queue between paho's network thread and the worker.

The network thread only puts each message's raw payload here; the worker takes them,
decodes them and scores them. Decoding on the worker keeps nearly all interpreter work
on one thread: two threads sharing the GIL cost more per reading than one (measured in
``bench/RESULTS.md``), and a backlog of raw payloads is a few large byte strings instead
of several Python objects per reading.

The queue is bounded twice, so a burst cannot grow memory without limit: at most
``capacity`` messages and at most ``capacity_bytes`` payload bytes. What happens when
either is reached is the configured overload policy, and the caller counts every
reading it costs:

* ``drop_oldest``: the oldest waiting messages make room (freshest data wins: what a
  live dashboard wants);
* ``drop_newest``: the new message is refused (what was queued first wins).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Raw:
    """One MQTT message as it arrived, not yet decoded."""

    stream: str
    topic: str
    payload: bytes
    received: float  # time.time() when the message arrived


class Intake:
    """``len`` counts messages; ``nbytes`` their payload bytes."""

    def __init__(self, capacity: int, capacity_bytes: int = 1 << 62, overload: str = "drop_oldest") -> None:
        self._msgs: deque[Raw] = deque()
        self._bytes = 0
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._drop_oldest = overload == "drop_oldest"
        # put and take enter the lock itself: Condition's own __enter__/__exit__ are Python
        # calls, and put runs once per MQTT message.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False

    def put(self, msg: Raw) -> list[Raw]:
        """Queue ``msg``; returns the messages the overload policy dropped (``msg`` itself,
        or older ones), for the caller to count."""
        size = len(msg.payload)
        with self._lock:
            if self._closed:
                return [msg]
            dropped: list[Raw] = []
            if len(self._msgs) >= self._capacity or self._bytes + size > self._capacity_bytes:
                if not self._drop_oldest or size > self._capacity_bytes:
                    return [msg]
                while self._msgs and (len(self._msgs) >= self._capacity
                                      or self._bytes + size > self._capacity_bytes):
                    old = self._msgs.popleft()
                    self._bytes -= len(old.payload)
                    dropped.append(old)
            was_empty = not self._msgs
            self._msgs.append(msg)
            self._bytes += size
            if was_empty:  # the worker only waits on an empty queue
                self._cond.notify()
            return dropped

    def take(self, max_msgs: int, max_wait: float) -> list[Raw]:
        """Up to ``max_msgs`` waiting messages, oldest first; waits up to ``max_wait``
        seconds when there are none. Under load batches fill by themselves while the
        worker scores."""
        deadline = time.monotonic() + max_wait
        with self._cond:
            while not self._msgs and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            msgs = self._msgs
            if len(msgs) <= max_msgs:
                out = list(msgs)
                msgs.clear()
                self._bytes = 0
            else:
                out = [msgs.popleft() for _ in range(max_msgs)]
                self._bytes -= sum(len(m.payload) for m in out)
            return out

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nbytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Stop accepting messages (shutdown: what is queued can still be taken)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._msgs)
