"""The command outbox: validation, sending with the real SDK, and what each answer means."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from callops import commands
from callops.commands import CallEnded, Outcome, classify, command_create, server_wait
from callops.models import Call, Command, MediaStream, Transcription
from callops.ratelimit import get_limiter
from callops.telnyx_params import ParamsInvalid
from tests.helpers import deliver
from tests.telnyx_events import envelope

STREAM = {"stream_url": "wss://media.example.com/s", "stream_track": "both_tracks"}


def create(call, action="streaming_start", params=None, **kwargs) -> Command:
    return command_create(
        call=call,
        action=action,
        params=STREAM if params is None and action == "streaming_start" else params,
        requested_by=kwargs.pop("requested_by", "operator"),
        **kwargs,
    )


def process(command: Command) -> commands.Next:
    return commands.command_process(command_pk=command.pk)


def drive(command: Command) -> commands.Next:
    """What the task does: come back at each rate-limit turn until there is an outcome."""
    step = commands.command_process(command_pk=command.pk)
    while step.outcome is None and step.delay is not None:
        time.sleep(step.delay)
        step = commands.command_process(command_pk=command.pk, reserved_at=step.reserved_at)
    return step


# --- Validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "params", "field"),
    [
        ("streaming_start", {}, "stream_url"),
        ("streaming_start", {"stream_url": "https://x.example.com"}, "stream_url"),
        ("streaming_start", {"stream_url": "ws://x.example.com"}, "stream_url"),
        ("streaming_start", {**STREAM, "stream_track": "both"}, "stream_track"),
        ("streaming_start", {**STREAM, "stream_codec": "MP3"}, "stream_codec"),
        ("streaming_start", {**STREAM, "stream_auth_token": "t" * 4001}, "stream_auth_token"),
        (
            "streaming_start",
            {**STREAM, "stream_bidirectional_codec": "PCMU"},
            "stream_bidirectional_codec",
        ),
        (
            "streaming_start",
            {
                **STREAM,
                "stream_bidirectional_mode": "rtp",
                "stream_bidirectional_sampling_rate": 11025,
            },
            "stream_bidirectional_sampling_rate",
        ),
        (
            "streaming_start",
            {**STREAM, "stream_bidirectional_target_legs": "all"},
            "stream_bidirectional_target_legs",
        ),
        ("streaming_start", {**STREAM, "custom_parameters": [{"name": "a"}]}, "custom_parameters"),
        ("streaming_start", {**STREAM, "surprise": 1}, "surprise"),
        ("fork_start", {}, "target"),
        ("fork_start", {"rx": "udp:10.0.0.1:5000"}, "target"),
        (
            "fork_start",
            {"target": "udp:10.0.0.1:5000", "rx": "udp:10.0.0.1:5001", "tx": "udp:10.0.0.1:5002"},
            "target",
        ),
        ("fork_start", {"target": "tcp:10.0.0.1:5000"}, "target"),
        ("fork_start", {"target": "udp:10.0.0.1:70000"}, "target"),
        ("fork_start", {"target": "udp:10.0.0.1:5000", "stream_type": "decrypted"}, "stream_type"),
        ("fork_stop", {"stream_type": "mixed"}, "stream_type"),
        ("transcription_start", {"transcription_engine": "Whisper"}, "transcription_engine"),
        ("transcription_start", {"transcription_tracks": "all"}, "transcription_tracks"),
        ("transcription_start", {"transcription_engine": "Azure"}, "transcription_engine_config"),
        (
            "transcription_start",
            {"transcription_engine_config": "en"},
            "transcription_engine_config",
        ),
        ("streaming_stop", {"stream_id": ""}, "stream_id"),
        ("hold", {}, "action"),
    ],
)
def test_it_refuses_parameters_telnyx_would_refuse(live_call, action, params, field):
    with pytest.raises(ParamsInvalid) as refused:
        create(live_call, action, params)
    assert field in refused.value.errors
    assert not Command.objects.exists()
    assert not MediaStream.objects.exists()


@pytest.mark.parametrize("state", ["not base64!", "x" * 5000])
def test_it_refuses_a_bad_client_state(live_call, state):
    with pytest.raises(ParamsInvalid) as refused:
        create(live_call, client_state=state)
    assert "client_state" in refused.value.errors


def test_it_refuses_a_command_on_an_ended_call(live_call):
    Call.objects.filter(pk=live_call.pk).update(status="ended")
    with pytest.raises(CallEnded):
        create(live_call)
    assert not Command.objects.exists()


def test_it_records_the_intent_and_enqueues_after_commit(
    live_call, django_capture_on_commit_callbacks, monkeypatch
):
    enqueued = []
    monkeypatch.setattr(commands, "command_enqueue", lambda **kw: enqueued.append(kw))
    with django_capture_on_commit_callbacks() as callbacks:
        command = create(live_call, client_state="c3RhdGU=")
        assert enqueued == []  # nothing leaves before the transaction commits
    for callback in callbacks:
        callback()
    assert enqueued == [{"command_pk": command.pk}]
    assert command.status == "queued"
    assert command.stream.status == "requested"
    assert command.stream.stream_url == STREAM["stream_url"]
    assert command.params == STREAM


def test_start_commands_record_forks_and_transcriptions(live_call):
    fork = create(live_call, "fork_start", {"rx": "udp:192.0.2.1:5000", "tx": "udp:192.0.2.1:5001"})
    assert (fork.fork.rx, fork.fork.status) == ("udp:192.0.2.1:5000", "requested")
    transcription = create(
        live_call,
        "transcription_start",
        {"transcription_engine": "Azure", "transcription_engine_config": {"region": "eastus"}},
    )
    assert transcription.transcription.engine == "Azure"


# --- Classification -----------------------------------------------------------------------


def test_server_wait_reads_each_header():
    assert server_wait({"retry-after-ms": "1500"}) == 1.5
    assert server_wait({"retry-after": "3"}) == 3.0
    assert server_wait({"retry-after": "Thu, 01 Jan 2099 00:00:00 GMT"}) == 300.0
    assert server_wait({"x-ratelimit-reset": "2"}) == 2.0
    assert server_wait({"x-ratelimit-reset": str(time.time() + 4)}) == pytest.approx(4, abs=0.1)
    assert server_wait({"retry-after": "soon"}) is None
    assert server_wait({}) is None


def test_backoff_is_jittered_exponential_and_capped(settings):
    settings.TELNYX_BACKOFF_BASE, settings.TELNYX_BACKOFF_CAP = 1.0, 8.0
    samples = {attempt: [commands.backoff(attempt) for _ in range(300)] for attempt in (1, 3, 9)}
    assert max(samples[1]) <= 1.0 and max(samples[3]) <= 4.0 and max(samples[9]) <= 8.0
    assert max(samples[9]) > 4.0 and min(samples[9]) < 4.0  # full jitter, not a fixed delay


def _raise(telnyx, action="streaming_start", **fault):
    """What the real SDK raises for one injected answer of the simulator."""
    import telnyx as sdk

    telnyx.inject(**fault)
    client = sdk.Telnyx(api_key=telnyx.api_key, base_url=telnyx.base_url, max_retries=0, timeout=1)
    try:
        client.calls.actions.start_streaming("v3:c", stream_url="wss://a.example.com")
    except Exception as exc:
        return exc
    return None


@pytest.mark.parametrize(
    ("fault", "kind", "reason"),
    [
        ({"status": 429, "headers": {"retry-after-ms": "700"}}, "retry", "rate limited"),
        ({"status": 500}, "retry", "HTTP 500"),
        ({"status": 503}, "retry", "HTTP 503"),
        ({"status": 408}, "retry", "HTTP 408"),
        ({"status": 409}, "retry", "HTTP 409"),
        ({"drop": True}, "retry", "connection error"),
        ({"status": 200, "delay": 1.5}, "retry", "timeout"),
        (
            {
                "status": 422,
                "body": {"errors": [{"code": "90018", "title": "Call has already ended"}]},
            },
            "call_ended",
            "call ended",
        ),
        (
            {
                "status": 422,
                "body": {"errors": [{"code": "90015", "title": "Invalid Call Control ID"}]},
            },
            "failed",
            "refused by Telnyx (HTTP 422)",
        ),
        ({"status": 401}, "failed", "refused by Telnyx (HTTP 401)"),
        ({"status": 403}, "failed", "refused by Telnyx (HTTP 403)"),
        ({"status": 404}, "failed", "refused by Telnyx (HTTP 404)"),
    ],
)
def test_classify_decides_every_answer(telnyx, fault, kind, reason):
    outcome = classify(_raise(telnyx, **fault), attempt=1)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    if fault.get("status") == 429:
        assert (outcome.delay, outcome.pause) == (0.7, 0.7)


def test_classify_keeps_telnyx_error_fields(telnyx):
    body = {"errors": [{"code": "90018", "title": "Call has already ended", "detail": "gone"}]}
    outcome = classify(_raise(telnyx, status=422, body=body), attempt=1)
    assert (outcome.http_status, outcome.code, outcome.title, outcome.detail) == (
        422,
        "90018",
        "Call has already ended",
        "gone",
    )


def test_classify_calls_success_success():
    assert classify(None, attempt=1) == Outcome("succeeded", http_status=200)


# --- Sending through the real SDK to the simulator -----------------------------------------


def test_it_sends_a_command_once_with_its_command_id(telnyx, live_call):
    command = create(live_call, client_state="c3RhdGU=")
    step = process(command)
    command.refresh_from_db()
    assert (command.status, step.delay, command.attempts) == ("succeeded", None, 1)
    (record,) = telnyx.commands(action="streaming_start")
    assert record.command_id == str(command.command_id)
    assert record.body["stream_url"] == STREAM["stream_url"]
    assert record.body["client_state"] == "c3RhdGU="
    assert record.call_control_id == "v3:live-call"
    # A succeeded command is never sent again, however often its message is delivered.
    assert process(command).delay is None
    assert len(telnyx.requests) == 1


def fields_of(record) -> dict:
    return {f.attname: getattr(record, f.attname) for f in record._meta.concrete_fields}


# PostgreSQL's one statement runs prepared (callops.prepared), which connection.queries omits.
@pytest.mark.parametrize(("vendor", "statements"), [("postgresql", 0), ("portable", 2)])
def test_a_claim_takes_the_command_once_with_its_call(live_call, monkeypatch, vendor, statements):
    """PostgreSQL claims in one statement that returns the command and its call; any other
    database (SQLite under ./bin/run) through the ORM. Either way: the row as stored, once."""
    params = {**STREAM, "custom_parameters": [{"name": "tenant", "value": "a"}]}
    command = create(live_call, params=params, client_state="c3RhdGU=")
    if vendor != "postgresql":  # no backend has "as_portable" SQL: the ORM's own is compiled
        monkeypatch.setattr(connection, "vendor", vendor)
    with CaptureQueriesContext(connection) as queries:
        claimed = commands.command_claim(command_pk=command.pk)
    assert len(queries) == statements
    assert commands.command_claim(command_pk=command.pk) is None  # held while its lease runs
    monkeypatch.undo()
    stored = Command.objects.get(pk=command.pk)
    assert (stored.status, stored.attempts, stored.outcome_unknown) == ("sending", 1, False)
    assert stored.first_sent_at == stored.sent_at < stored.lease_expires_at
    assert fields_of(claimed) == fields_of(stored)
    assert claimed.params == params  # JSON as a dict, not its text
    with CaptureQueriesContext(connection) as queries:
        assert fields_of(claimed.call) == fields_of(Call.objects.get(pk=live_call.pk))
    assert len(queries) == 1  # the comparison's own: the call came with the claim


def test_a_lapsed_lease_is_taken_over_with_its_outcome_unknown(live_call):
    command = create(live_call)
    commands.command_claim(command_pk=command.pk)
    Command.objects.filter(pk=command.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    taken = commands.command_claim(command_pk=command.pk)
    assert (taken.status, taken.attempts, taken.outcome_unknown) == ("sending", 2, True)
    assert taken.first_sent_at < taken.sent_at  # Telnyx's window counts from the first send


def test_a_success_is_recorded_with_its_attempt_in_one_statement(
    telnyx, live_call, transactional_db
):
    """No partner listens, nothing but the row changes: the outcome and the attempt the
    timeline shows are one statement, in autocommit; the claim is one more. Both run as
    prepared statements (callops.prepared), which connection.queries does not list."""
    command = create(live_call, "fork_stop", {})
    with CaptureQueriesContext(connection) as queries:
        assert process(command).outcome.kind == "succeeded"
    assert [q["sql"].split()[0] for q in queries] == ["SELECT"]  # the partner's endpoints
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0].split()[0] for row in cursor.fetchall()]
    assert sorted(statements) == ["UPDATE", "WITH"]  # the claim; the outcome with its attempt
    command.refresh_from_db()
    assert (command.status, command.last_http_status, command.lease_expires_at) == (
        "succeeded",
        200,
        None,
    )
    attempt = command.attempt_log.get()
    assert (attempt.number, attempt.http_status, attempt.outcome, attempt.error) == (
        1,
        200,
        "succeeded",
        "",
    )
    assert attempt.sent_at == command.sent_at <= attempt.answered_at <= command.finished_at


def test_an_attempt_that_cannot_be_kept_never_loses_its_outcome(
    telnyx, live_call, monkeypatch, caplog
):
    values = commands._attempt_values
    # A number the table refuses (it is a positive integer): the attempt's INSERT fails.
    monkeypatch.setattr(
        commands, "_attempt_values", lambda *args: [*values(*args)[:1], -1, *values(*args)[2:]]
    )
    command = create(live_call, "fork_stop", {})
    assert process(command).outcome.kind == "succeeded"
    command.refresh_from_db()
    assert (command.status, command.attempts) == ("succeeded", 1)
    assert not command.attempt_log.exists()
    assert "attempt not logged" in caplog.text


def test_a_fork_target_reaches_telnyx_though_the_sdk_has_no_argument_for_it(telnyx, live_call):
    command = create(live_call, "fork_start", {"target": "udp:192.0.2.1:5000"})
    process(command)
    assert telnyx.commands(action="fork_start")[0].body["target"] == "udp:192.0.2.1:5000"


@pytest.mark.parametrize(
    "headers",
    [{"retry-after-ms": "1200"}, {"Retry-After": "1"}, {"x-ratelimit-reset": "1"}],
)
def test_a_429_makes_every_worker_wait_what_telnyx_said(telnyx, live_call, headers):
    command = create(live_call)
    telnyx.inject(status=429, headers=headers)
    step = process(command)
    wait = server_wait({k.lower(): v for k, v in headers.items()})
    assert step.delay == pytest.approx(wait)
    command.refresh_from_db()
    assert (command.status, command.last_http_status) == ("queued", 429)
    # The pause is fleet-wide: another command gets no slot before the reset either.
    other = create(live_call, "transcription_start", {})
    held = process(other)
    assert held.delay == pytest.approx(wait, abs=0.1)
    assert len(telnyx.requests) == 1

    time.sleep(wait + 0.05)
    assert drive(command).outcome.kind == "succeeded"
    first, second = telnyx.requests
    assert second.monotonic - first.monotonic >= wait
    assert first.command_id == second.command_id


def test_a_500_is_retried_with_the_same_command_id(telnyx, live_call, settings):
    settings.TELNYX_BACKOFF_BASE = 0.01
    command = create(live_call)
    telnyx.inject(status=500)
    step = process(command)
    assert step.outcome.kind == "retry" and step.delay <= 0.01
    time.sleep(0.06)
    assert process(command).outcome.kind == "succeeded"
    assert [r.status for r in telnyx.requests] == [500, 200]
    assert len({r.command_id for r in telnyx.requests}) == 1
    command.refresh_from_db()
    assert (command.attempts, command.status) == (2, "succeeded")


def test_a_refused_connection_is_retried(telnyx, live_call, settings):
    from tests.helpers import closed_port

    settings.TELNYX_BACKOFF_BASE = 0.01
    real_url = settings.TELNYX_BASE_URL
    settings.TELNYX_BASE_URL = f"http://127.0.0.1:{closed_port()}/v2"
    command = create(live_call)
    assert process(command).outcome.reason == "connection error"
    settings.TELNYX_BASE_URL = real_url
    time.sleep(0.06)
    assert process(command).outcome.kind == "succeeded"
    assert telnyx.requests[0].command_id == str(command.command_id)


def test_call_ended_fails_the_command_and_ends_the_call(telnyx, live_call):
    stream = create(live_call)
    process(stream)
    MediaStream.objects.filter(pk=stream.stream_id).update(
        status="active", started_at=timezone.now()
    )
    telnyx.end_call("v3:live-call")
    command = create(live_call, "transcription_start", {})
    step = process(command)
    assert step.delay is None
    command.refresh_from_db()
    assert (command.status, command.failure_reason, command.error_code) == (
        "failed",
        "call ended",
        "90018",
    )
    live_call.refresh_from_db()
    assert live_call.status == "ended"
    assert {s.status for s in MediaStream.objects.all()} == {"stopped"}
    assert Transcription.objects.get().status in ("stopped", "failed")
    assert len(telnyx.commands(action="transcription_start", status=None)) == 1  # no retry


def test_a_401_fails_without_retry_and_keeps_the_error(telnyx, live_call, settings):
    settings.TELNYX_API_KEY = "KEY_WRONG"
    command = create(live_call)
    assert process(command).delay is None
    command.refresh_from_db()
    assert (command.status, command.last_http_status) == ("failed", 401)
    assert command.error_title
    assert command.stream.status == "failed"
    assert len(telnyx.requests) == 1


def test_it_gives_up_after_the_attempt_limit(telnyx, live_call, settings):
    settings.TELNYX_BACKOFF_BASE = 0.001
    settings.TELNYX_COMMAND_MAX_ATTEMPTS = 3
    command = create(live_call)
    telnyx.inject(status=503, times=None)
    for _ in range(3):
        process(command)
        time.sleep(0.06)
    command.refresh_from_db()
    assert (command.status, command.attempts) == ("failed", 3)
    assert command.failure_reason == "gave up after HTTP 503"
    assert process(command).delay is None
    assert len(telnyx.requests) == 3


def test_it_gives_up_when_the_command_is_too_old(telnyx, live_call):
    command = create(live_call)
    Command.objects.filter(pk=command.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    process(command)
    command.refresh_from_db()
    assert (command.status, command.failure_reason) == ("failed", "gave up")
    assert telnyx.requests == []


def test_transcription_stop_closes_the_transcription(telnyx, live_call):
    process(create(live_call, "transcription_start", {}))
    process(create(live_call, "transcription_stop", {}))
    assert Transcription.objects.get().status == "stopped"


def test_a_worker_without_a_token_reschedules_instead_of_sleeping(telnyx, live_call, settings):
    settings.TELNYX_RATE_LIMIT = 2
    first, second, third = (create(live_call, "fork_stop", {}) for _ in range(3))
    assert process(first).outcome.kind == "succeeded"
    assert process(second).outcome.kind == "succeeded"
    started = time.monotonic()
    step = process(third)
    assert time.monotonic() - started < 0.5
    assert 0.5 < step.delay <= 1.05
    third.refresh_from_db()
    assert third.status == "queued" and third.attempts == 0
    # Coming back at the reserved slot sends it without queueing again.
    time.sleep(step.delay)
    resumed = commands.command_process(command_pk=third.pk, reserved_at=step.reserved_at)
    assert resumed.outcome.kind == "succeeded"
    assert telnyx.max_in_any_window(1.0) <= 2


def test_repair_reenqueues_stuck_commands(live_call, monkeypatch, settings):
    settings.CALLOPS_STUCK_COMMAND_GRACE = 0
    enqueued = []
    monkeypatch.setattr(commands, "command_enqueue", lambda **kw: enqueued.append(kw["command_pk"]))
    lost = create(live_call)
    dead = create(live_call, "fork_stop", {})
    fine = create(live_call, "transcription_stop", {})
    past = timezone.now() - timedelta(seconds=5)
    Command.objects.filter(pk=lost.pk).update(next_attempt_at=past)
    Command.objects.filter(pk=dead.pk).update(status="sending", lease_expires_at=past)
    Command.objects.filter(pk=fine.pk).update(
        status="sending", lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    enqueued.clear()
    assert commands.commands_repair() == 2
    assert sorted(enqueued) == sorted([lost.pk, dead.pk])


def test_a_cancelled_answer_fails_what_it_would_have_started_and_no_webhook_pairs_with_it(
    telnyx, db
):
    call = Call.objects.create(call_control_id="v3:parked", connection_id="conn-1")
    answer = create(call, "answer", {**STREAM, "transcription": True})
    assert commands.command_cancel(command=answer)
    answer.refresh_from_db()
    assert (answer.stream.status, answer.stream.failure_reason) == ("failed", "command cancelled")
    assert answer.transcription.status == "failed"
    # A stream Telnyx starts on that URL later is another one's: it gets a record of its own.
    deliver(envelope("streaming.started", "v3:parked", stream_url=STREAM["stream_url"]))
    started = MediaStream.objects.get(call=call, status="active")
    assert started.pk != answer.stream_id
    assert process(answer).delay is None and telnyx.requests == []


def test_cancel_and_retry(telnyx, live_call, settings):
    queued = create(live_call)
    assert commands.command_cancel(command=queued)
    queued.refresh_from_db()
    assert queued.status == "cancelled"
    assert queued.stream.status == "failed"
    assert process(queued).delay is None and telnyx.requests == []

    settings.TELNYX_API_KEY = "KEY_WRONG"
    refused = create(live_call)
    process(refused)
    settings.TELNYX_API_KEY = telnyx.api_key
    assert commands.command_retry(command=refused)
    refused.refresh_from_db()
    assert (refused.status, refused.attempts, refused.stream.status) == ("queued", 0, "requested")
    assert process(refused).outcome.kind == "succeeded"
    assert not commands.command_retry(command=refused)  # only failed commands


def test_the_limiter_queues_turns_a_window_apart(settings):
    settings.TELNYX_RATE_LIMIT = 5
    limiter = get_limiter()
    allowed = [limiter.reserve() for _ in range(5)]
    assert all(r.ready for r in allowed)
    for turn in allowed:
        limiter.complete(turn.send)
    window = 1 + settings.TELNYX_RATE_LIMIT_GUARD
    tickets = [limiter.reserve() for _ in range(7)]
    assert not any(t.ready for t in tickets)
    # Orderly: each waiting command gets its own time, window / limit apart.
    gaps = [b.at - a.at for a, b in zip(tickets, tickets[1:], strict=False)]
    assert gaps == pytest.approx([window * 1000 / 5] * 6, abs=1)
    assert tickets[0].delay == pytest.approx(window, abs=0.05)
    # A ticket is honoured only when due and when the window has room.
    assert limiter.reserve(tickets[0].at).delay == pytest.approx(tickets[0].delay, abs=0.05)


def test_a_send_in_flight_counts_until_it_completes(settings):
    settings.TELNYX_RATE_LIMIT = 2
    limiter = get_limiter()
    slow, fast = limiter.reserve(), limiter.reserve()
    limiter.complete(fast.send)
    time.sleep(1.1)
    # The fast send left the window; the slow one is still in flight and still counts.
    assert limiter.reserve().ready
    assert not limiter.reserve().ready
    limiter.complete(slow.send)


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_it_spaces_tickets_by_the_window_plus_the_send_duration_it_learnt(settings, tmp_path, kind):
    """A turn frees a send's duration after the turn ``limit`` before it was due (the log counts
    from the answer): tickets a bare window / limit apart would run ahead of the room."""
    from callops.ratelimit import FileRateLimiter

    settings.TELNYX_RATE_LIMIT = 5
    limiter = get_limiter() if kind == "redis" else FileRateLimiter(tmp_path / "l", 5, 0, 10)
    turns = [limiter.reserve() for _ in range(5)]
    time.sleep(0.2)  # each send takes 200 ms from its turn to its answer
    for turn in turns:
        limiter.complete(turn.send)
    tickets = [limiter.reserve() for _ in range(4)]
    gaps = [b.at - a.at for a, b in zip(tickets, tickets[1:], strict=False)]
    assert gaps == pytest.approx([(1000 + 200) / 5] * 3, abs=15)
    # The first comes when the first answer leaves the window, a window after it came back.
    assert tickets[0].delay == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_an_in_flight_send_is_expected_back_after_the_learnt_duration(settings, tmp_path, kind):
    from callops.ratelimit import FileRateLimiter

    settings.TELNYX_RATE_LIMIT = 1
    limiter = get_limiter() if kind == "redis" else FileRateLimiter(tmp_path / "l", 1, 0, 10)
    first = limiter.reserve()
    time.sleep(0.3)
    limiter.complete(first.send)  # learnt: a send takes about 300 ms
    time.sleep(1.0)
    slow = limiter.reserve()
    assert slow.ready
    waiting = limiter.reserve()
    # Not at the in-flight horizon (10 s): when the usual duration says it will be back.
    assert waiting.delay == pytest.approx(1.3, abs=0.1)
    limiter.complete(slow.send)


def _published_ticket(command: Command) -> float:
    """The ticket the enqueuer published ``command`` with (the message a worker would get)."""
    import base64
    import json

    from django.conf import settings as django_settings

    broker = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    for raw in broker.lrange("callops", 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if args == [command.pk]:
            return kwargs["reserved_at"]
    raise AssertionError(f"command {command.pk} was not published")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("inline_wait", [0.0, 1.5])
def test_a_turn_due_within_the_inline_wait_is_waited_for_not_rescheduled(
    telnyx, live_call, settings, inline_wait
):
    settings.TELNYX_RATE_LIMIT = 2
    settings.CALLOPS_RATE_LIMIT_INLINE_WAIT = inline_wait
    limiter = get_limiter()
    for turn in [limiter.reserve(), limiter.reserve()]:
        limiter.complete(turn.send)
    redis.Redis.from_url(settings.CELERY_BROKER_URL).delete("callops")
    waiting = create(live_call, "fork_stop", {})
    ticket = _published_ticket(waiting)  # about a second away: the window is full

    started = time.monotonic()
    step = commands.command_process(command_pk=waiting.pk, reserved_at=ticket)
    waiting.refresh_from_db()
    if inline_wait < 1:
        assert step.outcome is None and step.delay > 0.5  # sent away to come back at its ticket
        assert waiting.status == "queued" and waiting.next_attempt_at > timezone.now()
    else:
        # It waited in the worker for the window's room: no second message, no reschedule.
        assert step.outcome is not None and step.outcome.kind == "succeeded"
        assert time.monotonic() - started > 0.5
        assert waiting.status == "succeeded" and waiting.attempts == 1


def test_the_embedded_file_limiter_follows_the_same_rules(tmp_path):
    from callops.ratelimit import FileRateLimiter

    limiter = FileRateLimiter(tmp_path / "limit.json", rate=3, guard=0.0, horizon=5)
    turns = [limiter.reserve() for _ in range(3)]
    assert all(t.ready for t in turns)
    waiting = limiter.reserve()
    # Three sends in flight: the ticket expects them back after the usual duration (none learnt
    # yet, so at once); it is an estimate, the window itself decides when the holder returns.
    assert not waiting.ready and waiting.delay == pytest.approx(1, abs=0.1)
    for turn in turns:
        limiter.complete(turn.send)
    limiter.pause(0.5)
    assert not limiter.reserve(waiting.at).ready  # paused, and the window is still full
