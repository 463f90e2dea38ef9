"""Applying events: the records end up the same whatever order and however often they arrive."""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from functools import partial

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from callops import drain, events, tasks, webhooks
from callops.models import Call, MediaStream, Transcription, TranscriptSegment, WebhookEvent
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


def store(event: dict) -> int:
    parsed = webhooks.parse_event(dumps(event))
    webhooks.store_event(parsed, handled=events.has_handler(parsed.event_type))
    return WebhookEvent.objects.get(event_id=parsed.event_id).pk


def segment_event(ccid: str, transcript: str, at_second: int) -> dict:
    return envelope(
        "call.transcription",
        ccid,
        occurred_at=T0 + timedelta(seconds=at_second),
        transcription_data={"transcript": transcript, "is_final": True},
    )


@pytest.mark.django_db
def test_a_drain_applies_segments_in_a_few_queries_however_many_there_are(settings):
    """Transcript segments are most of the traffic: claiming, loading, writing and marking
    them costs the same queries for 10 of them as for 60."""
    settings.CALLOPS_DRAIN_CLAIM = settings.CALLOPS_DRAIN_BATCH = 500
    calls = [f"v3:bulk-{i}" for i in range(5)]
    for ccid in calls:  # the calls and their transcriptions exist, as mid-call
        store(segment_event(ccid, "first", 1))
    events.events_drain()

    def queries_to_apply(per_call: int, offset: int) -> int:
        for ccid in calls:
            for k in range(per_call):
                store(segment_event(ccid, f"words {k}", offset + k))
        with CaptureQueriesContext(connection) as queries:
            assert events.events_drain() == per_call * len(calls)
        return len(queries)

    few, many = queries_to_apply(2, 10), queries_to_apply(12, 100)
    assert few == many <= 14
    assert not WebhookEvent.objects.exclude(status="processed").exists()
    assert TranscriptSegment.objects.count() == 5 * (1 + 2 + 12)
    assert Transcription.objects.filter(status="active").count() == 5


@pytest.mark.django_db
def test_a_row_that_cannot_be_loaded_is_marked_failed_and_the_drain_goes_on():
    """PostgreSQL holds times past Python's year 9999; such a row must not stop every drain."""
    bad = store(envelope("call.answered", "v3:far"))
    good = store(envelope("call.answered", "v3:near"))
    WebhookEvent.objects.filter(pk=bad).update(occurred_at=T0)  # then past year 9999, in SQL:
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {WebhookEvent._meta.db_table} SET occurred_at = "  # noqa: S608
            "'9999-12-31 23:00:00-05:00' WHERE id = %s",
            [bad],
        )
    assert events.events_drain() == 1
    statuses = dict(WebhookEvent.objects.values_list("pk", "status"))
    assert statuses == {bad: "failed", good: "processed"}
    error = WebhookEvent.objects.filter(pk=bad).values_list("error", flat=True).get()
    assert error.startswith("cannot load the stored event")
    assert Call.objects.get(call_control_id="v3:near").status == "answered"
    assert not WebhookEvent.objects.filter(status="pending").exists()


@pytest.mark.django_db
def test_a_segment_the_database_refuses_fails_alone_and_the_batch_lands():
    with connection.cursor() as cursor:  # a real refusal by the database, undone with the test
        cursor.execute(
            f"ALTER TABLE {TranscriptSegment._meta.db_table} ADD CONSTRAINT test_no_poison"
            " CHECK (transcript <> 'poison')"
        )
    ok = [store(segment_event("v3:a", "fine", 1)), store(segment_event("v3:b", "also fine", 2))]
    poison = store(segment_event("v3:a", "poison", 3))
    events.events_drain()
    statuses = dict(WebhookEvent.objects.values_list("pk", "status"))
    assert statuses == {ok[0]: "processed", ok[1]: "processed", poison: "failed"}
    assert "test_no_poison" in WebhookEvent.objects.get(pk=poison).error
    assert sorted(TranscriptSegment.objects.values_list("transcript", flat=True)) == [
        "also fine",
        "fine",
    ]
    # The refused segment's merge was rolled back with it: the call heard last at 1 s, not 3 s.
    assert Call.objects.get(call_control_id="v3:a").last_event_at == T0 + timedelta(seconds=1)


@pytest.mark.django_db
def test_an_urgent_drain_applies_what_a_caller_waits_on_and_leaves_the_rest():
    """The commands' worker runs it: it must stay short, whatever else is pending."""
    segment = store(segment_event("v3:urgent", "hello", 1))
    hangup = store(envelope("call.hangup", "v3:other", hangup_cause="normal_clearing"))
    initiated = store(envelope("call.initiated", "v3:urgent", direction="incoming"))
    assert tasks.drain_urgent_events.run(drain.shard_of("v3:urgent")) == 1
    statuses = dict(WebhookEvent.objects.values_list("pk", "status"))
    assert statuses == {initiated: "processed", segment: "pending", hangup: "pending"}


@pytest.mark.django_db
def test_a_streams_start_and_stop_in_one_batch_are_paired():
    """Verdicts are written at the end of a batch: the stop must still see the start that the
    same batch applied before it, or it would record a stream that never started."""
    url = "wss://media.example.com/s"
    store(envelope("streaming.started", "v3:one-batch", stream_url=url, occurred_at=T0))
    later = T0 + timedelta(seconds=5)
    store(envelope("streaming.stopped", "v3:one-batch", stream_url=url, occurred_at=later))
    assert events.events_drain() == 2
    stream = MediaStream.objects.get(call__call_control_id="v3:one-batch")
    assert (stream.started_at, stream.stopped_at, stream.status) == (T0, later, "stopped")
