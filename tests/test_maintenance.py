"""Scheduled maintenance: stale streams stopped once, what crashes left half-done repaired, old
rows purged, and the health checks that report it."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from functools import partial

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from callops import commands, maintenance, tasks
from callops.models import (
    Call,
    Command,
    DtmfDigit,
    Fork,
    IdempotencyRecord,
    MediaStream,
    Partner,
    PartnerConnection,
    StreamingProfile,
    TaskRun,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)
from config.celery_app import app
from tests.helpers import deliver, run_concurrently
from tests.telnyx_events import T0, envelope

HOUR = timedelta(hours=1)


def active_stream(call: Call, started_ago: timedelta, **fields) -> MediaStream:
    started = timezone.now() - started_ago
    deliver(
        envelope(
            "streaming.started",
            call.call_control_id,
            occurred_at=started,
            connection_id=call.connection_id,
            stream_url=fields.pop("stream_url", "wss://media.example.com/s"),
        )
    )
    stream = MediaStream.objects.filter(call=call).latest("started_at")
    if fields:
        MediaStream.objects.filter(pk=stream.pk).update(**fields)
        stream.refresh_from_db()
    return stream


@pytest.fixture
def call(db):
    return Call.objects.create(call_control_id="v3:m", connection_id="conn-m", status="answered")


@pytest.mark.django_db
def test_it_stops_a_stream_running_past_the_maximum(call, settings):
    settings.CALLOPS_MAX_STREAM_DURATION = 3600
    overdue = active_stream(call, 2 * HOUR, stream_id="st-9")
    fresh = active_stream(call, timedelta(minutes=5), stream_url="wss://other.example.com/s")
    assert overdue.stop_after == overdue.started_at + HOUR

    done = maintenance.sessions_stop_stale()
    assert done["over_duration"] == 1
    stop = Command.objects.get()
    assert (stop.action, stop.requested_by, stop.params, stop.stream_id) == (
        "streaming_stop",
        "schedule",
        {"stream_id": "st-9"},
        overdue.pk,
    )
    fresh.refresh_from_db()
    assert fresh.status == "active"


@pytest.mark.django_db
def test_a_partners_profile_sets_its_own_maximum(call, settings):
    settings.CALLOPS_MAX_STREAM_DURATION = 10 * 3600
    partner = Partner.objects.create(name="p")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-m")
    StreamingProfile.objects.create(
        partner=partner, stream_url="wss://x.example.com/", max_stream_duration=600
    )
    stream = active_stream(call, timedelta(minutes=11))
    assert stream.stop_after == stream.started_at + timedelta(minutes=10)
    assert maintenance.sessions_stop_stale()["over_duration"] == 1


@pytest.mark.django_db
def test_a_start_never_confirmed_is_failed_and_stopped(call, settings):
    settings.CALLOPS_START_GRACE = 60
    old = timezone.now() - timedelta(minutes=5)
    stuck = MediaStream.objects.create(
        call=call, stream_url="wss://a.example.com/", requested_at=old
    )
    fork = Fork.objects.create(
        call=call, target="udp:192.0.2.1:5000", stream_type="raw", requested_at=old
    )
    young = MediaStream.objects.create(call=call, stream_url="wss://b.example.com/")

    done = maintenance.sessions_stop_stale()
    assert done["never_started"] == 2
    stuck.refresh_from_db()
    assert (stuck.status, stuck.failure_reason) == ("failed", "never started")
    assert set(Command.objects.values_list("action", "requested_by")) == {
        ("streaming_stop", "schedule"),
        ("fork_stop", "schedule"),
    }
    assert Command.objects.get(action="fork_stop").params == {"stream_type": "raw"}
    young.refresh_from_db()
    fork.refresh_from_db()
    assert (young.status, fork.status) == ("requested", "failed")


STREAM = {"stream_url": "wss://media.example.com/s", "stream_track": "both_tracks"}


def start_stream(call: Call) -> Command:
    return commands.command_create(
        call=call, action="streaming_start", params=STREAM, requested_by="partner"
    )


def requested_long_ago(command: Command, ago: timedelta = HOUR) -> None:
    """Move a start's request into the past, as if Telnyx had rate-limited it for that long."""
    MediaStream.objects.filter(pk=command.stream_id).update(requested_at=timezone.now() - ago)


def test_a_start_still_retrying_after_429s_is_neither_failed_nor_stopped(
    telnyx, live_call, settings
):
    settings.CALLOPS_START_GRACE = 60
    start = start_stream(live_call)
    telnyx.inject(status=429, headers={"retry-after-ms": "300"})
    assert commands.command_process(command_pk=start.pk).outcome.kind == "retry"
    start.refresh_from_db()
    assert start.status == "queued" and start.next_attempt_at > timezone.now()
    requested_long_ago(start)

    done = maintenance.sessions_stop_stale()
    assert (done["never_started"], done["stops_sent"]) == (0, 0)
    assert MediaStream.objects.get().status == "requested"
    assert not Command.objects.filter(action="streaming_stop").exists()

    # Being sent (claimed by a worker) holds the sweeper off just the same.
    Command.objects.filter(pk=start.pk).update(status="sending")
    assert maintenance.sessions_stop_stale()["never_started"] == 0
    Command.objects.filter(pk=start.pk).update(status="queued")

    # Telnyx accepts it at last: its webhook gets the grace period from then, not from the
    # request, so the stop never overtakes the start.
    time.sleep(0.35)
    assert commands.command_process(command_pk=start.pk).outcome.kind == "succeeded"
    assert maintenance.sessions_stop_stale()["never_started"] == 0
    assert not Command.objects.filter(action="streaming_stop").exists()
    assert [r.action for r in telnyx.requests] == ["streaming_start", "streaming_start"]
    deliver(envelope("streaming.started", live_call.call_control_id, **STREAM))
    assert MediaStream.objects.get().status == "active"


def test_a_start_accepted_but_never_confirmed_is_failed_a_grace_period_after_its_answer(
    telnyx, live_call, settings
):
    settings.CALLOPS_START_GRACE = 60
    start = start_stream(live_call)
    assert commands.command_process(command_pk=start.pk).outcome.kind == "succeeded"
    requested_long_ago(start)
    Command.objects.filter(pk=start.pk).update(finished_at=timezone.now() - HOUR)

    assert maintenance.sessions_stop_stale()["never_started"] == 1
    stream = MediaStream.objects.get()
    assert (stream.status, stream.failure_reason) == ("failed", "never started")
    assert Command.objects.get(action="streaming_stop").stream_id == stream.pk


def test_a_start_that_gave_up_fails_its_record_itself_and_sends_no_stop(
    telnyx, live_call, settings
):
    settings.CALLOPS_START_GRACE = 60
    settings.TELNYX_COMMAND_MAX_ATTEMPTS = 1
    start = start_stream(live_call)
    telnyx.inject(status=429, headers={"retry-after-ms": "10"})
    commands.command_process(command_pk=start.pk)
    requested_long_ago(start)
    stream = MediaStream.objects.get()
    assert stream.status == "failed" and stream.failure_reason.startswith("gave up")
    # Telnyx never accepted it: nothing to stop.
    assert maintenance.sessions_stop_stale()["stops_sent"] == 0


@pytest.mark.django_db(transaction=True)
def test_a_start_confirmed_while_the_sweep_runs_is_neither_failed_nor_stopped(settings):
    """The started webhook is being applied (its drain holds the call) as the sweep finds the
    start overdue: the sweep leaves that call to the next run instead of failing a stream that
    has just started and sending it a stop."""
    settings.CALLOPS_START_GRACE = 60
    call = Call.objects.create(call_control_id="v3:race", status="answered")
    MediaStream.objects.create(
        call=call, stream_url=STREAM["stream_url"], requested_at=timezone.now() - HOUR
    )
    holding, swept = threading.Event(), threading.Event()

    def drain_holding_the_call():
        with transaction.atomic():
            Call.objects.select_for_update().get(pk=call.pk)
            holding.set()
            swept.wait(2)  # without waiting for the sweep for ever: it may be waiting for us
            deliver(envelope("streaming.started", "v3:race", **STREAM))

    def sweep():
        holding.wait(10)
        try:
            return maintenance.sessions_stop_stale()
        finally:
            swept.set()

    results, errors = run_concurrently(drain_holding_the_call, sweep)
    assert errors == []
    assert [r for r in results if r is not None][0]["never_started"] == 0
    assert MediaStream.objects.get().status == "active"
    assert not Command.objects.exists()
    assert maintenance.sessions_stop_stale()["never_started"] == 0


@pytest.mark.django_db
def test_sessions_left_open_on_an_ended_call_are_closed_without_a_command(call):
    ended_at = timezone.now() - timedelta(minutes=1)
    stream = MediaStream.objects.create(call=call, status="active", started_at=ended_at - HOUR)
    transcription = Transcription.objects.create(
        call=call, status="active", started_at=ended_at - HOUR
    )
    Call.objects.filter(pk=call.pk).update(status="ended", ended_at=ended_at)

    assert maintenance.sessions_stop_stale()["closed_on_ended_call"] == 2
    stream.refresh_from_db()
    transcription.refresh_from_db()
    assert (stream.status, stream.stopped_at) == ("stopped", ended_at)
    assert transcription.status == "stopped"
    assert not Command.objects.exists()


@pytest.mark.django_db
def test_a_stop_is_not_sent_again_while_one_is_in_flight_or_accepted(call, settings):
    settings.CALLOPS_MAX_STREAM_DURATION = 60
    active_stream(call, HOUR)
    maintenance.sessions_stop_stale()
    maintenance.sessions_stop_stale()
    assert Command.objects.count() == 1
    Command.objects.update(status="succeeded")  # Telnyx accepted; its webhook is on its way
    maintenance.sessions_stop_stale()
    assert Command.objects.count() == 1
    Command.objects.update(status="failed")  # refused: the next sweep tries again
    maintenance.sessions_stop_stale()
    assert Command.objects.count() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sweep", [tasks.stop_stale_sessions, maintenance._sweep])
def test_two_sweeps_at_once_send_one_stop_per_stream(settings, sweep):
    settings.CALLOPS_MAX_STREAM_DURATION = 60
    streams = []
    for index in range(5):
        call = Call.objects.create(call_control_id=f"v3:race-{index}", status="answered")
        streams.append(active_stream(call, HOUR))
    run = partial(sweep, 500) if sweep is maintenance._sweep else sweep
    _, errors = run_concurrently(run, run)
    assert errors == []
    assert Command.objects.filter(action="streaming_stop").count() == 5
    assert {c.stream_id for c in Command.objects.all()} == {s.pk for s in streams}


NOTHING_PURGED = {
    "webhook_events": 0,
    "failed_webhook_events": 0,
    "transcript_segments": 0,
    "idempotency_records": 0,
    "batches": 0,
}


def old_event(name: str, status: str, age: timedelta) -> WebhookEvent:
    now = timezone.now()
    return WebhookEvent.objects.create(
        event_id=name,
        event_type="call.answered",
        occurred_at=now,
        payload={},
        status=status,
        received_at=now - age,
    )


def old_segment(call: Call, age: timedelta, **fields) -> TranscriptSegment:
    transcription = Transcription.objects.filter(call=call).first()
    return TranscriptSegment.objects.create(
        call=call,
        transcription=transcription or Transcription.objects.create(call=call),
        occurred_at=timezone.now() - age,
        **fields,
    )


@pytest.mark.django_db
def test_the_purge_deletes_each_kind_past_its_retention_and_keeps_the_rest(call, settings):
    settings.CALLOPS_EVENT_RETENTION_DAYS = 30
    settings.CALLOPS_FAILED_EVENT_RETENTION_DAYS = 90
    settings.CALLOPS_SEGMENT_RETENTION_DAYS = 60
    settings.CALLOPS_IDEMPOTENCY_RETENTION_HOURS = 24
    day = timedelta(days=1)
    for name, status, age in [
        ("processed-old", "processed", 31 * day),
        ("processed-young", "processed", 29 * day),
        ("ignored-old", "ignored", 31 * day),
        ("failed-old", "failed", 91 * day),
        ("failed-young", "failed", 89 * day),  # past the processed events' 30 days: kept
        ("pending-ancient", "pending", 1000 * day),  # waits to be applied, never purged
    ]:
        old_event(name, status, age)
    for age_days in (61, 59):
        old_segment(call, age_days * day, transcript=f"{age_days} days")
    partner = Partner.objects.create(name="p")
    for key, age in [("key-old", 25 * HOUR), ("key-young", 23 * HOUR)]:
        IdempotencyRecord.objects.create(
            partner=partner, key=key, request_fingerprint="f", created_at=timezone.now() - age
        )

    assert maintenance.records_purge() == {
        "webhook_events": 2,
        "failed_webhook_events": 1,
        "transcript_segments": 1,
        "idempotency_records": 1,
        "batches": 4,
    }
    assert set(WebhookEvent.objects.values_list("event_id", flat=True)) == {
        "processed-young",
        "failed-young",
        "pending-ancient",
    }
    assert list(TranscriptSegment.objects.values_list("transcript", flat=True)) == ["59 days"]
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["key-young"]
    assert maintenance.records_purge() == NOTHING_PURGED


@pytest.mark.django_db
def test_a_purge_larger_than_a_batch_deletes_everything_one_batch_per_statement(call, settings):
    settings.CALLOPS_PURGE_BATCH = 3
    settings.CALLOPS_SEGMENT_RETENTION_DAYS = 1
    for _ in range(10):
        old_segment(call, timedelta(days=2))
    kept = old_segment(call, HOUR)

    with CaptureQueriesContext(connection) as queries:
        done = maintenance.records_purge()
    assert (done["transcript_segments"], done["batches"]) == (10, 4)
    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 4  # 3 + 3 + 3 + 1, each in its own transaction
    assert list(TranscriptSegment.objects.all()) == [kept]


@pytest.mark.django_db
def test_a_purged_event_leaves_its_segment_and_digit_in_place(call, settings):
    settings.CALLOPS_EVENT_RETENTION_DAYS = 30
    settings.CALLOPS_PURGE_BATCH = 2
    events = [old_event(f"e{i}", "processed", timedelta(days=40)) for i in range(3)]
    segment = old_segment(call, timedelta(days=1), event=events[0])
    digit = DtmfDigit.objects.create(
        call=call, digit="5", occurred_at=timezone.now(), event=events[2]
    )

    assert maintenance.records_purge()["webhook_events"] == 3
    segment.refresh_from_db()
    digit.refresh_from_db()
    assert (segment.event_id, digit.event_id) == (None, None)
    assert not WebhookEvent.objects.exists()


@pytest.mark.django_db
def test_each_periodic_task_records_its_runs(call, settings):
    settings.CALLOPS_MAX_STREAM_DURATION = 60
    active_stream(call, HOUR)
    tasks.stop_stale_sessions()
    run = TaskRun.objects.get(name="stop_stale_sessions")
    assert run.runs == 1 and run.last_finished_at is not None
    assert run.last_result["over_duration"] == 1
    tasks.purge_old_records()
    assert TaskRun.objects.get(name="purge_old_records").last_result == NOTHING_PURGED


@pytest.mark.django_db
def test_the_default_schedules_exist_and_name_real_tasks():
    scheduled = dict(PeriodicTask.objects.values_list("task", "interval__every"))
    assert scheduled["callops.tasks.stop_stale_sessions"] == 60
    for task in (
        "sweep_pending_webhook_events",
        "repair_stuck_commands",
        "purge_old_records",
        "beat_heartbeat",
    ):
        assert f"callops.tasks.{task}" in scheduled
    for name in scheduled:
        assert name in app.tasks, name


def test_healthz_is_liveness_only(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_needs_database_broker_and_a_fresh_heartbeat(client, settings):
    settings.CALLOPS_READYZ_TOKEN = "ops-token"
    client.defaults["HTTP_AUTHORIZATION"] = "Bearer ops-token"  # the details are for operators
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "ok",
        "broker": "ok",
        "beat": "no heartbeat yet",
    }
    tasks.beat_heartbeat()
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert "beat_heartbeat" in ready.json()["tasks"]
    TaskRun.objects.update(last_finished_at=timezone.now() - timedelta(minutes=4))
    stale = client.get("/readyz").json()["checks"]["beat"]
    assert stale.startswith("last heartbeat 24")


@pytest.mark.django_db
def test_readyz_reports_a_broker_outage(client, broker_down, settings):
    settings.CALLOPS_READYZ_TOKEN = "ops-token"
    tasks.beat_heartbeat()
    response = client.get("/readyz", HTTP_AUTHORIZATION="Bearer ops-token")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("unavailable")


def test_a_hangup_before_the_sweep_leaves_nothing_to_stop(db, settings):
    settings.CALLOPS_MAX_STREAM_DURATION = 60
    call = Call.objects.create(call_control_id="v3:h", status="answered")
    active_stream(call, HOUR)
    deliver(envelope("call.hangup", "v3:h", occurred_at=T0 + timedelta(days=1000)))
    assert maintenance.sessions_stop_stale() == {
        "closed_on_ended_call": 0,
        "never_started": 0,
        "over_duration": 0,
        "stops_sent": 0,
    }


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_beat_runs_the_schedules_from_the_database(worker_processes, settings):
    """celery beat, as a process, reads django-celery-beat's schedule and a worker runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from django_celery_beat.models import IntervalSchedule

    from tests.helpers import wait_for

    every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period="seconds")
    PeriodicTask.objects.update_or_create(
        name="callops: beat heartbeat",
        defaults={"task": "callops.tasks.beat_heartbeat", "interval": every_second},
    )
    worker_processes(count=1, concurrency=1)
    db = connection.settings_dict
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"],
        cwd=Path(__file__).resolve().parent.parent,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": settings.CELERY_BROKER_URL,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run = wait_for(
            lambda: TaskRun.objects.filter(name="beat_heartbeat", runs__gte=2).first(),
            timeout=30,
        )
    finally:
        beat.terminate()
        beat.wait(10)
    assert run.last_result == "ok"
