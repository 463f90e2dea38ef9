"""Scheduled maintenance: stop what runs too long, close what a hang-up left open, purge old rows.

Every query here walks a partial index (see ``CallSession.sweep_indexes``), so a sweep costs in
proportion to what is stale, not to the size of the tables (benchmarks/stale_sweep.py).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from callops import commands
from callops.models import (
    Call,
    CallSession,
    Command,
    Fork,
    MediaStream,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)

logger = logging.getLogger("callops.maintenance")

STOPS = (
    (MediaStream, Command.Action.STREAMING_STOP),
    (Fork, Command.Action.FORK_STOP),
    (Transcription, Command.Action.TRANSCRIPTION_STOP),
)
OPEN = (CallSession.Status.REQUESTED, CallSession.Status.ACTIVE)
SWEEP_LOCK = "maintenance:stale-sessions"
SWEEP_LOCK_TTL = 55  # shorter than the one-minute schedule: a crashed sweeper blocks one run


def _stop_params(session: CallSession) -> dict[str, Any]:
    if isinstance(session, MediaStream) and session.stream_id:
        return {"stream_id": session.stream_id}
    if isinstance(session, Fork) and session.stream_type:
        return {"stream_type": session.stream_type}
    return {}


def _stop(session: CallSession, action: str) -> bool:
    """Send one stop for ``session`` unless one is in flight or already accepted by Telnyx."""
    target = commands.TARGET_FIELDS[type(session)]
    if Command.objects.filter(
        **{target: session},
        action=action,
        status__in=[Command.Status.QUEUED, Command.Status.SENDING, Command.Status.SUCCEEDED],
    ).exists():
        return False
    try:
        commands.command_create(
            call=session.call,
            action=action,
            params=_stop_params(session),
            requested_by=Command.RequestedBy.SCHEDULE,
            target=session,
        )
    except commands.CommandConflict:
        return False  # another sweeper (or an operator) got there first
    except commands.CallEnded:
        _close_on_ended_call(session)
        return False
    return True


def _close_on_ended_call(session: CallSession) -> None:
    with transaction.atomic():
        call = Call.objects.select_for_update().get(pk=session.call_id)
        session.refresh_from_db()
        if call.ended_at is not None and session.is_open:
            session.record_stop(call.ended_at)
            session.refresh_status()
            session.save()


def sessions_stop_stale(*, limit: int = 500) -> dict[str, int] | None:
    """One sweep. Returns what it did, or None if another sweep holds the lock."""
    if not cache.add(SWEEP_LOCK, 1, timeout=SWEEP_LOCK_TTL):
        return None
    try:
        return _sweep(limit)
    finally:
        cache.delete(SWEEP_LOCK)


def _sweep(limit: int) -> dict[str, int]:
    now = timezone.now()
    done = {"closed_on_ended_call": 0, "never_started": 0, "over_duration": 0, "stops_sent": 0}
    grace = timedelta(seconds=settings.CALLOPS_START_GRACE)
    for model, action in STOPS:
        # The call is gone: nothing to send, just close the record at the hang-up.
        for session in model.objects.filter(status__in=OPEN, call__status=Call.Status.ENDED)[
            :limit
        ]:
            _close_on_ended_call(session)
            done["closed_on_ended_call"] += 1
        # Asked for, never confirmed: fail it, and stop it in case Telnyx did start it.
        unstarted = model.objects.filter(
            status=CallSession.Status.REQUESTED, requested_at__lt=now - grace
        ).select_related("call")[:limit]
        for session in unstarted:
            updated = model.objects.filter(pk=session.pk, status=CallSession.Status.REQUESTED)
            if updated.update(
                status=CallSession.Status.FAILED, failure_reason="never started", stopped_at=now
            ):
                done["never_started"] += 1
                done["stops_sent"] += _stop(session, action)
        # Running past its maximum duration.
        overdue = model.objects.filter(
            status=CallSession.Status.ACTIVE, stop_after__lt=now
        ).select_related("call")[:limit]
        for session in overdue:
            if _stop(session, action):
                done["over_duration"] += 1
                done["stops_sent"] += 1
    if any(done.values()):
        logger.info("stale sessions: %s", done)
    return done


def records_purge(*, budget_seconds: float = 20.0) -> dict[str, int]:
    """Delete processed events and transcript segments past retention, in bounded batches."""
    now = timezone.now()
    deadline = time.monotonic() + budget_seconds
    jobs = {
        "webhook_events": WebhookEvent.objects.filter(
            status__in=[WebhookEvent.Status.PROCESSED, WebhookEvent.Status.IGNORED],
            received_at__lt=now - timedelta(days=settings.CALLOPS_EVENT_RETENTION_DAYS),
        ),
        "transcript_segments": TranscriptSegment.objects.filter(
            occurred_at__lt=now - timedelta(days=settings.CALLOPS_SEGMENT_RETENTION_DAYS)
        ),
    }
    deleted = dict.fromkeys(jobs, 0)
    for name, queryset in jobs.items():
        while time.monotonic() < deadline:
            batch = list(queryset.values_list("pk", flat=True)[: settings.CALLOPS_PURGE_BATCH])
            if not batch:
                break
            count, _ = queryset.model.objects.filter(pk__in=batch).delete()
            deleted[name] += len(batch) if count else 0
    return deleted
