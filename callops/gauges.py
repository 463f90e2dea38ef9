"""Gauges read from the database (and the rate limiter) when Prometheus scrapes ``/metrics``.

What the records already say (events pending, streams open, backlogs, the beat's heartbeat) is
not counted by every process: the scrape reads it, once, here. Each query walks an index that
holds only the rows it counts (pending events, unfinished commands and deliveries, active
sessions: see the models' indexes), so its cost grows with the backlog, not with the tables'
millions of finished rows; each also runs under ``CALLOPS_METRICS_QUERY_TIMEOUT``. A query that
fails or times out leaves its gauges out of that scrape and is counted in
``callops_metrics_scrape_errors_total``: a slow database never makes the scrape hang.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from callops import metrics
from callops.models import Call, Command, Delivery, Fork, MediaStream, TaskRun, Transcription
from callops.models import WebhookEvent as Event
from callops.ratelimit import get_limiter

logger = logging.getLogger("callops.metrics")

SESSIONS = {"stream": MediaStream, "fork": Fork, "transcription": Transcription}
_errors: dict[str, int] = {}  # per web process: how many scrapes each part failed


def _age(now: datetime, at: datetime | None) -> float:
    return max(0.0, (now - at).total_seconds()) if at is not None else 0.0


def _gauge(name: str, doc: str, value: float | None = None, labels=()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, labels=list(labels) or None)


def events(now: datetime) -> Iterator[Metric]:
    pending = Event.objects.filter(status=Event.Status.PENDING)
    # Two index reads: the count walks the partial index of pending events, the oldest is the
    # first entry of (status, received_at).
    count = pending.count()
    oldest = pending.aggregate(at=Min("received_at"))["at"]
    yield _gauge("callops_webhook_events_pending", "Webhook events stored, not yet applied", count)
    yield _gauge(
        "callops_webhook_event_oldest_pending_seconds",
        "Age of the oldest webhook event not yet applied (0: none)",
        _age(now, oldest),
    )


def commands(now: datetime) -> Iterator[Metric]:
    rows = (
        Command.objects.filter(status__in=[Command.Status.QUEUED, Command.Status.SENDING])
        .values("status")
        .annotate(n=Count("pk"), oldest=Min("created_at"))
        .order_by()
    )
    by_status = {row["status"]: row for row in rows}
    unfinished = _gauge(
        "callops_commands_unfinished", "Commands queued or being sent, by status", labels=["status"]
    )
    for status in (Command.Status.QUEUED, Command.Status.SENDING):
        unfinished.add_metric([status], by_status.get(status, {}).get("n", 0))
    yield unfinished
    queued = by_status.get(Command.Status.QUEUED, {}).get("oldest")
    yield _gauge(
        "callops_command_oldest_queued_seconds",
        "Age of the oldest command still queued (0: none)",
        _age(now, queued),
    )


def calls(now: datetime) -> Iterator[Metric]:
    live = Call.objects.filter(status__in=[Call.Status.INITIATED, Call.Status.ANSWERED]).count()
    yield _gauge("callops_calls_in_progress", "Calls not ended", live)
    sessions = _gauge(
        "callops_sessions_open", "Streams, forks and transcriptions running", labels=["kind"]
    )
    for kind, model in SESSIONS.items():
        sessions.add_metric([kind], model.objects.filter(status=model.Status.ACTIVE).count())
    yield sessions


def deliveries(now: datetime) -> Iterator[Metric]:
    rows = (
        Delivery.objects.filter(status__in=Delivery.UNFINISHED)
        .values("status")
        .annotate(n=Count("pk"), oldest=Min("created_at"))
        .order_by()
    )
    backlog = _gauge(
        "callops_partner_deliveries_backlog",
        "Partner deliveries not finished, by status (pending, delivering, failed)",
        labels=["status"],
    )
    by_status = {row["status"]: row for row in rows}
    for status in Delivery.UNFINISHED:
        backlog.add_metric([status], by_status.get(status, {}).get("n", 0))
    yield backlog
    oldest = min((row["oldest"] for row in rows), default=None)
    yield _gauge(
        "callops_partner_delivery_oldest_seconds",
        "Age of the oldest unfinished partner delivery (0: none)",
        _age(now, oldest),
    )


def tasks(now: datetime) -> Iterator[Metric]:
    runs = list(TaskRun.objects.values_list("name", "last_finished_at"))
    ages = _gauge(
        "callops_task_last_success_seconds",
        "Seconds since each periodic task last finished without an error",
        labels=["task"],
    )
    heartbeat = None
    for name, finished in runs:
        if finished is not None:
            ages.add_metric([name], _age(now, finished))
        if name == "beat_heartbeat":
            heartbeat = finished
    yield ages
    if heartbeat is not None:  # absent until the first beat: alert on absent() too
        yield _gauge(
            "callops_beat_heartbeat_age_seconds",
            "Seconds since beat's heartbeat task last ran on a worker",
            _age(now, heartbeat),
        )


def rate_limit(now: datetime) -> Iterator[Metric]:
    yield _gauge(
        "callops_telnyx_rate_limit_pause_seconds",
        "Seconds left of the pause every worker keeps after Telnyx answered 429 (0: none)",
        get_limiter().paused_for(),
    )


PARTS: dict[str, Callable[[datetime], Iterator[Metric]]] = {
    "events": events,
    "commands": commands,
    "calls": calls,
    "deliveries": deliveries,
    "tasks": tasks,
    "rate_limit": rate_limit,
}


def _read(part: Callable[[datetime], Iterator[Metric]], now: datetime) -> list[Metric]:
    if part is rate_limit:
        return list(part(now))
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # SET LOCAL: only this transaction's statements; a pooled connection keeps nothing.
            timeout_ms = max(1, int(settings.CALLOPS_METRICS_QUERY_TIMEOUT * 1000))
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
        return list(part(now))


class DatabaseCollector:
    """A prometheus-client collector: registered only in the registry ``/metrics`` renders."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        for name, part in PARTS.items():
            try:
                yield from _read(part, now)
            except Exception as exc:  # the database or Redis: the other parts still count
                _errors[name] = _errors.get(name, 0) + 1
                logger.warning("metrics: %s not read: %s", name, type(exc).__name__)
        errors = CounterMetricFamily(
            "callops_metrics_scrape_errors",
            "Parts of a scrape that could not be read (this web process's count)",
            labels=["part"],
        )
        for name in PARTS:
            errors.add_metric([name], _errors.get(name, 0))
        yield errors


class _ThisProcess:
    """Without the multi-process directory: this process's own counters."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def metrics_render() -> bytes:
    """The text ``/metrics`` answers: every process's counters, and the gauges read now."""
    registry = CollectorRegistry(auto_describe=False)
    if metrics.MULTIPROCESS:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(DatabaseCollector())
    return generate_latest(registry)
