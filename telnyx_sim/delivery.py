"""Webhook delivery the way Telnyx does it (TELNYX.md section 1).

Each event is POSTed to one URL as a signed envelope with a 2 s budget and retried with
exponential backoff; any answer outside 2xx (3xx included) is a failure. Like Telnyx, delivery
can send an event twice (``duplicate_rate``) and out of order (``reorder``). Without
``reorder``, a call's events go out one at a time in the order they happened, retries
included, so a test can rely on that order.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from telnyx_sim.envelopes import dumps, wrap
from telnyx_sim.signing import Signer
from telnyx_sim.timers import Timer, Timers

__all__ = ["DeliveryPolicy", "DeliveryRecord", "Outbox", "WebhookSender"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How webhooks go out.

    Args:
        max_attempts: deliveries of one event before giving up (the first one included).
        retry_backoff: seconds before the first retry, doubling after each failure.
        delivery_timeout: the whole budget of one POST (Telnyx: 2 s).
        duplicate_rate: chance (0..1) that an event is delivered a second time.
        reorder: hold each call's events for ``reorder_window`` seconds (and at hang-up), then
            deliver the batch shuffled and concurrently.
        delivery_workers: threads POSTing webhooks (calls overlap up to this many).
    """

    max_attempts: int = 4
    retry_backoff: float = 1.0
    delivery_timeout: float = 2.0
    duplicate_rate: float = 0.0
    reorder: bool = False
    reorder_window: float = 1.5
    delivery_workers: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.duplicate_rate <= 1:
            raise ValueError("duplicate_rate must be between 0 and 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


@dataclass(frozen=True)
class DeliveryRecord:
    """One webhook POST attempt. ``status`` is 0 when no answer came (timeout, refused).

    ``monotonic`` is when the POST started and ``queued`` when its event was queued for
    delivery (both ``time.monotonic()``): on a first attempt, the difference is how long the
    event waited for a delivery thread, and for its call's earlier events to go first.
    """

    event_id: str
    event_type: str
    call_control_id: str
    attempt: int
    status: int
    error: str
    # The deliberate second copy sent because of ``duplicate_rate``.
    duplicate: bool
    monotonic: float
    elapsed: float
    queued: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class _Delivery:
    outbox: Outbox
    data: dict[str, Any]
    duplicate: bool = False
    attempts: int = 0
    queued: float = field(default_factory=time.monotonic)


@dataclass
class Outbox:
    """One call's webhooks on their way out."""

    call_control_id: str
    # Ordered delivery: one event in flight per call, the rest wait here.
    queue: deque[_Delivery] = field(default_factory=deque)
    pumping: bool = False
    # Reordered delivery: events held until the next flush.
    held: list[_Delivery] = field(default_factory=list)
    flush_timer: Timer | None = None


class WebhookSender:
    """Delivers events to ``url``, signed by ``signer``, as ``policy`` says.

    It shares its owner's re-entrant ``lock``: an event's place in the owner's log and in its
    call's outbox are decided together. `send` and `flush` are called with that lock held.
    POSTs run on a pool of ``policy.delivery_workers`` threads; backoffs and reorder windows
    wait on the owner's `Timers`.
    """

    def __init__(
        self,
        url: str,
        signer: Signer,
        policy: DeliveryPolicy,
        *,
        lock: threading.RLock,
        rng: random.Random,
        log_size: int,
        on_delivery: Callable[[DeliveryRecord], None] | None = None,
    ) -> None:
        self.url = url
        self.signer = signer
        self.policy = policy
        self.on_delivery = on_delivery
        self._lock = lock
        self._idle = threading.Condition(lock)
        self._random = rng
        self._deliveries: deque[DeliveryRecord] = deque(maxlen=log_size)
        self._pending = 0
        self._timers: Timers | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closing = False

    # -- lifecycle (the owner's) --

    def start(self, timers: Timers) -> None:
        self._closing = False
        self._timers = timers
        self._pool = ThreadPoolExecutor(
            self.policy.delivery_workers, thread_name_prefix="call-sim-post"
        )

    def close(self) -> None:
        """From now on, abandon work instead of starting it. Called with the lock held."""
        self._closing = True

    def shutdown(self) -> None:
        """Let in-flight POSTs finish (within ``delivery_timeout``); drop queued ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._pending = 0
        self._pool = self._timers = None

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no webhook is waiting for delivery or retry; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def records(
        self, call_control_id: str | None = None, event_type: str | None = None
    ) -> list[DeliveryRecord]:
        """Every POST attempt, in the order the attempts finished."""
        with self._lock:
            records = list(self._deliveries)
        return [
            record
            for record in records
            if (call_control_id is None or record.call_control_id == call_control_id)
            and (event_type is None or record.event_type == event_type)
        ]

    # -- queueing (the lock held) --

    def send(self, outbox: Outbox, data: dict[str, Any]) -> None:
        """Queue the event ``data`` of ``outbox``'s call (twice, by ``duplicate_rate``)."""
        deliveries = [_Delivery(outbox, data)]
        rate = self.policy.duplicate_rate
        if rate and self._random.random() < rate:
            deliveries.append(_Delivery(outbox, data, duplicate=True))
        self._pending += len(deliveries)
        if self.policy.reorder:
            if not outbox.held and self._timers is not None:
                outbox.flush_timer = self._timers.call_later(
                    self.policy.reorder_window, self._flush_due, outbox
                )
            outbox.held.extend(deliveries)
        else:
            outbox.queue.extend(deliveries)
            if not outbox.pumping:
                outbox.pumping = True
                self._submit(self._pump, outbox)

    def flush(self, outbox: Outbox) -> None:
        """Deliver what ``outbox`` holds now, shuffled, instead of at the end of its window."""
        if outbox.flush_timer is not None:
            outbox.flush_timer.cancel()
            outbox.flush_timer = None
        batch, outbox.held = outbox.held, []
        if len(batch) > 1:
            original = list(batch)
            # Shuffle until something actually moves, so "reorder" always reorders.
            while batch == original:
                self._random.shuffle(batch)
        for delivery in batch:
            self._submit(self._deliver_alone, delivery)

    def _flush_due(self, outbox: Outbox) -> None:
        with self._lock:
            outbox.flush_timer = None
            self.flush(outbox)

    # -- delivery (pool threads) --

    def _submit(self, fn: Callable[[Any], None], target: Outbox | _Delivery) -> None:
        """Run ``fn(target)`` on the pool; once closing, abandon the work instead."""
        pool = self._pool
        try:
            if pool is None or self._closing:
                raise RuntimeError("stopping")
            pool.submit(fn, target)
        except RuntimeError:
            self._abandon(target)

    def _abandon(self, target: Outbox | _Delivery) -> None:
        with self._lock:
            if isinstance(target, Outbox):
                self._done(len(target.queue))
                target.queue.clear()
                target.pumping = False
            else:
                self._done(1)

    def _pump(self, outbox: Outbox) -> None:
        """Deliver a call's queue in order, one event at a time (retries block the queue)."""
        while True:
            with self._lock:
                if self._closing:
                    self._abandon(outbox)
                    return
                if not outbox.queue:
                    outbox.pumping = False
                    return
                delivery = outbox.queue[0]
            if self._attempt(delivery) or delivery.attempts >= self.policy.max_attempts:
                with self._lock:
                    outbox.queue.popleft()
                    self._done(1)
                continue
            self._retry_later(delivery, self._pump, outbox)
            return

    def _deliver_alone(self, delivery: _Delivery) -> None:
        if self._attempt(delivery) or delivery.attempts >= self.policy.max_attempts:
            with self._lock:
                self._done(1)
            return
        self._retry_later(delivery, self._deliver_alone, delivery)

    def _retry_later(
        self, delivery: _Delivery, fn: Callable[[Any], None], target: Outbox | _Delivery
    ) -> None:
        """Run ``fn(target)`` on the pool after the backoff for the attempts made so far."""
        delay = self.policy.retry_backoff * 2 ** (delivery.attempts - 1)
        timers = self._timers
        timer = timers.call_later(delay, self._submit, fn, target) if timers else None
        if timer is None or timer.cancelled:
            self._abandon(target)

    def _done(self, count: int) -> None:
        self._pending = max(0, self._pending - count)
        if not self._pending:
            self._idle.notify_all()

    def _attempt(self, delivery: _Delivery) -> bool:
        """POST the event once; True on 2xx. Any 3xx counts as failure, as with Telnyx."""
        delivery.attempts += 1
        body = dumps(wrap(delivery.data, attempt=delivery.attempts, delivered_to=self.url))
        started = time.monotonic()
        status, error = self._post(body)
        record = DeliveryRecord(
            event_id=delivery.data["id"],
            event_type=delivery.data["event_type"],
            call_control_id=delivery.outbox.call_control_id,
            attempt=delivery.attempts,
            status=status,
            error=error,
            duplicate=delivery.duplicate,
            monotonic=started,
            elapsed=time.monotonic() - started,
            queued=delivery.queued,
        )
        with self._lock:
            self._deliveries.append(record)
        if self.on_delivery is not None:
            try:
                self.on_delivery(record)
            except Exception:
                logger.exception("on_delivery hook failed")
        return record.ok

    def _post(self, body: bytes) -> tuple[int, str]:
        parts = urlsplit(self.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        budget = self.policy.delivery_timeout
        deadline = time.monotonic() + budget
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(parts.hostname or "", parts.port, timeout=budget)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "telnyx-simulator",
            **self.signer.headers(body),
        }
        try:
            connection.request("POST", target, body=body, headers=headers)
            if connection.sock is not None:
                # The budget covers the whole exchange, not each socket operation.
                connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
            response = connection.getresponse()
            response.read()
            return response.status, "" if 200 <= response.status < 300 else response.reason
        except TimeoutError:
            return 0, f"no answer within {budget:g} s"
        except (OSError, http.client.HTTPException) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        finally:
            connection.close()
