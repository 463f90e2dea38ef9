"""Celery tasks: thin entry points that take ids, call a service and decide what comes next.

Services publish these by name through ``callops.queue`` (they never import this module); the
names are declared there. How webhook events reach ``drain_webhook_events`` is the drain flag's
business (``callops.drain``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from datetime import timedelta

from celery import shared_task
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
)
from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone

from callops import (
    commands,
    drain,
    events,
    logs,
    maintenance,
    metrics,
    partner_delivery,
    partner_events,
    queue,
)
from callops.models import TaskRun, WebhookEvent

logger = logging.getLogger("callops.tasks")


def recorded(func):
    """Record each run of a periodic task (start, finish, result, error) in ``TaskRun``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        name = func.__name__
        TaskRun.objects.update_or_create(name=name, defaults={"last_started_at": timezone.now()})
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            TaskRun.objects.filter(name=name).update(last_error=f"{type(exc).__name__}: {exc}")
            raise
        TaskRun.objects.filter(name=name).update(
            last_finished_at=timezone.now(),
            last_result=result,
            last_error="",
            runs=F("runs") + 1,
        )
        return result

    return wrapper


@shared_task(name=queue.DRAIN_WEBHOOK_EVENTS, ignore_result=True)
def drain_webhook_events(shard: int = 0, lane: str = drain.SOON) -> int:
    """Apply a shard's pending events in a batch; hand the rest to a fresh task so other
    shards interleave. ``lane``: the flag that published it (``callops.drain``)."""
    applied = events.events_drain(shard=shard)
    drain.after_batch(shard=shard, applied=applied, lane=lane)
    return applied


@shared_task(name=queue.DRAIN_URGENT_EVENTS, ignore_result=True)
def drain_urgent_events(shard: int = 0) -> int:
    """Apply a shard's pending events that a caller waits on (``drain.URGENT_EVENTS``), on the
    commands' queue, so an answer is never held behind transcript drains; then send the first
    command they created (the answer) here, without a task of its own."""
    with commands.held_for_sending() as held:
        applied = events.events_drain(shard=shard, types=drain.URGENT_EVENTS)
        drain.after_batch(shard=shard, applied=applied, lane=drain.NOW)
    commands.commands_send_held(held)
    return applied


@shared_task(ignore_result=True)
@recorded
def sweep_pending_webhook_events() -> int:
    """Drain events left pending past the grace period (the broker or a worker was down)."""
    cutoff = timezone.now() - timedelta(seconds=settings.CALLOPS_PENDING_EVENT_GRACE)
    stale = WebhookEvent.objects.filter(
        status=WebhookEvent.Status.PENDING, received_at__lt=cutoff
    ).count()
    if not stale:
        return 0
    logger.warning(
        "sweeper: %d webhook events pending for over %s s; draining",
        stale,
        settings.CALLOPS_PENDING_EVENT_GRACE,
    )
    return events.events_drain()


@shared_task(
    name=queue.SEND_COMMAND, ignore_result=True, acks_late=True, reject_on_worker_lost=True
)
def send_command(
    command_pk: int, reserved_at: float | None = None, turn: str | None = None
) -> str | None:
    """Send one outbox command. ``acks_late`` with ``reject_on_worker_lost``: a worker killed
    mid-send leaves the message to be delivered again, and the claim's lease decides who sends.
    ``turn``: the rate-limit turn its enqueuer took for it (a redelivered message reuses it:
    the attempt it was taken for never completed, or the claim finds the command done)."""
    step = commands.command_send(command_pk=command_pk, reserved_at=reserved_at, turn=turn)
    return step.outcome.kind if step.outcome else None


@shared_task(name=queue.SEND_COMMANDS, ignore_result=True)
def send_commands(command_pks: list[int]) -> int:
    """Fan a batch out to one send_command message each, so every worker can take a share."""
    for pk in command_pks:
        commands.command_enqueue(command_pk=pk)
    return len(command_pks)


@shared_task(
    name=queue.DELIVER_PARTNER_EVENT, ignore_result=True, acks_late=True, reject_on_worker_lost=True
)
def deliver_partner_event(delivery_pk: int) -> str:
    """Send one partner event to one endpoint (and, holding its slot, its call's next ones that
    are due). A worker killed mid-send leaves the message to be delivered again; the claim
    decides who sends (the partner dedupes by webhook-id)."""
    logs.bind(delivery_id=delivery_pk)
    step = partner_delivery.delivery_process(delivery_pk=delivery_pk)
    if step.delay is not None:
        partner_events.deliveries_enqueue(
            delivery_pks=[step.delivery_pk or delivery_pk], countdown=step.delay
        )
    return step.status


@shared_task(ignore_result=True)
@recorded
def sweep_partner_deliveries() -> int:
    """Publish deliveries due again: an endpoint's cooldown ended, a message or worker was lost."""
    return partner_delivery.deliveries_sweep()


@shared_task(ignore_result=True)
@recorded
def repair_stuck_commands() -> int:
    return commands.commands_repair()


@shared_task(ignore_result=True)
@recorded
def stop_stale_sessions() -> dict | None:
    return maintenance.sessions_stop_stale()


@shared_task(ignore_result=True)
@recorded
def purge_old_records() -> dict:
    return maintenance.records_purge()


@shared_task(ignore_result=True)
@recorded
def purge_partner_records() -> dict:
    return maintenance.partner_records_purge()


@shared_task(ignore_result=True)
@recorded
def beat_heartbeat() -> str:
    """Scheduled by beat, run by a worker: its last run proves beat, broker and workers work."""
    return "ok"


@worker_process_init.connect
def _warm_up_telnyx_client(**_) -> None:
    """Import the SDK and build this process's client in the background, right after the fork:
    its first use costs a second or more, which would otherwise land on the first command (and
    inside its rate-limit turn). A thread, so event drains are not held up meanwhile; a command
    arriving early simply waits for the import to finish."""

    def warm_up() -> None:
        try:
            commands.telnyx_client().calls.actions  # noqa: B018 - the access is the warm-up
        except Exception:
            logger.warning("could not prepare the Telnyx client", exc_info=True)
        else:
            logger.info("Telnyx client ready")

    threading.Thread(target=warm_up, name="telnyx-warm-up", daemon=True).start()


@worker_process_init.connect
def _count_this_process(**_) -> None:
    metrics.process_started("worker")


@worker_process_shutdown.connect
def _forget_this_process(**_) -> None:
    metrics.process_dead(os.getpid())


@task_prerun.connect
def _bind_log_context(task=None, task_id: str = "", **_) -> None:
    """A task's lines carry what its publisher's did (``callops.queue``); a task started by
    beat, or published without it, is a chain of its own, known by its task id."""
    carried = getattr(task.request, logs.HEADER, None) if task is not None else None
    logs.clear()
    logs.bind(**{"correlation_id": task_id, **(carried if isinstance(carried, dict) else {})})
    logs.bind(task=task.name if task is not None else "", task_id=task_id)


@task_postrun.connect
def _unbind_log_context(**_) -> None:
    logs.clear()


@task_failure.connect
def _count_failure(sender=None, **_) -> None:
    metrics.TASK_FAILURES.labels(getattr(sender, "name", "unknown")).inc()


@task_prerun.connect
@task_postrun.connect
def _reuse_database_connections(**_) -> None:
    """Treat each task as Django treats a request: keep the connection for CONN_MAX_AGE, drop
    it once broken. (Celery's Django fixup closes it around every task unless
    ``CELERY_DB_REUSE_MAX`` is set, and then never checks it: a reconnection, and a PostgreSQL
    backend forked, per task.)"""
    close_old_connections()
