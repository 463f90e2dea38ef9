"""Telnyx's side of a call: the lifecycle of calls that exist only here.

`CallSimulator` places simulated inbound calls and tells a webhook URL about them the way Telnyx
does (TELNYX.md sections 1, 3 and 5). An incoming call is strict like Telnyx's: it sends
``call.initiated`` (``incoming``, ``parked``) and then nothing until a command. Paired with a
`TelnyxAPISimulator`, it reacts to the commands that simulator applies:

- ``answer``: ``call.answered``, then the answer's inline stream (``stream_url``, ...) and
  transcription (``transcription: true`` + ``transcription_config``) as if started apart;
  the caller hangs up ``call_duration`` later (``normal_clearing``, ``caller``);
- ``reject``: ``call.hangup`` with the cause (``call_rejected``, ``not_found``, ``user_busy``;
  ``unspecified`` for TEMPORARILY_UNAVAILABLE), ``hangup_source: callee``;
- ``hangup``: ``call.hangup`` ``normal_clearing``, from our side (``callee`` of an incoming
  call, ``caller`` of a dialled one);
- nobody answers within ``ring_timeout``: the caller gives up, ``call.hangup``
  ``originator_cancel`` / ``caller``. With ``answered_elsewhere`` another application answers
  after ``answer_delay`` (callops' answer policy "none"), and ``answer`` is refused;
- ``dial`` (``POST /v2/calls``): ``call.initiated`` (``outgoing``), then by the plan's shares the
  far end answers (``call.answered``), is busy (``call.hangup`` ``user_busy``) or never answers
  (``call.hangup`` ``timeout`` after ``timeout_secs``). ``time_limit_secs`` ends an answered
  call with ``time_limit``; ``answering_machine_detection`` sends
  ``call.machine.detection.ended`` (``result`` human / machine / not_sure by the plan's shares)
  after answer, or ``call.machine.premium.detection.ended`` (human_residence / machine /
  silence) for the premium modes, as Telnyx's reference says. Inline media starts on answer
  (at once with ``stream_establish_before_call_originate``);
- ``streaming_start``: a real media WebSocket session to the ``stream_url``
  (`telnyx_sim.media`), and ``streaming.started`` once its socket is up (``streaming.failed``
  with ``stream_id`` and ``failure_reason`` if it cannot connect); ``fork_start`` yields
  ``call.fork.started``; ``transcription_start`` yields interim and final
  ``call.transcription`` events until hang-up.

An answered call's caller presses a key every ``dtmf_interval`` seconds or so (0: never):
``call.dtmf.received`` and, on a live stream, a ``dtmf`` frame. ``call.hangup`` carries
``start_time`` and ``call_quality_stats`` (null for a call never answered: no media flowed)::

    with TelnyxAPISimulator() as api, CallSimulator(webhook_url=url, api=api) as calls:
        ccid = calls.place_call(duration=5)
        # point callops at api.base_url and trust calls.public_key; callops answers

Webhooks go out through `telnyx_sim.delivery` (signed, retried, duplicated and reordered as
Telnyx may). What the calls are like is a `CallPlan`; how their webhooks go, a `DeliveryPolicy`.

No Django imports: any process can run one. Threads only: a timer thread for everything that
happens later (answers, hang-ups, transcripts, retries), a small pool for webhook POSTs and one
thread per live media stream; `stop` ends them all in bounded time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nacl.signing import SigningKey

from telnyx_sim.delivery import DeliveryPolicy, DeliveryRecord, Outbox, WebhookSender
from telnyx_sim.envelopes import event, iso_time
from telnyx_sim.media import FRAME_MS, MediaStream, MediaStreamRecord
from telnyx_sim.signing import Signer
from telnyx_sim.timers import Timer, Timers

if TYPE_CHECKING:
    from telnyx_sim.command_api import CommandRecord, TelnyxAPISimulator

__all__ = ["CallPlan", "CallSimulator"]

logger = logging.getLogger(__name__)

# What the simulated parties say, in turn: (track, words).
_SCRIPT = (
    ("inbound", "hi I am calling about my order"),
    ("outbound", "sure can I have the order number please"),
    ("inbound", "it is four two seven one"),
    ("outbound", "thanks I can see it here it ships tomorrow"),
    ("inbound", "great thank you so much"),
)


@dataclass(frozen=True)
class CallPlan:
    """What the simulated calls are like.

    Args:
        calls_per_minute: automatic placement rate once started; 0 places none.
        call_duration: seconds from answer to hang-up, ± ``duration_jitter`` (a fraction).
        ring_timeout: seconds an incoming call rings unanswered before the caller gives up.
        answered_elsewhere: another application answers incoming calls by itself, after
            ``answer_delay`` seconds (``answer`` from us is then refused).
        answer_delay: with ``answered_elsewhere``, seconds from ``call.initiated`` to
            ``call.answered``.
        connection_id, from_number, to_number: payload values (``connection_id`` may list
            several, comma separated: placed calls take them in turn); ``from_number`` None gives
            each call a random +1555 number.
        dial_answered_share, dial_busy_share, dial_no_answer_share: how a dialled far end
            behaves, as relative weights.
        dial_answer_delay: seconds (± 20 %) from a dial's ``call.initiated`` to the far end
            answering or being busy.
        dial_timeout: seconds a dial rings when it has no ``timeout_secs``.
        machine_human_share, machine_machine_share, machine_not_sure_share: answering
            machine detection results, as relative weights.
        machine_detection_delay: seconds from answer to the detection result.
        dtmf_interval: mean seconds between the caller's key presses on an answered call
            (0: none).
        transcription_interval: seconds between ``call.transcription`` events.
        media: open media WebSockets on ``streaming_start`` (False: webhooks only, and
            ``streaming.started`` at command time).
        media_connect_timeout: budget for connecting and the WebSocket handshake.
        media_error_rate: chance per 20 ms media chunk of an ``error`` frame (a fault).
    """

    calls_per_minute: float = 0.0
    call_duration: float = 30.0
    duration_jitter: float = 0.2
    ring_timeout: float = 30.0
    answered_elsewhere: bool = False
    answer_delay: float = 1.0
    connection_id: str = "sim-conn"
    from_number: str | None = None
    to_number: str = "+15550100000"
    dial_answered_share: float = 0.8
    dial_busy_share: float = 0.1
    dial_no_answer_share: float = 0.1
    dial_answer_delay: float = 2.0
    dial_timeout: float = 30.0
    machine_human_share: float = 0.7
    machine_machine_share: float = 0.25
    machine_not_sure_share: float = 0.05
    machine_detection_delay: float = 1.5
    dtmf_interval: float = 0.0
    transcription_interval: float = 1.0
    media: bool = True
    media_connect_timeout: float = 2.0
    media_error_rate: float = 0.0

    def __post_init__(self) -> None:
        for group in ("dial", "machine"):
            shares = self.shares(group).values()
            if min(shares) < 0 or sum(shares) <= 0:
                raise ValueError(f"the {group}_*_share weights must be >= 0, not all 0")
        if self.ring_timeout <= 0 or self.dial_timeout <= 0:
            raise ValueError("ring_timeout and dial_timeout must be positive")
        if not 0 <= self.media_error_rate <= 1:
            raise ValueError("media_error_rate must be between 0 and 1")

    def shares(self, group: str) -> dict[str, float]:
        """``"dial"`` or ``"machine"``: each outcome and its weight."""
        prefix = f"{group}_"
        return {
            f.name[len(prefix) : -len("_share")]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.startswith(prefix) and f.name.endswith("_share")
        }


# reject's cause -> (hangup_cause, sip_hangup_cause). Telnyx's list of hangup causes has no
# "temporarily unavailable": its nearest is unspecified (the SIP code still says 480).
_REJECT_CAUSES = {
    "CALL_REJECTED": ("call_rejected", "603"),
    "NOT_FOUND": ("not_found", "404"),
    "TEMPORARILY_UNAVAILABLE": ("unspecified", "480"),
    "USER_BUSY": ("user_busy", "486"),
}
# Telnyx's premium detection reports its own result names.
_PREMIUM_RESULTS = {"human": "human_residence", "machine": "machine", "not_sure": "silence"}
_DTMF_DIGITS = "0123456789*#"


_PLAN_FIELDS = frozenset(f.name for f in dataclasses.fields(CallPlan))
_DELIVERY_FIELDS = frozenset(f.name for f in dataclasses.fields(DeliveryPolicy))


def _configure(
    plan: CallPlan | None, delivery: DeliveryPolicy | None, shorthands: dict[str, Any]
) -> tuple[CallPlan, DeliveryPolicy]:
    """Apply each keyword shorthand to the field of that name in the plan or the policy."""
    unknown = shorthands.keys() - _PLAN_FIELDS - _DELIVERY_FIELDS
    if unknown:
        raise TypeError(f"CallSimulator() got unexpected keyword arguments {sorted(unknown)}")
    plan = dataclasses.replace(
        plan or CallPlan(), **{k: v for k, v in shorthands.items() if k in _PLAN_FIELDS}
    )
    delivery = dataclasses.replace(
        delivery or DeliveryPolicy(),
        **{k: v for k, v in shorthands.items() if k in _DELIVERY_FIELDS},
    )
    return plan, delivery


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
    outbox: Outbox
    client_state: str | None = None
    direction: str = "incoming"
    # The dial's body, for a call we placed: its inline media, limits and detection.
    dial: dict[str, Any] | None = None
    answered: bool = False
    answered_at: datetime | None = None
    ended: bool = False
    last_occurred: datetime | None = None
    stream: MediaStream | None = None
    fork_type: str | None = None
    # Bumped by every transcription start/stop, so a stale tick knows to stop.
    transcription_generation: int = 0
    transcript_position: int = 0
    timers: list[Timer] = field(default_factory=list)

    def payload(self, **extra: Any) -> dict[str, Any]:
        """The keys every webhook of this call carries, then ``extra``."""
        return {
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "connection_id": self.connection_id,
            "client_state": self.client_state,
            "from": self.from_number,
            "to": self.to_number,
            **extra,
        }


# --- The simulator ----------------------------------------------------------------------------


class CallSimulator:
    """Simulated Telnyx calls: signed webhooks to ``webhook_url`` and media WebSockets.

    Args:
        webhook_url: where webhooks are POSTed (callops: ``.../webhooks/telnyx/``).
        api: a running `TelnyxAPISimulator`; calls are registered there and its applied
            commands drive events. Without one, calls only produce lifecycle webhooks.
        signing_key: the Ed25519 key webhooks are signed with (generated when None).
        plan: what the calls are like (`CallPlan`).
        delivery: how their webhooks go out (`DeliveryPolicy`).
        on_delivery: called with each `DeliveryRecord`, on a delivery thread; exceptions are
            logged and swallowed.
        log_size: how many events, deliveries and media streams the logs keep.
        seed: seeds the random choices (jitter, duplicates, shuffles, confidences).
        **shorthands: single fields of the plan or the policy, by name:
            ``CallSimulator(webhook_url=url, answer_delay=0.05, reorder=True)``.

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
        plan: CallPlan | None = None,
        delivery: DeliveryPolicy | None = None,
        on_delivery: Callable[[DeliveryRecord], None] | None = None,
        log_size: int = 10_000,
        seed: int | None = None,
        **shorthands: Any,
    ) -> None:
        parts = urlsplit(webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook_url must be an http(s) URL, not {webhook_url!r}")
        self.plan, self.delivery = _configure(plan, delivery, shorthands)
        self.webhook_url = webhook_url
        self.api = api
        self.signer = Signer(signing_key or SigningKey.generate())
        self._random = random.Random(seed)  # noqa: S311 - simulation, not security
        # One re-entrant lock for calls, queues and logs: an event's occurred_at, its place in
        # the log and its place in the call's delivery queue are decided together.
        self._lock = threading.RLock()
        self._webhooks = WebhookSender(
            webhook_url,
            self.signer,
            self.delivery,
            lock=self._lock,
            rng=self._random,
            log_size=log_size,
            on_delivery=on_delivery,
        )
        self._calls: dict[str, _Call] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=log_size)
        self._sessions: deque[MediaStreamRecord] = deque(maxlen=log_size)
        self._streams: set[MediaStream] = set()
        self._timers: Timers | None = None
        self._placer: Timer | None = None
        self._placing = False
        self._placed = 0  # automatic placements so far: they take the connection ids in turn
        self._previous_hook: Callable[[CommandRecord], None] | None = None
        self._closing = False

    # -- keys --

    @property
    def public_key(self) -> str:
        """Base64 of the raw 32-byte verify key: callops' ``TELNYX_PUBLIC_KEY``."""
        return self.signer.public_key

    def write_public_key(self, path: str | os.PathLike[str]) -> Path:
        return self.signer.write_public_key(path)

    # -- lifecycle --

    @property
    def running(self) -> bool:
        return self._timers is not None and not self._closing

    def start(self) -> CallSimulator:
        if self._timers is not None:
            raise RuntimeError("The call simulator is already running.")
        self._closing = False
        self._timers = Timers()
        self._webhooks.start(self._timers)
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
            self._webhooks.close()
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
        self._webhooks.shutdown()
        if self.api is not None and self.api.on_command == self._on_command:
            self.api.on_command = self._previous_hook
        with self._lock:
            self._calls.clear()
        self._timers = self._placer = None

    def __enter__(self) -> CallSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no webhook is waiting for delivery or retry; False on timeout."""
        return self._webhooks.wait_idle(timeout)

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
        return self._webhooks.records(call_control_id, event_type)

    def media_sessions(self, call_control_id: str | None = None) -> list[MediaStreamRecord]:
        """What happened on each media WebSocket, in the order they opened (snapshots)."""
        with self._lock:
            records = [dataclasses.replace(record) for record in self._sessions]
        return [r for r in records if call_control_id in (None, r.call_control_id)]

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

        It stays parked until answered (or, with ``answered_elsewhere``, answers itself after
        ``answer_delay``). ``duration`` (seconds from answer to hang-up) defaults to
        ``call_duration`` with jitter; ``float("inf")`` keeps the call up until `hangup` or
        `stop`.
        """
        if not self.running:
            raise RuntimeError("Start the call simulator before placing calls.")
        rng, plan = self._random, self.plan
        if duration is None:
            spread = plan.call_duration * plan.duration_jitter
            duration = max(0.0, plan.call_duration + rng.uniform(-spread, spread))
        if answer_delay is None:
            answer_delay = plan.answer_delay * rng.uniform(0.8, 1.2)
        number = from_number or plan.from_number or f"+1555{rng.randrange(10**7):07d}"
        call_control_id = f"v3:sim-{uuid.uuid4()}"
        call = _Call(
            call_control_id=call_control_id,
            call_leg_id=str(uuid.uuid4()),
            call_session_id=str(uuid.uuid4()),
            connection_id=connection_id or plan.connection_id.split(",")[0],
            from_number=number,
            to_number=to_number or plan.to_number,
            started_at=datetime.now(UTC),
            duration=duration,
            outbox=Outbox(call_control_id),
        )
        with self._lock:
            if self.api is not None:
                self.api.add_call(call.call_control_id, answered=False)
            self._initiate(call, "parked")
            if plan.answered_elsewhere:
                self._later(call, answer_delay, self._answered_elsewhere, call)
            self._later(call, plan.ring_timeout, self._unanswered, call, "originator_cancel")
        logger.info(
            "call %s placed: %s -> %s", call.call_control_id, call.from_number, call.to_number
        )
        return call.call_control_id

    def hangup(
        self,
        call_control_id: str,
        *,
        cause: str | None = None,
        source: str | None = None,
        sip_cause: str | None = None,
    ) -> bool:
        """End a live call now: stop its media, then ``call.hangup``. False if not live.

        By default the other party hangs up (the caller of an incoming call, the callee of a
        dialled one): ``normal_clearing`` / SIP 200 once answered, ``originator_cancel`` /
        SIP 487 while still ringing.
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
            if source is None:
                source = "caller" if call.direction == "incoming" else "callee"
            for timer in call.timers:
                timer.cancel()
            call.transcription_generation += 1
            if self.api is not None:
                self.api.end_call(call_control_id)
            self._stop_stream(call)
            self._stop_fork(call)
            self._emit(
                call,
                "call.hangup",
                state="hangup",
                hangup_cause=cause,
                hangup_source=source,
                sip_hangup_cause=sip_cause,
                start_time=iso_time(call.started_at),
                call_quality_stats=self._quality_stats(call),
            )
            # Held (reordered) events go out now rather than after the call is gone.
            self._webhooks.flush(call.outbox)
        logger.info("call %s hung up (%s)", call_control_id, cause)
        return True

    def _initiate(self, call: _Call, state: str) -> None:
        """A new call, incoming or dialled: known from now, and ``call.initiated``."""
        self._calls[call.call_control_id] = call
        self._emit(
            call,
            "call.initiated",
            direction=call.direction,
            state=state,
            start_time=iso_time(call.started_at),
        )

    def _quality_stats(self, call: _Call) -> dict[str, Any] | None:
        """Telnyx's per-direction RTP summary; None when no media ever flowed."""
        if call.answered_at is None:
            return None
        elapsed = (datetime.now(UTC) - call.answered_at).total_seconds()
        packets = max(0, int(elapsed * 1000 / FRAME_MS))
        rng = self._random
        return {
            "inbound": {
                "jitter_max_variance": f"{rng.uniform(0.5, 4):.2f}",
                "jitter_packet_count": "0",
                "mos": f"{rng.uniform(4.2, 4.5):.2f}",
                "packet_count": str(packets),
                "skip_packet_count": str(packets // 500),
            },
            "outbound": {"packet_count": str(packets), "skip_packet_count": "0"},
        }

    def _answered(self, call: _Call, media: dict[str, Any]) -> None:
        """The call is answered (the API simulator already knows): its webhooks and timers.

        ``media`` is the body whose inline stream and transcription start now: the answer's,
        or the dial's. Called with the lock held.
        """
        if call.ended or call.answered:
            return
        call.answered = True
        call.answered_at = datetime.now(UTC)
        self._emit(call, "call.answered", state="answered", start_time=iso_time(call.started_at))
        if math.isfinite(call.duration):
            self._later(call, call.duration, self._hangup_due, call)
        dial = call.dial or {}
        if dial.get("time_limit_secs"):
            self._later(call, dial["time_limit_secs"], self._time_limit, call)
        detection = dial.get("answering_machine_detection")
        if detection not in (None, "disabled"):
            self._later(call, self.plan.machine_detection_delay, self._detected, call, detection)
        if self.plan.dtmf_interval > 0:
            self._later(call, self._dtmf_gap(), self._press_key, call)
        if media.get("stream_url") and not (
            call.dial and call.dial.get("stream_establish_before_call_originate")
        ):
            self._streaming_start(call, media)
        if media.get("transcription") is True:
            self._transcription_start(call, media.get("transcription_config") or {})

    def _answered_elsewhere(self, call: _Call) -> None:
        with self._lock:
            # False when answered (a command won the race) or ended meanwhile.
            if self.api is None or self.api.mark_answered(call.call_control_id):
                self._answered(call, {})

    def _unanswered(self, call: _Call, cause: str) -> None:
        """Nobody answered in time: the caller gives up, or Telnyx gives up on a dial."""
        with self._lock:
            if call.answered or call.ended:
                return
            # An answer the API simulator has just applied wins: its hook is on the way.
            if self.api is not None and not self.api.end_call(
                call.call_control_id, if_unanswered=True
            ):
                return
            self.hangup(call.call_control_id, cause=cause, source="caller", sip_cause="487")

    def _far_end_answers(self, call: _Call) -> None:
        with self._lock:
            if call.ended or (
                self.api is not None and not self.api.mark_answered(call.call_control_id)
            ):
                return
            self._answered(call, call.dial or {})

    def _far_end_busy(self, call: _Call) -> None:
        with self._lock:
            if call.ended or (
                self.api is not None
                and not self.api.end_call(call.call_control_id, if_unanswered=True)
            ):
                return
            self.hangup(call.call_control_id, cause="user_busy", source="callee", sip_cause="486")

    def _time_limit(self, call: _Call) -> None:
        self.hangup(call.call_control_id, cause="time_limit", source="unknown", sip_cause="200")

    def _detected(self, call: _Call, mode: str) -> None:
        with self._lock:
            if call.ended:
                return
            shares = self.plan.shares("machine")
            [result] = self._random.choices(list(shares), weights=list(shares.values()))
            if mode.startswith("premium"):
                self._emit(
                    call, "call.machine.premium.detection.ended", result=_PREMIUM_RESULTS[result]
                )
            else:
                self._emit(call, "call.machine.detection.ended", result=result)

    def _dtmf_gap(self) -> float:
        return self.plan.dtmf_interval * self._random.uniform(0.5, 1.5)

    def _press_key(self, call: _Call) -> None:
        with self._lock:
            if call.ended:
                return
            digit = self._random.choice(_DTMF_DIGITS)
            self._emit(call, "call.dtmf.received", digit=digit)
            if call.stream is not None:
                call.stream.send_dtmf(digit)
            self._later(call, self._dtmf_gap(), self._press_key, call)

    def _hangup_due(self, call: _Call) -> None:
        self.hangup(call.call_control_id)

    def _place_tick(self) -> None:
        """Place a call if the rate asks for one; look again after one interval (or 1 s)."""
        with self._lock:
            if not self._placing or self._timers is None:
                return
            rate = self.plan.calls_per_minute
            if rate > 0:
                connections = self.plan.connection_id.split(",")
                self.place_call(connection_id=connections[self._placed % len(connections)])
                self._placed += 1
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
        if record.action == "dial" and record.result is not None:
            self._dialled(record.body, record.result)
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

    def _dialled(self, body: dict[str, Any], ids: dict[str, Any]) -> None:
        """A dial was applied: the new call's life, decided now by the plan's shares."""
        rng, plan = self._random, self.plan
        to = body["to"]
        with self._lock:
            if self._closing or self._timers is None:
                return
            spread = plan.call_duration * plan.duration_jitter
            call = _Call(
                call_control_id=ids["call_control_id"],
                call_leg_id=ids["call_leg_id"],
                call_session_id=ids["call_session_id"],
                connection_id=body["connection_id"],
                from_number=body["from"],
                to_number=to[0] if isinstance(to, list) else to,
                started_at=datetime.now(UTC),
                duration=max(0.0, plan.call_duration + rng.uniform(-spread, spread)),
                outbox=Outbox(ids["call_control_id"]),
                client_state=body.get("client_state"),
                direction="outgoing",
                dial=body,
            )
            self._initiate(call, "bridging")
            shares = plan.shares("dial")
            [outcome] = rng.choices(list(shares), weights=list(shares.values()))
            timeout = body.get("timeout_secs") or plan.dial_timeout
            delay = plan.dial_answer_delay * rng.uniform(0.8, 1.2)
            if outcome == "answered" and delay < timeout:
                self._later(call, delay, self._far_end_answers, call)
            elif outcome == "busy" and delay < timeout:
                self._later(call, delay, self._far_end_busy, call)
            self._later(call, timeout, self._unanswered, call, "timeout")
            if body.get("stream_url") and body.get("stream_establish_before_call_originate"):
                self._streaming_start(call, body)
        logger.info("call %s dialled: %s -> %s", call.call_control_id, call.from_number, to)

    def _answer_command(self, call: _Call, body: dict[str, Any]) -> None:
        self._answered(call, body)

    def _reject(self, call: _Call, body: dict[str, Any]) -> None:
        cause, sip_cause = _REJECT_CAUSES.get(body.get("cause", ""), ("call_rejected", "603"))
        self.hangup(call.call_control_id, cause=cause, source="callee", sip_cause=sip_cause)

    def _hangup_command(self, call: _Call, body: dict[str, Any]) -> None:
        # Our side hangs up: the callee of an incoming call, the caller of one we dialled.
        source = "callee" if call.direction == "incoming" else "caller"
        self.hangup(call.call_control_id, cause="normal_clearing", source=source, sip_cause="200")

    def _streaming_start(self, call: _Call, body: dict[str, Any]) -> None:
        # One stream or fork per call (as in the API simulator): a new one replaces the old.
        self._stop_stream(call)
        self._stop_fork(call)
        stream = MediaStream(
            call,
            body,
            connect_timeout=self.plan.media_connect_timeout,
            lock=self._lock,
            on_end=self._stream_ended,
            on_connected=self._stream_connected,
            error_rate=self.plan.media_error_rate,
            rng=random.Random(self._random.random()),  # noqa: S311 - simulation
        )
        call.stream = stream
        if not self.plan.media:
            # No socket to wait for: Telnyx's word is all there is.
            self._emit(call, "streaming.started", stream_url=stream.url)
        if self.plan.media and not self._closing:
            self._streams.add(stream)
            with self._lock:
                self._sessions.append(stream.record)
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
            self.plan.transcription_interval,
            self._transcribe,
            call,
            call.transcription_generation,
            tracks,
        )

    def _transcription_stop(self, call: _Call, body: dict[str, Any]) -> None:
        call.transcription_generation += 1

    _COMMAND_HANDLERS: dict[str, Callable[[CallSimulator, _Call, dict[str, Any]], None]] = {
        "answer": _answer_command,
        "reject": _reject,
        "hangup": _hangup_command,
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

    def _stream_connected(self, stream: MediaStream) -> None:
        """Called from a media thread once the WebSocket is up: now Telnyx says started."""
        call = stream.call
        with self._lock:
            if call.ended or call.stream is not stream or self._closing:
                return
            self._emit(call, "streaming.started", stream_url=stream.url)

    def _stream_ended(self, stream: MediaStream, reason: str | None) -> None:
        """Called from a media thread; ``reason`` says why the stream failed (None: it did not)."""
        call = stream.call
        with self._lock:
            self._streams.discard(stream)
            if reason is None or call.ended or call.stream is not stream or self._closing:
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
                call, self.plan.transcription_interval, self._transcribe, call, generation, tracks
            )

    # -- events --

    def _emit(self, call: _Call, event_type: str, **payload: Any) -> None:
        """Record one event of ``call`` and queue its delivery. Called with the lock held."""
        now = datetime.now(UTC)
        if call.last_occurred is not None and now <= call.last_occurred:
            # Two events in the same clock tick still get strictly increasing times.
            now = call.last_occurred + timedelta(microseconds=1)
        call.last_occurred = now
        data = event(event_type, call.call_control_id, occurred_at=now, **call.payload(**payload))
        self._events.append(data)
        self._webhooks.send(call.outbox, data)
