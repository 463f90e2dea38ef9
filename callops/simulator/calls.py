"""Telnyx's side of a call: signed webhooks and media streams for calls that exist only here.

`CallSimulator` places simulated inbound calls and tells a webhook URL about them the way Telnyx
does (TELNYX.md sections 1 and 3): ``call.initiated``, ``call.answered``, later ``call.hangup``,
each an Ed25519-signed envelope POSTed with a 2 s budget and retried with exponential backoff.
Paired with a `TelnyxAPISimulator`, it reacts to the commands that simulator applies: a
``streaming_start`` yields ``streaming.started`` and a real media WebSocket session to the
``stream_url`` (PCMU sine tone, 20 ms frames); ``fork_start`` yields ``call.fork.started``;
``transcription_start`` yields interim and final ``call.transcription`` events until hang-up::

    with TelnyxAPISimulator() as api, CallSimulator(webhook_url=url, api=api) as calls:
        ccid = calls.place_call(duration=5)
        # point callops at api.base_url and trust calls.public_key

Like Telnyx it can deliver duplicates (``duplicate_rate``) and out of order (``reorder``).
Without ``reorder`` a call's webhooks go out one at a time in the order they happened, retries
included, so a test can rely on that order.

No Django imports: any process can run one. Threads only: a timer thread for everything that
happens later (answers, hang-ups, transcripts, retries), a small pool for webhook POSTs and one
thread per live media stream; `stop` ends them all in bounded time.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import heapq
import http.client
import itertools
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nacl.signing import SigningKey

if TYPE_CHECKING:
    from callops.simulator.api import CommandRecord, TelnyxAPISimulator

__all__ = ["CallSimulator", "DeliveryRecord", "MediaSession", "load_signing_key"]

logger = logging.getLogger(__name__)

# Telnyx's account id appears in media frames as ``user_id``; any stable uuid will do here.
SIMULATOR_USER_ID = "5e1a7c00-0000-4000-8000-00000000c0de"

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # PCMU: one byte per sample

# What the simulated parties say, in turn: (track, words).
_SCRIPT = (
    ("inbound", "hi I am calling about my order"),
    ("outbound", "sure can I have the order number please"),
    ("inbound", "it is four two seven one"),
    ("outbound", "thanks I can see it here it ships tomorrow"),
    ("inbound", "great thank you so much"),
)


# --- Records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRecord:
    """One webhook POST attempt. ``status`` is 0 when no answer came (timeout, refused)."""

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

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class MediaSession:
    """What happened on one media WebSocket (a snapshot when read through `media_sessions`)."""

    stream_id: str
    call_control_id: str
    stream_url: str
    tracks: tuple[str, ...]
    connected: bool = False
    media_frames: int = 0
    frames_received: int = 0
    error: str = ""
    closed: bool = False


# --- Keys -------------------------------------------------------------------------------------


def load_signing_key(path: str | os.PathLike[str], *, create: bool = True) -> SigningKey:
    """Read an Ed25519 seed (base64) from ``path``, or make one and save it there (mode 0600).

    Keeping the key across runs keeps the public key callops was configured with valid.
    """
    path = Path(path)
    if path.exists():
        return SigningKey(base64.b64decode(path.read_text().strip(), validate=True))
    if not create:
        raise FileNotFoundError(path)
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key


# --- Audio ------------------------------------------------------------------------------------


def _ulaw(sample: int) -> int:
    """G.711 mu-law byte for one signed 16-bit sample (Sun's reference, as in CPython's audioop)."""
    value = sample >> 2  # 14-bit linear
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, 8159) + 0x21
    segment = max(0, value.bit_length() - 6)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


@lru_cache(maxsize=4)
def pcmu_tone(frequency: int, amplitude: float = 0.3) -> bytes:
    """One second of a PCMU sine tone; a whole number of cycles, so it loops without a click."""
    scale = amplitude * 32767
    step = 2 * math.pi * frequency / SAMPLE_RATE
    return bytes(_ulaw(round(scale * math.sin(step * i))) for i in range(SAMPLE_RATE))


# Caller and callee sound different, so a listener can tell the tracks apart.
_TRACK_TONES = {"inbound": 440, "outbound": 660}
_STREAM_TRACKS = {
    "inbound_track": ("inbound",),
    "outbound_track": ("outbound",),
    "both_tracks": ("inbound", "outbound"),
}


# --- Timers -----------------------------------------------------------------------------------


class _Timer:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.fn, self.args, self.cancelled = fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class _Timers:
    """One thread running short callbacks at their due time. Callbacks must not block."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="call-sim-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> _Timer:
        timer = _Timer(fn, args)
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


# --- Internal state ---------------------------------------------------------------------------


@dataclass
class _Delivery:
    call: _Call
    data: dict[str, Any]
    duplicate: bool = False
    attempts: int = 0


@dataclass
class _Call:
    call_control_id: str
    call_leg_id: str
    call_session_id: str
    connection_id: str
    from_number: str
    to_number: str
    started_at: datetime
    duration: float
    client_state: str | None = None
    answered: bool = False
    ended: bool = False
    last_occurred: datetime | None = None
    stream: _MediaStream | None = None
    fork_type: str | None = None
    # Bumped by every transcription start/stop, so a stale tick knows to stop.
    transcription_generation: int = 0
    transcript_position: int = 0
    timers: list[_Timer] = field(default_factory=list)
    # Ordered delivery: one event in flight per call, the rest wait here.
    queue: deque[_Delivery] = field(default_factory=deque)
    pumping: bool = False
    # Reordered delivery: events held until the next flush.
    held: list[_Delivery] = field(default_factory=list)

    def payload(self, **extra: Any) -> dict[str, Any]:
        return {
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "connection_id": self.connection_id,
            "client_state": self.client_state,
            "from": self.from_number,
            "to": self.to_number,
            **extra,
        }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- The simulator ----------------------------------------------------------------------------


class CallSimulator:
    """Simulated Telnyx calls: signed webhooks to ``webhook_url`` and media WebSockets.

    Args:
        webhook_url: where webhooks are POSTed (callops: ``.../webhooks/telnyx/``).
        api: a running `TelnyxAPISimulator`; calls are registered there and its applied
            commands drive events. Without one, calls only produce lifecycle webhooks.
        signing_key: the Ed25519 key webhooks are signed with (generated when None).
        calls_per_minute: automatic placement rate once started; 0 places none.
        call_duration: seconds from answer to hang-up, ± ``duration_jitter`` (a fraction).
        answer_delay: seconds from ``call.initiated`` to ``call.answered``.
        connection_id, from_number, to_number: payload values; ``from_number`` None gives
            each call a random +1555 number.
        max_attempts: deliveries of one event before giving up (the first one included).
        retry_backoff: seconds before the first retry, doubling after each failure.
        delivery_timeout: the whole budget of one POST (Telnyx: 2 s).
        duplicate_rate: chance (0..1) that an event is delivered a second time.
        reorder: hold each call's events for ``reorder_window`` seconds (and at hang-up), then
            deliver the batch shuffled and concurrently.
        transcription_interval: seconds between ``call.transcription`` events.
        media: open media WebSockets on ``streaming_start`` (False: webhooks only).
        media_connect_timeout: budget for connecting and the WebSocket handshake.
        delivery_workers: threads POSTing webhooks (calls overlap up to this many).
        log_size: how many events and deliveries the logs keep.
        on_delivery: called with each `DeliveryRecord`, on a delivery thread; exceptions are
            logged and swallowed.
        seed: seeds the random choices (jitter, duplicates, shuffles, confidences).

    `start` chains onto ``api.on_command`` (the hook already there is still called) and `stop`
    restores it. ``api.reset()`` puts back the API simulator's constructor hook, unhooking this
    simulator: reset the API simulator before starting this one, not while it runs.
    """

    def __init__(
        self,
        *,
        webhook_url: str,
        api: TelnyxAPISimulator | None = None,
        signing_key: SigningKey | None = None,
        calls_per_minute: float = 0.0,
        call_duration: float = 30.0,
        duration_jitter: float = 0.2,
        answer_delay: float = 1.0,
        connection_id: str = "sim-conn",
        from_number: str | None = None,
        to_number: str = "+15550100000",
        max_attempts: int = 4,
        retry_backoff: float = 1.0,
        delivery_timeout: float = 2.0,
        duplicate_rate: float = 0.0,
        reorder: bool = False,
        reorder_window: float = 1.5,
        transcription_interval: float = 1.0,
        media: bool = True,
        media_connect_timeout: float = 2.0,
        delivery_workers: int = 8,
        log_size: int = 10_000,
        on_delivery: Callable[[DeliveryRecord], None] | None = None,
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook_url must be an http(s) URL, not {webhook_url!r}")
        if not 0 <= duplicate_rate <= 1:
            raise ValueError("duplicate_rate must be between 0 and 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.webhook_url = webhook_url
        self.api = api
        self.signing_key = signing_key or SigningKey.generate()
        self.calls_per_minute = calls_per_minute
        self.call_duration = call_duration
        self.duration_jitter = duration_jitter
        self.answer_delay = answer_delay
        self.connection_id = connection_id
        self.from_number = from_number
        self.to_number = to_number
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.delivery_timeout = delivery_timeout
        self.duplicate_rate = duplicate_rate
        self.reorder = reorder
        self.reorder_window = reorder_window
        self.transcription_interval = transcription_interval
        self.media = media
        self.media_connect_timeout = media_connect_timeout
        self.delivery_workers = delivery_workers
        self.on_delivery = on_delivery
        self._random = random.Random(seed)  # noqa: S311 - simulation, not security
        # One re-entrant lock for calls, queues and logs: an event's occurred_at, its place in
        # the log and its place in the call's delivery queue are decided together.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._calls: dict[str, _Call] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=log_size)
        self._deliveries: deque[DeliveryRecord] = deque(maxlen=log_size)
        self._sessions: deque[MediaSession] = deque(maxlen=log_size)
        self._streams: set[_MediaStream] = set()
        self._pending = 0
        self._timers: _Timers | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._placer: _Timer | None = None
        self._placing = False
        self._previous_hook: Callable[[CommandRecord], None] | None = None
        self._closing = False

    # -- keys --

    @property
    def public_key(self) -> str:
        """Base64 of the raw 32-byte verify key: callops' ``TELNYX_PUBLIC_KEY``."""
        return base64.b64encode(bytes(self.signing_key.verify_key)).decode()

    def write_public_key(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.public_key + "\n")
        return path

    def sign(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The two Telnyx signature headers for ``body``."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.signing_key.sign(ts.encode() + b"|" + body).signature
        return {
            "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
            "telnyx-timestamp": ts,
        }

    # -- lifecycle --

    @property
    def running(self) -> bool:
        return self._timers is not None and not self._closing

    def start(self) -> CallSimulator:
        if self._timers is not None:
            raise RuntimeError("The call simulator is already running.")
        self._closing = False
        self._timers = _Timers()
        self._pool = ThreadPoolExecutor(self.delivery_workers, thread_name_prefix="call-sim-post")
        if self.api is not None:
            # Chained, so whoever hooked the API simulator first still hears every command.
            self._previous_hook = self.api.on_command
            self.api.on_command = self._on_command
        self._placing = True
        self._placer = self._timers.call_later(0, self._place_tick)
        return self

    def stop(self, *, hangup: bool = True, timeout: float = 10.0) -> None:
        """Stop placing calls; hang up live ones first (``hangup``); end every thread.

        Waits up to ``timeout`` seconds for outstanding webhooks (retries included), then
        abandons the rest. Media streams get their ``stop`` frame.
        """
        if self._timers is None:
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            self._placing = False
            if self._placer is not None:
                self._placer.cancel()
        if hangup:
            for ccid in list(self._calls):
                self.hangup(ccid)
        self.wait_idle(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closing = True
            streams = list(self._streams)
        self._timers.close(timeout=1.0)
        for stream in streams:
            stream.stop()
        for stream in streams:
            stream.join(min(1.5, max(0.1, deadline - time.monotonic())))
            if stream.alive:
                # Stuck sending to a peer that stopped reading: cut the connection.
                stream.abort()
                stream.join(0.5)
        assert self._pool is not None
        # In-flight POSTs finish within delivery_timeout; queued ones are dropped.
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.api is not None and self.api.on_command == self._on_command:
            self.api.on_command = self._previous_hook
        with self._lock:
            self._calls.clear()
            self._pending = 0
        self._timers = self._pool = self._placer = None

    def __enter__(self) -> CallSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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

    # -- logs --

    def events(
        self, call_control_id: str | None = None, event_type: str | None = None
    ) -> list[dict[str, Any]]:
        """The ``data`` of every event emitted, in the order they happened (copies)."""
        with self._lock:
            events = list(self._events)
        return [
            json.loads(json.dumps(data))
            for data in events
            if (call_control_id is None or data["payload"]["call_control_id"] == call_control_id)
            and (event_type is None or data["event_type"] == event_type)
        ]

    def deliveries(
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

    def media_sessions(self, call_control_id: str | None = None) -> list[MediaSession]:
        with self._lock:
            sessions = [dataclasses.replace(session) for session in self._sessions]
        return [s for s in sessions if call_control_id in (None, s.call_control_id)]

    @property
    def live_calls(self) -> list[str]:
        with self._lock:
            return list(self._calls)

    # -- calls --

    def place_call(
        self,
        *,
        duration: float | None = None,
        answer_delay: float | None = None,
        connection_id: str | None = None,
        from_number: str | None = None,
        to_number: str | None = None,
    ) -> str:
        """Start one inbound call now; returns its ``call_control_id``.

        ``duration`` (seconds from answer to hang-up) defaults to ``call_duration`` with jitter;
        ``float("inf")`` keeps the call up until `hangup` or `stop`.
        """
        if not self.running:
            raise RuntimeError("Start the call simulator before placing calls.")
        rng = self._random
        if duration is None:
            spread = self.call_duration * self.duration_jitter
            duration = max(0.0, self.call_duration + rng.uniform(-spread, spread))
        if answer_delay is None:
            answer_delay = self.answer_delay * rng.uniform(0.8, 1.2)
        number = from_number or self.from_number or f"+1555{rng.randrange(10**7):07d}"
        call = _Call(
            call_control_id=f"v3:sim-{uuid.uuid4()}",
            call_leg_id=str(uuid.uuid4()),
            call_session_id=str(uuid.uuid4()),
            connection_id=connection_id or self.connection_id,
            from_number=number,
            to_number=to_number or self.to_number,
            started_at=datetime.now(UTC),
            duration=duration,
        )
        with self._lock:
            self._calls[call.call_control_id] = call
            if self.api is not None:
                self.api.add_call(call.call_control_id)
            self._emit(
                call,
                "call.initiated",
                direction="incoming",
                state="parked",
                start_time=_iso(call.started_at),
            )
            self._later(call, answer_delay, self._answer, call)
            if math.isfinite(duration):
                self._later(call, answer_delay + duration, self._hangup_due, call)
        logger.info(
            "call %s placed: %s -> %s", call.call_control_id, call.from_number, call.to_number
        )
        return call.call_control_id

    def hangup(
        self,
        call_control_id: str,
        *,
        cause: str | None = None,
        source: str = "caller",
        sip_cause: str | None = None,
    ) -> bool:
        """End a live call now: stop its media, then ``call.hangup``. False if not live.

        By default the caller hangs up: ``normal_clearing`` / SIP 200 once answered,
        ``originator_cancel`` / SIP 487 while still ringing.
        """
        with self._lock:
            call = self._calls.pop(call_control_id, None)
            if call is None or call.ended:
                return False
            call.ended = True
            if cause is None:
                cause = "normal_clearing" if call.answered else "originator_cancel"
            if sip_cause is None:
                sip_cause = "200" if call.answered else "487"
            for timer in call.timers:
                timer.cancel()
            call.transcription_generation += 1
            if self.api is not None:
                self.api.end_call(call_control_id)
            self._stop_stream(call)
            self._stop_fork(call)
            elapsed = (datetime.now(UTC) - call.started_at).total_seconds()
            packets = str(max(0, int(elapsed * 1000 / FRAME_MS)))
            self._emit(
                call,
                "call.hangup",
                state="hangup",
                hangup_cause=cause,
                hangup_source=source,
                sip_hangup_cause=sip_cause,
                start_time=_iso(call.started_at),
                call_quality_stats={
                    "inbound": {"mos": "4.50", "packet_count": packets, "skip_packet_count": "0"},
                    "outbound": {"packet_count": packets, "skip_packet_count": "0"},
                },
            )
            if self.reorder:
                self._flush(call)
        logger.info("call %s hung up (%s)", call_control_id, cause)
        return True

    def _answer(self, call: _Call) -> None:
        with self._lock:
            if call.ended or call.answered:
                return
            call.answered = True
            self._emit(call, "call.answered", state="answered", start_time=_iso(call.started_at))

    def _hangup_due(self, call: _Call) -> None:
        self.hangup(call.call_control_id)

    def _place_tick(self) -> None:
        """Place a call if the rate asks for one; look again after one interval (or 1 s)."""
        with self._lock:
            if not self._placing or self._timers is None:
                return
            rate = self.calls_per_minute
            if rate > 0:
                self.place_call()
            self._placer = self._timers.call_later(
                60.0 / rate if rate > 0 else 1.0, self._place_tick
            )

    def _later(self, call: _Call, delay: float, fn: Callable[..., None], *args: Any) -> None:
        if self._timers is not None:
            call.timers.append(self._timers.call_later(delay, fn, *args))

    # -- commands (API simulator threads) --

    def _on_command(self, record: CommandRecord) -> None:
        if self._previous_hook is not None:
            try:
                self._previous_hook(record)
            except Exception:
                logger.exception("chained on_command hook failed")
        # ``applied`` is false for errors and ignored repeats. It is true with a non-200 status
        # only for inject(apply=True): the command took effect though the client never heard,
        # and Telnyx would send its webhooks all the same.
        if not record.applied or record.duplicate or not isinstance(record.body, dict):
            return
        handler = self._COMMAND_HANDLERS.get(record.action or "")
        with self._lock:
            call = self._calls.get(record.call_control_id or "")
            if handler is None or call is None or call.ended or self._closing:
                return
            client_state = record.body.get("client_state")
            if isinstance(client_state, str):
                # Telnyx echoes it in this and every later webhook of the call.
                call.client_state = client_state
            handler(self, call, record.body)

    def _streaming_start(self, call: _Call, body: dict[str, Any]) -> None:
        # One stream or fork per call (as in the API simulator): a new one replaces the old.
        self._stop_stream(call)
        self._stop_fork(call)
        stream = _MediaStream(self, call, body)
        call.stream = stream
        self._emit(call, "streaming.started", stream_url=stream.url)
        if self.media and not self._closing:
            self._streams.add(stream)
            with self._lock:
                self._sessions.append(stream.session)
            stream.start()

    def _streaming_stop(self, call: _Call, body: dict[str, Any]) -> None:
        stream_id = body.get("stream_id")
        if call.stream is not None and stream_id in (None, call.stream.stream_id):
            self._stop_stream(call)

    def _fork_start(self, call: _Call, body: dict[str, Any]) -> None:
        self._stop_stream(call)
        self._stop_fork(call)
        call.fork_type = body.get("stream_type") or "raw"
        self._emit(call, "call.fork.started", stream_type=call.fork_type)

    def _fork_stop(self, call: _Call, body: dict[str, Any]) -> None:
        self._stop_fork(call)

    def _transcription_start(self, call: _Call, body: dict[str, Any]) -> None:
        call.transcription_generation += 1
        tracks = body.get("transcription_tracks") or "inbound"
        self._later(
            call,
            self.transcription_interval,
            self._transcribe,
            call,
            call.transcription_generation,
            tracks,
        )

    def _transcription_stop(self, call: _Call, body: dict[str, Any]) -> None:
        call.transcription_generation += 1

    _COMMAND_HANDLERS: dict[str, Callable[[CallSimulator, _Call, dict[str, Any]], None]] = {
        "streaming_start": _streaming_start,
        "streaming_stop": _streaming_stop,
        "fork_start": _fork_start,
        "fork_stop": _fork_stop,
        "transcription_start": _transcription_start,
        "transcription_stop": _transcription_stop,
    }

    def _stop_stream(self, call: _Call) -> None:
        stream, call.stream = call.stream, None
        if stream is not None:
            stream.stop()
            self._emit(call, "streaming.stopped", stream_url=stream.url)

    def _stop_fork(self, call: _Call) -> None:
        fork_type, call.fork_type = call.fork_type, None
        if fork_type is not None:
            self._emit(call, "call.fork.stopped", stream_type=fork_type)

    def _stream_failed(self, stream: _MediaStream, reason: str) -> None:
        """Called from a media thread when the stream could not connect or broke off."""
        call = stream.call
        with self._lock:
            self._streams.discard(stream)
            if call.ended or call.stream is not stream or self._closing:
                return
            call.stream = None
            self._emit(
                call,
                "streaming.failed",
                failure_reason=reason,
                stream_id=stream.stream_id,
                stream_type="websocket",
                stream_params={"stream_url": stream.url, "track": stream.track},
            )

    def _stream_finished(self, stream: _MediaStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _transcribe(self, call: _Call, generation: int, tracks: str) -> None:
        with self._lock:
            if call.ended or generation != call.transcription_generation:
                return
            lines = [line for line in _SCRIPT if tracks == "both" or line[0] == tracks] or _SCRIPT
            # Each line is heard twice: first half as an interim result, then the final one.
            position = call.transcript_position
            call.transcript_position += 1
            track, text = lines[(position // 2) % len(lines)]
            final = position % 2 == 1
            words = text.split()
            transcript = text if final else " ".join(words[: max(1, len(words) // 2)])
            low, high = (0.85, 0.99) if final else (0.5, 0.8)
            self._emit(
                call,
                "call.transcription",
                transcription_data={
                    "transcript": transcript,
                    "confidence": round(self._random.uniform(low, high), 3),
                    "is_final": final,
                    "transcription_track": track,
                },
            )
            self._later(
                call, self.transcription_interval, self._transcribe, call, generation, tracks
            )

    # -- events and delivery --

    def _emit(self, call: _Call, event_type: str, **payload: Any) -> None:
        """Record one event of ``call`` and queue its delivery. Called with the lock held."""
        now = datetime.now(UTC)
        if call.last_occurred is not None and now <= call.last_occurred:
            # Two events in the same clock tick still get strictly increasing times.
            now = call.last_occurred + timedelta(microseconds=1)
        call.last_occurred = now
        data = {
            "record_type": "event",
            "event_type": event_type,
            "id": str(uuid.uuid4()),
            "occurred_at": _iso(now),
            "payload": call.payload(**payload),
        }
        self._events.append(data)
        deliveries = [_Delivery(call, data)]
        if self.duplicate_rate and self._random.random() < self.duplicate_rate:
            deliveries.append(_Delivery(call, data, duplicate=True))
        self._pending += len(deliveries)
        if self.reorder:
            if not call.held:
                self._later(call, self.reorder_window, self._flush_due, call)
            call.held.extend(deliveries)
        else:
            call.queue.extend(deliveries)
            if not call.pumping:
                call.pumping = True
                self._submit(self._pump, call)

    def _flush_due(self, call: _Call) -> None:
        with self._lock:
            self._flush(call)

    def _flush(self, call: _Call) -> None:
        batch, call.held = call.held, []
        if len(batch) > 1:
            original = list(batch)
            # Shuffle until something actually moves, so "reorder" always reorders.
            while batch == original:
                self._random.shuffle(batch)
        for delivery in batch:
            self._submit(self._deliver_alone, delivery)

    def _submit(self, fn: Callable[[Any], None], target: _Call | _Delivery) -> None:
        """Run ``fn(target)`` on the delivery pool; once stopping, abandon the work instead."""
        pool = self._pool
        try:
            if pool is None or self._closing:
                raise RuntimeError("stopping")
            pool.submit(fn, target)
        except RuntimeError:
            self._abandon(target)

    def _abandon(self, target: _Call | _Delivery) -> None:
        with self._lock:
            if isinstance(target, _Call):
                self._done(len(target.queue))
                target.queue.clear()
                target.pumping = False
            else:
                self._done(1)

    def _pump(self, call: _Call) -> None:
        """Deliver a call's queue in order, one event at a time (retries block the queue)."""
        while True:
            with self._lock:
                if self._closing:
                    self._abandon(call)
                    return
                if not call.queue:
                    call.pumping = False
                    return
                delivery = call.queue[0]
            if self._attempt(delivery) or delivery.attempts >= self.max_attempts:
                with self._lock:
                    call.queue.popleft()
                    self._done(1)
                continue
            self._retry_later(delivery, self._pump, call)
            return

    def _deliver_alone(self, delivery: _Delivery) -> None:
        if self._attempt(delivery) or delivery.attempts >= self.max_attempts:
            with self._lock:
                self._done(1)
            return
        self._retry_later(delivery, self._deliver_alone, delivery)

    def _retry_later(
        self, delivery: _Delivery, fn: Callable[[Any], None], target: _Call | _Delivery
    ) -> None:
        """Run ``fn(target)`` on the pool after the backoff for the attempts made so far."""
        delay = self.retry_backoff * 2 ** (delivery.attempts - 1)
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
        envelope = {
            "data": delivery.data,
            "meta": {"attempt": delivery.attempts, "delivered_to": self.webhook_url},
        }
        body = json.dumps(envelope, separators=(",", ":")).encode()
        started = time.monotonic()
        status, error = self._post(body)
        record = DeliveryRecord(
            event_id=delivery.data["id"],
            event_type=delivery.data["event_type"],
            call_control_id=delivery.call.call_control_id,
            attempt=delivery.attempts,
            status=status,
            error=error,
            duplicate=delivery.duplicate,
            monotonic=started,
            elapsed=time.monotonic() - started,
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
        parts = urlsplit(self.webhook_url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        budget = self.delivery_timeout
        deadline = time.monotonic() + budget
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(parts.hostname or "", parts.port, timeout=budget)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "telnyx-simulator",
            **self.sign(body),
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


# --- Media streams ----------------------------------------------------------------------------


class _MediaStream:
    """One media WebSocket to a ``stream_url``, on its own thread."""

    def __init__(self, sim: CallSimulator, call: _Call, body: dict[str, Any]) -> None:
        self.sim = sim
        self.call = call
        self.stream_id = str(uuid.uuid4())
        self.url: str = body["stream_url"]
        self.track: str = body.get("stream_track") or "inbound_track"
        self.token: str | None = body.get("stream_auth_token")
        params = body.get("custom_parameters") or []
        self.custom_parameters = {p["name"]: p.get("value") for p in params}
        self.client_state = call.client_state
        self.tracks = _STREAM_TRACKS.get(self.track, ("inbound",))
        self.session = MediaSession(
            stream_id=self.stream_id,
            call_control_id=call.call_control_id,
            stream_url=self.url,
            tracks=self.tracks,
        )
        self._stopping = threading.Event()
        self._sequence = itertools.count(1)
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"call-sim-media:{self.stream_id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self) -> None:
        self._stopping.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        try:
            reason = self._stream()
        except Exception as exc:
            logger.exception("media stream %s crashed", self.stream_id)
            reason = f"{type(exc).__name__}: {exc}"
        with self.sim._lock:
            self.session.closed = True
            self.session.error = reason or ""
        if reason and not self._stopping.is_set():
            logger.info("media stream %s to %s failed: %s", self.stream_id, self.url, reason)
            self.sim._stream_failed(self, reason)
        else:
            self.sim._stream_finished(self)

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        # Our own socket: a plain TCP connect with a short timeout, and no proxy from the
        # environment (Telnyx connects directly).
        sock = socket.create_connection(
            (parts.hostname or "", port), timeout=self.sim.media_connect_timeout
        )
        # As websockets does with its own sockets: blocking from here, the handshake is
        # bounded by open_timeout.
        sock.settimeout(None)
        self._socket = sock
        try:
            headers = {"x-telnyx-streaming-auth-token": self.token} if self.token else None
            return connect(
                self.url,
                sock=sock,
                additional_headers=headers,
                open_timeout=self.sim.media_connect_timeout,
                close_timeout=1,
                compression=None,
                user_agent_header="telnyx-simulator",
            )
        except BaseException:
            sock.close()
            raise

    def _stream(self) -> str | None:
        """Run the session; returns why it failed, or None after a clean stop."""
        try:
            from websockets.exceptions import ConnectionClosed
        except ImportError:
            return "the websockets package is not installed"
        try:
            ws = self._connect()
        except Exception as exc:
            return f"could not connect: {type(exc).__name__}: {exc}".rstrip(": ")
        with ws:
            self.session.connected = True
            logger.info("media stream %s connected to %s", self.stream_id, self.url)
            try:
                self._send(ws, self._connected_frame())
                self._send(ws, self._start_frame())
                self._send_media(ws)
                self._send(
                    ws,
                    {
                        "event": "stop",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "stop": {
                            "user_id": SIMULATOR_USER_ID,
                            "call_control_id": self.call.call_control_id,
                        },
                    },
                )
            except ConnectionClosed as exc:
                return f"websocket closed by the server ({exc})"
        logger.info(
            "media stream %s closed after %d media frames",
            self.stream_id,
            self.session.media_frames,
        )
        return None

    def _connected_frame(self) -> dict[str, Any]:
        frame = {"event": "connected", "version": "1.0.0"}
        if self.token:
            frame["x-telnyx-streaming-auth-token"] = self.token
        return frame

    def _start_frame(self) -> dict[str, Any]:
        call = self.call
        return {
            "event": "start",
            "sequence_number": str(next(self._sequence)),
            "stream_id": self.stream_id,
            "start": {
                "user_id": SIMULATOR_USER_ID,
                "call_control_id": call.call_control_id,
                "call_session_id": call.call_session_id,
                "from": call.from_number,
                "to": call.to_number,
                "client_state": self.client_state,
                "custom_parameters": self.custom_parameters,
                "media_format": {"encoding": "PCMU", "sample_rate": SAMPLE_RATE, "channels": 1},
            },
        }

    def _send_media(self, ws: Any) -> None:
        tones = {track: pcmu_tone(_TRACK_TONES[track]) for track in self.tracks}
        started = time.monotonic()
        chunk = 0
        # Paced against the start time, so scheduling jitter does not accumulate.
        while not self._stopping.wait(
            max(0.0, started + chunk * FRAME_MS / 1000 - time.monotonic())
        ):
            offset = (chunk * FRAME_BYTES) % SAMPLE_RATE
            for track, tone in tones.items():
                self._send(
                    ws,
                    {
                        "event": "media",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "media": {
                            "track": track,
                            "chunk": str(chunk + 1),
                            "timestamp": str(chunk * FRAME_MS),
                            "payload": base64.b64encode(
                                tone[offset : offset + FRAME_BYTES]
                            ).decode(),
                        },
                    },
                )
                self.session.media_frames += 1
            chunk += 1
            self._answer_frames(ws)

    def _answer_frames(self, ws: Any) -> None:
        """Read what the application sent; answer marks at once (no audio is ever queued)."""
        while True:
            try:
                message = ws.recv(timeout=0)
            except TimeoutError:
                return
            self.session.frames_received += 1
            try:
                frame = json.loads(message)
            except (TypeError, ValueError):
                continue
            if isinstance(frame, dict) and frame.get("event") == "mark":
                mark = frame.get("mark") if isinstance(frame.get("mark"), dict) else {}
                self._send(
                    ws,
                    {
                        "event": "mark",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "mark": {"name": mark.get("name")},
                    },
                )

    @staticmethod
    def _send(ws: Any, frame: dict[str, Any]) -> None:
        ws.send(json.dumps(frame, separators=(",", ":")))
