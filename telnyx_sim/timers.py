"""One thread that runs the call simulator's later work: answers, hang-ups, transcripts, retries."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Timer", "Timers"]

logger = logging.getLogger(__name__)


class Timer:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.fn, self.args, self.cancelled = fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """One thread running short callbacks at their due time. Callbacks must not block."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="call-sim-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(fn, args)
        with self._cond:
            if self._closed:
                timer.cancel()
            else:
                due = time.monotonic() + max(0.0, delay)
                heapq.heappush(self._heap, (due, next(self._seq), timer))
                self._cond.notify()
        return timer

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                try:
                    timer.fn(*timer.args)
                except Exception:
                    logger.exception("simulator timer callback %r failed", timer.fn)

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout)
