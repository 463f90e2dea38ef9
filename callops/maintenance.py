"""Scheduled maintenance: stop what runs too long, close what a hang-up left open, purge old rows.

Every query here walks a partial index (see ``CallSession.sweep_indexes``), so a sweep costs in
proportion to what is stale, not to the size of the tables (benchmarks/stale_sweep.py).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import models, transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from callops import actions, commands, metrics, state
from callops.models import (
    Call,
    CallSession,
    Command,
    Delivery,
    IdempotencyRecord,
    PartnerEvent,
    TranscriptSegment,
    WebhookEvent,
)

logger = logging.getLogger("callops.maintenance")

LIVE = ~Q(call__status=Call.Status.ENDED)
SWEEP_LOCK = "maintenance:stale-sessions"
SWEEP_LOCK_TTL = 55  # shorter than the one-minute schedule: a crashed sweeper blocks one run


def _no_stop_yet(stop: actions.TelnyxAction) -> Exists:
    """No stop in flight or accepted by Telnyx (its webhook will close the record)."""
    return ~Exists(
        Command.objects.filter(
            **{stop.record: OuterRef("pk")},
            action=stop.name,
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


def _start_settled(model: type[CallSession], since) -> Exists:
    """No command that starts it is still queued, being sent or retried (a backlog of 429s
    can hold one for minutes), nor accepted by Telnyx after ``since``: its webhook may still
    be on its way. Failing and stopping such a start would have Telnyx get the stop first.

    A start still in flight is left to its command, which fails the record itself if it gives
    up (and stops it when Telnyx may have applied it: ``commands.command_settle``)."""
    field = next(
        name for name, stop in actions.STOPS.items() if commands.record_model(stop) is model
    )
    starters = [spec.name for spec in actions.ACTIONS.values() if field in spec.records]
    return ~Exists(
        Command.objects.filter(
            Q(status__in=[Command.Status.QUEUED, Command.Status.SENDING])
            | Q(status=Command.Status.SUCCEEDED, finished_at__gte=since),
            **{field: OuterRef("pk")},
            action__in=starters,
        )
    )


def unstarted(model: type[CallSession], now) -> QuerySet:
    """Asked for, never confirmed within the grace period, on a live call, and its start no
    longer in flight: the grace runs from Telnyx's answer to it as well as from the request."""
    since = now - timedelta(seconds=settings.CALLOPS_START_GRACE)
    return model.objects.filter(
        LIVE,
        _start_settled(model, since),
        status=CallSession.Status.REQUESTED,
        requested_at__lt=since,
    ).select_related("call")


def overdue(stop: actions.TelnyxAction, now) -> QuerySet:
    """Running past its maximum duration, on a live call, with no stop on its way yet."""
    return (
        commands.record_model(stop)
        .objects.filter(
            LIVE, _no_stop_yet(stop), status=CallSession.Status.ACTIVE, stop_after__lt=now
        )
        .select_related("call")
    )


def _sweep(limit: int) -> dict[str, int]:
    now = timezone.now()
    done = {"closed_on_ended_call": 0, "never_started": 0, "over_duration": 0, "stops_sent": 0}
    for stop in actions.STOPS.values():
        model = commands.record_model(stop)
        done["closed_on_ended_call"] += state.sessions_close_on_ended_calls(model)
        failed, stops = _fail_unstarted(stop, now, limit)
        done["never_started"] += failed
        late = list(overdue(stop, now)[:limit])
        done["over_duration"] += len(late)
        done["stops_sent"] += stops + _stop(stop, late)
    if any(done.values()):
        logger.info("stale sessions: %s", done)
    for reason in ("closed_on_ended_call", "never_started", "over_duration"):
        if done[reason]:
            metrics.STALE_SESSIONS.labels(reason).inc(done[reason])
    return done


def _fail_unstarted(stop: actions.TelnyxAction, now, limit: int) -> tuple[int, int]:
    """Fail the starts never confirmed, and stop them in case Telnyx did start them without
    telling us. Returns (failed, stops created).

    Under their calls' locks, as a drain applies the started webhook: the webhook is applied
    either before (the start is no longer unstarted) or after (it merges into a failed record
    with its stop on the way), never in between, where its stop would hit a stream that has
    just started. A call a drain holds right now is left to the next sweep, never waited for."""
    model = commands.record_model(stop)
    candidates = list(unstarted(model, now).values_list("pk", "call_id")[:limit])
    if not candidates:
        return 0, 0
    with transaction.atomic():
        calls = Call.objects.select_for_update(skip_locked=True).filter(
            pk__in={call for _, call in candidates}
        )
        never = list(
            unstarted(model, now).filter(
                pk__in=[pk for pk, _ in candidates],
                call__in=list(calls.values_list("pk", flat=True)),
            )
        )
        failed = state.sessions_fail_unstarted(
            model.objects.filter(pk__in=[s.pk for s in never]), reason="never started", at=now
        )
        return failed, _stop(stop, never)


def _stop(stop: actions.TelnyxAction, sessions: list[CallSession]) -> int:
    return commands.commands_create_stops(
        targets=[(s, stop.params_for_stop_of(s)) for s in sessions],
        action=stop.name,
        requested_by=Command.RequestedBy.SCHEDULE,
    )


def past_retention(now) -> dict[str, QuerySet]:
    """What the purge deletes, by kind (README: *Retention*). Pending events are never
    purged: they wait to be applied. Unordered, so each walks its own time index."""
    days = settings.CALLOPS_EVENT_RETENTION_DAYS, settings.CALLOPS_FAILED_EVENT_RETENTION_DAYS
    events = WebhookEvent.objects.order_by()
    return {
        "webhook_events": events.filter(
            status__in=[WebhookEvent.Status.PROCESSED, WebhookEvent.Status.IGNORED],
            received_at__lt=now - timedelta(days=days[0]),
        ),
        "failed_webhook_events": events.filter(
            status=WebhookEvent.Status.FAILED, received_at__lt=now - timedelta(days=days[1])
        ),
        "transcript_segments": TranscriptSegment.objects.order_by().filter(
            occurred_at__lt=now - timedelta(days=settings.CALLOPS_SEGMENT_RETENTION_DAYS)
        ),
        "idempotency_records": IdempotencyRecord.objects.order_by().filter(
            created_at__lt=now - timedelta(hours=settings.CALLOPS_IDEMPOTENCY_RETENTION_HOURS)
        ),
    }


def partner_past_retention(now) -> dict[str, QuerySet]:
    """What the partner purge deletes: finished deliveries, and events none of whose
    deliveries is unfinished (their finished ones go with them). Unfinished deliveries are
    still being sent: never purged."""
    return {
        "partner_deliveries": Delivery.objects.order_by().filter(
            status__in=[Delivery.Status.SUCCEEDED, Delivery.Status.DEAD],
            created_at__lt=now - timedelta(days=settings.CALLOPS_DELIVERY_RETENTION_DAYS),
        ),
        "partner_events": PartnerEvent.objects.order_by()
        .filter(created_at__lt=now - timedelta(days=settings.CALLOPS_PARTNER_EVENT_RETENTION_DAYS))
        .exclude(
            Exists(Delivery.objects.filter(event=OuterRef("pk"), status__in=Delivery.UNFINISHED))
        ),
    }


def records_purge(*, budget_seconds: float = 20.0) -> dict[str, int]:
    """Delete what is past its retention, in batches of at most ``CALLOPS_PURGE_BATCH`` rows,
    each batch its own short transaction: a purge of millions never holds one long transaction
    or its locks. The kinds take turns, a batch each, so a backlog of one does not starve the
    others; what the budget leaves is purged by the next run. Returns the rows deleted per
    kind and the number of batches."""
    return _purge(past_retention(timezone.now()), budget_seconds)


def partner_records_purge(*, budget_seconds: float = 20.0) -> dict[str, int]:
    """``records_purge`` of webhooks to partners (``partner_past_retention``), its own task so
    each run's report keeps its shape."""
    return _purge(partner_past_retention(timezone.now()), budget_seconds)


def _purge(jobs: dict[str, QuerySet], budget_seconds: float) -> dict[str, int]:
    deadline = time.monotonic() + budget_seconds
    done = {**dict.fromkeys(jobs, 0), "batches": 0}
    while jobs and time.monotonic() < deadline:
        for name, queryset in list(jobs.items()):
            deleted = _purge_batch(queryset, settings.CALLOPS_PURGE_BATCH)
            done[name] += deleted
            done["batches"] += bool(deleted)
            if deleted < settings.CALLOPS_PURGE_BATCH:
                del jobs[name]  # nothing more (or only rows locked right now: next run)
            if time.monotonic() >= deadline:
                break
    return done


def _purge_batch(queryset: QuerySet, size: int) -> int:
    """Delete up to ``size`` rows of ``queryset`` in one transaction. Rows another transaction
    holds (a replay, an API request) are skipped, never waited for; the ones taken are locked,
    so none changes between the SELECT and the DELETE."""
    model = queryset.model
    with transaction.atomic():
        pks = list(queryset.select_for_update(skip_locked=True).values_list("pk", flat=True)[:size])
        if not pks:
            return 0
        rows = model.objects.filter(pk__in=pks)
        relations = model._meta.related_objects
        if any(relation.on_delete is not models.SET_NULL for relation in relations):
            return rows.delete()[1].get(model._meta.label, 0)
        # What refers to these rows lets go in one UPDATE per relation (a segment outlives its
        # event), then one DELETE: Django's delete() would load every row (an event's whole
        # payload) to do the same and delete them a hundred at a time.
        for relation in relations:
            name = relation.field.name
            relation.related_model.objects.filter(**{f"{name}__in": pks}).update(**{name: None})
        return rows._raw_delete(rows.db)
