"""The drain flag: how a stored webhook event gets a worker to apply it.

Webhook events are not sent to the broker one task each. The webhook stores the event as
``pending`` (the database is the queue) and raises a one-row flag, ``DrainFlag``; only the
request that raises it publishes a ``drain_webhook_events`` task, so a burst of webhooks costs
one publish. On PostgreSQL the flag is raised inside the event's own INSERT statement
(``raise_in``), so storing an event and deciding whether to publish cost one round trip.

Correctness: the flag is lowered only by a drain task, *before* its last look for pending
events, so an event stored while the flag was up is either drained by that task or seen by its
last look. If the broker is down the event stays pending and the periodic sweeper drains it
once it is back; a flag whose drain was lost counts as lowered after ``FLAG_TTL``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q
from django.utils import timezone

from callops import queue
from callops.models import DrainFlag, WebhookEvent

logger = logging.getLogger("callops.drain")

# A raised flag older than this counts as lowered: its drain task was lost.
FLAG_TTL = timedelta(seconds=30)


def raise_in(insert_sql: str) -> str:
    """Wrap the webhook's ``INSERT ... RETURNING status, delivery_count`` so the same statement
    raises the flag when it stored a pending event; the third column says whether it did.

    Parameters ``%(now)s`` and ``%(stale)s`` (now - ``FLAG_TTL``) are bound by the caller. A
    plain UPDATE takes no lock when the flag is already up, so concurrent webhooks do not queue
    on the flag row; the INSERT covers a missing row (a fresh or truncated table).
    """
    flag = DrainFlag._meta.db_table
    return (
        f"WITH stored AS ({insert_sql}),"  # noqa: S608 - table names only; values are bound
        " pending AS (SELECT 1 FROM stored WHERE status = 'pending'),"
        f" raised AS (UPDATE {flag} SET requested_at = %(now)s WHERE id = 1"
        " AND (requested_at IS NULL OR requested_at < %(stale)s)"
        " AND EXISTS (SELECT 1 FROM pending) RETURNING 1),"
        f" created AS (INSERT INTO {flag} (id, requested_at) SELECT 1, %(now)s"
        f" WHERE EXISTS (SELECT 1 FROM pending) AND NOT EXISTS (SELECT 1 FROM {flag} WHERE id = 1)"
        " ON CONFLICT (id) DO NOTHING RETURNING 1)"
        " SELECT status, delivery_count,"
        " EXISTS (SELECT 1 FROM raised) OR EXISTS (SELECT 1 FROM created) FROM stored"
    )


def flag_raise() -> bool:
    """Raise the flag unless it is up. True if this call raised it: the caller must then
    publish a drain. (``raise_in`` does the same inside the webhook's INSERT.)"""
    now = timezone.now()
    due = Q(requested_at__isnull=True) | Q(requested_at__lt=now - FLAG_TTL)
    if DrainFlag.objects.filter(due, pk=1).update(requested_at=now):
        return True
    _, created = DrainFlag.objects.get_or_create(pk=1, defaults={"requested_at": now})
    return created


def flag_lower() -> None:
    DrainFlag.objects.filter(pk=1).update(requested_at=None)


def publish() -> bool:
    """Publish a drain for a flag just raised; lower it again if the broker is unreachable."""
    try:
        queue.publish(queue.DRAIN_WEBHOOK_EVENTS)
    except Exception:
        logger.warning("drain: broker unavailable; the sweeper will drain pending events")
        try:
            flag_lower()
        except DatabaseError:
            logger.debug("drain: could not lower the flag; it expires on its own")
        return False
    return True


def request() -> bool:
    """Make sure a drain task will look at the pending events. Never raises."""
    try:
        raised = flag_raise()
    except DatabaseError:
        logger.warning("drain: database unavailable; the sweeper will drain pending events")
        return False
    return raised and publish()


def after_store(*, status: str, raised: bool | None) -> None:
    """What the webhook does once its event is stored. ``raised`` is whether its INSERT raised
    the flag, or None where the database could not do it in the same statement (SQLite, the
    embedded default): then a pending event raises it here, in a second statement."""
    if raised:
        publish()
    elif raised is None and status == WebhookEvent.Status.PENDING:
        request()


def after_batch(*, applied: int) -> None:
    """What a drain task does after applying ``applied`` events: a full batch hands the rest
    to a fresh task, so other tasks interleave; otherwise lower the flag and look once more."""
    if applied >= settings.CALLOPS_DRAIN_BATCH:
        try:
            queue.publish(queue.DRAIN_WEBHOOK_EVENTS)
        except Exception:
            logger.warning("drain: broker unavailable; the sweeper will drain the rest")
            flag_lower()
        return
    flag_lower()
    if WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING).exists():
        request()
