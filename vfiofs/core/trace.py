"""What the devices are doing, for ``vfiofs trace``: an event bus with bounded subscriber queues.

Every region access, control command (with its errno), interrupt and DMA can be
published as one JSON-able event. Nothing is formatted while nobody listens, so the hot
path pays one truth test. A subscriber that does not keep up loses its oldest events and
is told how many. Events are stamped with the clock the daemon passes in (the wall clock;
a fixed one in unit tests): the core reads no clock itself.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

QUEUE_LIMIT = 65536


class Subscriber:
    def __init__(self, clock: Callable[[], float], on_event: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self.on_event = on_event  # e.g. wake a poll() waiter

    def take(self, size: int) -> bytes:
        """Whole lines, up to ``size`` bytes (at least one line, even a long one)."""
        out = bytearray()
        if self.dropped:
            out += json.dumps({"t": self.clock(), "op": "dropped", "count": self.dropped}).encode() + b"\n"
            self.dropped = 0
        while self.queue and (not out or len(out) + len(self.queue[0]) <= size):
            out += self.queue.popleft()
        return bytes(out)


class TraceBus:
    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock  # seconds since the epoch, for the events' "t"
        self.subscribers: list[Subscriber] = []

    def subscribe(self, on_event: Callable[[], None] | None = None) -> Subscriber:
        subscriber = Subscriber(self.clock, on_event)
        self.subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    def emit(self, **event: Any) -> None:
        if not self.subscribers:
            return
        line = json.dumps({"t": self.clock(), **event}, default=str).encode() + b"\n"
        for subscriber in self.subscribers:
            if len(subscriber.queue) >= QUEUE_LIMIT:
                subscriber.queue.popleft()
                subscriber.dropped += 1
            subscriber.queue.append(line)
            if subscriber.on_event is not None:
                try:
                    subscriber.on_event()
                except Exception:  # a waker must never break the device
                    pass
