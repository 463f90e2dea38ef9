"""The drain flag: how a stored webhook event gets a worker to apply it.

Webhook events are not sent to the broker one task each. The webhook stores the event as
``pending`` (the database is the queue) and raises its shard's flag, a ``DrainFlag`` row; only
the request that raises it publishes a ``drain_webhook_events`` task for that shard, so a burst
of webhooks costs one publish per shard. On PostgreSQL the flag is raised inside the event's own
INSERT statement (``raise_in``), so storing an event and deciding whether to publish cost one
round trip.

Shards: every event of a call is in the same shard (a hash of its ``call_control_id``), and one
drain at a time works a shard, so events of one call never race for its row lock, while
``CALLOPS_DRAIN_SHARDS`` shards are drained in parallel by any number of workers and hosts.

Lanes: each shard has two flags. An event that a caller is waiting on (``URGENT_EVENTS``: the
call.initiated that callops answers, the call.answered that starts media, a machine-detection
result a policy acts on) raises the shard's ``now`` flag, and its drain is published at once,
on the commands' queue: it applies only urgent events, so it is short, and it never waits
behind a backlog of transcript drains. Every other event (transcript segments, most of the
traffic) raises the ``soon`` flag, whose drain (queue ``events``) is published
``CALLOPS_DRAIN_DELAY`` seconds later: what arrives meanwhile joins the same batch, so a busy
shard costs a few tasks a second, not one per event. It applies everything pending in its
shard, the calls' lifecycle first.

Correctness: a flag is lowered only by a drain task of its lane, *before* its last look for
pending events, so an event stored while the flag was up is either drained by that task or
seen by its last look. If the broker is down the event stays pending and the periodic sweeper
drains it once it is back; a flag whose drain was lost counts as lowered after ``FLAG_TTL``.
"""

from __future__ import annotations

import logging
import zlib
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
# Applied after the call's lifecycle under a backlog (their order is irrelevant to the records).
BULK_EVENTS = frozenset({"call.transcription"})
# Events whose drain is published at once: a caller or a partner is waiting on what they start.
URGENT_EVENTS = frozenset(
    {
        "call.initiated",
        "call.answered",
        "call.machine.detection.ended",
        "call.machine.premium.detection.ended",
    }
)
NOW, SOON = "now", "soon"
_NOW_FLAGS = 1000  # the now lane's flag ids follow the soon lane's (1..shards)


def shard_of(call_control_id: str) -> int:
    """The call's shard: stable across processes and hosts (not Python's salted hash)."""
    return zlib.crc32(call_control_id.encode()) % max(1, settings.CALLOPS_DRAIN_SHARDS)


def priority_of(event_type: str) -> int:
    return 1 if event_type in BULK_EVENTS else 0


def lane_of(event_type: str) -> str:
    return NOW if event_type in URGENT_EVENTS else SOON


def flag_id(shard: int, lane: str = SOON) -> int:
    return shard + 1 + (_NOW_FLAGS if lane == NOW else 0)


def _delay(lane: str) -> float:
    return 0.0 if lane == NOW else settings.CALLOPS_DRAIN_DELAY


def raise_in(insert_sql: str) -> str:
    """Wrap the webhook's ``INSERT ... RETURNING status, delivery_count`` so the same statement
    raises the flag when it stored a pending event; the third column says whether it did.

    Parameters ``%(now)s``, ``%(stale)s`` (now - ``FLAG_TTL``) and ``%(flag)s`` (the shard's
    flag row) are bound by the caller. A
    plain UPDATE takes no lock when the flag is already up, so concurrent webhooks do not queue
    on the flag row; the INSERT covers a missing row (a fresh or truncated table).
    """
    flag = DrainFlag._meta.db_table
    return (
        f"WITH stored AS ({insert_sql}),"  # noqa: S608 - table names only; values are bound
        " pending AS (SELECT 1 FROM stored WHERE status = 'pending'),"
        f" raised AS (UPDATE {flag} SET requested_at = %(now)s WHERE id = %(flag)s"
        " AND (requested_at IS NULL OR requested_at < %(stale)s)"
        " AND EXISTS (SELECT 1 FROM pending) RETURNING 1),"
        f" created AS (INSERT INTO {flag} (id, requested_at) SELECT %(flag)s, %(now)s WHERE"
        f" EXISTS (SELECT 1 FROM pending) AND NOT EXISTS (SELECT 1 FROM {flag} WHERE id = %(flag)s)"
        " ON CONFLICT (id) DO NOTHING RETURNING 1)"
        " SELECT status, delivery_count,"
        " EXISTS (SELECT 1 FROM raised) OR EXISTS (SELECT 1 FROM created) FROM stored"
    )


def flag_raise(shard: int, lane: str = NOW) -> bool:
    """Raise the shard's flag of ``lane`` unless it is up. True if this call raised it: the
    caller must then publish a drain. (``raise_in`` does the same inside the webhook's INSERT.)"""
    now = timezone.now()
    due = Q(requested_at__isnull=True) | Q(requested_at__lt=now - FLAG_TTL)
    flag = flag_id(shard, lane)
    if DrainFlag.objects.filter(due, pk=flag).update(requested_at=now):
        return True
    _, created = DrainFlag.objects.get_or_create(pk=flag, defaults={"requested_at": now})
    return created


def flag_lower(shard: int | None = None, lane: str | None = None) -> None:
    """Lower the shard's flag of ``lane`` (None: every shard, or both lanes)."""
    flags = DrainFlag.objects.all()
    if shard is not None:
        lanes = [lane] if lane is not None else [NOW, SOON]
        flags = flags.filter(pk__in=[flag_id(shard, each) for each in lanes])
    flags.update(requested_at=None)


def _publish_drain(shard: int, lane: str, countdown: float = 0.0) -> None:
    if lane == NOW:
        queue.publish(queue.DRAIN_URGENT_EVENTS, shard)
    else:
        queue.publish(queue.DRAIN_WEBHOOK_EVENTS, shard, lane, countdown=countdown)


def publish(shard: int, lane: str = NOW) -> bool:
    """Publish a drain for a flag just raised (the ``soon`` lane's after the delay); lower it
    again if the broker is unreachable."""
    try:
        _publish_drain(shard, lane, _delay(lane))
    except Exception:
        logger.warning("drain: broker unavailable; the sweeper will drain pending events")
        try:
            flag_lower(shard, lane)
        except DatabaseError:
            logger.debug("drain: could not lower the flag; it expires on its own")
        return False
    return True


def request(shard: int | None = None, lane: str | None = None) -> bool:
    """Make sure a drain will look at the shard's pending events (None: every shard that has
    some, as after a replay) in ``lane`` (None: both). Never raises. True if a drain was
    published."""
    lanes = [lane] if lane is not None else [NOW, SOON]
    try:
        shards = [shard] if shard is not None else _pending_shards()
        raised = [(s, each) for s in shards for each in lanes if flag_raise(s, each)]
    except DatabaseError:
        logger.warning("drain: database unavailable; the sweeper will drain pending events")
        return False
    return any([publish(s, each) for s, each in raised])


def _pending_shards() -> list[int]:
    pending = WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING)
    return sorted(set(pending.values_list("shard", flat=True).distinct()))


def after_store(*, status: str, raised: bool | None, shard: int = 0, lane: str = NOW) -> None:
    """What the webhook does once its event is stored. ``raised`` is whether its INSERT raised
    the lane's flag, or None where the database could not do it in the same statement (SQLite,
    the embedded default): then a pending event raises it here, in a second statement."""
    if raised:
        publish(shard, lane)
    elif raised is None and status == WebhookEvent.Status.PENDING:
        request(shard, lane)


def after_batch(*, shard: int, applied: int, lane: str = NOW) -> None:
    """What a shard's drain does after applying ``applied`` events: a full batch hands the rest
    to a fresh task at once (a backlog waits for no delay), so other tasks interleave;
    otherwise lower the lane's flag and look once more."""
    if applied >= settings.CALLOPS_DRAIN_BATCH:
        try:
            _publish_drain(shard, lane)
        except Exception:
            logger.warning("drain: broker unavailable; the sweeper will drain the rest")
            flag_lower(shard, lane)
        return
    flag_lower(shard, lane)
    pending = WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING, shard=shard)
    if lane == NOW:
        pending = pending.filter(event_type__in=URGENT_EVENTS)
    if pending.exists():
        request(shard, lane)
