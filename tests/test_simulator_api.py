"""The Telnyx command-API simulator, exercised through the real telnyx SDK.

No database: run with ``pytest tests/test_simulator_api.py -p no:django``.
"""

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import telnyx

from telnyx_sim import TelnyxAPISimulator

API_KEY = "KEY_TEST_SIMULATOR"
CCID = "v3:call-1"
STATE = "eyJ0ZW5hbnQiOiAxfQ=="  # base64 of {"tenant": 1}


class FakeClock:
    """Monotonic time the test moves by hand, so windows and TTLs need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def clock():
    return FakeClock()


@pytest.fixture(scope="module")
def server(clock):
    # One server and one client for the module: starting them costs ~40 ms a test.
    with TelnyxAPISimulator(api_key=API_KEY, clock=clock) as server:
        yield server


@pytest.fixture
def sim(server):
    server.reset()
    return server


def make_client(sim, **kwargs):
    options = {"api_key": API_KEY, "base_url": sim.base_url, "max_retries": 0, "timeout": 5}
    return telnyx.Telnyx(**{**options, **kwargs})


@pytest.fixture(scope="module")
def shared_client(server):
    with make_client(server) as client:
        yield client


@pytest.fixture
def client(sim, shared_client):
    return shared_client


def error_code(exc):
    return exc.body["errors"][0]["code"]


def raw_request(sim, method, path, body=b"", headers=None):
    """One request with http.client, for what the SDK cannot send."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# (SDK method, Telnyx action, keyword arguments)
SIX_ACTIONS = [
    (
        "start_streaming",
        "streaming_start",
        {
            "stream_url": "wss://media.example/ws",
            "stream_track": "both_tracks",
            "stream_codec": "PCMU",
        },
    ),
    ("stop_streaming", "streaming_stop", {}),
    ("start_forking", "fork_start", {"rx": "udp:10.0.0.1:4000", "tx": "udp:10.0.0.1:4001"}),
    ("stop_forking", "fork_stop", {"stream_type": "raw"}),
    (
        "start_transcription",
        "transcription_start",
        {"transcription_engine": "Google", "transcription_tracks": "both"},
    ),
    ("stop_transcription", "transcription_stop", {}),
]


@pytest.mark.parametrize(("method", "action", "kwargs"), SIX_ACTIONS)
def test_it_accepts_each_action_and_logs_it(sim, client, method, action, kwargs):
    response = getattr(client.calls.actions, method)(
        CCID, client_state=STATE, command_id=f"cmd-{action}", **kwargs
    )

    assert response.data.result == "ok"
    [record] = sim.commands()
    assert record.action == action
    assert record.call_control_id == CCID
    assert record.body == {"client_state": STATE, "command_id": f"cmd-{action}", **kwargs}
    assert record.command_id == f"cmd-{action}"
    assert (record.status, record.authorized, record.applied) == (200, True, True)
    assert (record.duplicate, record.fault) == (False, False)
    assert record.path == f"/v2/calls/{CCID}/actions/{action}"


def test_it_keeps_call_state_in_order(sim, client):
    actions = client.calls.actions
    actions.start_streaming(CCID, stream_url="wss://media.example/ws")
    actions.start_transcription(CCID, transcription_tracks="inbound")
    assert sim.call(CCID).streaming and sim.call(CCID).transcribing

    # Only one stream or fork per call: the fork replaces the stream.
    actions.start_forking(CCID, extra_body={"target": "udp:10.0.0.1:4000"})
    state = sim.call(CCID)
    assert (state.streaming, state.forking, state.transcribing) == (False, True, True)

    actions.stop_forking(CCID)
    actions.stop_transcription(CCID)
    state = sim.call(CCID)
    assert not (state.streaming or state.forking or state.transcribing)
    assert [name for name, _ in state.actions] == [
        "streaming_start",
        "transcription_start",
        "fork_start",
        "fork_stop",
        "transcription_stop",
    ]


def test_it_decodes_percent_encoded_call_control_ids(sim, client):
    client.calls.actions.stop_streaming("v3:odd/id with space")

    assert sim.commands()[0].call_control_id == "v3:odd/id with space"


def test_it_rejects_a_wrong_api_key(sim):
    with (
        make_client(sim, api_key="KEY_WRONG") as client,
        pytest.raises(telnyx.AuthenticationError) as caught,
    ):
        client.calls.actions.stop_streaming(CCID)

    assert caught.value.status_code == 401
    assert error_code(caught.value) == "10009"
    assert caught.value.body["errors"][0]["title"] == "Authentication failed"
    [record] = sim.requests
    assert (record.status, record.authorized, record.applied) == (401, False, False)
    assert sim.call(CCID) is None


def test_it_rejects_a_missing_authorization_header(sim):
    status, _, body = raw_request(sim, "POST", f"/v2/calls/{CCID}/actions/streaming_stop", b"{}")

    assert status == 401
    assert json.loads(body)["errors"][0]["code"] == "10009"


def test_it_answers_90018_for_an_ended_call(sim, client):
    sim.add_call(CCID)
    sim.end_call(CCID)

    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.start_streaming(CCID, stream_url="wss://media.example/ws")

    assert error_code(caught.value) == "90018"
    assert caught.value.body["errors"][0]["title"] == "Call has already ended"
    assert sim.commands(status=422)[0].applied is False


def test_it_accepts_unknown_calls_by_default(sim, client):
    client.calls.actions.stop_transcription("v3:never-seen")

    assert sim.call("v3:never-seen").ended is False


def test_it_answers_90015_for_unknown_calls_when_strict(sim, client):
    sim.accept_unknown_calls = False

    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.stop_streaming("v3:never-seen")
    assert error_code(caught.value) == "90015"

    sim.add_call("v3:known")
    assert client.calls.actions.stop_streaming("v3:known").data.result == "ok"


INVALID_BODIES = [
    ("start_streaming", {}, "/stream_url"),
    ("start_streaming", {"stream_url": "https://media.example/ws"}, "/stream_url"),
    ("start_streaming", {"stream_url": "wss://m.example", "stream_track": "left"}, "/stream_track"),
    ("start_streaming", {"stream_url": "wss://m.example", "stream_codec": "MP3"}, "/stream_codec"),
    ("start_forking", {}, "/target"),
    ("start_forking", {"rx": "udp:10.0.0.1:4000"}, "/target"),
    (
        "start_forking",
        {"extra_body": {"target": "udp:1.2.3.4:5"}, "stream_type": "decrypted"},
        "/rx",
    ),
    ("start_transcription", {"transcription_tracks": "left"}, "/transcription_tracks"),
    ("stop_forking", {"client_state": "not base64!"}, "/client_state"),
]


@pytest.mark.parametrize(("method", "kwargs", "pointer"), INVALID_BODIES)
def test_it_rejects_invalid_parameters(sim, client, method, kwargs, pointer):
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        getattr(client.calls.actions, method)(CCID, **kwargs)

    [error] = caught.value.body["errors"]
    assert (error["code"], error["title"]) == ("10015", "Invalid parameter")
    assert error["source"] == {"pointer": pointer}
    assert sim.call(CCID).actions == []


def test_it_reports_every_invalid_parameter(client):
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.start_streaming(CCID, stream_url="http://x", stream_track="left")

    pointers = [error["source"]["pointer"] for error in caught.value.body["errors"]]
    assert pointers == ["/stream_url", "/stream_track"]


def test_it_answers_400_to_a_body_that_is_not_json(sim):
    path = f"/v2/calls/{CCID}/actions/streaming_stop"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    status, _, body = raw_request(sim, "POST", path, b"{nope", headers)

    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == "10015"


def test_it_answers_404_for_other_actions_and_paths(sim, client):
    with pytest.raises(telnyx.NotFoundError) as caught:
        client.calls.actions.send_dtmf(CCID, digits="1")
    assert error_code(caught.value) == "10005"

    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert raw_request(sim, "GET", f"/v2/calls/{CCID}", headers=headers)[0] == 404
    assert [r.action for r in sim.requests] == ["send_dtmf", None]


def test_it_rate_limits_with_telnyx_headers(sim, client, clock):
    sim.rate_limit = 2
    client.calls.actions.stop_streaming(CCID)
    client.calls.actions.stop_streaming(CCID)

    with pytest.raises(telnyx.RateLimitError) as caught:
        client.calls.actions.stop_streaming(CCID)

    assert error_code(caught.value) == "10011"
    assert caught.value.body["errors"][0]["title"] == "Too many requests"
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit"] == "2"
    assert headers["x-ratelimit-remaining"] == "0"
    assert int(headers["X-RateLimit-Reset"]) >= 1

    clock.advance(1.0)
    assert client.calls.actions.stop_streaming(CCID).data.result == "ok"
    assert sim.max_in_any_window(1.0, status=200) == 2
    assert sim.max_in_any_window(1.0) == 3


def test_it_changes_the_rate_limit_at_runtime(sim, client):
    sim.rate_limit = 1
    client.calls.actions.stop_streaming(CCID)
    with pytest.raises(telnyx.RateLimitError):
        client.calls.actions.stop_streaming(CCID)

    sim.rate_limit = None
    for _ in range(3):
        client.calls.actions.stop_streaming(CCID)
    assert len(sim.commands(status=200)) == 4


def test_it_rate_limits_concurrent_clients_on_the_real_clock():
    with TelnyxAPISimulator(api_key=API_KEY, rate_limit=5) as sim, make_client(sim) as client:

        def send(_):
            try:
                return client.calls.actions.stop_streaming(CCID).data.result
            except telnyx.RateLimitError:
                return "limited"

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(send, range(12)))

    assert "limited" in results
    assert sim.max_in_any_window(1.0, status=200) <= 5


def test_it_counts_requests_in_sliding_windows(sim, client, clock):
    for step in (0.0, 0.5, 0.49, 0.01, 1.0):
        clock.advance(step)
        client.calls.actions.stop_streaming(CCID)

    # Times 0, 0.5, 0.99, 1.0, 2.0: a window is half-open, so 0 and 1.0 never share one.
    assert sim.max_in_any_window(1.0) == 3
    assert sim.max_in_any_window(0.1) == 2
    assert sim.max_in_any_window(10.0) == 5


def test_it_serves_an_injected_500_then_succeeds(sim, client):
    fault = sim.inject(status=500)

    with pytest.raises(telnyx.InternalServerError) as caught:
        client.calls.actions.stop_streaming(CCID, command_id="cmd-1")
    assert caught.value.status_code == 500
    assert fault.remaining == 0

    assert client.calls.actions.stop_streaming(CCID, command_id="cmd-1").data.result == "ok"
    assert [(r.status, r.fault, r.applied) for r in sim.requests] == [
        (500, True, False),
        (200, False, True),
    ]


def test_it_injects_only_into_matching_requests(sim, client):
    sim.inject(status=503, body="<html>upstream down</html>", times=None, action="fork_start")

    client.calls.actions.stop_streaming(CCID)
    with pytest.raises(telnyx.InternalServerError) as caught:
        client.calls.actions.start_forking(CCID, extra_body={"target": "udp:10.0.0.1:4000"})
    assert caught.value.status_code == 503
    assert caught.value.body == "<html>upstream down</html>"

    sim.clear_faults()
    client.calls.actions.start_forking(CCID, extra_body={"target": "udp:10.0.0.1:4000"})
    assert sim.call(CCID).forking


def test_it_injects_custom_json_and_headers(client, sim):
    sim.inject(status=429, body={"errors": [{"code": "10011"}]}, headers={"Retry-After": "7"})

    with pytest.raises(telnyx.RateLimitError) as caught:
        client.calls.actions.stop_streaming(CCID)

    assert caught.value.response.headers["retry-after"] == "7"
    assert error_code(caught.value) == "10011"


def test_it_drops_the_connection_when_asked(sim, client):
    sim.inject(drop=True)

    with pytest.raises(telnyx.APIConnectionError) as caught:
        client.calls.actions.stop_streaming(CCID)
    assert not isinstance(caught.value, telnyx.APITimeoutError)

    assert client.calls.actions.stop_streaming(CCID).data.result == "ok"
    assert [r.status for r in sim.requests] == [0, 200]


def test_it_delays_past_the_client_timeout(sim):
    sim.inject(delay=5.0, status=200, body={"data": {"result": "ok"}})

    with make_client(sim, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(telnyx.APITimeoutError):
            client.calls.actions.stop_streaming(CCID)

    assert time.monotonic() - started < 1.0
    assert len(sim.requests) == 1


def test_it_ignores_a_repeated_command_id_for_60_seconds(sim, client, clock):
    actions = client.calls.actions
    assert actions.stop_streaming(CCID, command_id="cmd-1").data.result == "ok"
    assert actions.stop_streaming(CCID, command_id="cmd-1").data.result == "ok"
    actions.stop_streaming("v3:call-2", command_id="cmd-1")  # another call: applied

    clock.advance(59.9)
    actions.stop_streaming(CCID, command_id="cmd-1")
    clock.advance(0.1)
    actions.stop_streaming(CCID, command_id="cmd-1")

    assert [(r.duplicate, r.applied) for r in sim.commands(call_control_id=CCID)] == [
        (False, True),
        (True, False),
        (True, False),
        (False, True),
    ]
    assert len(sim.call(CCID).actions) == 2
    assert len(sim.call("v3:call-2").actions) == 1


def test_it_dedupes_a_retry_after_a_lost_response(sim, client):
    # Telnyx applied the command but the answer never arrived: the retry must be a no-op.
    sim.inject(drop=True, apply=True)

    with pytest.raises(telnyx.APIConnectionError):
        client.calls.actions.start_streaming(CCID, stream_url="wss://m.example", command_id="c1")
    client.calls.actions.start_streaming(CCID, stream_url="wss://m.example", command_id="c1")

    assert [(r.status, r.applied, r.duplicate) for r in sim.requests] == [
        (0, True, False),
        (200, False, True),
    ]
    assert len(sim.call(CCID).actions) == 1


def test_it_calls_the_hook_after_answering(sim, client):
    seen = []
    done = threading.Event()

    def hook(record):
        seen.append(record)
        if len(seen) == 2:
            done.set()
        raise RuntimeError("a broken hook must not break the server")

    sim.on_command = hook
    client.calls.actions.start_streaming(CCID, stream_url="wss://media.example/ws")
    client.calls.actions.stop_streaming(CCID)

    assert done.wait(2)
    assert [r.action for r in seen] == ["streaming_start", "streaming_stop"]


def test_it_answers_many_concurrent_requests(sim, client):
    def send(n):
        return client.calls.actions.stop_streaming(f"v3:call-{n % 5}").data.result

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(send, range(40)))

    assert results == ["ok"] * 40
    assert len(sim.commands()) == 40


def test_it_keeps_connections_alive(sim):
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    sockets = []
    for _ in range(2):
        conn.request("POST", f"/v2/calls/{CCID}/actions/streaming_stop", b"{}", headers)
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert int(response.getheader("Content-Length")) == len(response.read())
        sockets.append(conn.sock)

    assert sockets[0] is sockets[1]
    conn.close()


def test_it_stops_cleanly_with_idle_and_busy_connections():
    sim = TelnyxAPISimulator(api_key=API_KEY).start()
    idle = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    idle.request("POST", f"/v2/calls/{CCID}/actions/streaming_stop", b"{}")
    idle.getresponse().read()
    sim.inject(delay=30.0)

    def wait_for_answer():
        with pytest.raises(http.client.RemoteDisconnected):
            raw_request(sim, "POST", "/v2/x")

    busy = threading.Thread(target=wait_for_answer, daemon=True)
    busy.start()
    while not sim.requests[1:]:
        time.sleep(0.005)

    started = time.monotonic()
    sim.stop()
    sim.stop()  # idempotent

    assert time.monotonic() - started < 1.0
    busy.join(1)
    assert not busy.is_alive()
    with pytest.raises(RuntimeError):
        sim.base_url  # noqa: B018
    idle.close()


def test_it_clears_the_log_but_keeps_state(sim, client):
    client.calls.actions.stop_streaming(CCID, command_id="c1")
    sim.clear()

    assert sim.requests == []
    client.calls.actions.stop_streaming(CCID, command_id="c1")
    assert sim.requests[0].duplicate

    sim.rate_limit = 1
    sim.accept_unknown_calls = False
    sim.reset()
    assert sim.call(CCID) is None
    assert (sim.rate_limit, sim.accept_unknown_calls) == (None, True)


# --- Call control: answer, reject, hangup, dial -----------------------------------------------

DIAL = {"connection_id": "conn-1", "to": "+15550001111", "from_": "+15550002222"}


def test_it_refuses_media_commands_on_a_parked_call(sim, client):
    sim.add_call(CCID, answered=False)

    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.start_streaming(CCID, stream_url="wss://media.example/ws")

    assert caught.value.body == {
        "errors": [
            {
                "code": "90019",
                "title": "Call not answered",
                "detail": "streaming_start needs an answered call: until the call is answered "
                "only answer, reject and hangup are accepted.",
            }
        ]
    }
    assert sim.commands(status=422)[0].applied is False
    assert not sim.call(CCID).streaming

    client.calls.actions.answer(CCID)
    client.calls.actions.start_streaming(CCID, stream_url="wss://media.example/ws")
    assert sim.call(CCID).answered and sim.call(CCID).streaming


@pytest.mark.parametrize(
    ("method", "kwargs"), [("reject", {"cause": "USER_BUSY"}), ("hangup", {"reason": "done"})]
)
def test_it_ends_a_parked_call_on_reject_or_hangup(sim, client, method, kwargs):
    sim.add_call(CCID, answered=False)

    assert getattr(client.calls.actions, method)(CCID, **kwargs).data.result == "ok"

    assert sim.call(CCID).ended
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.answer(CCID)
    assert error_code(caught.value) == "90018"


def test_it_answers_or_rejects_only_a_parked_incoming_call(sim, client):
    sim.add_call(CCID)  # answered
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.answer(CCID)
    assert (error_code(caught.value), caught.value.body["errors"][0]["title"]) == (
        "90020",
        "Call cannot be answered",
    )

    outgoing = client.calls.dial(**DIAL).data.call_control_id
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.reject(outgoing, cause="CALL_REJECTED")
    assert error_code(caught.value) == "90020"
    assert "outgoing" in caught.value.body["errors"][0]["detail"]
    assert [name for name, _ in sim.call(outgoing).actions] == ["dial"]


def test_it_finds_an_unknown_call_parked_when_its_first_command_answers(sim, client):
    client.calls.actions.answer("v3:never-seen")

    state = sim.call("v3:never-seen")
    assert (state.direction, state.answered, state.ended) == ("incoming", True, False)


def test_it_checks_reject_and_inline_media_bodies(sim, client):
    path = f"/v2/calls/{CCID}/actions/reject"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    sim.add_call(CCID, answered=False)

    status, _, body = raw_request(sim, "POST", path, b"{}", headers)
    assert status == 422
    assert json.loads(body)["errors"][0]["source"] == {"pointer": "/cause"}

    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.answer(
            CCID,
            stream_url="https://not-a-websocket",
            transcription=True,
            transcription_config={"transcription_tracks": "left"},
        )
    pointers = [error["source"]["pointer"] for error in caught.value.body["errors"]]
    assert pointers == ["/stream_url", "/transcription_config/transcription_tracks"]
    assert not sim.call(CCID).answered


def test_an_answer_starts_its_inline_stream_and_transcription(sim, client):
    sim.add_call(CCID, answered=False)

    client.calls.actions.answer(
        CCID,
        stream_url="wss://media.example/ws",
        stream_track="both_tracks",
        transcription=True,
        transcription_config={"transcription_engine": "Telnyx", "transcription_tracks": "both"},
    )

    state = sim.call(CCID)
    assert (state.answered, state.streaming, state.transcribing) == (True, True, True)


def test_it_dials_and_answers_the_new_calls_ids(sim, client):
    response = client.calls.dial(**DIAL, client_state=STATE, timeout_secs=30)

    data = response.data
    assert data.call_control_id.startswith("v3:")
    assert data.is_alive is False and data.record_type == "call"
    assert len({data.call_control_id, data.call_leg_id, data.call_session_id}) == 3
    [record] = sim.commands(action="dial")
    assert record.path == "/v2/calls" and record.call_control_id is None
    assert record.result == response.model_dump(exclude_none=True)["data"]
    state = sim.call(data.call_control_id)
    assert (state.direction, state.answered, state.ended) == ("outgoing", False, False)

    # Ringing: media commands wait for the far end to answer; hangup does not.
    with pytest.raises(telnyx.UnprocessableEntityError) as caught:
        client.calls.actions.start_transcription(data.call_control_id)
    assert error_code(caught.value) == "90019"
    client.calls.actions.hangup(data.call_control_id)
    assert sim.call(data.call_control_id).ended


def test_it_checks_a_dials_body(sim):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body = json.dumps({"to": [], "timeout_secs": 2, "answering_machine_detection": "maybe"})

    status, _, answer = raw_request(sim, "POST", "/v2/calls", body.encode(), headers)

    assert status == 422
    pointers = [error["source"]["pointer"] for error in json.loads(answer)["errors"]]
    assert pointers == [
        "/connection_id",
        "/to",
        "/from",
        "/timeout_secs",
        "/answering_machine_detection",
    ]
    assert sim.commands(action="dial", status=None)[0].applied is False


def test_it_dedupes_a_dial_by_command_id_per_connection(sim, client, clock):
    first = client.calls.dial(**DIAL, command_id="dial-1").data
    again = client.calls.dial(**DIAL, command_id="dial-1").data
    other = client.calls.dial(**{**DIAL, "connection_id": "conn-2"}, command_id="dial-1").data
    clock.advance(60)
    later = client.calls.dial(**DIAL, command_id="dial-1").data

    assert again.call_control_id == first.call_control_id
    assert len({first.call_control_id, other.call_control_id, later.call_control_id}) == 3
    assert [(r.applied, r.duplicate) for r in sim.commands(action="dial")] == [
        (True, False),
        (False, True),
        (True, False),
        (True, False),
    ]


def test_a_lost_answer_to_answer_still_answers_the_call(sim, client):
    sim.add_call(CCID, answered=False)
    sim.inject(drop=True, apply=True, action="answer")

    with pytest.raises(telnyx.APIConnectionError):
        client.calls.actions.answer(CCID, command_id="answer-1")
    assert sim.call(CCID).answered
    # The retry is a repeat, not a second answer (which would be refused with 90020).
    assert client.calls.actions.answer(CCID, command_id="answer-1").data.result == "ok"

    assert [(r.status, r.applied, r.duplicate) for r in sim.requests] == [
        (0, True, False),
        (200, False, True),
    ]


@pytest.mark.parametrize(("method", "kwargs"), [("reject", {"cause": "NOT_FOUND"}), ("hangup", {})])
def test_a_lost_answer_to_reject_or_hangup_still_ends_the_call(sim, client, method, kwargs):
    sim.add_call(CCID, answered=False)
    sim.inject(drop=True, apply=True, action=method)

    with pytest.raises(telnyx.APIConnectionError):
        getattr(client.calls.actions, method)(CCID, command_id="end-1", **kwargs)

    assert sim.call(CCID).ended
    assert sim.requests[0].applied


def test_a_lost_answer_to_dial_still_places_the_call(sim, client):
    sim.inject(drop=True, apply=True, action="dial")

    with pytest.raises(telnyx.APIConnectionError):
        client.calls.dial(**DIAL, command_id="dial-lost")
    [lost] = sim.requests
    assert (lost.status, lost.applied) == (0, True)
    placed = lost.result["call_control_id"]
    assert sim.call(placed).direction == "outgoing"

    # Retried with the same command_id: the call already placed, not a second one.
    assert client.calls.dial(**DIAL, command_id="dial-lost").data.call_control_id == placed
    assert sim.requests[1].duplicate and not sim.requests[1].applied


def test_the_far_end_answering_starts_a_dials_inline_media(sim, client):
    ccid = client.calls.dial(**DIAL, stream_url="wss://media.example/ws", transcription=True)
    ccid = ccid.data.call_control_id
    assert not sim.call(ccid).streaming

    assert sim.mark_answered(ccid)
    assert not sim.mark_answered(ccid)

    state = sim.call(ccid)
    assert (state.answered, state.streaming, state.transcribing) == (True, True, True)
    assert not sim.end_call(ccid, if_unanswered=True)
    assert sim.end_call(ccid) and not sim.end_call(ccid)
