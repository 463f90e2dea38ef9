"""Applying events: the records end up the same whatever order and however often they arrive."""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from functools import partial

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from callops import events, webhooks
from callops.models import Call, MediaStream, WebhookEvent
from tests.helpers import deliver, run_concurrently
from tests.telnyx_events import T0, call_life, dumps, envelope


def snapshot(call_control_id: str) -> dict:
    """Everything events decide about a call, with ids that differ between calls normalised."""

    def norm(value):
        return value.replace(call_control_id, "CALL") if isinstance(value, str) else value

    call = Call.objects.get(call_control_id=call_control_id)
    skip = {"id", "created_at", "updated_at"}
    state = {f.name: norm(getattr(call, f.name)) for f in Call._meta.fields if f.name not in skip}
    for name, related in (
        ("streams", call.streams),
        ("forks", call.forks),
        ("transcriptions", call.transcriptions),
    ):
        fields = [f.name for f in related.model._meta.fields if f.name not in skip | {"call"}]
        state[name] = sorted(tuple(str(getattr(o, f)) for f in fields) for o in related.all())
    state["dtmf"] = sorted((d.digit, d.occurred_at) for d in call.dtmf.all())
    state["segments"] = sorted(
        (s.transcript, s.confidence, s.is_final, s.track, s.occurred_at, s.transcription.started_at)
        for s in call.segments.select_related("transcription")
    )
    return state


@pytest.mark.django_db
def test_it_applies_a_call_in_order():
    for event in call_life("v3:in-order"):
        deliver(event)
    call = Call.objects.get(call_control_id="v3:in-order")
    assert call.status == "ended"
    assert call.direction == "incoming"
    assert (call.started_at, call.answered_at, call.ended_at) == (
        T0,
        T0 + timedelta(seconds=2),
        T0 + timedelta(seconds=20),
    )
    assert (call.hangup_cause, call.hangup_source) == ("normal_clearing", "caller")
    assert base64.b64decode(call.client_state) == b"hungup"
    first, second = call.streams.order_by("started_at")
    assert (first.status, first.started_at, first.stopped_at) == (
        "stopped",
        T0 + timedelta(seconds=3),
        T0 + timedelta(seconds=9),
    )
    assert (second.status, second.stream_id, second.failure_reason) == (
        "failed",
        "st-2",
        "connection refused",
    )
    fork = call.forks.get()
    assert (fork.status, fork.stream_type, fork.stopped_at) == (
        "stopped",
        "raw",
        T0 + timedelta(seconds=20),
    )
    transcription = call.transcriptions.get()
    assert (transcription.status, transcription.stopped_at) == ("stopped", call.ended_at)
    assert list(call.segments.values_list("transcript", "is_final")) == [
        ("hello", False),
        ("hello there", True),
        ("bye", True),
    ]
    statuses = dict(WebhookEvent.objects.values_list("event_type", "status").distinct())
    assert statuses["call.dtmf.received"] == "processed"
    assert list(call.dtmf.values_list("digit", "occurred_at")) == [("5", T0 + timedelta(seconds=7))]
    assert statuses["call.hangup"] == "processed"


def deliver_as_planned(life: list[dict], plan) -> None:
    """Deliver the events in the plan's order, replaying the chosen ones once applied."""
    order, replays = plan
    for position, index in enumerate(order):
        deliver(life[index])
        if position in replays:
            # An operator replay applies an already-processed event a second time.
            stored = WebhookEvent.objects.get(event_id=life[index]["data"]["id"])
            events.events_replay(event_ids=[stored.pk])
            events.events_drain()


@st.composite
def deliveries(draw, count: int):
    """A permutation of every event, with some delivered again, and some applied twice."""
    duplicates = draw(st.lists(st.integers(0, count - 1), max_size=count))
    order = draw(st.permutations(list(range(count)) + duplicates))
    replays = draw(st.sets(st.integers(0, len(order) - 1), max_size=4))
    return order, replays


@pytest.mark.django_db
@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(deliveries(len(call_life())))
def test_it_reaches_the_in_order_state_from_any_order(plan):
    reference_id, shuffled_id = f"v3:ref-{uuid.uuid4()}", f"v3:perm-{uuid.uuid4()}"
    for event in call_life(reference_id):
        deliver(event)

    deliver_as_planned(call_life(shuffled_id), plan)
    assert snapshot(shuffled_id) == snapshot(reference_id)


def two_streams_life(call_control_id: str) -> list[dict]:
    """Two streams to the same URL, one after the other, then the hang-up."""
    url = "wss://media.example.com/again"

    def at(seconds: float):
        return T0 + timedelta(seconds=seconds)

    return [
        envelope("call.answered", call_control_id, occurred_at=at(1)),
        envelope("streaming.started", call_control_id, occurred_at=at(3), stream_url=url),
        envelope("streaming.stopped", call_control_id, occurred_at=at(6), stream_url=url),
        envelope("streaming.started", call_control_id, occurred_at=at(8), stream_url=url),
        envelope("streaming.stopped", call_control_id, occurred_at=at(12), stream_url=url),
        envelope(
            "call.hangup", call_control_id, occurred_at=at(20), hangup_cause="normal_clearing"
        ),
    ]


@pytest.mark.django_db
@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(deliveries(len(two_streams_life("x"))), st.booleans())
def test_successive_streams_to_one_url_pair_up_in_any_order(plan, requested_first):
    ccid = f"v3:two-{uuid.uuid4()}"
    if requested_first:  # both started by commands: their records wait for their webhooks
        call = Call.objects.create(call_control_id=ccid)
        for seconds in (2, 7):
            MediaStream.objects.create(
                call=call,
                stream_url="wss://media.example.com/again",
                requested_at=T0 + timedelta(seconds=seconds),
            )
    deliver_as_planned(two_streams_life(ccid), plan)

    streams = MediaStream.objects.filter(call__call_control_id=ccid).order_by("started_at")
    assert [(s.status, s.started_at, s.stopped_at) for s in streams] == [
        ("stopped", T0 + timedelta(seconds=3), T0 + timedelta(seconds=6)),
        ("stopped", T0 + timedelta(seconds=8), T0 + timedelta(seconds=12)),
    ]


@pytest.mark.django_db
def test_it_creates_the_call_from_any_first_event():
    deliver(envelope("streaming.started", "v3:late", stream_url="wss://x.example.com/"))
    call = Call.objects.get(call_control_id="v3:late")
    assert call.status == "initiated"
    assert call.connection_id == "conn-1"
    assert call.streams.get().status == "active"


@pytest.mark.django_db
def test_it_never_reopens_a_terminal_call():
    deliver(envelope("call.hangup", "v3:t", occurred_at=T0 + timedelta(seconds=5)))
    deliver(envelope("call.answered", "v3:t", occurred_at=T0 + timedelta(seconds=1)))
    call = Call.objects.get(call_control_id="v3:t")
    assert (call.status, call.answered_at) == ("ended", T0 + timedelta(seconds=1))


@pytest.mark.django_db
def test_a_later_client_state_wins_whatever_the_order():
    late = envelope(
        "call.answered", "v3:cs", occurred_at=T0 + timedelta(seconds=9), client_state="bGF0ZQ=="
    )
    early = envelope("call.initiated", "v3:cs", occurred_at=T0, client_state="ZWFybHk=")
    deliver(late)
    deliver(early)
    assert Call.objects.get(call_control_id="v3:cs").client_state == "bGF0ZQ=="


@pytest.mark.django_db
def test_it_marks_a_malformed_event_failed_and_a_replay_applies_it_once_fixed():
    event = envelope("call.transcription", "v3:bad", transcription_data="oops")
    deliver(event)
    stored = WebhookEvent.objects.get()
    assert stored.status == "failed"
    assert "transcription_data" in stored.error
    # The handler's writes were rolled back to its savepoint; the event row kept the verdict.
    assert not Call.objects.filter(call_control_id="v3:bad").exists()

    stored.payload["data"]["payload"]["transcription_data"] = {"transcript": "ok"}
    stored.save(update_fields=["payload"])
    events.events_replay(event_ids=[stored.pk])
    events.events_drain()
    stored.refresh_from_db()
    assert (stored.status, stored.error) == ("processed", "")
    assert Call.objects.get(call_control_id="v3:bad").segments.get().transcript == "ok"


@pytest.mark.django_db
def test_an_event_without_a_call_control_id_fails_with_a_reason():
    event = envelope("call.answered")
    del event["data"]["payload"]["call_control_id"]
    deliver(event)
    stored = WebhookEvent.objects.get()
    assert stored.status == "failed"
    assert "call_control_id" in stored.error


def apply_by_id(pk: int) -> None:
    """Apply one stored event under its row lock, as a drain does, in this thread."""
    with transaction.atomic():
        events.event_process(event=WebhookEvent.objects.select_for_update().get(pk=pk))


@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_lose_no_update_on_postgresql():
    assert connection.vendor == "postgresql"
    for round_ in range(5):
        reference, racing = f"v3:ref-{round_}", f"v3:race-{round_}"
        for event in call_life(reference):
            deliver(event)
        stored_ids = []
        for event in call_life(racing):
            parsed = webhooks.parse_event(dumps(event))
            webhooks.store_event(parsed, handled=events.has_handler(parsed.event_type))
            stored_ids.append(WebhookEvent.objects.get(event_id=parsed.event_id).pk)

        _, errors = run_concurrently(*(partial(apply_by_id, pk) for pk in stored_ids))
        assert errors == []
        assert not WebhookEvent.objects.filter(pk__in=stored_ids, status="failed").exists()
        assert Call.objects.filter(call_control_id=racing).count() == 1
        assert snapshot(racing) == snapshot(reference)


@pytest.mark.django_db(transaction=True)
def test_concurrent_drains_apply_each_event_once():
    for index in range(3):
        for event in call_life(f"v3:drain-{index}"):
            parsed = webhooks.parse_event(dumps(event))
            webhooks.store_event(parsed, handled=events.has_handler(parsed.event_type))
    counts, errors = run_concurrently(*[partial(events.events_drain, limit=1000)] * 4)
    assert errors == []
    handled = WebhookEvent.objects.count()
    assert sum(counts) == handled
    assert not WebhookEvent.objects.filter(status="pending").exists()
    assert MediaStream.objects.count() == 6


@pytest.mark.django_db
def test_a_backlog_applies_the_calls_lifecycle_before_transcripts():
    segment = {"transcript": "hi", "is_final": True}
    for index in range(5):
        event = envelope("call.transcription", "v3:busy", transcription_data=segment)
        webhooks.store_event(webhooks.parse_event(dumps(event)), handled=True)
    hangup = envelope("call.hangup", "v3:busy", hangup_cause="normal_clearing")
    webhooks.store_event(webhooks.parse_event(dumps(hangup)), handled=True)
    assert events.events_drain(limit=1) == 1
    assert list(
        WebhookEvent.objects.filter(status="processed").values_list("event_type", flat=True)
    ) == ["call.hangup"]
    assert Call.objects.get().status == "ended"
