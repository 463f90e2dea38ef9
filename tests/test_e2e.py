"""End to end: the simulator plays Telnyx against callops served over HTTP, with real Celery
worker processes on Redis and PostgreSQL. A call's whole life, under duplicates and reordering,
under Telnyx's rate limit, and across a broker restart."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import pytest
from websockets.sync.server import serve

from callops import tasks
from callops.media import MediaSession
from callops.models import (
    Call,
    Command,
    MediaStream,
    Partner,
    PartnerConnection,
    StreamingProfile,
    TranscriptSegment,
    WebhookEvent,
)
from telnyx_sim import CallSimulator
from tests.helpers import closed_port, use_broker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def media_sink():
    """The partner's media server: a WebSocket that reads Telnyx's frames."""
    sessions: list[MediaSession] = []

    def handler(websocket):
        session = MediaSession(expected_tokens=("sink-token",))
        sessions.append(session)
        if not session.authorised(websocket.request.headers.get("x-telnyx-streaming-auth-token")):
            websocket.close(code=4401)
            return
        for message in websocket:
            session.feed(message)

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        server.url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}/media"
        server.sessions = sessions
        yield server
        server.shutdown()


@pytest.fixture
def stack(live_server, telnyx, settings, worker_processes, media_sink):
    """callops on a live server, two worker processes, the simulator pointed at both."""
    settings.CALLOPS_ALLOW_INSECURE_WS = True
    partner = Partner.objects.create(name="e2e")
    PartnerConnection.objects.create(partner=partner, connection_id="e2e-conn")
    StreamingProfile.objects.create(
        partner=partner,
        stream_url=media_sink.url,
        stream_track="both_tracks",
        stream_auth_token="sink-token",
        transcribe=True,
        transcription_engine="Telnyx",
        auto_start=True,
    )

    def start(workers: int = 2, worker_env: dict | None = None, **simulator_options):
        sim = CallSimulator(
            webhook_url=f"{live_server.url}/webhooks/telnyx/",
            api=telnyx,
            connection_id="e2e-conn",
            # These tests' profile leaves the answer to another application (policy "none");
            # the call-control tests below have callops answer.
            answered_elsewhere=simulator_options.pop("answered_elsewhere", True),
            answer_delay=0.3,
            transcription_interval=0.4,
            retry_backoff=0.2,
            max_attempts=8,
            seed=7,
            **simulator_options,
        )
        settings.TELNYX_PUBLIC_KEYS = [sim.public_key]
        worker_processes(
            count=workers, concurrency=2, CALLOPS_ALLOW_INSECURE_WS="true", **(worker_env or {})
        )
        started.append(sim.start())
        return sim

    started: list[CallSimulator] = []
    yield start
    for sim in started:
        sim.stop(hangup=False, timeout=5)


def settled(call_control_id: str, sim: CallSimulator) -> bool:
    """Telnyx has delivered everything, and callops has applied and sent everything."""
    call = Call.objects.filter(call_control_id=call_control_id).first()
    return bool(
        sim.wait_idle(0.1)
        and call
        and call.status == "ended"
        and not WebhookEvent.objects.filter(status="pending").exists()
        and not Command.objects.filter(status__in=["queued", "sending"]).exists()
    )


def assert_true_to_telnyx(sim: CallSimulator, telnyx, call_control_id: str) -> None:
    """The records say exactly what the simulator (Telnyx) did, and each command went once."""
    told = {e["event_type"]: e for e in reversed(sim.events(call_control_id))}
    at = {kind: event["occurred_at"] for kind, event in told.items()}
    call = Call.objects.get(call_control_id=call_control_id)
    assert call.status == "ended"
    assert call.answered_at.isoformat().replace("+00:00", "Z")[:23] == at["call.answered"][:23]
    assert call.ended_at.isoformat().replace("+00:00", "Z")[:23] == at["call.hangup"][:23]
    assert call.hangup_cause == "normal_clearing"

    stream = MediaStream.objects.get(call=call)
    assert stream.status == "stopped"
    assert stream.started_at.isoformat()[:19] == at["streaming.started"][:19]
    transcription = call.transcriptions.get()
    assert transcription.status == "stopped"

    spoken = sorted(
        (
            e["payload"]["transcription_data"]["transcript"],
            e["payload"]["transcription_data"]["is_final"],
        )
        for e in sim.events(call_control_id, "call.transcription")
    )
    stored = sorted(
        TranscriptSegment.objects.filter(call=call).values_list("transcript", "is_final")
    )
    assert spoken and stored == spoken, (
        [(e["event_type"], e["occurred_at"]) for e in sim.events(call_control_id)],
        [(r.action, r.status, r.wall_time) for r in telnyx.requests],
    )

    assert not WebhookEvent.objects.filter(status="failed").exists()
    commands = Command.objects.filter(call=call)
    assert sorted(commands.values_list("action", "status")) == [
        ("streaming_start", "succeeded"),
        ("transcription_start", "succeeded"),
    ]
    for command in commands:
        applied = [
            r
            for r in telnyx.requests
            if r.command_id == str(command.command_id) and r.applied and not r.duplicate
        ]
        assert len(applied) == 1, command.action


def test_a_calls_whole_life(stack, telnyx, media_sink):
    sim = stack()
    ccid = sim.place_call(duration=6)
    wait_for(lambda: settled(ccid, sim), timeout=30)
    assert_true_to_telnyx(sim, telnyx, ccid)
    (session,) = media_sink.sessions
    assert session.call_control_id == ccid and session.stopped
    assert session.audio_ms > 500 and not session.errors  # at least 25 frames per track


def test_duplicated_and_reordered_webhooks_give_the_same_records(stack, telnyx):
    sim = stack(duplicate_rate=1.0, reorder=True, reorder_window=0.8)
    ccid = sim.place_call(duration=6)
    wait_for(lambda: settled(ccid, sim), timeout=40)
    assert_true_to_telnyx(sim, telnyx, ccid)
    assert WebhookEvent.objects.filter(delivery_count__gte=2).exists()


def test_telnyx_rate_limiting_loses_no_command(stack, telnyx, settings):
    telnyx.rate_limit = 1  # Telnyx allows one command a second; callops is told nothing
    sim = stack()
    calls = [sim.place_call(duration=float("inf")) for _ in range(3)]
    wait_for(lambda: Command.objects.filter(status="succeeded").count() == 6, timeout=60)
    wait_for(lambda: all(sim.events(ccid, "call.transcription") for ccid in calls))
    for ccid in calls:
        sim.hangup(ccid)
    wait_for(lambda: all(settled(ccid, sim) for ccid in calls), timeout=60)
    assert [r.status for r in telnyx.requests].count(429) > 0
    for ccid in calls:
        assert_true_to_telnyx(sim, telnyx, ccid)


@pytest.fixture
def private_redis():
    """A Redis of this test's own, so it can be stopped and started again."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed for the broker-restart test"
    port = closed_port()

    def start():
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        return proc

    server = {"proc": start()}
    server["url"] = f"redis://127.0.0.1:{port}/0"
    server["restart"] = lambda: server.update(proc=start())
    yield server
    server["proc"].send_signal(signal.SIGTERM)
    server["proc"].wait(5)


def test_nothing_is_lost_across_a_broker_restart(stack, telnyx, settings, private_redis):
    url, original = private_redis["url"], settings.CELERY_BROKER_URL
    settings.CELERY_BROKER_URL = url
    settings.CALLOPS_RATE_LIMIT_URL = url
    # The same cache as the workers' (same key prefix), on the private Redis.
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": url}}
    use_broker(url)
    try:
        sim = stack(worker_env={"CALLOPS_PENDING_EVENT_GRACE": "0"})
        ccid = sim.place_call(duration=float("inf"))
        wait_for(lambda: Command.objects.filter(status="succeeded").count() == 2, timeout=30)
        wait_for(lambda: sim.events(ccid, "call.transcription"))

        private_redis["proc"].kill()  # the broker goes away mid-call...
        private_redis["proc"].wait(5)
        time.sleep(1.5)  # ...while transcripts keep arriving (stored, answered 200)
        sim.hangup(ccid)
        wait_for(lambda: WebhookEvent.objects.filter(event_type="call.hangup").exists())
        assert WebhookEvent.objects.filter(status="pending").exists()

        private_redis["restart"]()  # ...and comes back; beat's sweeper runs
        wait_for(lambda: _sweep_once(), timeout=30)
        wait_for(lambda: settled(ccid, sim), timeout=30)
        assert_true_to_telnyx(sim, telnyx, ccid)
    finally:
        use_broker(original)  # the test's own broker: later tests must not inherit the private one


def _sweep_once() -> bool:
    try:
        tasks.sweep_pending_webhook_events.apply_async(retry=False)
    except Exception:
        return False  # the workers and the broker are still reconnecting
    return True


def test_an_incoming_call_waits_parked_until_callops_answers_it_with_media_inline(
    stack, telnyx, media_sink
):
    StreamingProfile.objects.update(answer_policy="answer")
    sim = stack(answered_elsewhere=False)
    ccid = sim.place_call(duration=5)
    wait_for(lambda: settled(ccid, sim), timeout=40)

    # One answer carried the stream and the transcription; Telnyx saw nothing else before it.
    requests = telnyx.commands(call_control_id=ccid, status=None)
    assert [r.action for r in requests] == ["answer"]
    (answer,) = requests
    assert answer.body["stream_url"] == media_sink.url and answer.body["transcription"] is True
    told = [e["event_type"] for e in sim.events(ccid)]
    assert told.index("call.answered") < told.index("streaming.started")

    call = Call.objects.get(call_control_id=ccid)
    assert (call.status, call.hangup_cause) == ("ended", "normal_clearing")
    assert call.answered_at is not None and call.answer_decided_at is not None
    stream = call.streams.get()
    assert (stream.status, stream.started_at is not None) == ("stopped", True)
    assert call.transcriptions.get().status == "stopped"
    assert TranscriptSegment.objects.filter(call=call).exists()
    (command,) = Command.objects.filter(call=call)
    assert (command.action, command.status) == ("answer", "succeeded")
    (session,) = media_sink.sessions
    assert session.call_control_id == ccid and session.audio_ms > 300


def test_an_outbound_call_dialed_through_the_partner_api_ends_true(
    stack, telnyx, media_sink, settings
):
    from tests.helpers import partner_with_key

    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = True  # the partner's media sink is on loopback

    _, api = partner_with_key("dialer", "dial-conn")
    StreamingProfile.objects.create(
        partner=Partner.objects.get(name="dialer"),
        stream_url=media_sink.url,
        stream_track="both_tracks",
        stream_auth_token="sink-token",
        transcribe=True,
        transcription_engine="Telnyx",
        auto_start=True,
    )
    sim = stack(
        answered_elsewhere=False,
        dial_answered_share=1.0,
        dial_busy_share=0.0,
        dial_no_answer_share=0.0,
        dial_answer_delay=0.3,
        call_duration=4,
    )
    body = {"connection_id": "dial-conn", "to": "+15550001111", "from": "+15550002222"}
    response = api.post("/api/v1/calls/", body, format="json")
    assert response.status_code == 202, response.json()

    dial = Command.objects.get(action="dial")
    wait_for(lambda: not Call.objects.filter(call_control_id__startswith="dialing:").exists())
    call = Call.objects.get(commands=dial)
    wait_for(lambda: settled(call.call_control_id, sim), timeout=40)
    call.refresh_from_db()
    dial.refresh_from_db()
    assert dial.status == "succeeded"
    assert (call.direction, call.connection_id, call.to_number) == (
        "outgoing",
        "dial-conn",
        "+15550001111",
    )
    assert call.call_leg_id and call.call_session_id and call.answered_at
    assert Call.objects.filter(connection_id="dial-conn").count() == 1  # merged, not doubled
    stream = call.streams.get()
    assert stream.status == "stopped" and stream.started_at is not None
    assert TranscriptSegment.objects.filter(call=call).exists()
    dials = [r for r in telnyx.requests if r.path.endswith("/calls")]
    assert len(dials) == 1 and dials[0].body["stream_url"] == media_sink.url
