"""Answer, reject, hang up and dial: the policies, the partner API and the admin."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from callops import commands
from callops.models import Call, Command, MediaStream, StreamingProfile, Transcription
from tests.helpers import deliver, make_call, partner_with_key
from tests.telnyx_events import dumps, envelope

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fake_dns")]

STREAM_URL = "wss://media.example.com/live"


@pytest.fixture
def acme():
    partner, client = partner_with_key("acme", "conn-1")
    return partner, client


def profile(partner, **fields) -> StreamingProfile:
    defaults = {
        "stream_url": STREAM_URL,
        "stream_track": "both_tracks",
        "auto_start": True,
        "transcribe": True,
        "transcription_engine": "Google",
        "transcription_tracks": "both",
    }
    return StreamingProfile.objects.create(partner=partner, **{**defaults, **fields})


def incoming(ccid: str = "v3:in") -> None:
    deliver(envelope("call.initiated", ccid, direction="incoming", state="parked"))


# --- The answer policy ------------------------------------------------------------------------


def test_answer_policy_sends_one_answer_with_streaming_and_transcription_inline(acme):
    profile(acme[0], answer_policy="answer")
    incoming()
    deliver(envelope("call.initiated", "v3:in", direction="incoming"))  # delivered twice
    (answer,) = Command.objects.all()
    assert (answer.action, answer.requested_by) == ("answer", "policy")
    assert answer.params["stream_url"] == STREAM_URL
    assert answer.params["transcription"] is True
    assert answer.params["transcription_config"]["transcription_engine"] == "Google"
    assert answer.stream.status == answer.transcription.status == "requested"
    # Telnyx's call.answered starts nothing more: the media were inline.
    deliver(envelope("call.answered", "v3:in"))
    assert Command.objects.count() == 1
    assert (MediaStream.objects.count(), Transcription.objects.count()) == (1, 1)


def test_reject_policy_rejects_with_the_profile_s_cause(acme):
    profile(acme[0], answer_policy="reject", reject_cause="USER_BUSY")
    incoming()
    (reject,) = Command.objects.all()
    assert (reject.action, reject.params) == ("reject", {"cause": "USER_BUSY"})


def test_policy_none_leaves_the_answer_to_another_app_and_starts_on_answer(acme):
    profile(acme[0], answer_policy="none")
    incoming()
    assert not Command.objects.exists()
    deliver(envelope("call.answered", "v3:in"))
    assert sorted(Command.objects.values_list("action", flat=True)) == [
        "streaming_start",
        "transcription_start",
    ]


def test_an_outgoing_call_is_never_answered_by_the_policy(acme):
    profile(acme[0], answer_policy="answer")
    deliver(envelope("call.initiated", "v3:out", direction="outgoing"))
    assert not Command.objects.exists()


# --- Machine detection, DTMF, quality ------------------------------------------------------------


def test_a_machine_is_hung_up_on_when_the_profile_says_so(acme):
    profile(acme[0], machine_policy="hangup")
    deliver(envelope("call.machine.detection.ended", "v3:amd", result="machine"))
    call = Call.objects.get()
    assert call.machine_detection == "machine"
    assert list(call.commands.values_list("action", flat=True)) == ["hangup"]


def test_humans_only_starts_media_once_a_human_is_detected(acme):
    profile(acme[0], machine_policy="humans_only")
    command = commands.call_dial(
        params={
            "connection_id": "conn-1",
            "to": "+15550001111",
            "from": "+15550002222",
            "answering_machine_detection": "detect",
        },
        requested_by="partner",
    )
    from callops import state

    state.call_adopt(command.call, named={"call_control_id": "v3:h"})
    deliver(envelope("call.answered", "v3:h"))
    assert not Command.objects.exclude(action="dial").exists()  # held back: no verdict yet
    deliver(envelope("call.machine.detection.ended", "v3:h", result="human"))
    assert sorted(Command.objects.exclude(action="dial").values_list("action", flat=True)) == [
        "streaming_start",
        "transcription_start",
    ]


def test_the_hangup_keeps_call_quality_stats(acme):
    stats = {"inbound": {"mos": "4.3", "jitter_max_variance": "2.1"}}
    deliver(
        envelope("call.hangup", "v3:q", hangup_cause="normal_clearing", call_quality_stats=stats)
    )
    assert Call.objects.get().call_quality_stats == stats


def test_the_hangup_cause_wins_over_a_command_that_learned_the_call_ended(acme):
    call = make_call("v3:late", "conn-1")
    from django.utils import timezone

    from callops import state

    state.call_mark_ended(call=call, at=timezone.now())  # what "call has already ended" does
    call.save()
    deliver(envelope("call.hangup", "v3:late", hangup_cause="user_busy"))
    call.refresh_from_db()
    assert call.hangup_cause == "user_busy"
    assert call.ended_at == call.hangup_at


# --- The partner API ---------------------------------------------------------------------------


def test_a_partner_answers_rejects_and_hangs_up_its_calls(acme):
    _, client = acme
    for action, body in (
        ("answer", {"stream_url": STREAM_URL}),
        ("reject", {"cause": "CALL_REJECTED"}),
        ("hangup", {}),
    ):
        make_call(f"v3:{action}", "conn-1", status="initiated")
        response = client.post(f"/api/v1/calls/v3:{action}/{action}/", body, format="json")
        assert response.status_code == 202, response.json()
        assert response.json()["action"] == action


def test_reject_needs_a_cause_telnyx_knows(acme):
    make_call("v3:r", "conn-1", status="initiated")
    response = acme[1].post("/api/v1/calls/v3:r/reject/", {"cause": "NOPE"}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "cause"


def test_answer_refuses_stream_options_without_a_stream_url(acme):
    make_call("v3:a", "conn-1", status="initiated")
    response = acme[1].post("/api/v1/calls/v3:a/answer/", {"stream_codec": "PCMU"}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"field": "stream_codec", "message": "is used only with stream_url"}
    ]


def test_dial_places_a_call_on_a_partner_connection(acme):
    _, client = acme
    body = {"connection_id": "conn-1", "to": "+15550001111", "from": "+15550002222"}
    response = client.post("/api/v1/calls/", {**body, "timeout_secs": 20}, format="json")
    assert response.status_code == 202, response.json()
    command = Command.objects.get()
    assert command.action == "dial"
    assert command.params == {**body, "timeout_secs": 20}
    assert response.json()["call_control_id"].startswith("dialing:")
    assert command.call.direction == "outgoing"


def test_dial_takes_only_the_partner_s_own_connections(acme):
    partner_with_key("other", "conn-other")
    body = {"connection_id": "conn-other", "to": "+15550001111", "from": "+15550002222"}
    response = acme[1].post("/api/v1/calls/", body, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "connection_id"
    assert not Call.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "+1", "from": "+2"}, "connection_id"),
        ({"connection_id": "conn-1", "from": "+2"}, "to"),
        ({"connection_id": "conn-1", "to": "+1", "from": "+2", "timeout_secs": 2}, "timeout_secs"),
        (
            {"connection_id": "conn-1", "to": "+1", "from": "+2", "record": "record-from-answer"},
            "record",
        ),
    ],
)
def test_dial_refuses_what_telnyx_would_refuse_naming_the_field(acme, body, field):
    response = acme[1].post("/api/v1/calls/", body, format="json")
    assert response.status_code == 400
    assert field in {e["field"] for e in response.json()["errors"]}


def test_dial_takes_the_profile_s_media_inline(acme):
    profile(acme[0])
    body = {"connection_id": "conn-1", "to": "+15550001111", "from": "+15550002222"}
    assert acme[1].post("/api/v1/calls/", body, format="json").status_code == 202
    command = Command.objects.get()
    assert command.params["stream_url"] == STREAM_URL and command.params["transcription"]
    assert command.stream.status == "requested"


def test_a_second_stream_is_refused_while_one_is_open(acme):
    call = make_call("v3:two", "conn-1")
    MediaStream.objects.create(call=call, stream_url=STREAM_URL, status="active")
    for path, body in (
        ("streaming/", {"stream_url": STREAM_URL}),
        ("forking/", {"target": "udp:93.184.216.34:5000"}),
    ):
        response = acme[1].post(f"/api/v1/calls/v3:two/{path}", body, format="json")
        assert response.status_code == 409
        assert "stop it first" in response.json()["errors"][0]["message"]


def test_a_stop_is_aimed_at_the_open_stream_when_its_id_is_known(acme):
    call = make_call("v3:stop", "conn-1")
    MediaStream.objects.create(call=call, stream_url=STREAM_URL, status="active", stream_id="st-9")
    response = acme[1].post("/api/v1/calls/v3:stop/streaming/stop/", {}, format="json")
    assert response.status_code == 202
    assert response.json()["params"] == {"stream_id": "st-9"}
    assert response.json()["applies_to"].startswith("stream ")


def test_a_stop_without_a_known_stream_id_says_it_stops_every_stream(acme):
    call = make_call("v3:all", "conn-1")
    MediaStream.objects.create(call=call, stream_url=STREAM_URL, status="active")
    response = acme[1].post("/api/v1/calls/v3:all/streaming/stop/", {}, format="json")
    assert response.json()["applies_to"] == "every stream of the call"


def test_profiles_take_an_answer_policy(acme):
    body = {"stream_url": STREAM_URL, "answer_policy": "reject", "reject_cause": "USER_BUSY"}
    response = acme[1].post("/api/v1/profiles/", body, format="json")
    assert response.status_code == 201, response.json()
    assert (response.json()["answer_policy"], response.json()["reject_cause"]) == (
        "reject",
        "USER_BUSY",
    )
    response = acme[1].patch(
        f"/api/v1/profiles/{response.json()['id']}/", {"answer_policy": "maybe"}, format="json"
    )
    assert response.status_code == 400


# --- The admin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin_action", "telnyx_action", "params"),
    [
        ("answer", "answer", {}),
        ("reject", "reject", {"cause": "CALL_REJECTED"}),
        ("hang_up", "hangup", {}),
    ],
)
def test_operators_answer_reject_and_hang_up_from_the_admin(
    client, admin_action, telnyx_action, params
):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client.force_login(user)
    call = make_call("v3:admin", "conn-none", status="initiated")
    response = client.post(
        "/admin/callops/call/", {"action": admin_action, "_selected_action": [call.pk]}, follow=True
    )
    assert f"Queued {telnyx_action} for 1 call(s)." in response.content.decode()
    command = Command.objects.get()
    assert (command.action, command.params, command.requested_by) == (
        telnyx_action,
        params,
        "operator",
    )


def test_premium_detection_of_a_machine_is_hung_up_on_too(acme):
    profile(acme[0], machine_policy="hangup")
    deliver(envelope("call.machine.premium.detection.ended", "v3:prem", result="machine"))
    assert list(Call.objects.get().commands.values_list("action", flat=True)) == ["hangup"]


def test_a_profile_setting_callops_does_not_have_is_refused_by_name(acme):
    body = {"stream_url": STREAM_URL, "answer_policy": "answer", "answer_delay": 3, "id": 7}
    response = acme[1].post("/api/v1/profiles/", body, format="json")
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {"answer_delay"}  # id: read-only


@pytest.mark.django_db(transaction=True)
def test_the_urgent_drain_sends_the_answer_it_created_itself_and_publishes_the_rest(
    acme, telnyx, monkeypatch
):
    """No send_command message and no wait for a free worker between the call.initiated and
    its answer; a second answer in the same batch goes on another worker, in parallel."""
    from callops import drain, queue, tasks, webhooks

    published = []
    real_publish = queue.publish
    monkeypatch.setattr(
        queue,
        "publish",
        lambda name, *a, **kw: (published.append(name), real_publish(name, *a, **kw)),
    )
    profile(acme[0], answer_policy="answer")
    same_shard = [f"v3:in-{k}" for k in range(100) if drain.shard_of(f"v3:in-{k}") == 0][:2]
    for ccid in same_shard:
        telnyx.add_call(ccid, answered=False)
        event = envelope("call.initiated", ccid, direction="incoming", state="parked")
        webhooks.store_event(webhooks.parse_event(dumps(event)), handled=True)
    assert tasks.drain_urgent_events.run(0) == 2
    # The first answer went from the drain itself: no message for it; the second was published.
    assert [r.action for r in telnyx.requests] == ["answer"]
    assert published.count(queue.SEND_COMMAND) == 1
    first = Command.objects.get(call__call_control_id=telnyx.requests[0].call_control_id)
    assert first.status == "succeeded"
    assert Command.objects.exclude(pk=first.pk).get().status == "queued"
