"""A call's state, and the one place it is decided: the lattice of facts.

Telnyx reports facts late, twice, concurrently and out of order, and commands and the sweeper
learn facts of their own ("call has already ended", "never started"). Every one of them is
merged here as a join, so any order of the same facts gives the same records:

- times take the earliest evidence (a start, a stop, a hang-up), or the latest for
  ``last_event_at``;
- a call's status only climbs its rank (initiated < answered < ended);
- a stream's, fork's or transcription's status is never set: ``session_status`` derives it
  from its facts (failed > stopped > started > requested), in Python for one record and as the
  same rule in SQL (``session_status_sql``) for the sweeper's bulk updates;
- last-writer-wins fields (``client_state``, the hang-up cause) compare ``occurred_at``.

Callers hold the call's row lock (``SELECT ... FOR UPDATE``) while they merge, so two workers
merging facts of one call serialise instead of losing an update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TypeVar

from django.conf import settings
from django.db.models import Case, F, OuterRef, QuerySet, Subquery, Value, When
from django.db.models.expressions import Combinable
from django.db.models.functions import Now
from django.db.models.lookups import Exact, IsNull

from callops.models import Call, CallSession, StreamingProfile

S = TypeVar("S", bound=CallSession)
OPEN = (CallSession.Status.REQUESTED, CallSession.Status.ACTIVE)


def earliest(current: datetime | None, candidate: datetime | None) -> datetime | None:
    if candidate is None:
        return current
    return candidate if current is None or candidate < current else current


# --- Streams, forks and transcriptions ------------------------------------------------------


def session_status(*, failure_reason: str, stopped_at: datetime | None, started_at) -> str:
    """The status a stream, fork or transcription has, given its facts."""
    if failure_reason:
        return CallSession.Status.FAILED
    if stopped_at is not None:
        return CallSession.Status.STOPPED
    if started_at is not None:
        return CallSession.Status.ACTIVE
    return CallSession.Status.REQUESTED


def session_status_sql(
    *,
    failure_reason: Combinable | None = None,
    stopped_at: Combinable | None = None,
    started_at: Combinable | None = None,
) -> Case:
    """``session_status`` as an SQL expression over the facts an UPDATE writes (each defaults
    to the row's own column), so a bulk update derives the status by the same rule."""
    failure_reason = F("failure_reason") if failure_reason is None else failure_reason
    stopped_at = F("stopped_at") if stopped_at is None else stopped_at
    started_at = F("started_at") if started_at is None else started_at
    return Case(
        When(
            Exact(failure_reason, Value("")),
            then=Case(
                When(IsNull(stopped_at, False), then=Value(CallSession.Status.STOPPED)),
                When(IsNull(started_at, False), then=Value(CallSession.Status.ACTIVE)),
                default=Value(CallSession.Status.REQUESTED),
            ),
        ),
        default=Value(CallSession.Status.FAILED),
    )


def session_refresh_status(session: CallSession) -> None:
    session.status = session_status(
        failure_reason=session.failure_reason,
        stopped_at=session.stopped_at,
        started_at=session.started_at,
    )


def session_record_start(session: CallSession, at: datetime) -> None:
    session.started_at = earliest(session.started_at, at)


def session_record_stop(session: CallSession, at: datetime) -> None:
    """The earliest evidence of a stop wins: an explicit stop, a failure or the hang-up."""
    session.stopped_at = earliest(session.stopped_at, at)


def session_save(call: Call, session: S, at: datetime, *, limit: timedelta | None = None) -> S:
    """Merge what every session shares, derive its status and save it.

    A session on a call that has ended is closed at the hang-up: whether the hang-up was merged
    before or after this fact, the result is the same. ``limit`` is ``max_duration(call)`` when
    the caller already has it.
    """
    session_merge(call, session, at, limit=lambda: limit or max_duration(call), recompute=True)
    session.save()
    return session


_SESSION_FACTS = ("requested_at", "started_at", "stopped_at", "stop_after", "status")


def session_merge(
    call: Call,
    session: CallSession,
    at: datetime,
    *,
    limit: Callable[[], timedelta],
    recompute: bool = False,
) -> bool:
    """``session_save`` without the save: merge, derive the status, and say whether anything
    changed (the drain's bulk path saves only what did). ``limit`` is asked for only when the
    stop deadline must be derived: it has none yet, or ``recompute`` (the start moved, or the
    duration limit may have changed since)."""
    before = tuple(getattr(session, name) for name in _SESSION_FACTS)
    session.requested_at = earliest(session.requested_at, at)
    if call.ended_at is not None:
        session_record_stop(session, call.ended_at)
    if session.started_at is not None and (recompute or session.stop_after is None):
        session.stop_after = session.started_at + limit()
    session_refresh_status(session)
    return before != tuple(getattr(session, name) for name in _SESSION_FACTS)


def session_fail(session: CallSession, reason: str, at: datetime) -> None:
    """A start Telnyx refused, or that was cancelled: failed with its first reason, stopped."""
    session.refresh_from_db()
    session.failure_reason = session.failure_reason or reason.strip(": ")[:2000]
    session_record_stop(session, at)
    session_refresh_status(session)
    session.save()


def sessions_stop(sessions: Iterable[CallSession], at: datetime) -> None:
    """Stop every open one of ``sessions`` at ``at`` (evidence without a webhook: Telnyx's 200
    to a ``transcription_stop``)."""
    for session in sessions:
        if session.status in OPEN:
            session_record_stop(session, at)
            session_refresh_status(session)
            session.save()


def max_duration(call: Call) -> timedelta:
    """How long a stream, fork or transcription of this call may run: the partner's profile
    for its connection, else ``CALLOPS_MAX_STREAM_DURATION``."""
    profile = StreamingProfile.for_call(call)
    seconds = profile.max_stream_duration if profile and profile.max_stream_duration else None
    return timedelta(seconds=seconds or settings.CALLOPS_MAX_STREAM_DURATION)


# Bulk paths of the sweeper: one UPDATE each, status derived by ``session_status_sql``.


def sessions_close_on_ended_calls(model: type[CallSession]) -> int:
    """The call is gone: nothing to send, just close its open records at the hang-up. Open
    sessions have no stop time yet, so the hang-up's time is the earliest evidence."""
    ended_at = Subquery(Call.objects.filter(pk=OuterRef("call_id")).values("ended_at")[:1])
    return model.objects.filter(status__in=OPEN, call__status=Call.Status.ENDED).update(
        stopped_at=ended_at, status=session_status_sql(stopped_at=ended_at), updated_at=Now()
    )


def sessions_fail_unstarted(queryset: QuerySet, *, reason: str, at: datetime) -> int:
    """Requested, never confirmed: failed with ``reason`` and stopped now, if still unstarted."""
    return queryset.filter(status=CallSession.Status.REQUESTED).update(
        failure_reason=reason,
        stopped_at=at,
        status=session_status_sql(failure_reason=Value(reason), stopped_at=Value(at)),
        updated_at=at,
    )


# --- The call -------------------------------------------------------------------------------

_CALL_FIELDS = (
    ("call_leg_id", "call_leg_id"),
    ("call_session_id", "call_session_id"),
    ("connection_id", "connection_id"),
    ("from_number", "from"),
    ("to_number", "to"),
)


def call_raise_status(call: Call, status: str) -> None:
    if Call.STATUS_RANK[status] > Call.STATUS_RANK[call.status]:
        call.status = status


def call_merge_payload(call: Call, body: dict, at: datetime, start_time: datetime | None):
    """What every event of a call says about it: its ids and numbers (first seen wins),
    ``client_state`` (last writer wins), its start time and when we last heard of it."""
    for field, key in _CALL_FIELDS:
        value = body.get(key)
        if not getattr(call, field) and isinstance(value, str):
            setattr(call, field, value[: Call._meta.get_field(field).max_length])
    client_state = body.get("client_state")
    # Last writer wins; on equal times the larger value, so the outcome never depends on order.
    if (
        isinstance(client_state, str)
        and client_state
        and (
            call.client_state_at is None
            or (at, client_state) > (call.client_state_at, call.client_state)
        )
    ):
        call.client_state, call.client_state_at = client_state, at
    call.started_at = earliest(call.started_at, start_time)
    call.last_event_at = max(filter(None, (call.last_event_at, at)))


def call_record_answer(call: Call, at: datetime) -> None:
    call.answered_at = earliest(call.answered_at, at)
    call_raise_status(call, Call.Status.ANSWERED)


def call_record_hangup(
    call: Call, at: datetime, *, cause: str, source: str, sip_cause: str, quality: dict | None
) -> None:
    """The hang-up's own facts. Its cause, source and quality stats win over anything learned
    before (a command told "call has already ended" knows only that it ended), and between
    hang-ups the earliest wins, whenever each arrives."""
    if call.hangup_at is None or at <= call.hangup_at:
        call.hangup_at = at
        call.hangup_cause, call.hangup_source, call.sip_hangup_cause = cause, source, sip_cause
        call.call_quality_stats = quality
    call_mark_ended(call=call, at=at)


def call_mark_ended(*, call: Call, at: datetime) -> None:
    """End a locked call at ``at`` (or earlier, if that is already known) and close every
    stream, fork and transcription on it. Used by the hang-up and by a command that Telnyx
    refused because the call had ended; the hang-up's own time wins whenever it arrives."""
    call.ended_at = call.hangup_at or earliest(call.ended_at, at)
    call_raise_status(call, Call.Status.ENDED)
    sessions = [*call.streams.all(), *call.forks.all(), *call.transcriptions.all()]
    # The call's duration limit, looked up once rather than once per session.
    limit = max_duration(call) if any(s.started_at for s in sessions) else None
    for session in sessions:  # one a stop already closed is not written again
        if session_merge(
            call, session, at, limit=lambda: limit or max_duration(call), recompute=True
        ):
            session.save()


def call_adopt(placeholder: Call, *, named: dict) -> Call:
    """Telnyx answered a dial with the ids of the call it placed. The caller holds the
    placeholder's lock. Webhooks of that call may have created it already (they may arrive
    before the answer): what callops knew before Telnyx spoke is merged into it, its records
    move to it, and the placeholder goes. Returns the call."""
    ccid = str(named["call_control_id"])[: Call._meta.get_field("call_control_id").max_length]
    Call.objects.bulk_create([Call(call_control_id=ccid)], ignore_conflicts=True)
    call = Call.objects.select_for_update().get(call_control_id=ccid)
    for field in ("call_leg_id", "call_session_id"):
        value = named.get(field)
        if not getattr(call, field) and isinstance(value, str):
            setattr(call, field, value[: Call._meta.get_field(field).max_length])
    for field in ("connection_id", "direction", "from_number", "to_number"):
        setattr(call, field, getattr(call, field) or getattr(placeholder, field))
    if not call.client_state_at:  # a webhook's client_state is newer evidence than ours
        call.client_state = call.client_state or placeholder.client_state
    call.autostarted_at = earliest(call.autostarted_at, placeholder.autostarted_at)
    for related in (
        placeholder.streams,
        placeholder.forks,
        placeholder.transcriptions,
        placeholder.segments,
        placeholder.dtmf,
        placeholder.commands,
    ):
        related.update(call=call)
    Call.objects.filter(pk=call.pk).update(created_at=placeholder.created_at)
    placeholder.delete()
    if call.is_ended:  # the hang-up was applied first: close what just moved in
        call_mark_ended(call=call, at=call.ended_at)
    call.save()
    return call
