"""The bounded queue between paho's network thread and the worker.

The network thread only decodes and puts; the worker takes micro-batches. The queue is
bounded so a burst cannot grow memory without limit; what happens when it is full is the
configured overload policy, and every reading it costs is counted by the caller:

* ``drop_oldest``: the oldest waiting readings make room (freshest data wins: what a
  live dashboard wants);
* ``drop_newest``: the new readings are refused (what was queued first wins).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from detector.payloads import Reading


@dataclass(slots=True)
class Message:
    """The readings of one MQTT message, in payload order: one stream, one receive time.
    Queued whole, so a batch of a hundred readings costs one queue entry, not a hundred."""

    readings: list[Reading]
    received: float  # time.time() when the message arrived


class Intake:
    """Capacity and ``len`` count readings, not messages."""

    def __init__(self, capacity: int, overload: str = "drop_oldest") -> None:
        self._msgs: deque[Message] = deque()
        self._n = 0
        self._capacity = capacity
        self._drop_oldest = overload == "drop_oldest"
        # put and take enter the lock itself: Condition's own __enter__/__exit__ are Python
        # calls, and put runs once per MQTT message.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False

    def put(self, msg: Message) -> int:
        """Queue ``msg``; returns how many readings the overload policy dropped (of it, or
        of older messages)."""
        with self._lock:
            k = len(msg.readings)
            if self._closed:
                return k
            room = self._capacity - self._n
            dropped = 0
            if k > room:
                if self._drop_oldest:
                    dropped = k - room
                    room += self._cut(dropped)
                    if k > room:  # a message larger than the whole queue keeps its newest
                        msg = Message(msg.readings[k - room:], msg.received)
                else:
                    dropped = k - max(room, 0)
                    msg = Message(msg.readings[: max(room, 0)], msg.received)
            if msg.readings:
                was_empty = not self._msgs
                self._msgs.append(msg)
                self._n += len(msg.readings)
                if was_empty:  # the worker only waits on an empty queue
                    self._cond.notify()
            return dropped

    def _cut(self, n: int) -> int:
        """Remove up to ``n`` of the oldest readings; returns how many it removed."""
        cut = 0
        while cut < n and self._msgs:
            first = self._msgs[0]
            m = len(first.readings)
            if m <= n - cut:
                self._msgs.popleft()
                cut += m
            else:
                del first.readings[: n - cut]
                cut = n
        self._n -= cut
        return cut

    def take(self, max_items: int, max_wait: float) -> list[Message]:
        """Messages holding up to ``max_items`` waiting readings (the last one split if
        need be); waits up to ``max_wait`` seconds when there are none. Under load
        batches fill by themselves while the worker scores."""
        deadline = time.monotonic() + max_wait
        with self._cond:
            while not self._msgs and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out: list[Message] = []
            budget = max_items
            while budget > 0 and self._msgs:
                first = self._msgs[0]
                m = len(first.readings)
                if m <= budget:
                    out.append(self._msgs.popleft())
                    budget -= m
                else:
                    out.append(Message(first.readings[:budget], first.received))
                    del first.readings[:budget]
                    budget = 0
            self._n -= max_items - budget
            return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop accepting readings (shutdown: what is queued can still be taken)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return self._n
