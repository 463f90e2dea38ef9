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
from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Now
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
LIVE = ~Q(call__status=Call.Status.ENDED)
SWEEP_LOCK = "maintenance:stale-sessions"
SWEEP_LOCK_TTL = 55  # shorter than the one-minute schedule: a crashed sweeper blocks one run


def _stop_params(session: CallSession) -> dict[str, Any]:
    if isinstance(session, MediaStream) and session.stream_id:
        return {"stream_id": session.stream_id}
    if isinstance(session, Fork) and session.stream_type:
        return {"stream_type": session.stream_type}
    return {}


def _close_on_ended_calls(model: type[CallSession]) -> int:
    """The call is gone: nothing to send, just close the records at the hang-up. One UPDATE;
    open sessions have no stop time yet, so the hang-up's time is the earliest evidence."""
    ended_at = Call.objects.filter(pk=OuterRef("call_id")).values("ended_at")[:1]
    return model.objects.filter(status__in=OPEN, call__status=Call.Status.ENDED).update(
        status=CallSession.Status.STOPPED, stopped_at=Subquery(ended_at), updated_at=Now()
    )


def _no_stop_yet(model: type[CallSession], action: str) -> Exists:
    """No stop in flight or accepted by Telnyx (its webhook will close the record)."""
    return ~Exists(
        Command.objects.filter(
            **{commands.TARGET_FIELDS[model]: OuterRef("pk")},
            action=action,
            status__in=[Command.Status.QUEUED, Command.Status.SENDING, Command.Status.SUCCEEDED],
        )
    )


def sessions_stop_stale(*, limit: int = 500) -> dict[str, int] | None:
    """One sweep. Returns what it did, or None if another sweep holds the lock."""
    if not cache.add(SWEEP_LOCK, 1, timeout=SWEEP_LOCK_TTL):
        return None
    try:
        return _sweep(limit)
    finally:
        cache.delete(SWEEP_LOCK)


def unstarted(model: type[CallSession], now) -> QuerySet:
    """Asked for, never confirmed within the grace period, on a live call."""
    grace = timedelta(seconds=settings.CALLOPS_START_GRACE)
    return model.objects.filter(
        LIVE, status=CallSession.Status.REQUESTED, requested_at__lt=now - grace
    ).select_related("call")


def overdue(model: type[CallSession], action: str, now) -> QuerySet:
    """Running past its maximum duration, on a live call, with no stop on its way yet."""
    return model.objects.filter(
        LIVE, _no_stop_yet(model, action), status=CallSession.Status.ACTIVE, stop_after__lt=now
    ).select_related("call")


def _sweep(limit: int) -> dict[str, int]:
    now = timezone.now()
    done = {"closed_on_ended_call": 0, "never_started": 0, "over_duration": 0, "stops_sent": 0}
    for model, action in STOPS:
        done["closed_on_ended_call"] += _close_on_ended_calls(model)
        # Failed, and stopped in case Telnyx did start it without telling us.
        never = list(unstarted(model, now)[:limit])
        if never:
            done["never_started"] += model.objects.filter(
                pk__in=[s.pk for s in never], status=CallSession.Status.REQUESTED
            ).update(
                status=CallSession.Status.FAILED,
                failure_reason="never started",
                stopped_at=now,
                updated_at=now,
            )
        late = list(overdue(model, action, now)[:limit])
        done["over_duration"] += len(late)
        done["stops_sent"] += commands.commands_create_stops(
            targets=[(s, _stop_params(s)) for s in never + late],
            action=action,
            requested_by=Command.RequestedBy.SCHEDULE,
        )
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
