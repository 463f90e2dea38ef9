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
from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DataError, connection, transaction
from django.db.models import Field, Model, QuerySet
from django.utils import timezone

from callops import logs, metrics, partner_events, state
from callops.actions import ACTIONS
from callops.exceptions import EventError
from callops.models import (
    Call,
    CallSession,
    Command,
    DtmfDigit,
    MediaStream,
    StreamingProfile,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)
from callops.policies import call_answered_policy, call_initiated_policy, call_machine_policy
from callops.webhooks import parse_time

logger = logging.getLogger("callops.events")

# The lifecycle events the current batch has applied so far (``_apply``).
_APPLIED_IN_BATCH: ContextVar[frozenset[int] | set[int]] = ContextVar(
    "callops_applied_in_batch", default=frozenset()
)

# --- Applying one event --------------------------------------------------------------------


def event_process(*, event: WebhookEvent) -> str:
    """Apply one locked, pending event and record the verdict on it. Returns the new status."""
    return _apply([event])[event.pk]


def events_drain(
    *, limit: int | None = None, shard: int | None = None, types: Iterable[str] | None = None
) -> int:
    """Apply pending events of ``shard`` (every shard: None) and of ``types`` (every type:
    None), the calls' lifecycle before transcript segments and oldest first, until none is left
    or ``limit`` were applied.

    Events are claimed ``CALLOPS_DRAIN_CLAIM`` at a time with ``SKIP LOCKED`` and applied in one
    transaction, so any number of drains can run side by side and none waits for, or applies
    twice, an event another one holds; a call's events in the batch share one lock of its row.
    """
    limit = settings.CALLOPS_DRAIN_BATCH if limit is None else limit
    applied = 0
    while applied < limit:
        with transaction.atomic():
            pending = WebhookEvent.objects.select_for_update(skip_locked=True).filter(
                status=WebhookEvent.Status.PENDING
            )
            if shard is not None:
                pending = pending.filter(shard=shard)
            if types is not None:
                pending = pending.filter(event_type__in=list(types))
            size = min(settings.CALLOPS_DRAIN_CLAIM, limit - applied)
            claimed = pending.order_by("priority", "received_at")[:size]
            batch = _load(claimed)
            if not batch:
                break
            with StreamingProfile.looked_up_once(), partner_events.looked_up_once():
                _apply(batch)
        applied += len(batch)
        if len(batch) < size:  # nothing else was claimable: spare the empty claim
            break
    return applied


def _load(claimed: QuerySet[WebhookEvent]) -> list[WebhookEvent]:
    """Claim and load the events; one that cannot be loaded (a time PostgreSQL holds but Python
    cannot, past year 9999) is marked failed instead of stopping every drain at that row."""
    try:
        return list(claimed)
    except (DataError, ValueError, OverflowError):
        pks = list(claimed.values_list("pk", flat=True))  # the rows this transaction holds
    batch = []
    for pk in pks:
        try:
            batch.append(WebhookEvent.objects.get(pk=pk))
        except (DataError, ValueError, OverflowError) as exc:
            logger.error("event row %s cannot be loaded: %s", pk, exc)
            WebhookEvent.objects.filter(pk=pk).update(
                status=WebhookEvent.Status.FAILED,
                error=f"cannot load the stored event: {type(exc).__name__}: {exc}"[:4000],
                processed_at=timezone.now(),
            )
    return batch


def _apply(batch: list[WebhookEvent]) -> dict[int, str]:
    """Apply locked, pending events and record each verdict. Returns each event's new status.

    The batch's known calls are locked in one statement, in one order (their id) by every drain,
    and new ones are created in that order too: two drains holding events of the same calls (the
    sweeper drains every shard) wait for each other rather than deadlock. A call's lifecycle
    events are applied one by one, each in a savepoint (a new call is created in its first
    event's): if a handler raises, its writes are rolled back and the event is marked failed
    with the error, ready for a replay, and the others go on. Transcript segments, most of the
    traffic, are then applied in bulk (``_apply_segments``).
    """
    verdicts: dict[int, str] = {}
    failures: dict[int, str] = {}
    by_call: dict[str, list[WebhookEvent]] = {}
    for event in batch:
        if not has_handler(event.event_type):
            verdicts[event.pk] = WebhookEvent.Status.IGNORED
        elif not event.call_control_id:
            failures[event.pk] = "EventError: event has no data.payload.call_control_id"
        else:
            by_call.setdefault(event.call_control_id, []).append(event)
    calls = _lock_calls(sorted(by_call))
    segments: list[tuple[Call, WebhookEvent]] = []
    # Verdicts are written at the end of the batch: until then, this is how a handler knows an
    # earlier event of the batch was applied (a stop pairs with the start applied before it).
    applied: set[int] = set()
    token = _APPLIED_IN_BATCH.set(applied)
    try:
        for ccid, events_of_call in sorted(by_call.items()):
            call = calls.get(ccid)
            for event in events_of_call:
                if event.event_type == SEGMENT_EVENT:
                    continue
                # What applying it logs, creates and sends carries its ids (callops.logs).
                context = logs.bound(
                    correlation_id=event.event_id, event_id=event.event_id, call_control_id=ccid
                )
                try:
                    with context, transaction.atomic():
                        call = call or _create_call(ccid)
                        before = _facts(call)
                        _merge(call, event)
                        HANDLERS[event.event_type](call, event)
                        partner_events.webhook_event_applied(call=call, event=event)
                        _save_changed_calls([call], {call.pk: before})
                except Exception as exc:
                    logger.exception(
                        "event %s (%s) failed",
                        event.event_id,
                        event.event_type,
                        extra={"event_id": event.event_id, "call_control_id": ccid},
                    )
                    failures[event.pk] = f"{type(exc).__name__}: {exc}"[:4000]
                    call = _reread(call)  # it may hold the failed handler's changes
                else:
                    verdicts[event.pk] = WebhookEvent.Status.PROCESSED
                    applied.add(event.pk)
            for event in events_of_call:
                if event.event_type != SEGMENT_EVENT:
                    continue
                if not isinstance(event.body.get("transcription_data"), dict):
                    failures[event.pk] = (
                        "EventError: call.transcription has no transcription_data object"
                    )
                    continue
                call = call or _create_call(ccid)
                segments.append((call, event))
    finally:
        _APPLIED_IN_BATCH.reset(token)
    _apply_segments(segments, verdicts, failures)
    _record_verdicts(batch, verdicts, failures)
    return {**verdicts, **dict.fromkeys(failures, WebhookEvent.Status.FAILED)}


def _record_verdicts(batch: list[WebhookEvent], verdicts: dict, failures: dict) -> None:
    now = timezone.now()
    for status in (WebhookEvent.Status.PROCESSED, WebhookEvent.Status.IGNORED):
        pks = [pk for pk, verdict in verdicts.items() if verdict == status]
        if pks:
            WebhookEvent.objects.filter(pk__in=pks).update(
                status=status, error="", processed_at=now
            )
    for pk, error in failures.items():
        WebhookEvent.objects.filter(pk=pk).update(
            status=WebhookEvent.Status.FAILED, error=error, processed_at=now
        )
    lags = []
    for event in batch:
        if event.pk in failures:
            event.status, event.error = WebhookEvent.Status.FAILED, failures[event.pk]
        else:
            event.status, event.error = verdicts[event.pk], ""
            lags.append((now - event.received_at).total_seconds())
        event.processed_at = now
    counts = Counter(verdicts.values())
    counts[WebhookEvent.Status.FAILED] = len(failures)
    metrics.events_applied(lags=lags, counts=counts)


def events_replay(*, event_ids: Iterable[int]) -> int:
    """Put events back to pending so the next drain applies them again. Returns how many."""
    return WebhookEvent.objects.filter(pk__in=list(event_ids)).update(
        status=WebhookEvent.Status.PENDING, error="", processed_at=None
    )


def has_handler(event_type: str) -> bool:
    return event_type in HANDLERS or event_type == SEGMENT_EVENT


# --- The call -------------------------------------------------------------------------------


def _lock_calls(ccids: list[str]) -> dict[str, Call]:
    """The calls we know of, locked for this transaction in the order of their ids (PostgreSQL
    locks rows as the sorted scan returns them)."""
    locked = Call.objects.select_for_update().filter(call_control_id__in=ccids)
    return {call.call_control_id: call for call in locked.order_by("call_control_id")}


def _create_call(ccid: str) -> Call:
    """The first we hear of a call: create it (another drain may be creating it too) and lock
    it."""
    Call.objects.bulk_create([Call(call_control_id=ccid)], ignore_conflicts=True)
    return Call.objects.select_for_update().get(call_control_id=ccid)


def _reread(call: Call | None) -> Call | None:
    """A call after a rolled-back savepoint: as stored, or None if the savepoint created it."""
    if call is None:
        return None
    return Call.objects.filter(pk=call.pk).first()


def _merge(call: Call, event: WebhookEvent) -> None:
    """What every event says about its call, merged into the locked call."""
    body = event.body
    state.call_merge_payload(call, body, event.occurred_at, parse_time(body.get("start_time")))


def on_call_initiated(call: Call, event: WebhookEvent) -> None:
    direction = event.body.get("direction")
    if isinstance(direction, str) and direction:
        call.direction = direction[:32]
    call.started_at = state.earliest(call.started_at, event.occurred_at)
    call_initiated_policy(call=call)


def on_machine_detection_ended(call: Call, event: WebhookEvent) -> None:
    """The first result Telnyx reports is the call's (it reports one per call). Premium
    detection's human_residence and human_business count as human for the profile's policy."""
    result = _text(event.body.get("result"), 32)
    if result and (
        call.machine_detection_at is None or event.occurred_at < call.machine_detection_at
    ):
        call.machine_detection, call.machine_detection_at = result, event.occurred_at
    call_machine_policy(call=call)


def on_dtmf_received(call: Call, event: WebhookEvent) -> None:
    digit = _text(event.body.get("digit"), 8)
    if not digit:
        raise EventError("call.dtmf.received has no digit")
    DtmfDigit.objects.update_or_create(
        event=event, defaults={"call": call, "digit": digit, "occurred_at": event.occurred_at}
    )


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
        quality=body.get("call_quality_stats")
        if isinstance(body.get("call_quality_stats"), dict)
        else None,
    )


def _text(value: object, length: int) -> str:
    return value[:length] if isinstance(value, str) else ""


# --- Streams, forks and transcriptions -------------------------------------------------------


@dataclass
class _Span:
    """One stream's (or fork's) life as Telnyx reported it: its start, and its stop or failure."""

    started_at: datetime | None = None
    stopped_at: datetime | None = None
    failure_reason: str = ""
    stream_id: str = ""
    track: str = ""
    stream_type: str = ""

    @property
    def first(self) -> datetime:
        return self.started_at or self.stopped_at


_STARTS = {"streaming.started", "call.fork.started"}
_STREAM_EVENTS = ("streaming.started", "streaming.stopped", "streaming.failed")
_FORK_EVENTS = ("call.fork.started", "call.fork.stopped")


def _spans(facts: list[WebhookEvent]) -> list[_Span]:
    """Pair starts with stops in time order, whatever order they were delivered in.

    One stream (or fork) at a time per call (callops refuses a second start while one is
    open), so a stop ends the latest start before it, and a stop or failure with no start
    before it is a stream whose start has not arrived (or never will). The spans are a
    function of the set of facts: each delivery recomputes them from every fact known.
    """
    spans: list[_Span] = []
    open_: _Span | None = None
    for event in sorted(facts, key=lambda e: (e.occurred_at, e.event_type not in _STARTS)):
        body = event.body
        if event.event_type in _STARTS:
            if open_ is not None:
                spans.append(open_)  # its stop has not arrived
            open_ = _Span(started_at=event.occurred_at)
            current = open_
        else:
            current, open_ = open_ or _Span(), None
            current.stopped_at = event.occurred_at
            if event.event_type == "streaming.failed":
                params = body.get("stream_params")
                params = params if isinstance(params, dict) else {}
                reason = _text(body.get("failure_reason"), 2000)
                current.failure_reason = reason or "streaming failed"
                current.stream_id = _text(body.get("stream_id"), 255)
                current.track = _text(params.get("track"), 32)
            spans.append(current)
        if event.event_type in _FORK_EVENTS:
            current.stream_type = current.stream_type or _text(body.get("stream_type"), 16)
    if open_ is not None:
        spans.append(open_)
    return spans


def _repair(
    field: str,
    call: Call,
    event: WebhookEvent,
    event_types: tuple[str, ...],
    **key: str,
) -> None:
    """Re-pair the call's streams (or forks: the Command ``field`` that points at them) with
    ``key`` from every fact stored for them.

    Records that start commands created wait for their span in the order they were requested;
    one whose command Telnyx refused (or that was cancelled) will never have one. A span with
    no record waiting gets a new one.
    """
    # By call and type only: the call's few events come from its index, whatever the planner
    # knows of how many rows each status has (a status filter in SQL let it scan them all).
    stored = WebhookEvent.objects.filter(
        call_control_id=call.call_control_id, event_type__in=event_types
    ).exclude(pk=event.pk)
    applied = _APPLIED_IN_BATCH.get()
    stored = [e for e in stored if e.status == WebhookEvent.Status.PROCESSED or e.pk in applied]
    spans = _spans([e for e in [*stored, event] if _key_of(e) == key])
    model = Command._meta.get_field(field).related_model  # "stream" -> MediaStream
    waiting = list(model.objects.filter(call=call, **key).order_by("requested_at", "pk"))
    # A refused or cancelled start failed its record in the same transaction: only a failed
    # record can be one, so a call without any needs no look at its commands.
    if any(record.status == CallSession.Status.FAILED for record in waiting):
        refused = set(
            Command.objects.filter(
                **{f"{field}__call": call},
                status__in=[Command.Status.FAILED, Command.Status.CANCELLED],
                action__in=[a.name for a in ACTIONS.values() if field in a.records],
            ).values_list(field, flat=True)
        )
        waiting = [record for record in waiting if record.pk not in refused]
    for index, span in enumerate(spans):
        record = waiting[index] if index < len(waiting) else model(call=call, **key)
        record.started_at, record.stopped_at = span.started_at, span.stopped_at
        if span.failure_reason:
            record.failure_reason = record.failure_reason or span.failure_reason
        for name in ("stream_id", "track", "stream_type"):
            if hasattr(record, name) and not getattr(record, name):
                setattr(record, name, getattr(span, name))
        state.session_save(call, record, span.first)


def _key_of(event: WebhookEvent) -> dict[str, str]:
    return {"stream_url": _stream_url(event.body)} if event.event_type in _STREAM_EVENTS else {}


def _stream_url(body: dict) -> str:
    url = body.get("stream_url")
    if not isinstance(url, str):
        params = body.get("stream_params")
        url = params.get("stream_url") if isinstance(params, dict) else None
    return url[:2048] if isinstance(url, str) else ""


def on_stream_event(call: Call, event: WebhookEvent) -> None:
    """streaming.started, .stopped and .failed. A failure naming a stream_id callops already
    knows is that stream's; every other fact is paired by time among the URL's streams."""
    stream_id = _text(event.body.get("stream_id"), 255)
    known = (
        event.event_type == "streaming.failed"
        and stream_id
        and MediaStream.objects.filter(call=call, stream_id=stream_id).first()
    )
    if known:
        reason = _text(event.body.get("failure_reason"), 2000) or "streaming failed"
        known.failure_reason = known.failure_reason or reason
        state.session_record_stop(known, event.occurred_at)
        state.session_save(call, known, event.occurred_at)
        return
    _repair("stream", call, event, _STREAM_EVENTS, **_key_of(event))


def on_fork_event(call: Call, event: WebhookEvent) -> None:
    _repair("fork", call, event, _FORK_EVENTS)


def _for_segment(sessions: list[Transcription], at: datetime) -> Transcription | None:
    """Telnyx sends no transcription start or stop events: a segment belongs to the latest
    transcription requested before it, else to the earliest one we know."""
    before = [s for s in sessions if s.requested_at <= at]
    if before:
        return max(before, key=lambda s: (s.requested_at, s.pk))
    return sessions[0] if sessions else None


SEGMENT_EVENT = "call.transcription"
_SEGMENT_FIELDS = ("call", "transcription", "transcript", "confidence", "is_final", "track")


def _apply_segments(
    segments: list[tuple[Call, WebhookEvent]], verdicts: dict, failures: dict
) -> None:
    """Apply the batch's well-formed ``call.transcription`` events (their calls locked) in
    bulk, and add their verdicts. If the bulk write fails, each event is applied alone in a
    savepoint of its own, so the one at fault is marked failed and the others go on."""
    if not segments:
        return
    try:
        with transaction.atomic():
            done = _write_segments(segments)
    except Exception as exc:
        for call in {id(call): call for call, _ in segments}.values():
            call.refresh_from_db()  # it holds the rolled-back merges
        if len(segments) > 1:
            logger.warning("bulk segment write failed (%s); applying them one by one", exc)
            for pair in segments:
                _apply_segments([pair], verdicts, failures)
            return
        event = segments[0][1]
        logger.exception("event %s (%s) failed", event.event_id, event.event_type)
        failures[event.pk] = f"{type(exc).__name__}: {exc}"[:4000]
        return
    verdicts.update(dict.fromkeys(done, WebhookEvent.Status.PROCESSED))


def _write_segments(segments: list[tuple[Call, WebhookEvent]]) -> list[int]:
    """One query loads every transcription of the segments' calls, one writes every segment
    (a redelivered or replayed event updates its own), one per set of changed fields updates
    the calls; a transcription is saved only when a segment changed its facts. Returns the
    applied events' ids."""
    calls = {call.pk: call for call, _ in segments}
    before = {pk: _facts(call) for pk, call in calls.items()}
    known: dict[int, list[Transcription]] = {pk: [] for pk in calls}
    for transcription in Transcription.objects.filter(call__in=list(calls)).order_by(
        "requested_at", "pk"
    ):
        known[transcription.call_id].append(transcription)
    limits: dict[int, timedelta] = {}

    def limit_of(call: Call) -> timedelta:  # the profile lookup, once per call when needed
        if call.pk not in limits:
            limits[call.pk] = state.max_duration(call)
        return limits[call.pk]

    done, rows, changed = [], [], {}
    for call, event in segments:
        data = event.body["transcription_data"]  # a dict: checked by _apply
        _merge(call, event)
        at = event.occurred_at
        transcription = _for_segment(known[call.pk], at) or Transcription(
            call=call, requested_at=at
        )
        moved = transcription.started_at is None or at < transcription.started_at
        state.session_record_start(transcription, at)
        if state.session_merge(
            call, transcription, at, limit=lambda call=call: limit_of(call), recompute=moved
        ):
            if transcription.pk is None:
                transcription.save()  # the segments that follow must find it
                known[call.pk].append(transcription)
                known[call.pk].sort(key=lambda t: (t.requested_at, t.pk))
            else:
                changed[transcription.pk] = transcription
        rows.append(_segment(call, transcription, event, data))
        done.append(event.pk)
    for transcription in changed.values():
        transcription.save()
    TranscriptSegment.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["event"],
        update_fields=[*_SEGMENT_FIELDS, "occurred_at"],
    )
    partner_events.segments_applied(segments=rows)
    _save_changed_calls(calls.values(), before)
    return done


def _segment(
    call: Call, transcription: Transcription, event: WebhookEvent, data: dict
) -> TranscriptSegment:
    confidence = data.get("confidence")
    return TranscriptSegment(
        call=call,
        transcription=transcription,
        event=event,
        transcript=_text(data.get("transcript"), 100_000),
        confidence=float(confidence)
        if isinstance(confidence, int | float) and not isinstance(confidence, bool)
        else None,
        is_final=data.get("is_final") is True,
        track=_text(data.get("transcription_track"), 16),
        occurred_at=event.occurred_at,
    )


_CALL_FIELDS = [f for f in Call._meta.concrete_fields if not f.primary_key]


def _facts(call: Call) -> tuple:
    return tuple(getattr(call, f.attname) for f in _CALL_FIELDS)


def _save_changed_calls(calls: Iterable[Call], before: dict[int, tuple]) -> None:
    """One UPDATE for the calls whose same fields changed (most often only last_event_at);
    none for a call that did not change. A lifecycle event saves its call this way too: a
    full-row save of every column cost more than the event's own handler."""
    by_fields: dict[tuple[Field, ...], list[Call]] = {}
    now = timezone.now()
    for call in calls:
        after = _facts(call)
        changed = tuple(
            f
            for f, old, new in zip(_CALL_FIELDS, before[call.pk], after, strict=True)
            if old != new and f.name != "updated_at"
        )
        if changed:
            call.updated_at = now
            by_fields.setdefault(changed, []).append(call)
    updated_at = Call._meta.get_field("updated_at")
    for fields, group in by_fields.items():
        _update_rows(Call, group, [*fields, updated_at])


def _update_rows(model: type[Model], rows: list[Model], fields: list[Field]) -> None:
    """Write ``fields`` of ``rows`` in one statement. On PostgreSQL an ``UPDATE ... FROM
    unnest(...)`` of typed arrays: Django's ``bulk_update`` compiles a CASE per field and row,
    which cost a drain more CPU than the segments it writes."""
    if connection.vendor != "postgresql":
        model.objects.bulk_update(rows, [f.name for f in fields])
        return
    pk = model._meta.pk
    columns = [pk, *fields]
    table = connection.ops.quote_name(model._meta.db_table)
    sets = ", ".join(
        f"{connection.ops.quote_name(f.column)} = v.c{i}" for i, f in enumerate(fields)
    )
    arrays = ", ".join(f"%s::{f.cast_db_type(connection)}[]" for f in columns)
    names = ", ".join(["id", *(f"c{i}" for i in range(len(fields)))])
    values = [
        [f.get_db_prep_save(getattr(row, f.attname), connection) for row in rows] for f in columns
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {sets} FROM unnest({arrays}) AS v({names})"  # noqa: S608
            f" WHERE {table}.{connection.ops.quote_name(pk.column)} = v.id",
            values,
        )


HANDLERS: dict[str, Callable[[Call, WebhookEvent], None]] = {
    "call.initiated": on_call_initiated,
    "call.answered": on_call_answered,
    "call.hangup": on_call_hangup,
    "streaming.started": on_stream_event,
    "streaming.stopped": on_stream_event,
    "streaming.failed": on_stream_event,
    "call.fork.started": on_fork_event,
    "call.fork.stopped": on_fork_event,
    "call.machine.detection.ended": on_machine_detection_ended,
    # Premium detection reports human_residence / human_business / machine / silence...
    "call.machine.premium.detection.ended": on_machine_detection_ended,
    "call.dtmf.received": on_dtmf_received,
}
