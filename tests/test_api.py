"""The partner REST API: each partner sees and drives its own calls only."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from callops import events
from callops.api_keys import api_key_revoke
from callops.models import (
    Call,
    Command,
    MediaStream,
    Partner,
    StreamingProfile,
    TranscriptSegment,
    WebhookEvent,
)
from tests.helpers import make_call, partner_with_key
from tests.telnyx_events import T0, envelope

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fake_dns")]


@pytest.fixture
def alice():
    return partner_with_key("alice", "conn-alice")


@pytest.fixture
def bob():
    return partner_with_key("bob", "conn-bob")


@pytest.fixture
def calls(alice, bob):
    return make_call("v3:alice-1", "conn-alice"), make_call("v3:bob-1", "conn-bob")


STREAM = {"stream_url": "wss://media.example.com/audio", "stream_track": "both_tracks"}
COMMAND_POSTS = [
    ("streaming/", STREAM),
    ("streaming/stop/", {}),
    ("forking/", {"target": "udp:93.184.216.34:5000"}),
    ("forking/stop/", {}),
    ("transcription/", {"transcription_engine": "Google"}),
    ("transcription/stop/", {}),
]


# --- Authentication ---------------------------------------------------------------------------


def test_it_answers_401_without_a_key():
    response = APIClient().get("/api/v1/calls/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["errors"][0]["message"]


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer cok_abc_def", "Bearer", "Basic x:y"])
def test_it_answers_401_for_an_unknown_key(header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert client.get("/api/v1/calls/").status_code == 401


def test_a_revoked_key_is_refused_and_a_used_key_is_stamped(alice):
    partner, client = alice
    assert client.get("/api/v1/calls/").status_code == 200
    key = partner.api_keys.get()
    assert key.last_used_at is not None
    api_key_revoke(key=key)
    assert client.get("/api/v1/calls/").status_code == 401


def test_an_inactive_partner_gets_403(alice):
    partner, client = alice
    Partner.objects.filter(pk=partner.pk).update(active=False)
    assert client.get("/api/v1/calls/").status_code == 403


def test_keys_are_stored_only_as_hashes(alice):
    partner, client = alice
    key = partner.api_keys.get()
    assert client.key not in (key.hashed_key, key.prefix)
    assert key.prefix in client.key


def test_throttling_answers_429_with_retry_after(alice, monkeypatch):
    from callops.api.schema import PartnerRateThrottle

    monkeypatch.setattr(PartnerRateThrottle, "THROTTLE_RATES", {"partner": "3/minute"})
    _, client = alice
    statuses = [client.get("/api/v1/calls/").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = client.get("/api/v1/calls/")
    assert int(response["Retry-After"]) > 0


# --- Isolation --------------------------------------------------------------------------------


def test_a_partner_sees_and_changes_nothing_of_another(alice, bob, calls):
    _, alice_client = alice
    bob_partner, bob_client = bob
    bob_profile = StreamingProfile.objects.create(
        partner=bob_partner, stream_url=STREAM["stream_url"]
    )
    bob_command = Command.objects.create(
        call=calls[1], action="fork_stop", requested_by="partner", expires_at=timezone.now()
    )

    listing = alice_client.get("/api/v1/calls/").json()["results"]
    assert [c["call_control_id"] for c in listing] == ["v3:alice-1"]
    for path in ("v3:bob-1/", "v3:bob-1/transcript/", "v3:nobody/"):
        assert alice_client.get(f"/api/v1/calls/{path}").status_code == 404
    for suffix, body in COMMAND_POSTS:
        response = alice_client.post(f"/api/v1/calls/v3:bob-1/{suffix}", body, format="json")
        assert response.status_code == 404, suffix
    assert alice_client.get(f"/api/v1/commands/{bob_command.command_id}/").status_code == 404
    assert alice_client.get("/api/v1/profiles/").json() == []
    profile_url = f"/api/v1/profiles/{bob_profile.pk}/"
    assert alice_client.get(profile_url).status_code == 404
    assert alice_client.patch(profile_url, {"auto_start": True}, format="json").status_code == 404
    assert alice_client.delete(profile_url).status_code == 404
    assert Command.objects.count() == 1
    bob_profile.refresh_from_db()
    assert bob_profile.auto_start is False
    # ...while bob sees his own.
    assert bob_client.get("/api/v1/calls/v3:bob-1/").status_code == 200
    assert bob_client.get(f"/api/v1/commands/{bob_command.command_id}/").status_code == 200


# --- Reading ----------------------------------------------------------------------------------


def test_calls_are_paginated_by_cursor_and_filtered(alice):
    _, client = alice
    for index in range(5):
        make_call(
            f"v3:p-{index}",
            "conn-alice",
            started_at=T0 + timedelta(minutes=index),
            status="ended" if index % 2 else "answered",
        )
    first = client.get("/api/v1/calls/", {"page_size": 2}).json()
    second = client.get(first["next"]).json()
    seen = [c["call_control_id"] for c in first["results"] + second["results"]]
    assert seen == ["v3:p-4", "v3:p-3", "v3:p-2", "v3:p-1"]
    ended = client.get("/api/v1/calls/", {"status": "ended"}).json()["results"]
    assert {c["call_control_id"] for c in ended} == {"v3:p-1", "v3:p-3"}
    window = client.get(
        "/api/v1/calls/",
        {
            "started_after": (T0 + timedelta(minutes=1)).isoformat(),
            "started_before": (T0 + timedelta(minutes=3)).isoformat(),
        },
    ).json()["results"]
    assert {c["call_control_id"] for c in window} == {"v3:p-1", "v3:p-2"}
    assert client.get("/api/v1/calls/", {"connection": "conn-other"}).json()["results"] == []
    # Offsets PostgreSQL itself would refuse are normalised to UTC first.
    odd = client.get("/api/v1/calls/", {"started_before": "2026-11-25T00:00:00-19:03"})
    assert odd.status_code == 200


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("status", "dancing"),
        ("started_after", "soon"),
        ("started_before", "0001-01-01T00:00:00+05:00"),
    ],
)
def test_a_bad_filter_answers_400_naming_it(alice, param, value):
    _, client = alice
    response = client.get("/api/v1/calls/", {param: value})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == param


def test_call_detail_shows_streams_and_commands(alice, calls):
    _, client = alice
    MediaStream.objects.create(call=calls[0], stream_url=STREAM["stream_url"], status="active")
    client.post("/api/v1/calls/v3:alice-1/forking/stop/", {}, format="json")
    detail = client.get("/api/v1/calls/v3:alice-1/").json()
    assert detail["streams"][0]["status"] == "active"
    assert detail["commands"][0]["action"] == "fork_stop"


def test_the_transcript_comes_in_time_order_as_json_or_text(alice, calls):
    _, client = alice
    transcription = calls[0].transcriptions.create()
    for second, words, final in ((3, "later", True), (1, "first", False), (2, "then", True)):
        TranscriptSegment.objects.create(
            call=calls[0],
            transcription=transcription,
            transcript=words,
            is_final=final,
            track="inbound",
            occurred_at=T0 + timedelta(seconds=second),
        )
    url = "/api/v1/calls/v3:alice-1/transcript/"
    everything = client.get(url).json()["results"]
    assert [s["transcript"] for s in everything] == ["first", "then", "later"]
    finals = client.get(url, {"final_only": "true"}).json()["results"]
    assert [s["transcript"] for s in finals] == ["then", "later"]
    text = client.get(url, {"format": "txt"})
    assert text["Content-Type"].startswith("text/plain")
    assert text.content.decode().splitlines()[0].endswith("inbound: then")  # finals by default
    assert client.get(url, HTTP_ACCEPT="text/plain").content.decode().count("\n") == 2
    every_line = client.get(url, {"format": "txt", "final_only": "false"}).content.decode()
    assert every_line.splitlines()[0].endswith("inbound: first")
    assert client.get(url, {"final_only": "maybe"}).json()["errors"][0]["field"] == "final_only"


# --- Commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "body"), COMMAND_POSTS)
def test_each_command_endpoint_answers_202_with_the_command(alice, calls, suffix, body):
    _, client = alice
    response = client.post(f"/api/v1/calls/v3:alice-1/{suffix}", body, format="json")
    assert response.status_code == 202, response.json()
    command = Command.objects.get()
    assert response.json()["id"] == str(command.command_id)
    assert command.requested_by == "partner"
    progress = client.get(f"/api/v1/commands/{command.command_id}/").json()
    assert progress["status"] == "queued"


def test_streaming_start_takes_the_profile_defaults_and_hides_the_token(alice, calls):
    partner, client = alice
    StreamingProfile.objects.create(
        partner=partner,
        stream_url=STREAM["stream_url"],
        stream_track="inbound_track",
        stream_codec="PCMU",
        stream_auth_token="s3cret",
    )
    response = client.post(
        "/api/v1/calls/v3:alice-1/streaming/", {"stream_codec": "OPUS"}, format="json"
    )
    assert response.status_code == 202
    command = Command.objects.get()
    assert command.params == {
        "stream_url": STREAM["stream_url"],
        "stream_track": "inbound_track",
        "stream_codec": "OPUS",
        "stream_auth_token": "s3cret",
    }
    assert "s3cret" not in response.content.decode()
    assert "stream_auth_token" not in response.json()["params"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "stream_url"),
        ({**STREAM, "stream_track": "sideways"}, "stream_track"),
        ({**STREAM, "client_state": "not base64!"}, "client_state"),
        ({**STREAM, "stream_auth_token": "x" * 4001}, "stream_auth_token"),
        ({"stream_url": "https://media.example.com/"}, "stream_url"),
        ({"stream_url": "ws://media.example.com/"}, "stream_url"),
    ],
)
def test_a_malformed_command_answers_400_naming_the_field(alice, calls, body, field):
    _, client = alice
    response = client.post("/api/v1/calls/v3:alice-1/streaming/", body, format="json")
    assert response.status_code == 400
    assert field in [e["field"] for e in response.json()["errors"]]
    assert not Command.objects.exists() and not MediaStream.objects.exists()


def test_malformed_json_answers_400(alice, calls):
    _, client = alice
    response = client.post(
        "/api/v1/calls/v3:alice-1/streaming/", "{nope", content_type="application/json"
    )
    assert response.status_code == 400


def test_a_command_on_an_ended_call_answers_409(alice, calls):
    _, client = alice
    Call.objects.filter(pk=calls[0].pk).update(status="ended")
    response = client.post("/api/v1/calls/v3:alice-1/streaming/", STREAM, format="json")
    assert response.status_code == 409
    assert not Command.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "wss://127.0.0.1/s",
        "wss://10.0.0.1/s",
        "wss://169.254.169.254/latest/meta-data",
        "wss://[::1]/s",
        "wss://[::ffff:127.0.0.1]/s",
        "wss://localhost/s",
        "wss://evil.example.com/s",
        "wss://sneaky.example.com/s",
        "wss://nowhere.invalid/s",
    ],
)
def test_stream_urls_must_be_public(alice, calls, url):
    _, client = alice
    response = client.post(
        "/api/v1/calls/v3:alice-1/streaming/", {"stream_url": url}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "stream_url"


@pytest.mark.parametrize(
    "target",
    ["udp:127.0.0.1:5000", "udp:10.0.0.1:5000", "udp:169.254.169.254:80", "udp:[::1]:5000"],
)
def test_fork_targets_must_be_public(alice, calls, target):
    _, client = alice
    response = client.post("/api/v1/calls/v3:alice-1/forking/", {"target": target}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "target"


def test_plain_ws_is_allowed_only_when_configured(alice, calls, settings):
    settings.CALLOPS_ALLOW_INSECURE_WS = True
    _, client = alice
    response = client.post(
        "/api/v1/calls/v3:alice-1/streaming/",
        {"stream_url": "ws://media.example.com/s"},
        format="json",
    )
    assert response.status_code == 202


# --- Idempotency ------------------------------------------------------------------------------


def test_an_idempotency_key_replays_the_first_answer(alice, bob, calls):
    _, client = alice
    url = "/api/v1/calls/v3:alice-1/streaming/"
    first = client.post(url, STREAM, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = client.post(url, STREAM, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert Command.objects.count() == 1

    conflict = client.post(
        url, {**STREAM, "stream_track": "inbound_track"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert conflict.status_code == 422
    assert conflict.json()["errors"][0]["field"] == "Idempotency-Key"
    # Keys belong to a partner: bob's "k-1" is his own.
    _, bob_client = bob
    response = bob_client.post(
        "/api/v1/calls/v3:bob-1/streaming/", STREAM, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert response.status_code == 202
    assert Command.objects.count() == 2


def test_an_idempotency_key_expires_after_a_day(alice, calls):
    from callops.models import IdempotencyRecord

    _, client = alice
    url = "/api/v1/calls/v3:alice-1/forking/stop/"
    client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="old")
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))
    client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="old")
    assert Command.objects.count() == 2


def test_an_error_answer_is_replayed_too(alice, calls):
    _, client = alice
    url = "/api/v1/calls/v3:alice-1/streaming/"
    first = client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="bad")
    again = client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="bad")
    assert first.status_code == again.status_code == 400
    assert again.json() == first.json()


# --- Profiles ---------------------------------------------------------------------------------


def test_profiles_can_be_created_read_changed_and_deleted(alice):
    partner, client = alice
    created = client.post(
        "/api/v1/profiles/",
        {**STREAM, "auto_start": True, "stream_auth_token": "tok", "connection_id": "conn-alice"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    body = created.json()
    assert "stream_auth_token" not in body
    url = f"/api/v1/profiles/{body['id']}/"
    changed = client.patch(
        url, {"transcribe": True, "transcription_engine": "Deepgram"}, format="json"
    )
    assert changed.status_code == 200 and changed.json()["transcription_engine"] == "Deepgram"
    assert client.get("/api/v1/profiles/").json()[0]["transcribe"] is True
    assert client.delete(url).status_code == 204
    assert not StreamingProfile.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**STREAM, "connection_id": "conn-bob"}, "connection_id"),
        ({"stream_url": "wss://10.0.0.1/"}, "stream_url"),
        (
            {**STREAM, "transcribe": True, "transcription_engine": "Azure"},
            "transcription_engine_config",
        ),
        ({**STREAM, "max_stream_duration": 0}, "max_stream_duration"),
        ({**STREAM, "stream_bidirectional_codec": "PCMU"}, "stream_bidirectional_codec"),
    ],
)
def test_a_bad_profile_answers_400_naming_the_field(alice, bob, body, field):
    _, client = alice
    response = client.post("/api/v1/profiles/", body, format="json")
    assert response.status_code == 400
    assert field in [e["field"] for e in response.json()["errors"]]


def test_one_profile_per_connection(alice):
    _, client = alice
    assert client.post("/api/v1/profiles/", STREAM, format="json").status_code == 201
    second = client.post("/api/v1/profiles/", STREAM, format="json")
    assert second.status_code == 400
    assert second.json()["errors"][0]["field"] == "connection_id"


# --- Auto-start -------------------------------------------------------------------------------


def deliver(event: dict) -> None:
    from tests.helpers import deliver as deliver_event

    deliver_event(event)


def test_auto_start_happens_once_however_often_answered_arrives(alice):
    partner, _ = alice
    StreamingProfile.objects.create(
        partner=partner,
        stream_url=STREAM["stream_url"],
        auto_start=True,
        transcribe=True,
        transcription_engine="Telnyx",
    )
    answered = envelope("call.answered", "v3:auto", connection_id="conn-alice")
    deliver(envelope("call.initiated", "v3:auto", connection_id="conn-alice"))
    deliver(answered)
    deliver(answered)  # a duplicate delivery
    events.events_replay(event_ids=WebhookEvent.objects.values_list("pk", flat=True))
    events.events_drain()  # and an operator replay of everything
    commands = Command.objects.order_by("action")
    assert [(c.action, c.requested_by) for c in commands] == [
        ("streaming_start", "policy"),
        ("transcription_start", "policy"),
    ]
    assert MediaStream.objects.get().status == "requested"


def test_no_auto_start_without_a_profile_or_after_the_hangup(alice):
    partner, _ = alice
    deliver(envelope("call.answered", "v3:plain", connection_id="conn-alice"))
    StreamingProfile.objects.create(
        partner=partner, stream_url=STREAM["stream_url"], auto_start=True
    )
    deliver(
        envelope(
            "call.hangup",
            "v3:late",
            connection_id="conn-alice",
            occurred_at=T0 + timedelta(seconds=9),
        )
    )
    deliver(envelope("call.answered", "v3:late", connection_id="conn-alice", occurred_at=T0))
    assert not Command.objects.exists()


# --- Provisioning -----------------------------------------------------------------------------


def test_create_partner_prints_a_working_key_last(capsys):
    call_command("create_partner", "carol", "--connection-id", "c-1", "--connection-id", "c-2")
    key = capsys.readouterr().out.strip().splitlines()[-1]
    partner = Partner.objects.get(name="carol")
    assert set(partner.connections.values_list("connection_id", flat=True)) == {"c-1", "c-2"}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/calls/").status_code == 200
    # Run again: same partner, a second key.
    call_command("create_partner", "carol")
    assert partner.api_keys.count() == 2


def test_create_partner_refuses_another_partners_connection(alice):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="belongs to partner alice"):
        call_command("create_partner", "mallory", "--connection-id", "conn-alice")


def test_an_unknown_api_url_answers_json_404(alice):
    _, client = alice
    response = client.get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response.json() == {"errors": [{"field": None, "message": "Not found."}]}


def test_the_schema_and_docs_are_public():
    assert APIClient().get("/api/v1/schema/").status_code == 200
    docs = APIClient().get("/api/v1/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_503_when_the_database_is_down(alice):
    from tests.helpers import database_down

    _, client = alice
    with database_down():
        response = client.get("/api/v1/calls/")
    assert response.status_code == 503
    assert response.json()["errors"][0]["message"].startswith("database unavailable")
