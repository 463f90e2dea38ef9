"""The call simulator: signed webhooks, command-driven events, retries and media WebSockets.

A real HTTP receiver verifies every signature with PyNaCl; commands go through the real telnyx
SDK to the API simulator; media goes to a real ``websockets`` server. No database.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import telnyx
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from websockets.sync.server import serve

from callops.webhooks import verify_signature
from telnyx_sim import (
    CallPlan,
    CallSimulator,
    DeliveryPolicy,
    TelnyxAPISimulator,
    load_signing_key,
)
from tests.helpers import wait_for

API_KEY = "KEY_TEST_CALLS"
STATE = base64.b64encode(b'{"tenant": 7}').decode()
COMMON_KEYS = {
    "call_control_id",
    "call_leg_id",
    "call_session_id",
    "connection_id",
    "client_state",
    "from",
    "to",
}
ROOT = Path(__file__).resolve().parent.parent


# --- A webhook receiver -----------------------------------------------------------------------


class Receiver:
    """Records every POST; ``answer(envelope, count)`` -> (status, delay) decides the reply."""

    def __init__(self, public_key: str | None = None) -> None:
        self.public_key = public_key
        self.received: list[dict] = []
        self.answer = lambda envelope, count: (200, 0.0)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                envelope = json.loads(body)
                with receiver._lock:
                    key = envelope["data"]["id"]
                    receiver._counts[key] = count = receiver._counts.get(key, 0) + 1
                    receiver.received.append(
                        {
                            "envelope": envelope,
                            "body": body,
                            "headers": dict(self.headers),
                            "verified": receiver.verify(body, self.headers),
                            "at": time.monotonic(),
                        }
                    )
                status, delay = receiver.answer(envelope, count)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/telnyx/"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def verify(self, body: bytes, headers) -> bool:
        if self.public_key is None:
            return False
        timestamp = headers["telnyx-timestamp"]
        signature = base64.b64decode(headers["telnyx-signature-ed25519"])
        try:
            VerifyKey(base64.b64decode(self.public_key)).verify(
                timestamp.encode() + b"|" + body, signature
            )
        except BadSignatureError:
            return False
        return abs(time.time() - int(timestamp)) <= 300

    def envelopes(self, call_control_id: str | None = None, event_type: str | None = None):
        with self._lock:
            items = list(self.received)
        return [
            item["envelope"]
            for item in items
            if call_control_id in (None, item["envelope"]["data"]["payload"]["call_control_id"])
            and event_type in (None, item["envelope"]["data"]["event_type"])
        ]

    def types(self, call_control_id: str) -> list[str]:
        return [e["data"]["event_type"] for e in self.envelopes(call_control_id)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- A media WebSocket server -----------------------------------------------------------------


class MediaServer:
    """Accepts Telnyx media sessions and keeps every frame and the upgrade headers.

    ``on_start(ws)`` runs when the ``start`` frame arrives (by default: send a mark named
    "greeting"); ``handshake_delay`` holds each WebSocket upgrade back that many seconds.
    """

    def __init__(self, on_start=None, handshake_delay: float = 0.0) -> None:
        self.sessions: list[dict] = []
        on_start = on_start or (
            lambda ws: ws.send(json.dumps({"event": "mark", "mark": {"name": "greeting"}}))
        )

        def process_request(connection, request):
            time.sleep(handshake_delay)

        def handler(ws):
            session = {
                "headers": dict(ws.request.headers),
                "frames": [],
                "at": [],
                "opened": time.monotonic(),
                "closed": False,
            }
            self.sessions.append(session)
            for message in ws:
                frame = json.loads(message)
                session["frames"].append(frame)
                session["at"].append(time.monotonic())
                if frame["event"] == "start":
                    on_start(ws)
            session["closed"] = True

        self.server = serve(
            handler, "127.0.0.1", 0, compression=None, process_request=process_request
        )
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/media"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def frames(self, event: str, session: int = 0) -> list[dict]:
        if len(self.sessions) <= session:
            return []
        return [f for f in list(self.sessions[session]["frames"]) if f["event"] == event]

    def close(self) -> None:
        self.server.shutdown()


# --- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key():
    return SigningKey.generate()


@pytest.fixture(scope="module")
def public_key(signing_key):
    return base64.b64encode(bytes(signing_key.verify_key)).decode()


@pytest.fixture
def receiver(public_key):
    receiver = Receiver(public_key)
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def api_server():
    with TelnyxAPISimulator(api_key=API_KEY) as api:
        yield api


@pytest.fixture
def api(api_server):
    api_server.reset()
    yield api_server
    api_server.reset()


@pytest.fixture(scope="module")
def client(api_server):
    with telnyx.Telnyx(
        api_key=API_KEY, base_url=api_server.base_url, max_retries=0, timeout=5
    ) as client:
        yield client


@pytest.fixture
def make_sim(receiver, api, signing_key):
    """A started CallSimulator with fast timings, stopped after the test."""
    started: list[CallSimulator] = []

    def make(**options) -> CallSimulator:
        defaults = {
            "webhook_url": receiver.url,
            "api": api,
            "signing_key": signing_key,
            "answer_delay": 0.05,
            "retry_backoff": 0.05,
            "transcription_interval": 0.05,
            "seed": 1,
        }
        sim = CallSimulator(**{**defaults, **options}).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop(timeout=3)


def occurred(envelope: dict) -> datetime:
    return datetime.fromisoformat(envelope["data"]["occurred_at"])


# --- Envelopes and signatures -----------------------------------------------------------------


def test_it_sends_signed_envelopes_shaped_like_telnyx(make_sim, receiver, public_key):
    sim = make_sim(answered_elsewhere=True)
    ccid = sim.place_call(duration=0.1, from_number="+15551112222")
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert sim.wait_idle(2)

    assert ccid.startswith("v3:sim-")
    assert receiver.types(ccid) == ["call.initiated", "call.answered", "call.hangup"]
    for item in receiver.received:
        assert item["verified"]
        # The project's own verifier accepts them too.
        verify_signature(
            item["body"],
            item["headers"]["telnyx-signature-ed25519"],
            item["headers"]["telnyx-timestamp"],
            public_keys=[public_key],
            tolerance=300,
        )
        envelope = item["envelope"]
        data = envelope["data"]
        assert data["record_type"] == "event"
        uuid.UUID(data["id"])
        assert data["occurred_at"].endswith("Z")
        assert set(data["payload"]) >= COMMON_KEYS
        assert data["payload"]["from"] == "+15551112222"
        assert data["payload"]["connection_id"] == "sim-conn"
        assert envelope["meta"] == {"attempt": 1, "delivered_to": receiver.url}
        assert item["headers"]["Content-Type"] == "application/json"

    initiated, answered, hangup = (e["data"]["payload"] for e in receiver.envelopes(ccid))
    assert initiated["direction"] == "incoming"
    assert initiated["state"] == "parked"
    assert answered["state"] == "answered"
    assert hangup["hangup_cause"] == "normal_clearing"
    assert hangup["hangup_source"] == "caller"
    assert hangup["sip_hangup_cause"] == "200"
    assert initiated["start_time"] == answered["start_time"] == hangup["start_time"]
    assert len({initiated["call_leg_id"], initiated["call_session_id"], ccid}) == 3

    call = sim.api.call(ccid)
    assert call is not None and call.ended


def test_a_call_hung_up_while_ringing_is_cancelled_by_the_caller(make_sim, receiver):
    sim = make_sim(answered_elsewhere=True)
    ringing = sim.place_call(answer_delay=10)
    answered = sim.place_call(duration=float("inf"))
    wait_for(lambda: "call.answered" in receiver.types(answered), timeout=3)
    assert sim.hangup(ringing)
    assert sim.hangup(answered, cause="time_limit", source="unknown", sip_cause="503")
    assert not sim.hangup(answered)
    assert sim.wait_idle(3)
    assert receiver.types(ringing) == ["call.initiated", "call.hangup"]
    cancelled = receiver.envelopes(ringing, "call.hangup")[0]["data"]["payload"]
    assert (cancelled["hangup_cause"], cancelled["sip_hangup_cause"]) == (
        "originator_cancel",
        "487",
    )
    ended = receiver.envelopes(answered, "call.hangup")[0]["data"]["payload"]
    assert (ended["hangup_cause"], ended["hangup_source"], ended["sip_hangup_cause"]) == (
        "time_limit",
        "unknown",
        "503",
    )


def test_its_signatures_fail_against_another_key(make_sim, receiver):
    receiver.public_key = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
    sim = make_sim(answered_elsewhere=True)
    ccid = sim.place_call(duration=0.05)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert not any(item["verified"] for item in receiver.received)


def test_it_keeps_its_signing_key_in_a_file(tmp_path):
    key = load_signing_key(tmp_path / "sk")
    assert load_signing_key(tmp_path / "sk").encode() == key.encode()
    assert (tmp_path / "sk").stat().st_mode & 0o777 == 0o600
    sim = CallSimulator(webhook_url="http://127.0.0.1:9/", signing_key=key)
    path = sim.write_public_key(tmp_path / "var" / "pk")
    assert path.read_text().strip() == sim.public_key
    assert len(base64.b64decode(sim.public_key)) == 32
    with pytest.raises(FileNotFoundError):
        load_signing_key(tmp_path / "missing", create=False)


def test_its_settings_are_a_call_plan_and_a_delivery_policy():
    plan = CallPlan(answer_delay=0.5, connection_id="c-1")
    sim = CallSimulator(
        webhook_url="http://127.0.0.1:9/", plan=plan, answer_delay=0.05, reorder=True
    )
    assert sim.plan == CallPlan(answer_delay=0.05, connection_id="c-1")
    assert sim.delivery == DeliveryPolicy(reorder=True)
    with pytest.raises(TypeError, match="answer_dealy"):
        CallSimulator(webhook_url="http://127.0.0.1:9/", answer_dealy=1)
    with pytest.raises(ValueError, match="duplicate_rate"):
        CallSimulator(webhook_url="http://127.0.0.1:9/", duplicate_rate=1.5)
    with pytest.raises(ValueError, match="max_attempts"):
        CallSimulator(webhook_url="http://127.0.0.1:9/", max_attempts=0)
    with pytest.raises(ValueError, match="webhook_url"):
        CallSimulator(webhook_url="ftp://127.0.0.1/")


# --- Commands drive events --------------------------------------------------------------------


@pytest.mark.slow
def test_it_answers_sdk_commands_with_their_webhooks(make_sim, receiver, client, api):
    sim = make_sim(media=False, transcription_interval=0.1, answered_elsewhere=True)
    ccid = sim.place_call(duration=float("inf"))
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=5)
    actions = client.calls.actions

    fork = actions.start_forking(
        ccid, rx="udp:127.0.0.1:4000", tx="udp:127.0.0.1:4001", command_id=str(uuid.uuid4())
    )
    assert fork.data.result == "ok"
    actions.start_transcription(
        ccid, transcription_tracks="both", client_state=STATE, command_id=str(uuid.uuid4())
    )
    command_id = str(uuid.uuid4())
    for _ in range(2):  # the repeat is acknowledged but not applied: one streaming.started
        actions.start_streaming(ccid, stream_url="wss://media.example/ws", command_id=command_id)
    wait_for(lambda: len(receiver.envelopes(ccid, "call.transcription")) >= 4, timeout=5)
    actions.stop_streaming(ccid, command_id=str(uuid.uuid4()))
    actions.stop_transcription(ccid, command_id=str(uuid.uuid4()))
    wait_for(lambda: "streaming.stopped" in receiver.types(ccid), timeout=5)
    assert sim.hangup(ccid)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert sim.wait_idle(2)

    types = [t for t in receiver.types(ccid) if t != "call.transcription"]
    assert types == [
        "call.initiated",
        "call.answered",
        "call.fork.started",
        # A stream replaces the fork, as on Telnyx.
        "call.fork.stopped",
        "streaming.started",
        "streaming.stopped",
        "call.hangup",
    ]
    events = {e["data"]["event_type"]: e["data"]["payload"] for e in receiver.envelopes(ccid)}
    assert events["call.fork.started"]["stream_type"] == "raw"
    assert events["streaming.started"]["stream_url"] == "wss://media.example/ws"
    # client_state is echoed from the command that set it onwards.
    assert events["call.fork.started"]["client_state"] is None
    assert events["call.hangup"]["client_state"] == STATE

    transcripts = [
        e["data"]["payload"]["transcription_data"]
        for e in receiver.envelopes(ccid, "call.transcription")
    ]
    assert [t["is_final"] for t in transcripts[:4]] == [False, True, False, True]
    assert {t["transcription_track"] for t in transcripts} == {"inbound", "outbound"}
    for t in transcripts:
        assert isinstance(t["confidence"], float) and 0 < t["confidence"] < 1
        assert t["transcript"]
    assert transcripts[0]["transcript"] in transcripts[1]["transcript"]
    # No transcription after transcription_stop.
    count = len(transcripts)
    time.sleep(0.25)
    assert len(receiver.envelopes(ccid, "call.transcription")) == count

    # The call is over for the API too.
    with pytest.raises(telnyx.UnprocessableEntityError) as error:
        actions.start_streaming(ccid, stream_url="wss://media.example/ws")
    assert error.value.body["errors"][0]["code"] == "90018"


def test_it_ignores_commands_that_failed_or_for_calls_it_did_not_place(
    make_sim, receiver, api, client
):
    sim = make_sim(media=False)
    ccid = sim.place_call(duration=float("inf"))
    client.calls.actions.answer(ccid)
    fork = {"rx": "udp:1.2.3.4:5", "tx": "udp:1.2.3.4:6"}
    api.inject(500, action="fork_start")
    with pytest.raises(telnyx.InternalServerError):
        client.calls.actions.start_forking(ccid, **fork)
    with pytest.raises(telnyx.UnprocessableEntityError):
        client.calls.actions.start_forking(ccid, rx="not-udp", tx="udp:1.2.3.4:6")
    client.calls.actions.start_forking("v3:someone-else", **fork)
    time.sleep(0.1)
    assert "call.fork.started" not in receiver.types(ccid)
    assert not receiver.envelopes("v3:someone-else")

    # Applied although the client saw a 500: Telnyx acted, so the webhook comes.
    api.inject(500, action="fork_start", apply=True)
    with pytest.raises(telnyx.InternalServerError):
        client.calls.actions.start_forking(ccid, **fork)
    wait_for(lambda: "call.fork.started" in receiver.types(ccid), timeout=3)


def test_it_delivers_each_calls_webhooks_in_the_order_they_happened(make_sim, receiver, client):
    # A slow receiver makes every call's deliveries overlap with the others'.
    receiver.answer = lambda envelope, count: (200, 0.02)
    sim = make_sim(media=False)
    calls = [sim.place_call(duration=float("inf")) for _ in range(4)]
    for ccid in calls:
        client.calls.actions.answer(ccid)
        client.calls.actions.start_forking(
            ccid, rx="udp:127.0.0.1:4000", tx="udp:127.0.0.1:4001", stream_type="decrypted"
        )
        client.calls.actions.start_transcription(ccid)
    time.sleep(0.2)
    for ccid in calls:
        sim.hangup(ccid)
    assert sim.wait_idle(5)

    for ccid in calls:
        envelopes = receiver.envelopes(ccid)
        assert [e["data"] for e in envelopes] == sim.events(ccid)
        times = [occurred(e) for e in envelopes]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert envelopes[-2]["data"]["event_type"] == "call.fork.stopped"
        assert envelopes[-1]["data"]["event_type"] == "call.hangup"
    # The calls did overlap: deliveries of different calls interleave.
    arrival = [e["data"]["payload"]["call_control_id"] for e in receiver.envelopes()]
    assert arrival[: len(calls)] != [calls[0]] * len(calls)


# --- Delivery like Telnyx ---------------------------------------------------------------------


@pytest.mark.slow
def test_it_retries_errors_and_timeouts_with_backoff(make_sim, receiver):
    def answer(envelope, count):
        event_type = envelope["data"]["event_type"]
        if event_type == "call.initiated" and count <= 2:
            return 500, 0.0
        if event_type == "call.answered" and count == 1:
            return 200, 0.6  # beyond the budget: a timeout
        return 200, 0.0

    receiver.answer = answer
    sim = make_sim(retry_backoff=0.1, delivery_timeout=0.3, answered_elsewhere=True)
    ccid = sim.place_call(duration=0.1)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert sim.wait_idle(2)

    initiated = [e["meta"]["attempt"] for e in receiver.envelopes(ccid, "call.initiated")]
    assert initiated == [1, 2, 3]
    log = sim.deliveries(ccid, "call.initiated")
    assert [(r.attempt, r.status) for r in log] == [(1, 500), (2, 500), (3, 200)]
    # Exponential backoff: 0.1 s, then 0.2 s.
    assert log[1].monotonic - log[0].monotonic >= 0.1
    assert log[2].monotonic - log[1].monotonic >= 0.2

    answered = sim.deliveries(ccid, "call.answered")
    assert [(r.attempt, r.status) for r in answered] == [(1, 0), (2, 200)]
    assert "0.3 s" in answered[0].error
    assert answered[0].elapsed < 0.5
    # Retries hold the call's later events back: the order still holds.
    first = [t for i, t in enumerate(receiver.types(ccid)) if t not in receiver.types(ccid)[:i]]
    assert first == ["call.initiated", "call.answered", "call.hangup"]


def test_it_gives_up_after_max_attempts(make_sim, receiver):
    receiver.answer = lambda envelope, count: (503, 0.0)
    sim = make_sim(max_attempts=3, retry_backoff=0.01, answered_elsewhere=True)
    ccid = sim.place_call(duration=0.05)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert sim.wait_idle(3)
    for event_type in ("call.initiated", "call.answered", "call.hangup"):
        assert [e["meta"]["attempt"] for e in receiver.envelopes(ccid, event_type)] == [1, 2, 3]


def test_it_counts_a_redirect_as_a_failure(make_sim, receiver):
    receiver.answer = lambda envelope, count: (302 if count == 1 else 204, 0.0)
    sim = make_sim(answered_elsewhere=True)
    ccid = sim.place_call(duration=0.05)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=5)
    assert sim.wait_idle(3)
    assert [r.status for r in sim.deliveries(ccid, "call.initiated")] == [302, 204]


def test_it_sends_duplicates_when_asked(make_sim, receiver):
    sim = make_sim(duplicate_rate=1.0, answered_elsewhere=True)
    ccid = sim.place_call(duration=0.05)
    wait_for(lambda: receiver.types(ccid).count("call.hangup") == 2, timeout=5)
    assert sim.wait_idle(2)
    ids = [e["data"]["id"] for e in receiver.envelopes(ccid)]
    assert len(ids) == 6 and len(set(ids)) == 3
    assert sum(r.duplicate for r in sim.deliveries(ccid)) == 3


def test_it_reorders_a_calls_events_when_asked(make_sim, receiver):
    # One delivery thread makes the arrival order exactly the shuffled order.
    sim = make_sim(reorder=True, reorder_window=2.0, delivery_workers=1, answered_elsewhere=True)
    ccid = sim.place_call(duration=0.1)
    wait_for(lambda: len(receiver.envelopes(ccid)) == 3, timeout=5)
    envelopes = receiver.envelopes(ccid)
    assert sorted(receiver.types(ccid)) == ["call.answered", "call.hangup", "call.initiated"]
    times = [occurred(e) for e in envelopes]
    assert times != sorted(times)


def test_it_delivers_reordered_batches_concurrently(make_sim, receiver):
    receiver.answer = lambda envelope, count: (200, 0.3)
    sim = make_sim(reorder=True, reorder_window=5.0, answered_elsewhere=True)
    ccid = sim.place_call(duration=0.1)
    wait_for(lambda: len(receiver.envelopes(ccid)) == 3, timeout=5)
    arrivals = [item["at"] for item in receiver.received]
    # Three 0.3 s answers in well under 0.6 s: they were in flight together.
    assert max(arrivals) - min(arrivals) < 0.2
    assert sim.wait_idle(2)


# --- Media streams ----------------------------------------------------------------------------


@pytest.fixture
def media_server():
    server = MediaServer()
    yield server
    server.close()


@pytest.mark.slow
def test_it_streams_media_frames_like_telnyx(make_sim, receiver, client, media_server):
    sim = make_sim(answered_elsewhere=True)
    ccid = sim.place_call(duration=float("inf"), from_number="+15553334444")
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)
    client.calls.actions.start_streaming(
        ccid,
        stream_url=media_server.url,
        stream_track="both_tracks",
        stream_auth_token="secret-token",
        custom_parameters=[{"name": "tenant", "value": "7"}],
        client_state=STATE,
        command_id=str(uuid.uuid4()),
    )
    wait_for(lambda: media_server.sessions and len(media_server.sessions[0]["frames"]) > 20)
    time.sleep(0.3)
    assert sim.hangup(ccid)
    wait_for(lambda: media_server.sessions[0]["closed"], timeout=3)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    session = media_server.sessions[0]
    assert session["headers"]["x-telnyx-streaming-auth-token"] == "secret-token"
    frames = session["frames"]
    connected, start, *media, stop = frames
    assert connected == {
        "event": "connected",
        "version": "1.0.0",
        "x-telnyx-streaming-auth-token": "secret-token",
    }
    assert start["event"] == "start"
    stream_id = start["stream_id"]
    assert start["start"]["call_control_id"] == ccid
    assert start["start"]["from"] == "+15553334444"
    assert start["start"]["client_state"] == STATE
    assert start["start"]["custom_parameters"] == {"tenant": "7"}
    assert start["start"]["media_format"] == {
        "encoding": "PCMU",
        "sample_rate": 8000,
        "channels": 1,
    }
    assert stop["event"] == "stop" and stop["stream_id"] == stream_id
    assert stop["stop"]["call_control_id"] == ccid

    sequence = [int(frame["sequence_number"]) for frame in frames[1:]]
    assert sequence == list(range(1, len(sequence) + 1))
    media_frames = [f for f in media if f["event"] == "media"]
    marks = [f for f in media if f["event"] == "mark"]
    assert marks and marks[0]["mark"] == {"name": "greeting"}
    for track in ("inbound", "outbound"):
        frames_of_track = [f["media"] for f in media_frames if f["media"]["track"] == track]
        assert len(frames_of_track) >= 20
        assert [int(m["chunk"]) for m in frames_of_track] == list(
            range(1, len(frames_of_track) + 1)
        )
        assert [int(m["timestamp"]) for m in frames_of_track] == [
            20 * i for i in range(len(frames_of_track))
        ]
        # 20 ms of PCMU at 8 kHz: 160 bytes.
        assert {len(base64.b64decode(m["payload"])) for m in frames_of_track} == {160}
    assert all(f["stream_id"] == stream_id for f in media_frames)
    # Paced in real time, not sent as fast as possible.
    duration_ms = int(media_frames[-1]["media"]["timestamp"])
    assert duration_ms >= 400

    types = receiver.types(ccid)
    assert types == [
        "call.initiated",
        "call.answered",
        "streaming.started",
        "streaming.stopped",
        "call.hangup",
    ]
    assert sim.media_sessions(ccid)[0].connected


def test_it_reports_an_unreachable_stream_as_failed(make_sim, receiver, client):
    sim = make_sim(media_connect_timeout=0.5)
    ccid = sim.place_call(duration=float("inf"))
    client.calls.actions.answer(ccid)
    url = "ws://127.0.0.1:9/nobody-listens"
    client.calls.actions.start_streaming(ccid, stream_url=url, command_id=str(uuid.uuid4()))
    wait_for(lambda: "streaming.failed" in receiver.types(ccid), timeout=3)
    failed = receiver.envelopes(ccid, "streaming.failed")[0]["data"]["payload"]
    assert failed["failure_reason"]
    assert failed["stream_type"] == "websocket"
    assert failed["stream_params"] == {"stream_url": url, "track": "inbound_track"}
    assert failed["stream_id"] == sim.media_sessions(ccid)[0].stream_id
    sim.hangup(ccid)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)
    # A failed stream is not stopped again at hang-up.
    assert "streaming.stopped" not in receiver.types(ccid)


@pytest.mark.slow
def test_it_stops_quickly_hanging_up_live_calls(receiver, api, signing_key, media_server, client):
    sim = CallSimulator(
        webhook_url=receiver.url, api=api, signing_key=signing_key, answer_delay=0.05
    ).start()
    calls = [sim.place_call(duration=float("inf")) for _ in range(3)]
    client.calls.actions.answer(calls[0])
    client.calls.actions.start_streaming(calls[0], stream_url=media_server.url)
    wait_for(lambda: media_server.sessions and media_server.sessions[0]["frames"], timeout=3)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 3
    for ccid in calls:
        assert receiver.types(ccid)[-1] == "call.hangup"
    assert media_server.sessions[0]["frames"][-1]["event"] == "stop"
    assert api.on_command is None
    assert not [t for t in threading.enumerate() if t.name.startswith("call-sim")]


def test_it_places_calls_at_the_configured_rate(make_sim, receiver):
    sim = make_sim(calls_per_minute=600, call_duration=0.05)  # one every 0.1 s
    wait_for(lambda: len(receiver.envelopes(event_type="call.initiated")) >= 3, timeout=3)
    sim.stop()
    initiated = [
        datetime.fromisoformat(e["occurred_at"]) for e in sim.events(event_type="call.initiated")
    ]
    gaps = [(b - a).total_seconds() for a, b in zip(initiated, initiated[1:], strict=False)]
    assert gaps and all(gap >= 0.09 for gap in gaps)
    assert len(sim.events(event_type="call.hangup")) == len(initiated)


# --- The command line -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cli_runs_until_sigterm(tmp_path, receiver):
    key = load_signing_key(tmp_path / "sk")
    receiver.public_key = base64.b64encode(bytes(key.verify_key)).decode()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "telnyx_sim",
            "--webhook-url",
            receiver.url,
            "--port",
            "0",
            "--api-key",
            "KEY_CMD",
            "--calls-per-minute",
            "600",
            "--call-duration",
            "0.2",
            "--answered-elsewhere",
            "--signing-key-file",
            str(tmp_path / "sk"),
            "--public-key-file",
            str(tmp_path / "pk"),
        ],
        cwd=ROOT,
        # No Django settings: the simulator must run without them.
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: len(receiver.envelopes(event_type="call.hangup")) >= 2, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert all(item["verified"] for item in receiver.received)
    assert (tmp_path / "pk").read_text().strip() == receiver.public_key
    assert "command API http://127.0.0.1:" in output
    assert f"public key {receiver.public_key}" in output
    assert "webhook  call.initiated" in output
    assert output.rstrip().endswith("stopped")


# --- Strict like Telnyx: parked until answered ------------------------------------------------


def payload(receiver: Receiver, ccid: str, event_type: str) -> dict:
    return receiver.envelopes(ccid, event_type)[0]["data"]["payload"]


DIAL = {"connection_id": "sim-conn", "to": "+15550003333", "from_": "+15550004444"}


def test_an_incoming_call_stays_parked_until_answered(make_sim, receiver, client):
    sim = make_sim(media=False)
    ccid = sim.place_call(duration=float("inf"))
    time.sleep(0.3)  # six times the answer_delay the old self-answering simulator used
    assert receiver.types(ccid) == ["call.initiated"]
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.start_streaming(ccid, stream_url="wss://media.example/ws")
    assert caught.value.body["errors"][0]["code"] == "90019"

    client.calls.actions.answer(ccid, client_state=STATE, command_id=str(uuid.uuid4()))
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)
    answered = payload(receiver, ccid, "call.answered")
    assert (answered["state"], answered["client_state"]) == ("answered", STATE)
    client.calls.actions.start_streaming(ccid, stream_url="wss://media.example/ws")
    wait_for(lambda: "streaming.started" in receiver.types(ccid), timeout=3)


def test_an_unanswered_call_ends_when_the_caller_gives_up(make_sim, receiver, client):
    sim = make_sim(ring_timeout=0.3)
    ccid = sim.place_call()
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    assert receiver.types(ccid) == ["call.initiated", "call.hangup"]
    initiated = payload(receiver, ccid, "call.initiated")
    hangup = payload(receiver, ccid, "call.hangup")
    assert (initiated["direction"], initiated["state"]) == ("incoming", "parked")
    assert (hangup["hangup_cause"], hangup["hangup_source"], hangup["sip_hangup_cause"]) == (
        "originator_cancel",
        "caller",
        "487",
    )
    assert hangup["start_time"] == initiated["start_time"]
    # No media ever flowed.
    assert "call_quality_stats" in hangup and hangup["call_quality_stats"] is None
    elapsed = occurred(receiver.envelopes(ccid)[1]) - occurred(receiver.envelopes(ccid)[0])
    assert elapsed.total_seconds() >= 0.3
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.answer(ccid)
    assert caught.value.body["errors"][0]["code"] == "90018"


def test_another_application_can_answer_instead(make_sim, receiver, client):
    sim = make_sim(answered_elsewhere=True, media=False)
    ccid = sim.place_call(duration=float("inf"))
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)

    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.answer(ccid)
    assert caught.value.body["errors"][0]["code"] == "90020"
    client.calls.actions.start_forking(ccid, extra_body={"target": "udp:127.0.0.1:4000"})
    wait_for(lambda: "call.fork.started" in receiver.types(ccid), timeout=3)


@pytest.mark.slow
def test_an_answer_starts_its_inline_stream_and_transcription(make_sim, receiver, client):
    server = MediaServer()
    try:
        sim = make_sim(transcription_interval=0.05)
        ccid = sim.place_call(duration=float("inf"))
        client.calls.actions.answer(
            ccid,
            stream_url=server.url,
            stream_track="inbound_track",
            stream_codec="L16",
            transcription=True,
            transcription_config={"transcription_engine": "Telnyx", "transcription_tracks": "both"},
            command_id=str(uuid.uuid4()),
        )
        wait_for(lambda: len(server.frames("media")) >= 5, timeout=3)
        # Each line is heard interim then final: the callee's first words are the third event.
        wait_for(lambda: len(receiver.envelopes(ccid, "call.transcription")) >= 4, timeout=3)
        assert sim.hangup(ccid)
        wait_for(lambda: server.sessions[0]["closed"], timeout=3)
        assert sim.wait_idle(3)
    finally:
        server.close()

    types = [t for t in receiver.types(ccid) if t != "call.transcription"]
    assert types == [
        "call.initiated",
        "call.answered",
        "streaming.started",
        "streaming.stopped",
        "call.hangup",
    ]
    transcripts = receiver.envelopes(ccid, "call.transcription")
    assert occurred(transcripts[0]) > occurred(receiver.envelopes(ccid, "call.answered")[0])
    tracks = {
        t["data"]["payload"]["transcription_data"]["transcription_track"] for t in transcripts
    }
    assert tracks == {"inbound", "outbound"}
    [start] = server.frames("start")
    assert start["start"]["media_format"] == {
        "encoding": "L16",
        "sample_rate": 16000,
        "channels": 1,
    }
    # 20 ms of 16-bit samples at 16 kHz.
    assert {len(base64.b64decode(f["media"]["payload"])) for f in server.frames("media")} == {640}
    hangup = payload(receiver, ccid, "call.hangup")
    assert (hangup["hangup_cause"], hangup["hangup_source"]) == ("normal_clearing", "caller")
    stats = hangup["call_quality_stats"]
    assert int(stats["inbound"]["packet_count"]) > 0 and stats["inbound"]["mos"]


@pytest.mark.parametrize(
    ("cause", "hangup_cause", "sip"),
    [
        ("CALL_REJECTED", "call_rejected", "603"),
        ("USER_BUSY", "user_busy", "486"),
        ("NOT_FOUND", "not_found", "404"),
        ("TEMPORARILY_UNAVAILABLE", "unspecified", "480"),
    ],
)
def test_a_rejected_call_hangs_up_with_the_cause(
    make_sim, receiver, client, cause, hangup_cause, sip
):
    sim = make_sim()
    ccid = sim.place_call()
    client.calls.actions.reject(ccid, cause=cause, client_state=STATE)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    assert receiver.types(ccid) == ["call.initiated", "call.hangup"]
    hangup = payload(receiver, ccid, "call.hangup")
    assert (hangup["hangup_cause"], hangup["hangup_source"], hangup["sip_hangup_cause"]) == (
        hangup_cause,
        "callee",
        sip,
    )
    assert hangup["client_state"] == STATE
    assert ccid not in sim.live_calls


def test_a_hangup_command_ends_the_call_from_our_side(make_sim, receiver, client):
    sim = make_sim(media=False)
    ccid = sim.place_call(duration=float("inf"))
    client.calls.actions.answer(ccid)
    client.calls.actions.start_transcription(ccid)
    wait_for(lambda: receiver.envelopes(ccid, "call.transcription"), timeout=3)
    client.calls.actions.hangup(ccid, command_id=str(uuid.uuid4()))
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    hangup = payload(receiver, ccid, "call.hangup")
    assert (hangup["hangup_cause"], hangup["hangup_source"], hangup["sip_hangup_cause"]) == (
        "normal_clearing",
        "callee",
        "200",
    )
    assert set(hangup["call_quality_stats"]) == {"inbound", "outbound"}
    count = len(receiver.envelopes(ccid, "call.transcription"))
    time.sleep(0.2)
    assert len(receiver.envelopes(ccid, "call.transcription")) == count
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.hangup(ccid)
    assert caught.value.body["errors"][0]["code"] == "90018"


# --- Dial ---------------------------------------------------------------------------------------

ONLY_ANSWERED = {"dial_answered_share": 1, "dial_busy_share": 0, "dial_no_answer_share": 0}


def test_a_dialled_call_is_answered_by_the_far_end(make_sim, receiver, client):
    make_sim(media=False, dial_answer_delay=0.05, **ONLY_ANSWERED)
    data = client.calls.dial(**DIAL, client_state=STATE, command_id=str(uuid.uuid4())).data
    ccid = data.call_control_id
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)
    client.calls.actions.start_forking(ccid, extra_body={"target": "udp:127.0.0.1:4000"})
    wait_for(lambda: "call.fork.started" in receiver.types(ccid), timeout=3)
    client.calls.actions.hangup(ccid)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    initiated = payload(receiver, ccid, "call.initiated")
    assert (initiated["direction"], initiated["state"]) == ("outgoing", "bridging")
    assert (initiated["call_leg_id"], initiated["call_session_id"]) == (
        data.call_leg_id,
        data.call_session_id,
    )
    assert (initiated["from"], initiated["to"], initiated["connection_id"]) == (
        "+15550004444",
        "+15550003333",
        "sim-conn",
    )
    for envelope in receiver.envelopes(ccid):
        assert envelope["data"]["payload"]["client_state"] == STATE
    hangup = payload(receiver, ccid, "call.hangup")
    assert (hangup["hangup_cause"], hangup["hangup_source"]) == ("normal_clearing", "caller")


def test_a_dialled_far_end_can_be_busy(make_sim, receiver, client):
    sim = make_sim(
        dial_answer_delay=0.05, dial_answered_share=0, dial_busy_share=1, dial_no_answer_share=0
    )
    ccid = client.calls.dial(**DIAL).data.call_control_id
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    assert receiver.types(ccid) == ["call.initiated", "call.hangup"]
    hangup = payload(receiver, ccid, "call.hangup")
    assert (hangup["hangup_cause"], hangup["hangup_source"], hangup["sip_hangup_cause"]) == (
        "user_busy",
        "callee",
        "486",
    )
    assert sim.api.call(ccid).ended


def test_a_dial_nobody_answers_times_out(make_sim, receiver, client):
    sim = make_sim(dial_timeout=0.3, dial_answered_share=0, dial_no_answer_share=1)
    ccid = client.calls.dial(**DIAL).data.call_control_id
    time.sleep(0.15)
    assert receiver.types(ccid) == ["call.initiated"]
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)

    hangup = payload(receiver, ccid, "call.hangup")
    assert hangup["hangup_cause"] == "timeout"
    assert hangup["call_quality_stats"] is None
    assert sim.api.call(ccid).ended


@pytest.mark.slow
def test_a_dial_rings_for_its_timeout_secs(make_sim, receiver, client):
    sim = make_sim(dial_timeout=0.1, dial_answer_delay=30, **ONLY_ANSWERED)
    started = time.monotonic()
    ccid = client.calls.dial(**DIAL, timeout_secs=5).data.call_control_id
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=8)
    assert time.monotonic() - started >= 5
    assert payload(receiver, ccid, "call.hangup")["hangup_cause"] == "timeout"
    assert sim.wait_idle(2)


def test_a_dialled_call_ends_at_its_time_limit(make_sim, receiver, client):
    sim = make_sim(media=False, dial_answer_delay=0.05, call_duration=60, **ONLY_ANSWERED)
    ccid = client.calls.dial(**DIAL, time_limit_secs=1).data.call_control_id
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=4)

    answered, hangup = (
        receiver.envelopes(ccid, kind)[0] for kind in ("call.answered", "call.hangup")
    )
    assert hangup["data"]["payload"]["hangup_cause"] == "time_limit"
    assert (occurred(hangup) - occurred(answered)).total_seconds() >= 1
    assert sim.wait_idle(2)


@pytest.mark.parametrize(
    ("mode", "shares", "event_type", "result"),
    [
        ("detect", (0, 1, 0), "call.machine.detection.ended", "machine"),
        ("detect_words", (0, 0, 1), "call.machine.detection.ended", "not_sure"),
        ("premium", (1, 0, 0), "call.machine.premium.detection.ended", "human_residence"),
    ],
)
def test_machine_detection_reports_after_answer(
    make_sim, receiver, client, mode, shares, event_type, result
):
    human, machine, not_sure = shares
    sim = make_sim(
        media=False,
        dial_answer_delay=0.05,
        machine_detection_delay=0.05,
        machine_human_share=human,
        machine_machine_share=machine,
        machine_not_sure_share=not_sure,
        **ONLY_ANSWERED,
    )
    ccid = client.calls.dial(**DIAL, answering_machine_detection=mode).data.call_control_id
    wait_for(lambda: event_type in receiver.types(ccid), timeout=3)

    assert receiver.types(ccid) == ["call.initiated", "call.answered", event_type]
    assert payload(receiver, ccid, event_type)["result"] == result
    sim.hangup(ccid)


def test_a_dial_without_machine_detection_reports_none(make_sim, receiver, client):
    sim = make_sim(
        media=False, dial_answer_delay=0.05, machine_detection_delay=0.05, **ONLY_ANSWERED
    )
    ccid = client.calls.dial(**DIAL, answering_machine_detection="disabled").data.call_control_id
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)
    time.sleep(0.2)
    assert receiver.types(ccid) == ["call.initiated", "call.answered"]
    sim.hangup(ccid)


def test_a_dials_inline_stream_starts_once_answered(make_sim, receiver, client, media_server):
    sim = make_sim(dial_answer_delay=0.3, **ONLY_ANSWERED)
    ccid = client.calls.dial(**DIAL, stream_url=media_server.url).data.call_control_id
    time.sleep(0.15)
    assert not media_server.sessions
    wait_for(lambda: media_server.frames("media"), timeout=3)
    sim.hangup(ccid)
    wait_for(lambda: "call.hangup" in receiver.types(ccid), timeout=3)
    assert receiver.types(ccid)[:3] == ["call.initiated", "call.answered", "streaming.started"]
    assert media_server.frames("start")[0]["start"]["call_control_id"] == ccid


def test_a_lost_answer_to_dial_still_places_the_call(make_sim, receiver, client, api):
    make_sim(media=False, dial_answer_delay=0.05, **ONLY_ANSWERED)
    api.inject(drop=True, apply=True, action="dial")
    command_id = str(uuid.uuid4())

    with pytest.raises(telnyx.APIConnectionError):
        client.calls.dial(**DIAL, client_state=STATE, command_id=command_id)
    placed = api.requests[0].result["call_control_id"]
    wait_for(lambda: "call.answered" in receiver.types(placed), timeout=3)
    # The retry learns the call it made, and makes no other.
    assert client.calls.dial(**DIAL, command_id=command_id).data.call_control_id == placed
    time.sleep(0.1)
    assert len(receiver.envelopes(event_type="call.initiated")) == 1
    assert payload(receiver, placed, "call.initiated")["client_state"] == STATE


def test_a_lost_answer_to_answer_still_answers_the_call(make_sim, receiver, client, api):
    sim = make_sim(media=False)
    ccid = sim.place_call(duration=float("inf"))
    api.inject(drop=True, apply=True, action="answer")
    command_id = str(uuid.uuid4())

    with pytest.raises(telnyx.APIConnectionError):
        client.calls.actions.answer(ccid, command_id=command_id)
    wait_for(lambda: "call.answered" in receiver.types(ccid), timeout=3)
    assert client.calls.actions.answer(ccid, command_id=command_id).data.result == "ok"
    time.sleep(0.1)
    assert receiver.types(ccid) == ["call.initiated", "call.answered"]


def test_its_plan_checks_the_shares():
    with pytest.raises(ValueError, match="dial"):
        CallPlan(dial_answered_share=0, dial_busy_share=0, dial_no_answer_share=0)
    with pytest.raises(ValueError, match="machine"):
        CallPlan(machine_human_share=-1)
    with pytest.raises(ValueError, match="ring_timeout"):
        CallPlan(ring_timeout=0)
    assert CallPlan().shares("dial") == {"answered": 0.8, "busy": 0.1, "no_answer": 0.1}


# --- The media WebSocket, more closely --------------------------------------------------------


def answered_call(sim, client, **stream):
    """A parked call, answered with an inline stream."""
    ccid = sim.place_call(duration=float("inf"))
    client.calls.actions.answer(ccid, **stream)
    return ccid


@pytest.mark.slow
def test_its_media_frames_come_in_order_with_the_codecs_format(make_sim, receiver, client):
    server = MediaServer(on_start=lambda ws: None)
    try:
        sim = make_sim(dtmf_interval=0.1)
        ccid = answered_call(sim, client, stream_url=server.url, stream_codec="PCMA")
        wait_for(lambda: len(server.frames("dtmf")) >= 2, timeout=5)
        sim.hangup(ccid)
        wait_for(lambda: server.sessions[0]["closed"], timeout=3)
        assert sim.wait_idle(3)
    finally:
        server.close()

    events = [f["event"] for f in server.sessions[0]["frames"]]
    assert events[:3] == ["connected", "start", "media"]
    assert events[-1] == "stop" and set(events[2:-1]) == {"media", "dtmf"}
    assert server.frames("start")[0]["start"]["media_format"] == {
        "encoding": "PCMA",
        "sample_rate": 8000,
        "channels": 1,
    }
    payloads = [base64.b64decode(f["media"]["payload"]) for f in server.frames("media")]
    assert {len(p) for p in payloads} == {160}
    # A-law, not mu-law: the same tone gives other bytes.
    assert payloads[0] != base64.b64decode(pcmu_chunk())
    # Every key press is both a webhook and a frame.
    pressed = [
        e["data"]["payload"]["digit"] for e in receiver.envelopes(ccid, "call.dtmf.received")
    ]
    framed = [f["dtmf"]["digit"] for f in server.frames("dtmf")]
    assert framed and framed == pressed[: len(framed)]
    assert all(d in "0123456789*#" for d in pressed)


def pcmu_chunk() -> str:
    from telnyx_sim.media import tone

    return base64.b64encode(tone("PCMU", 440)[:160]).decode()


@pytest.mark.slow
def test_streaming_started_waits_for_the_socket(make_sim, receiver, client):
    server = MediaServer(handshake_delay=0.5)
    try:
        sim = make_sim()
        ccid = answered_call(sim, client, stream_url=server.url)
        sent = time.monotonic()
        time.sleep(0.3)
        assert "streaming.started" not in receiver.types(ccid)
        wait_for(lambda: "streaming.started" in receiver.types(ccid), timeout=3)
        sim.hangup(ccid)
    finally:
        server.close()

    [started] = [
        r for r in receiver.received if r["envelope"]["data"]["event_type"] == "streaming.started"
    ]
    assert started["at"] >= server.sessions[0]["opened"] >= sent + 0.5


@pytest.mark.slow
def test_it_acknowledges_marks_once_the_audio_before_them_has_played(make_sim, client):
    def silence(ms: int) -> str:
        return base64.b64encode(b"\xff" * 8 * ms).decode()  # PCMU at 8 kHz

    def play(ws):
        ws.send(json.dumps({"event": "media", "media": {"payload": silence(200)}}))
        ws.send(json.dumps({"event": "mark", "mark": {"name": "after-200ms"}}))
        ws.send(json.dumps({"event": "media", "media": {"payload": silence(1000)}}))
        ws.send(json.dumps({"event": "mark", "mark": {"name": "cleared"}}))
        time.sleep(0.4)
        ws.send(json.dumps({"event": "clear"}))
        ws.send(json.dumps({"event": "mark", "mark": {"name": "after-clear"}}))
        ws.send("not json")
        ws.send(json.dumps({"event": "media", "media": {"payload": "###"}}))

    def on_start(ws):
        # From a thread of its own, so the server goes on reading (and timing) frames.
        threading.Thread(target=play, args=(ws,), daemon=True).start()

    server = MediaServer(on_start=on_start)
    try:
        sim = make_sim()
        ccid = answered_call(
            sim,
            client,
            stream_url=server.url,
            stream_bidirectional_mode="rtp",
            stream_bidirectional_codec="PCMU",
        )
        wait_for(lambda: len(server.frames("mark")) >= 2 and server.frames("error"), timeout=5)
        time.sleep(0.3)
        sim.hangup(ccid)
        wait_for(lambda: server.sessions[0]["closed"], timeout=3)
    finally:
        server.close()

    session = server.sessions[0]
    start_at = session["at"][[f["event"] for f in session["frames"]].index("start")]
    marks = server.frames("mark")
    assert [m["mark"]["name"] for m in marks] == ["after-200ms", "after-clear"]
    first = session["at"][session["frames"].index(marks[0])]
    assert first - start_at >= 0.18
    assert [e["payload"]["code"] for e in server.frames("error")] == [100003, 100004]
    [record] = sim.media_sessions(ccid)
    assert record.bidirectional == "rtp"
    assert record.audio_received_ms == 1200
    assert 400 <= record.audio_played_ms < 1000
    assert record.marks_acknowledged == ["after-200ms", "after-clear"]


def test_it_sends_error_frames_only_when_switched_on(make_sim, client, media_server):
    sim = make_sim(media_error_rate=1.0)
    ccid = answered_call(sim, client, stream_url=media_server.url)
    wait_for(lambda: len(media_server.frames("error")) >= 2, timeout=3)
    error = media_server.frames("error")[0]
    assert error["payload"]["code"] == 100002 and error["payload"]["title"]
    sim.hangup(ccid)

    quiet = make_sim()
    other = answered_call(quiet, client, stream_url=media_server.url)
    wait_for(lambda: len(media_server.frames("media", session=1)) >= 10, timeout=3)
    assert not media_server.frames("error", session=1)
    quiet.hangup(other)
