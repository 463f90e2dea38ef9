"""Partner events: what happened on a partner's call, recorded once, for its webhook endpoints.

The drains (``callops.events``) and the command outbox (``callops.commands._finish``) call in here
with the call's row lock held, inside the transaction that records the fact, so an event exists
if and only if its fact was committed. Each fact has a ``source_key`` (the Telnyx event id and
the type, or the command and its outcome): a redelivered or replayed webhook finds its event
already there and adds nothing. A call's events are numbered 1, 2, ... by
``Call.partner_event_seq``, taken under the same lock, so the numbers follow the order in which
callops learned the facts.

An event is created only for a partner with an active endpoint that wants it, and with one
``Delivery`` per such endpoint; a partner without endpoints costs one query per batch. After
commit the first new delivery of each (call, endpoint) is published, unless an earlier one of
the call is still on its way to that endpoint (``first_in_line``); the ones after it follow as
each finishes (``callops.partner_delivery``), which keeps a call's events in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from callops import logs, lookups, queue
from callops.models import Call, Command, Delivery, PartnerEvent, WebhookEndpoint, WebhookEvent

logger = logging.getLogger("callops.partner_events")

API_VERSION = "v1"

# Set by looked_up_once: connection id -> the active endpoints of the partner that owns it.
_ENDPOINTS: ContextVar[dict[str, list[WebhookEndpoint]] | None] = ContextVar(
    "callops_partner_endpoints", default=None
)


@contextmanager
def looked_up_once() -> Iterator[None]:
    """Within the block, each connection's endpoints are read once (a drain's batch). Drains
    also remember them across batches (``callops.lookups``): an endpoint added, changed or
    deactivated meanwhile is seen within ``CALLOPS_LOOKUP_TTL`` seconds (a delivery to an
    endpoint deactivated since is not sent: ``partner_delivery`` reads it again first)."""
    token = _ENDPOINTS.set({})
    try:
        yield
    finally:
        _ENDPOINTS.reset(token)


def endpoints_for(connection_id: str) -> list[WebhookEndpoint]:
    """The active endpoints of the active partner that owns ``connection_id``."""
    if not connection_id:
        return []
    return lookups.ENDPOINTS.in_batch(
        _ENDPOINTS.get(), connection_id, lambda: _look_up(connection_id)
    )


def _look_up(connection_id: str) -> list[WebhookEndpoint]:
    return list(
        WebhookEndpoint.objects.filter(
            active=True, partner__active=True, partner__connections__connection_id=connection_id
        ).order_by("pk")
    )


@dataclass
class Fact:
    """One partner event to be: its type, identity, data and when it happened."""

    type: str
    source_key: str
    data: dict
    occurred_at: datetime
    interim: bool = False  # an interim transcript segment: only endpoints that opt in
    endpoints: list[WebhookEndpoint] = field(default_factory=list)


def partner_events_record(*, call: Call, facts: Iterable[Fact]) -> list[PartnerEvent]:
    """Record ``facts`` about the locked ``call`` (skipping those already recorded), with their
    deliveries, and publish them after commit. Returns the events created."""
    return _record([(call, fact) for fact in facts])


def _record(pairs: list[tuple[Call, Fact]]) -> list[PartnerEvent]:
    wanted: list[tuple[Call, Fact]] = []
    for call, fact in pairs:
        endpoints = endpoints_for(call.connection_id)
        fact.endpoints = [e for e in endpoints if e.wants(fact.type, interim=fact.interim)]
        if fact.endpoints:
            wanted.append((call, fact))
    if not wanted:
        return []
    known = set(
        PartnerEvent.objects.filter(
            source_key__in=[fact.source_key for _, fact in wanted]
        ).values_list("source_key", flat=True)
    )
    new = [(call, fact) for call, fact in wanted if fact.source_key not in known]
    new = list({fact.source_key: (call, fact) for call, fact in new}.values())  # once per batch
    if not new:
        return []
    counts: dict[int, int] = {}
    for call, _ in new:
        counts[call.pk] = counts.get(call.pk, 0) + 1
    calls = {call.pk: call for call, _ in new}
    next_seq = {pk: _take_sequences(calls[pk], n) for pk, n in counts.items()}
    now = timezone.now()
    rows, deliveries = [], []
    for call, fact in new:
        sequence = next_seq[call.pk]
        next_seq[call.pk] += 1
        event = PartnerEvent(
            partner_id=fact.endpoints[0].partner_id,
            call=call,
            type=fact.type,
            sequence=sequence,
            source_key=fact.source_key[:255],
            occurred_at=fact.occurred_at,
            created_at=now,
        )
        event.payload = _envelope(event, call, fact.data)
        rows.append(event)
        deliveries += [delivery_build(event, endpoint, now) for endpoint in fact.endpoints]
    PartnerEvent.objects.bulk_create(rows)
    for delivery in deliveries:
        delivery.event_id = delivery.event.pk  # bulk_create set the pk on PostgreSQL and SQLite
    Delivery.objects.bulk_create(deliveries)
    firsts: dict[tuple, Delivery] = {}
    for delivery in deliveries:  # in sequence order: the first of each (call, endpoint)
        firsts.setdefault((delivery.call_id, delivery.endpoint_id), delivery)
    # Not those of a parked endpoint: the probe's success or the sweeper publishes them, so a
    # dead endpoint's events cost no task each while it is parked.
    pks = [d.pk for d in firsts.values() if d.next_attempt_at <= now]
    logs.on_commit(lambda: deliveries_enqueue(delivery_pks=first_in_line(delivery_pks=pks)))
    return rows


def first_in_line(*, delivery_pks: list[int]) -> list[int]:
    """Of committed new deliveries, those with no earlier unfinished delivery of their call to
    their endpoint: the others are published (or sent in its slot) by that earlier one when it
    finishes, and a message of their own would only find it unfinished. Run after the commit:
    an earlier one read unfinished and not locked has no finish under way, and its finish will
    look for its call's next delivery in a statement after the one that writes it, which sees
    these (``partner_delivery``). One whose finish is being written right now (locked) is
    skipped, not waited for: waiting for several rows that a finish and its follower's claim
    write in their own order could deadlock, and skipping only publishes a message that may
    find it unfinished. PostgreSQL only (elsewhere all are published, as before)."""
    if not delivery_pks or connection.vendor != "postgresql":
        return delivery_pks
    table = connection.ops.quote_name(Delivery._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT d.id FROM {table} d JOIN {table} x ON x.endpoint_id = d.endpoint_id"  # noqa: S608
            " AND x.call_id = d.call_id AND x.sequence < d.sequence AND x.status IN (%s, %s, %s)"
            " WHERE d.id = ANY(%s) FOR SHARE OF x SKIP LOCKED",
            [*Delivery.UNFINISHED, list(delivery_pks)],
        )
        behind = {pk for (pk,) in cursor.fetchall()}
    return [pk for pk in delivery_pks if pk not in behind]


def _take_sequences(call: Call, count: int) -> int:
    """Reserve ``count`` numbers of the call's sequence; returns the first. The counter is
    taken from the row (this transaction holds its lock), and written back to the caller's
    instance, which the drain saves with every field."""
    table = connection.ops.quote_name(Call._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET partner_event_seq = partner_event_seq + %s"  # noqa: S608
            " WHERE id = %s RETURNING partner_event_seq",
            [count, call.pk],
        )
        last = cursor.fetchone()[0]
    call.partner_event_seq = last
    return last - count + 1


def delivery_build(event: PartnerEvent, endpoint: WebhookEndpoint, now: datetime) -> Delivery:
    """A new (unsaved) delivery of ``event`` to ``endpoint``, due now, or when the endpoint's
    cooldown ends if it is parked (as it read)."""
    parked_until = endpoint.parked_until
    return Delivery(
        event=event,
        endpoint=endpoint,
        call=event.call,
        sequence=event.sequence,
        next_attempt_at=max(now, parked_until) if parked_until else now,
        expires_at=now + timedelta(seconds=settings.CALLOPS_WEBHOOK_MAX_AGE),
        created_at=now,
    )


def _envelope(event: PartnerEvent, call: Call, data: dict) -> dict:
    """The body every endpoint gets, fixed at creation so each retry sends the same bytes."""
    return {
        "id": event.event_id,
        "type": event.type,
        "api_version": API_VERSION,
        "created_at": _iso(event.created_at),
        "occurred_at": _iso(event.occurred_at),
        "call_control_id": call.call_control_id,
        "sequence": event.sequence,
        "data": data,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def deliveries_enqueue(*, delivery_pks: Iterable[int], countdown: float = 0.0) -> None:
    """Publish one delivery task each. A broker outage loses nothing: the sweeper
    (``partner_delivery.deliveries_sweep``) finds due deliveries in the database."""
    for pk in delivery_pks:
        try:
            queue.publish(queue.DELIVER_PARTNER_EVENT, pk, countdown=countdown)
        except Exception:
            logger.warning("could not enqueue delivery %s; the sweeper will", pk, exc_info=True)


# --- What each Telnyx event and command outcome means to a partner ---------------------------


def _call_initiated(call: Call, event: WebhookEvent) -> Fact:
    data = {
        "call_session_id": call.call_session_id,
        "connection_id": call.connection_id,
        "direction": call.direction,
        "from": call.from_number,
        "to": call.to_number,
        "started_at": _iso(call.started_at),
    }
    # Once per call: a second call.initiated (another event id) is the same fact.
    return Fact("call.initiated", f"call:{call.pk}:initiated", data, event.occurred_at)


def _call_answered(call: Call, event: WebhookEvent) -> Fact:
    data = {"answered_at": _iso(call.answered_at)}
    return Fact("call.answered", f"call:{call.pk}:answered", data, event.occurred_at)


def _call_ended(call: Call, event: WebhookEvent) -> Fact:
    data = {
        "ended_at": _iso(call.ended_at),
        "hangup_cause": call.hangup_cause,
        "hangup_source": call.hangup_source,
        "sip_hangup_cause": call.sip_hangup_cause,
    }
    return Fact("call.ended", f"call:{call.pk}:ended", data, event.occurred_at)


def _body_text(event: WebhookEvent, name: str, length: int = 2048) -> str:
    value = event.body.get(name)
    return value[:length] if isinstance(value, str) else ""


def _by_event(kind: str, *fields: str) -> Callable[[Call, WebhookEvent], Fact]:
    """A fact per Telnyx event (its id is the identity), carrying ``fields`` of its payload."""

    def fact(call: Call, event: WebhookEvent) -> Fact:
        data = {name: _body_text(event, name) for name in fields}
        if "stream_url" in data and not data["stream_url"]:
            params = event.body.get("stream_params")
            url = params.get("stream_url") if isinstance(params, dict) else None
            data["stream_url"] = url[:2048] if isinstance(url, str) else ""
        return Fact(kind, f"{event.event_id}:{kind}", data, event.occurred_at)

    return fact


# Telnyx event type -> the partner event it makes (README: Partner webhooks, the catalogue).
WEBHOOK_FACTS: dict[str, Callable[[Call, WebhookEvent], Fact]] = {
    "call.initiated": _call_initiated,
    "call.answered": _call_answered,
    "call.hangup": _call_ended,
    "streaming.started": _by_event("stream.started", "stream_url", "stream_id"),
    "streaming.stopped": _by_event("stream.stopped", "stream_url", "stream_id"),
    "streaming.failed": _by_event("stream.failed", "stream_url", "stream_id", "failure_reason"),
    "call.fork.started": _by_event("fork.started", "stream_type"),
    "call.fork.stopped": _by_event("fork.stopped", "stream_type"),
    "call.machine.detection.ended": _by_event("machine_detection.result", "result"),
    "call.machine.premium.detection.ended": _by_event("machine_detection.result", "result"),
    "call.dtmf.received": _by_event("dtmf.digit", "digit"),
}

# Every type a partner may receive (what an endpoint's event_types may name).
EVENT_TYPES = (
    "call.initiated",
    "call.answered",
    "call.ended",
    "stream.started",
    "stream.stopped",
    "stream.failed",
    "fork.started",
    "fork.stopped",
    "transcript.segment",
    "machine_detection.result",
    "dtmf.digit",
    "command.succeeded",
    "command.failed",
)


def webhook_event_applied(*, call: Call, event: WebhookEvent) -> None:
    """A Telnyx lifecycle event was applied to the locked ``call``: its partner event, once."""
    make = WEBHOOK_FACTS.get(event.event_type)
    if make is not None:
        partner_events_record(call=call, facts=[make(call, event)])


def segments_applied(*, segments: Iterable) -> None:
    """Transcript segments were written (a drain's batch, their calls locked): one event per
    segment event, final segments for every endpoint, interim ones for those that opt in, in
    one query for what is already known and one bulk insert."""
    pairs = []
    for segment in segments:
        event = segment.event
        data = {
            "transcript": segment.transcript,
            "is_final": segment.is_final,
            "confidence": segment.confidence,
            "track": segment.track,
        }
        key = f"{event.event_id}:transcript.segment"
        fact = Fact("transcript.segment", key, data, event.occurred_at, not segment.is_final)
        pairs.append((segment.call, fact))
    _record(pairs)


def command_finished(*, command: Command, failed: bool, at: datetime) -> None:
    """A command succeeded or failed (``commands._finish``, in its transaction)."""
    # The claim loaded the call with the command (a call's connection never changes).
    if not endpoints_for(command.call.connection_id):
        return  # no partner listens: no lock taken, nothing written
    # As _finish recorded it; a dial's command has moved from its placeholder to the call placed.
    command = Command.objects.get(pk=command.pk)
    call = Call.objects.select_for_update().get(pk=command.call_id)  # the lock, as for events
    kind = "command.failed" if failed else "command.succeeded"
    data = {
        "command_id": str(command.command_id),
        "action": command.action,
        "requested_by": command.requested_by,
        "attempts": command.attempts,
        "http_status": command.last_http_status,
        "reason": command.failure_reason,
        "error_code": command.error_code,
        "error_title": command.error_title,
        "settlement": command.settlement,
    }
    # Once per finish: _finish records an outcome once (a conditional UPDATE); an operator's
    # retry that finishes again is a new fact, at a new time.
    key = f"command:{command.pk}:{kind}:{at.isoformat()}"
    partner_events_record(call=call, facts=[Fact(kind, key, data, at)])
