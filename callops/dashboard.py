"""The figures of the operators' dashboard, each read with a bounded query.

The tables grow by millions of rows (events, segments, deliveries), so every figure is read
from a partial index whose size is the backlog (pending events, unfinished commands and
deliveries, active sessions), from an index range over a recent window (the last hour), or
from a table that stays small (periodic tasks). ``benchmarks/admin_dashboard.py`` times the
page on a database of millions of rows.

Rejected webhooks are not stored (a flood of forged requests must not become a flood of
database rows): each rejection increments a counter in the cache for its minute and kind, kept
two hours, and the dashboard sums the last sixty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db.models import Count, Min, Q
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from callops.models import (
    Call,
    Command,
    CommandAttempt,
    Delivery,
    Fork,
    MediaStream,
    TaskRun,
    Transcription,
    WebhookEvent,
)
from callops.ratelimit import get_limiter

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=1)
LAG_SAMPLE = 1000  # the most recent events whose apply lag is summarised

# What a rejection is counted as: a few kinds, whatever the attacker sends (the reason's text
# may quote the body). The latest reason of each kind is kept as an example.
REJECTION_KINDS = {400: "malformed body", 401: "signature", 413: "body too large"}
OTHER = "other"


def _rejection_key(minute: int | str, kind: str) -> str:
    return f"webhook-rejections:{minute}:{kind.replace(' ', '-')}"


def webhook_rejection_count(*, status: int, reason: str) -> None:
    """Count one rejected webhook request; never fails the response it is part of."""
    kind = REJECTION_KINDS.get(status, OTHER)
    key = _rejection_key(int(timezone.now().timestamp() // 60), kind)
    try:
        cache.add(key, 0, timeout=2 * 3600)
        cache.incr(key)
        cache.set(_rejection_key("latest", kind), reason[:200], timeout=2 * 3600)
    except Exception:  # the cache is down: the log line still counts it
        logger.warning("could not count a webhook rejection (the cache is unavailable)")


def webhook_rejections_recent() -> list[tuple[str, int, str]]:
    """(kind, count in the last hour, latest reason) for each kind seen, most first."""
    now = int(timezone.now().timestamp() // 60)
    kinds = [*REJECTION_KINDS.values(), OTHER]
    keys = {_rejection_key(m, k): k for m in range(now - 59, now + 1) for k in kinds}
    counts = dict.fromkeys(kinds, 0)
    for key, value in cache.get_many(list(keys)).items():
        counts[keys[key]] += int(value)
    latest = cache.get_many([_rejection_key("latest", k) for k in kinds])
    rows = [
        (kind, n, latest.get(_rejection_key("latest", kind), "")) for kind, n in counts.items() if n
    ]
    return sorted(rows, key=lambda row: -row[1])


@dataclass
class Lag:
    sampled: int
    p50: float | None
    p99: float | None
    worst: float | None


def _lag_of_recent_events(since: datetime) -> Lag:
    # The newest events first, from the received_at index, at most LAG_SAMPLE of them.
    rows = (
        WebhookEvent.objects.filter(received_at__gte=since, processed_at__isnull=False)
        .order_by("-received_at")
        .values_list("received_at", "processed_at")[:LAG_SAMPLE]
    )
    lags = sorted(max(0.0, (done - got).total_seconds()) for got, done in rows)
    if not lags:
        return Lag(0, None, None, None)
    return Lag(
        len(lags), lags[len(lags) // 2], lags[min(len(lags) - 1, len(lags) * 99 // 100)], lags[-1]
    )


def _count_by(queryset, field: str) -> dict[str, int]:
    return dict(queryset.values_list(field).annotate(n=Count("pk")).values_list(field, "n"))


def calls_figures() -> dict:
    return {
        "in_progress": _count_by(
            Call.objects.filter(status__in=[Call.Status.INITIATED, Call.Status.ANSWERED]),
            "status",
        ),
        "sessions": {
            name: _count_by(
                model.objects.filter(status__in=["requested", "active"]).order_by(), "status"
            )
            for model, name in (
                (MediaStream, "streams"),
                (Fork, "forks"),
                (Transcription, "transcriptions"),
            )
        },
    }


def commands_figures(now: datetime) -> dict:
    unfinished = Command.objects.filter(status__in=[Command.Status.QUEUED, Command.Status.SENDING])
    # All of it from the partial index of unfinished commands: a backlog, not the table.
    backlog = unfinished.order_by().aggregate(
        total=Count("pk"),
        retrying=Count("pk", filter=Q(attempts__gt=0, status=Command.Status.QUEUED)),
        after_429=Count("pk", filter=Q(last_http_status=429)),
        oldest_due=Min("next_attempt_at"),
    )
    recent = Command.objects.filter(created_at__gte=now - WINDOW)
    failed = (
        recent.filter(status=Command.Status.FAILED)
        .order_by()
        .values("action", "failure_reason")
        .annotate(n=Count("pk"))
        .order_by("-n")[:10]
    )
    # Every 429 Telnyx answered, also those a later attempt overcame (the partial index).
    answered_429 = CommandAttempt.objects.filter(
        http_status=429, answered_at__gte=now - WINDOW
    ).count()
    try:
        paused = get_limiter().paused_for()
    except Exception as exc:  # Redis down: say so instead of failing the page
        paused = f"unknown ({type(exc).__name__})"
    return {
        "backlog": backlog,
        "by_action": _count_by(unfinished.order_by(), "action"),
        "failed": list(failed),
        "answered_429": answered_429,
        "rate_limit_paused_for": paused,
    }


def events_figures(now: datetime) -> dict:
    pending = WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING).order_by()
    backlog = pending.aggregate(total=Count("pk"), oldest=Min("received_at"))
    oldest = backlog["oldest"]
    failed = (
        WebhookEvent.objects.filter(
            status=WebhookEvent.Status.FAILED, received_at__gte=now - WINDOW
        )
        .order_by()
        .values("event_type")
        .annotate(n=Count("pk"))
        .order_by("-n")[:10]
    )
    return {
        "pending": backlog["total"],
        "oldest_pending_age": (now - oldest).total_seconds() if oldest else None,
        "lag": _lag_of_recent_events(now - WINDOW),
        "failed": list(failed),
        "rejections": webhook_rejections_recent(),
    }


def deliveries_figures(now: datetime) -> dict:
    unfinished = Delivery.objects.filter(status__in=Delivery.UNFINISHED).order_by()
    backlog = unfinished.aggregate(
        total=Count("pk"),
        retrying=Count("pk", filter=Q(status=Delivery.Status.FAILED)),
        overdue=Count("pk", filter=Q(next_attempt_at__lt=now - timedelta(minutes=1))),
        oldest_due=Min("next_attempt_at"),
    )
    dead = Delivery.objects.filter(status=Delivery.Status.DEAD, created_at__gte=now - WINDOW)
    return {"backlog": backlog, "dead_last_hour": dead.count()}


def tasks_figures() -> dict:
    runs = {run.name: run for run in TaskRun.objects.all()}
    periodic = [
        (task, runs.pop(task.task.rpartition(".")[2], None) or runs.pop(task.name, None))
        for task in PeriodicTask.objects.order_by("name")
    ]
    return {"periodic": periodic, "other_runs": list(runs.values())}


# (the figures, the permission a user needs to see them)
SECTIONS = {
    "calls": ("callops.view_call",),
    "commands": ("callops.view_command",),
    "events": ("callops.view_webhookevent",),
    "deliveries": ("callops.view_delivery",),
    "tasks": ("callops.view_taskrun", "django_celery_beat.view_periodictask"),
}


def dashboard_figures(*, user) -> dict:
    """The sections ``user`` may see (any of a section's permissions shows it)."""
    now = timezone.now()
    readers = {
        "calls": calls_figures,
        "commands": lambda: commands_figures(now),
        "events": lambda: events_figures(now),
        "deliveries": lambda: deliveries_figures(now),
        "tasks": tasks_figures,
    }
    return {
        name: readers[name]()
        for name, perms in SECTIONS.items()
        if any(user.has_perm(p) for p in perms)
    } | {"now": now}
