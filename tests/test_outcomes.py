"""Commands Telnyx may or may not have applied: re-sent with their command_id only inside
Telnyx's window, settled from their webhooks after it, never re-sent blindly (TELNYX.md §6).

Each case runs the real SDK against the simulator, whose faults include "applied, but the
answer was lost" (``inject(apply=True, drop=True)``). The window is shortened to a fraction
of a second so its end can be reached in a test.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from callops import commands
from callops.commands import command_create
from callops.models import Call, Command, MediaStream, Transcription
from callops.ratelimit import get_limiter
from tests.helpers import deliver
from tests.telnyx_events import envelope

STREAM = {"stream_url": "wss://media.example.com/s", "stream_track": "both_tracks"}
WINDOW = 0.5


@pytest.fixture
def short_window(settings):
    settings.TELNYX_COMMAND_ID_WINDOW = WINDOW
    settings.TELNYX_TIMEOUT = 0.3
    settings.TELNYX_BACKOFF_BASE = 0.01
    settings.TELNYX_BACKOFF_CAP = 0.02


def create(call, action="streaming_start", params=None) -> Command:
    params = STREAM if params is None and action == "streaming_start" else params
    return command_create(call=call, action=action, params=params or {}, requested_by="operator")


def process(command: Command) -> commands.Next:
    return commands.command_process(command_pk=command.pk)


def past_the_window() -> None:
    time.sleep(WINDOW + 0.05)


def test_a_lost_answer_inside_the_window_is_resent_with_the_same_command_id(
    telnyx, live_call, settings
):
    settings.TELNYX_BACKOFF_BASE = 0.01
    command = create(live_call)
    telnyx.inject(apply=True, drop=True)
    step = process(command)
    assert step.outcome.kind == "retry" and step.outcome.unknown
    command.refresh_from_db()
    assert command.outcome_unknown and command.status == "queued"
    time.sleep(0.05)
    assert process(command).outcome.kind == "succeeded"
    first, second = telnyx.commands(action="streaming_start", status=None)
    assert first.command_id == second.command_id == str(command.command_id)
    assert first.applied and not second.applied  # Telnyx's dedupe: applied once


def test_applied_but_lost_then_confirmed_by_its_webhook_settles_as_succeeded(
    telnyx, live_call, short_window
):
    command = create(live_call)
    telnyx.inject(apply=True, drop=True)
    process(command)
    deliver(
        envelope("streaming.started", live_call.call_control_id, stream_url=STREAM["stream_url"])
    )
    past_the_window()
    step = process(command)
    command.refresh_from_db()
    assert (step.outcome.kind, command.status) == ("succeeded", "succeeded")
    assert command.settlement == "applied: streaming.started arrived"
    assert len(telnyx.commands(action="streaming_start", status=None)) == 1  # never re-sent
    assert MediaStream.objects.get().status == "active"


def test_a_start_with_no_evidence_after_the_window_fails_and_is_stopped_not_resent(
    telnyx, live_call, short_window
):
    command = create(live_call)
    telnyx.inject(apply=True, drop=True)
    process(command)
    past_the_window()
    step = process(command)
    command.refresh_from_db()
    assert (step.outcome.kind, command.status) == ("failed", "failed")
    assert "not sent again" in command.settlement
    assert len(telnyx.commands(action="streaming_start", status=None)) == 1
    stream = MediaStream.objects.get()
    assert stream.status == "failed" and stream.failure_reason.startswith("outcome unknown")
    # Telnyx may have started it without telling us: a stop goes out for it.
    stop = Command.objects.get(action="streaming_stop")
    assert (stop.stream_id, stop.status) == (stream.pk, "queued")


def test_a_start_whose_call_ended_meanwhile_settles_as_call_ended(telnyx, live_call, short_window):
    command = create(live_call)
    telnyx.inject(apply=True, drop=True)
    process(command)
    deliver(envelope("call.hangup", live_call.call_control_id, hangup_cause="normal_clearing"))
    past_the_window()
    step = process(command)
    assert step.outcome.kind == "call_ended"
    assert len(telnyx.commands(action="streaming_start", status=None)) == 1


def test_a_stop_with_no_evidence_after_the_window_is_sent_again(telnyx, live_call, short_window):
    command = create(live_call, "fork_stop", {})
    telnyx.inject(delay=0.5, apply=True)  # longer than the 0.3 s timeout: applied, unanswered
    assert process(command).outcome.reason == "timeout"
    past_the_window()
    assert process(command).outcome.kind == "succeeded"
    command.refresh_from_db()
    assert command.settlement.startswith("outcome unknown after the command_id window; sent again")
    assert len(telnyx.commands(action="fork_stop", status=None)) == 2


def test_a_dial_whose_answer_was_lost_is_never_placed_twice(telnyx, db, short_window):
    command = commands.call_dial(
        params={"connection_id": "conn-1", "to": "+15550001111", "from": "+15550002222"},
        requested_by="partner",
    )
    telnyx.inject(apply=True, drop=True)
    process(command)
    past_the_window()
    step = process(command)
    command.refresh_from_db()
    assert (step.outcome.kind, command.status) == ("failed", "failed")
    assert "not sent again" in command.settlement
    assert len([r for r in telnyx.requests if r.path.endswith("/calls")]) == 1
    assert command.call.status == "ended"


def test_a_worker_lost_after_sending_leaves_an_unknown_outcome(telnyx, live_call, short_window):
    command = create(live_call)
    telnyx.inject(apply=True, drop=True)
    claimed = commands.command_claim(command_pk=command.pk)  # the worker took it, then died
    assert claimed is not None
    Command.objects.filter(pk=command.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    reclaimed = commands.command_claim(command_pk=command.pk)
    assert reclaimed.outcome_unknown and reclaimed.attempts == 2


def test_redis_failing_after_the_answer_never_turns_an_applied_command_back(
    telnyx, live_call, monkeypatch
):
    command = create(live_call)
    limiter = get_limiter()

    def redis_down(*args):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(limiter, "complete", redis_down)
    step = process(command)
    command.refresh_from_db()
    assert (step.outcome.kind, command.status) == ("succeeded", "succeeded")
    assert process(command).delay is None  # done: never claimed again
    assert len(telnyx.requests) == 1


def test_a_success_that_used_telnyx_s_last_request_pauses_every_worker(telnyx, live_call):
    telnyx.rate_limit = 1
    first = create(live_call, "fork_stop", {})
    assert process(first).outcome.kind == "succeeded"
    second = create(live_call, "transcription_stop", {})
    held = process(second)
    assert held.outcome is None and held.delay > 0  # waits, rather than meet Telnyx's 429
    assert len(telnyx.requests) == 1


def test_the_placeholder_of_a_dial_merges_with_the_call_its_webhooks_created(telnyx, db):
    from callops import state

    command = commands.call_dial(
        params={
            "connection_id": "conn-1",
            "to": "+15550001111",
            "from": "+15550002222",
            "stream_url": "wss://media.example.com/s",
        },
        requested_by="partner",
    )
    placeholder = command.call
    deliver(envelope("call.initiated", "v3:dialed", direction="outgoing"))
    deliver(envelope("call.answered", "v3:dialed"))
    state.call_adopt(
        placeholder,
        named={"call_control_id": "v3:dialed", "call_leg_id": "leg", "call_session_id": "sess"},
    )
    call = Call.objects.get()
    assert call.call_control_id == "v3:dialed" and call.status == "answered"
    assert (call.direction, call.to_number) == ("outgoing", "+15559870000")
    assert list(call.commands.values_list("action", flat=True)) == ["dial"]
    assert call.streams.get().stream_url == "wss://media.example.com/s"
    assert call.autostarted_at is not None  # its media were inline: no second start on answer


def test_a_start_refused_because_the_call_ended_is_recorded_as_never_started(telnyx, live_call):
    command = create(live_call, "transcription_start", {})
    telnyx.end_call(live_call.call_control_id)
    assert process(command).outcome.kind == "call_ended"
    transcription = command.transcription
    transcription.refresh_from_db()
    assert (transcription.status, transcription.started_at) == ("failed", None)
    assert transcription.failure_reason == "never started: the call had ended"


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_a_send_counts_from_when_its_answer_came_back_not_from_the_bookkeeping(
    settings, tmp_path, kind
):
    from callops.ratelimit import FileRateLimiter

    settings.TELNYX_RATE_LIMIT = 1
    limiter = get_limiter() if kind == "redis" else FileRateLimiter(tmp_path / "l", 1, 0, 10)
    turn = limiter.reserve()
    assert turn.ready
    limiter.complete(turn.send, 0.4)  # the outcome took 0.4 s to record after the answer
    wait = limiter.reserve().delay
    assert wait == pytest.approx(0.6, abs=0.1)  # the window runs from the answer, not from now


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_commands_is_published_once_each_at_its_turn(live_call, settings):
    import json

    from django.conf import settings as django_settings

    settings.TELNYX_RATE_LIMIT = 2
    broker = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    broker.delete("callops")
    for _ in range(6):
        create(live_call, "fork_stop", {})
    messages = [json.loads(m) for m in broker.lrange("callops", 0, -1)]
    assert len(messages) == 6  # one each: nobody visits a worker only to learn when to return
    etas = sorted(m["headers"]["eta"] for m in messages if m["headers"].get("eta"))
    assert len(etas) == 4  # two turns free now, four tickets half a second apart
    queued = Command.objects.order_by("next_attempt_at")
    gaps = [
        (b.next_attempt_at - a.next_attempt_at).total_seconds()
        for a, b in zip(queued[2:], queued[3:], strict=False)
    ]
    assert gaps == pytest.approx([0.5, 0.5, 0.5], abs=0.1)


@pytest.mark.parametrize("hangup_first", [False, True], ids=["90018-first", "hangup-first"])
def test_the_hangup_gives_the_call_its_cause_and_end_whichever_is_learnt_first(
    telnyx, live_call, hangup_first
):
    """A command told "call has already ended" knows only that the call is over, and when it
    learnt so. The hang-up, however late it is delivered (here after the sweeper ran), gives
    the call its cause and its end, and whatever that closed stops at the hang-up too."""
    from callops import maintenance

    ccid = live_call.call_control_id
    hung_up = timezone.now() - timedelta(minutes=10)  # delivered ten minutes late
    deliver(envelope("streaming.started", ccid, occurred_at=hung_up - timedelta(hours=1), **STREAM))
    stop = create(live_call, "streaming_stop", {})
    start = create(live_call, "transcription_start", {})
    telnyx.end_call(ccid)
    hangup = envelope(
        "call.hangup",
        ccid,
        occurred_at=hung_up,
        hangup_cause="normal_clearing",
        hangup_source="callee",
        sip_hangup_cause="200",
    )
    if hangup_first:
        deliver(hangup)
    assert process(stop).outcome.kind == "call_ended"
    assert process(start).outcome.kind == "call_ended"
    maintenance.sessions_stop_stale()
    if not hangup_first:
        deliver(hangup)

    call = Call.objects.get()
    assert (call.status, call.ended_at, call.hangup_at) == ("ended", hung_up, hung_up)
    assert (call.hangup_cause, call.hangup_source, call.sip_hangup_cause) == (
        "normal_clearing",
        "callee",
        "200",
    )
    stream = MediaStream.objects.get()
    assert (stream.status, stream.stopped_at) == ("stopped", hung_up)
    transcription = Transcription.objects.get()
    assert (transcription.status, transcription.stopped_at) == ("failed", hung_up)
    assert transcription.failure_reason == "never started: the call had ended"
    assert set(Command.objects.values_list("action", "status")) == {
        ("streaming_stop", "failed"),
        ("transcription_start", "failed"),
    }
