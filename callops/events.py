"""Apply stored Telnyx events to Call, MediaStream, Fork and Transcription records.

Telnyx delivers events late, twice, concurrently and out of order. Every handler therefore only
*adds facts*, merged by ``callops.state`` as joins, so the final records are the same for any
permutation of a call's events with any duplicates. What is decided here is which record an
event is about: the stream a ``streaming.stopped`` ends, the transcription a segment belongs to.

All writes for one call happen under a row lock on the ``Call`` (``SELECT ... FOR UPDATE``), so two
workers applying events of the same call serialise instead of losing an update. Lock order is
always event row, then call row, then the call's children: no cycle, no deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from callops import state
from callops.exceptions import EventError
from callops.models import (
    Call,
    CallSession,
    Fork,
    MediaStream,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)
from callops.policies import call_answered_policy
from callops.webhooks import parse_time

logger = logging.getLogger("callops.events")

S = TypeVar("S", bound=CallSession)


# --- Applying one event --------------------------------------------------------------------


def event_process(*, event: WebhookEvent) -> str:
    """Apply a locked, pending event and record the verdict on it. Returns the new status.

    The handler runs in a savepoint: if it raises, its writes are rolled back and the event is
    marked failed with the error, ready for a replay.
    """
    handler = HANDLERS.get(event.event_type)
    if handler is None:
        event.status = WebhookEvent.Status.IGNORED
        event.error = ""
    else:
        try:
            with transaction.atomic():
                call = _lock_call(event)
                handler(call, event)
                call.save()
        except Exception as exc:
            logger.exception("event %s (%s) failed", event.event_id, event.event_type)
            event.status = WebhookEvent.Status.FAILED
            event.error = f"{type(exc).__name__}: {exc}"[:4000]
        else:
            event.status = WebhookEvent.Status.PROCESSED
            event.error = ""
    event.processed_at = timezone.now()
    event.save(update_fields=["status", "error", "processed_at"])
    return event.status


def events_drain(*, limit: int | None = None) -> int:
    """Apply pending events, oldest first, until none is left or ``limit`` were applied.

    Each event is claimed with ``SKIP LOCKED``, so any number of drain tasks can run side by side
    and none waits for, or applies twice, an event another one holds.
    """
    limit = settings.CALLOPS_DRAIN_BATCH if limit is None else limit
    applied = 0
    while applied < limit:
        with transaction.atomic():
            event = (
                WebhookEvent.objects.select_for_update(skip_locked=True)
                .filter(status=WebhookEvent.Status.PENDING)
                .order_by("received_at")
                .first()
            )
            if event is None:
                break
            event_process(event=event)
        applied += 1
    return applied


def events_replay(*, event_ids: Iterable[int]) -> int:
    """Put events back to pending so the next drain applies them again. Returns how many."""
    return WebhookEvent.objects.filter(pk__in=list(event_ids)).update(
        status=WebhookEvent.Status.PENDING, error="", processed_at=None
    )


def has_handler(event_type: str) -> bool:
    return event_type in HANDLERS


# --- The call -------------------------------------------------------------------------------


def _lock_call(event: WebhookEvent) -> Call:
    """The event's call, created if this is the first we hear of it, locked for this transaction."""
    if not event.call_control_id:
        raise EventError("event has no data.payload.call_control_id")
    Call.objects.bulk_create([Call(call_control_id=event.call_control_id)], ignore_conflicts=True)
    call = Call.objects.select_for_update().get(call_control_id=event.call_control_id)
    body = event.body
    state.call_merge_payload(call, body, event.occurred_at, parse_time(body.get("start_time")))
    return call


def on_call_initiated(call: Call, event: WebhookEvent) -> None:
    direction = event.body.get("direction")
    if isinstance(direction, str) and direction:
        call.direction = direction[:32]
    call.started_at = state.earliest(call.started_at, event.occurred_at)


def on_call_answered(call: Call, event: WebhookEvent) -> None:
    state.call_record_answer(call, event.occurred_at)
    call_answered_policy(call=call)


def on_call_hangup(call: Call, event: WebhookEvent) -> None:
    body = event.body
    state.call_record_hangup(
        call,
        event.occurred_at,
        cause=_text(body.get("hangup_cause"), 64),
        source=_text(body.get("hangup_source"), 32),
        sip_cause=_text(body.get("sip_hangup_cause"), 16),
    )


def _text(value: object, length: int) -> str:
    return value[:length] if isinstance(value, str) else ""


# --- Streams, forks and transcriptions -------------------------------------------------------


def _for_start(sessions: list[S], at: datetime) -> S | None:
    """The session a start at ``at`` belongs to: the same start seen before, or one not started
    yet (requested by a command, or whose stop arrived first)."""
    for session in sessions:
        if session.started_at == at:
            return session
    for session in sessions:
        if session.started_at is None and (session.stopped_at is None or session.stopped_at >= at):
            return session
    return None


def _for_stop(sessions: list[S], at: datetime) -> S | None:
    """The session a stop at ``at`` ends: the latest one started before it, else one whose
    start has not arrived yet."""
    started = [s for s in sessions if s.started_at is not None and s.started_at <= at]
    if started:
        return max(started, key=lambda s: (s.started_at, s.pk))
    return next((s for s in sessions if s.started_at is None), None)


def _matching(
    model: type[S],
    call: Call,
    at: datetime,
    find: Callable[[list[S], datetime], S | None],
    **filters: object,
) -> S:
    sessions = list(model.objects.filter(call=call, **filters).order_by("requested_at", "pk"))
    found = find(sessions, at)
    return found if found is not None else model(call=call, requested_at=at, **filters)


def _stream_url(body: dict) -> str:
    url = body.get("stream_url")
    if not isinstance(url, str):
        params = body.get("stream_params")
        url = params.get("stream_url") if isinstance(params, dict) else None
    return url[:2048] if isinstance(url, str) else ""


def on_streaming_started(call: Call, event: WebhookEvent) -> None:
    stream = _matching(
        MediaStream, call, event.occurred_at, _for_start, stream_url=_stream_url(event.body)
    )
    state.session_record_start(stream, event.occurred_at)
    state.session_save(call, stream, event.occurred_at)


def on_streaming_stopped(call: Call, event: WebhookEvent) -> None:
    stream = _matching(
        MediaStream, call, event.occurred_at, _for_stop, stream_url=_stream_url(event.body)
    )
    state.session_record_stop(stream, event.occurred_at)
    state.session_save(call, stream, event.occurred_at)


def on_streaming_failed(call: Call, event: WebhookEvent) -> None:
    body, at = event.body, event.occurred_at
    stream_id = _text(body.get("stream_id"), 255)
    stream = None
    if stream_id:
        stream = MediaStream.objects.filter(call=call, stream_id=stream_id).first()
    if stream is None:
        stream = _matching(MediaStream, call, at, _for_stop, stream_url=_stream_url(body))
    params = body.get("stream_params") if isinstance(body.get("stream_params"), dict) else {}
    stream.stream_id = stream.stream_id or stream_id
    stream.track = stream.track or _text(params.get("track"), 32)
    stream.failure_reason = (
        stream.failure_reason or _text(body.get("failure_reason"), 2000) or ("streaming failed")
    )
    state.session_record_stop(stream, at)
    state.session_save(call, stream, at)


def on_fork_started(call: Call, event: WebhookEvent) -> None:
    fork = _matching(Fork, call, event.occurred_at, _for_start)
    fork.stream_type = fork.stream_type or _text(event.body.get("stream_type"), 16)
    state.session_record_start(fork, event.occurred_at)
    state.session_save(call, fork, event.occurred_at)


def on_fork_stopped(call: Call, event: WebhookEvent) -> None:
    fork = _matching(Fork, call, event.occurred_at, _for_stop)
    fork.stream_type = fork.stream_type or _text(event.body.get("stream_type"), 16)
    state.session_record_stop(fork, event.occurred_at)
    state.session_save(call, fork, event.occurred_at)


def _for_segment(sessions: list[Transcription], at: datetime) -> Transcription | None:
    """Telnyx sends no transcription start or stop events: a segment belongs to the latest
    transcription requested before it, else to the earliest one we know."""
    before = [s for s in sessions if s.requested_at <= at]
    if before:
        return max(before, key=lambda s: (s.requested_at, s.pk))
    return sessions[0] if sessions else None


def on_call_transcription(call: Call, event: WebhookEvent) -> None:
    data = event.body.get("transcription_data")
    if not isinstance(data, dict):
        raise EventError("call.transcription has no transcription_data object")
    at = event.occurred_at
    transcription = _matching(Transcription, call, at, _for_segment)
    state.session_record_start(transcription, at)
    state.session_save(call, transcription, at)
    confidence = data.get("confidence")
    TranscriptSegment.objects.update_or_create(
        event=event,
        defaults={
            "call": call,
            "transcription": transcription,
            "transcript": _text(data.get("transcript"), 100_000),
            "confidence": float(confidence)
            if isinstance(confidence, int | float) and not isinstance(confidence, bool)
            else None,
            "is_final": data.get("is_final") is True,
            "track": _text(data.get("transcription_track"), 16),
            "occurred_at": at,
        },
    )


HANDLERS: dict[str, Callable[[Call, WebhookEvent], None]] = {
    "call.initiated": on_call_initiated,
    "call.answered": on_call_answered,
    "call.hangup": on_call_hangup,
    "streaming.started": on_streaming_started,
    "streaming.stopped": on_streaming_stopped,
    "streaming.failed": on_streaming_failed,
    "call.fork.started": on_fork_started,
    "call.fork.stopped": on_fork_stopped,
    "call.transcription": on_call_transcription,
}
