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


@dataclass(frozen=True, slots=True)
class Item:
    reading: Reading
    received: float  # time.time() when the message arrived


class Intake:
    def __init__(self, capacity: int, overload: str = "drop_oldest") -> None:
        self._items: deque[Item] = deque()
        self._capacity = capacity
        self._drop_oldest = overload == "drop_oldest"
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, items: list[Item]) -> int:
        """Queue ``items`` in order; returns how many readings the overload policy dropped."""
        with self._cond:
            if self._closed:
                return len(items)
            room = self._capacity - len(self._items)
            dropped = 0
            if len(items) > room:
                if self._drop_oldest:
                    dropped = len(items) - room
                    from_queue = min(dropped, len(self._items))
                    for _ in range(from_queue):
                        self._items.popleft()
                    items = items[dropped - from_queue:]  # a batch larger than the queue
                else:
                    dropped = len(items) - max(room, 0)
                    items = items[: max(room, 0)]
            was_empty = not self._items
            self._items.extend(items)
            if items and was_empty:  # the worker only waits on an empty queue
                self._cond.notify()
            return dropped

    def take(self, max_items: int, max_wait: float) -> list[Item]:
        """Up to ``max_items`` waiting readings; waits up to ``max_wait`` seconds when there
        are none. Under load batches fill by themselves while the worker scores."""
        deadline = time.monotonic() + max_wait
        with self._cond:
            while not self._items and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop accepting readings (shutdown: what is queued can still be taken)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)
