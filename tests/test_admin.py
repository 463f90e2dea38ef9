"""The operators' console, driven the way an operator drives it: through the changelist."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model

from callops.models import Call, WebhookEvent
from tests.helpers import wait_for
from tests.telnyx_events import call_life, envelope


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client.force_login(user)
    return client


@pytest.mark.django_db(transaction=True)
def test_the_replay_action_reapplies_failed_events(operator, post_event, celery_worker):
    post_event(envelope("call.transcription", "v3:replay", transcription_data="broken"))
    event = wait_for(lambda: WebhookEvent.objects.filter(status="failed").first())
    event.payload["data"]["payload"]["transcription_data"] = {"transcript": "fixed"}
    event.save(update_fields=["payload"])

    response = operator.post(
        "/admin/callops/webhookevent/",
        {"action": "replay", "_selected_action": [event.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert "1 event(s) queued for replay." in response.content.decode()
    wait_for(lambda: WebhookEvent.objects.filter(pk=event.pk, status="processed").exists())
    call = Call.objects.get(call_control_id="v3:replay")
    assert call.segments.get().transcript == "fixed"


@pytest.mark.django_db
def test_events_are_read_only(operator, post_event):
    post_event(envelope("call.answered"))
    event = WebhookEvent.objects.get()
    page = operator.get(f"/admin/callops/webhookevent/{event.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert operator.post(f"/admin/callops/webhookevent/{event.pk}/change/", {}).status_code == 403
    assert operator.get("/admin/callops/webhookevent/add/").status_code == 403


@pytest.mark.django_db
def test_calls_are_searchable_and_show_their_streams_and_transcript(operator):
    from tests.helpers import deliver

    for event in call_life("v3:shown"):
        deliver(event)
    listing = operator.get("/admin/callops/call/", {"q": "session-v3:shown"})
    assert b"v3:shown" in listing.content
    assert operator.get("/admin/callops/call/", {"status__exact": "ended"}).status_code == 200
    call = Call.objects.get()
    page = operator.get(f"/admin/callops/call/{call.pk}/change/").content.decode()
    for text in ("wss://media.example.com/stream", "connection refused", "hello there", "raw"):
        assert text in page
    events_page = operator.get("/admin/callops/webhookevent/", {"status__exact": "ignored"})
    assert b"call.dtmf.received" in events_page.content


@pytest.mark.django_db
def test_events_are_found_by_their_exact_ids(operator, post_event):
    kept, other = envelope("call.answered", "v3:find-me"), envelope("call.answered", "v3:other")
    post_event(kept)
    post_event(other)

    def listed(query: str) -> set[str]:
        page = operator.get("/admin/callops/webhookevent/", {"q": query})
        assert page.status_code == 200
        return {e.event_id for e in page.context["cl"].result_list}

    assert listed("v3:find-me") == {kept["data"]["id"]}
    assert listed(other["data"]["id"]) == {other["data"]["id"]}
    assert listed("find") == set()  # exact ids only: a substring would read the whole table


@pytest.fixture
def answered_call(db):
    return Call.objects.create(call_control_id="v3:admin", status="answered")


def changelist_action(operator, model: str, action: str, pks: list[int]):
    return operator.post(
        f"/admin/callops/{model}/",
        {"action": action, "_selected_action": pks},
        follow=True,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("action", "telnyx_action"),
    [
        ("stop_streaming", "streaming_stop"),
        ("stop_forking", "fork_stop"),
        ("stop_transcription", "transcription_stop"),
    ],
)
def test_call_actions_send_stop_commands_through_the_outbox(
    operator, answered_call, telnyx, celery_worker, action, telnyx_action
):
    from callops.models import Command

    response = changelist_action(operator, "call", action, [answered_call.pk])
    assert f"Queued {telnyx_action} for 1 call(s)." in response.content.decode()
    command = Command.objects.get()
    assert (command.action, command.requested_by) == (telnyx_action, "operator")
    wait_for(lambda: Command.objects.filter(status="succeeded").exists())
    (record,) = telnyx.commands(action=telnyx_action)
    assert record.call_control_id == "v3:admin"


@pytest.mark.django_db
def test_a_call_action_on_an_ended_call_explains_why_nothing_was_sent(operator):
    ended = Call.objects.create(call_control_id="v3:gone", status="ended")
    response = changelist_action(operator, "call", "stop_streaming", [ended.pk])
    assert "Did not send streaming_stop: v3:gone: call v3:gone has ended" in (
        response.content.decode()
    )


@pytest.mark.django_db(transaction=True)
def test_retry_now_and_cancel_from_the_commands_changelist(
    operator, answered_call, telnyx, settings, celery_worker
):
    from callops.commands import command_create
    from callops.models import Command

    settings.TELNYX_API_KEY = "KEY_WRONG"  # the first attempt is refused with a 401
    failed = command_create(
        call=answered_call, action="fork_stop", params={}, requested_by="operator"
    )
    wait_for(lambda: Command.objects.filter(pk=failed.pk, status="failed").exists())
    settings.TELNYX_API_KEY = telnyx.api_key

    response = changelist_action(operator, "command", "retry_now", [failed.pk])
    assert "1 command(s) queued again." in response.content.decode()
    wait_for(lambda: Command.objects.filter(pk=failed.pk, status="succeeded").exists())

    queued = Command.objects.create(
        call=answered_call,
        action="fork_stop",
        requested_by="operator",
        expires_at=answered_call.created_at,
    )
    response = changelist_action(operator, "command", "cancel", [queued.pk, failed.pk])
    page = response.content.decode()
    assert "1 command(s) cancelled." in page
    assert "1 command(s) skipped: only queued ones can be cancelled." in page
    queued.refresh_from_db()
    assert queued.status == "cancelled"


@pytest.mark.django_db
def test_the_commands_changelist_shows_status_and_last_error(operator, answered_call):
    from callops.models import Command

    Command.objects.create(
        call=answered_call,
        action="fork_stop",
        requested_by="policy",
        status="failed",
        failure_reason="call ended",
        error_code="90018",
        expires_at=answered_call.created_at,
    )
    page = operator.get("/admin/callops/command/", {"status__exact": "failed"}).content.decode()
    assert "call ended 90018" in page
    assert "v3:admin" in page


# --- Who may do what: every action that changes something needs its own permission ---------

VIEW_EVERYTHING = [
    f"view_{model}"
    for model in ("call", "command", "webhookevent", "partner", "apikey", "streamingprofile")
]


def staff_user(client, *codenames: str):
    """A logged-in staff user who may view every callops model and also do ``codenames``."""
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="callops", codename__in=[*VIEW_EVERYTHING, *codenames]
        )
    )
    client.force_login(user)
    return client


def _call(status: str) -> int:
    return Call.objects.create(call_control_id=f"v3:{status}", status=status).pk


def _command(status: str) -> int:
    from callops.models import Command

    call = Call.objects.create(call_control_id="v3:commanded", status="answered")
    command = Command.objects.create(
        call=call,
        action="fork_stop",
        requested_by="operator",
        status=status,
        expires_at=call.created_at,
    )
    return command.pk


def _failed_event() -> int:
    event = envelope("call.answered", "v3:replayed")
    return WebhookEvent.objects.create(
        event_id=event["data"]["id"],
        event_type="call.answered",
        occurred_at=event["data"]["occurred_at"],
        payload=event,
        status="failed",
    ).pk


def _partner() -> int:
    from callops.models import Partner

    return Partner.objects.create(name="acme").pk


def _api_key() -> int:
    from callops.api_keys import api_key_create
    from callops.models import Partner

    return api_key_create(partner=Partner.objects.create(name="keyed"))[0].pk


def _commands_of(pk: int) -> list[str]:
    return list(Call.objects.get(pk=pk).commands.values_list("action", flat=True))


def _command_status(pk: int) -> str:
    from callops.models import Command

    return Command.objects.get(pk=pk).status


def _keys_of(pk: int) -> int:
    from callops.models import ApiKey

    return ApiKey.objects.filter(partner_id=pk).count()


def _revoked(pk: int) -> bool:
    from callops.models import ApiKey

    return ApiKey.objects.get(pk=pk).revoked_at is not None


# (changelist, action, the permission it needs, make the selected record, what the action changes)
ACTIONS = [
    ("call", "answer", "act_on_call", lambda: _call("initiated"), _commands_of),
    ("call", "reject", "act_on_call", lambda: _call("initiated"), _commands_of),
    ("call", "hang_up", "act_on_call", lambda: _call("answered"), _commands_of),
    ("call", "stop_streaming", "act_on_call", lambda: _call("answered"), _commands_of),
    ("call", "stop_forking", "act_on_call", lambda: _call("answered"), _commands_of),
    ("call", "stop_transcription", "act_on_call", lambda: _call("answered"), _commands_of),
    ("command", "retry_now", "act_on_command", lambda: _command("failed"), _command_status),
    ("command", "cancel", "act_on_command", lambda: _command("queued"), _command_status),
    (
        "webhookevent",
        "replay",
        "replay_webhookevent",
        _failed_event,
        lambda pk: WebhookEvent.objects.get(pk=pk).status,
    ),
    ("partner", "create_api_key", "create_api_key", _partner, _keys_of),
    ("apikey", "revoke", "change_apikey", _api_key, _revoked),
]


def offered_actions(client, model: str) -> set[str]:
    page = client.get(f"/admin/callops/{model}/")
    assert page.status_code == 200
    form = page.context["action_form"]
    return {name for name, _ in form.fields["action"].choices if name} if form else set()


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "action", "permission", "make", "effect"), ACTIONS)
def test_an_action_is_neither_offered_nor_run_without_its_permission(
    client, model, action, permission, make, effect
):
    staff = staff_user(client)  # may view everything, and do nothing
    pk = make()
    before = effect(pk)
    assert action not in offered_actions(staff, model)

    response = changelist_action(staff, model, action, [pk])  # posted anyway
    assert response.status_code in (200, 403)
    assert effect(pk) == before


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "action", "permission", "make", "effect"), ACTIONS)
def test_an_action_is_offered_and_runs_with_its_permission(
    client, model, action, permission, make, effect
):
    staff = staff_user(client, permission)
    pk = make()
    before = effect(pk)
    assert action in offered_actions(staff, model)

    response = changelist_action(staff, model, action, [pk])
    assert response.status_code == 200
    assert effect(pk) != before


@pytest.mark.django_db
def test_a_view_only_user_is_offered_no_action_anywhere(client):
    staff = staff_user(client)
    for model in {model for model, *_ in ACTIONS}:
        assert offered_actions(staff, model) == set(), model


@pytest.mark.django_db
def test_one_permission_unlocks_only_its_own_actions(client):
    staff = staff_user(client, "act_on_call")
    assert offered_actions(staff, "call") == {a for m, a, *_ in ACTIONS if m == "call"}
    assert offered_actions(staff, "command") == set()
    assert offered_actions(staff, "partner") == set()


# --- Secrets stay secret ----------------------------------------------------------------------

TOKEN = "tok-1d9c-very-secret"


@pytest.fixture
def profile(db, fake_dns):
    from callops.models import Partner, StreamingProfile

    partner = Partner.objects.create(name="tokened")
    return StreamingProfile.objects.create(
        partner=partner, stream_url="wss://media.example.com/a", stream_auth_token=TOKEN
    )


def profile_form(profile, **changes) -> dict:
    """The profile's change form as a browser would post it (the token field left empty)."""
    data = {
        "partner": profile.partner_id,
        "connection_id": "",
        "name": "",
        "stream_url": profile.stream_url,
        "stream_track": profile.stream_track,
        "stream_auth_token": "",
        "transcription_engine_config": "{}",
        "answer_policy": profile.answer_policy,
        "reject_cause": profile.reject_cause,
        "machine_policy": profile.machine_policy,
    }
    return {**data, **changes}


@pytest.mark.django_db
def test_a_stream_auth_token_is_never_shown_in_the_admin(client, profile):
    from django.test import Client

    profile_url = f"/admin/callops/streamingprofile/{profile.pk}/change/"
    partner_url = f"/admin/callops/partner/{profile.partner_id}/change/"
    viewer = staff_user(client)
    superuser = Client()
    superuser.force_login(get_user_model().objects.create_superuser("root", "r@example.com", "pw"))
    pages = {
        "the profile, read-only": viewer.get(profile_url),
        "the partner's inline, read-only": viewer.get(partner_url),
        "the profiles list": viewer.get("/admin/callops/streamingprofile/"),
        "the profile's form": superuser.get(profile_url),
        "the partner's inline form": superuser.get(partner_url),
    }
    for where, page in pages.items():
        assert page.status_code == 200, where
        assert TOKEN not in page.content.decode(), where
    # Whether a token is set is shown; the ones who may change it get an empty field for it.
    assert re.search(r"Stream auth token.*?\bset\b", pages["the profile, read-only"].text, re.S)
    assert 'type="password" name="stream_auth_token"' in pages["the profile's form"].text
    assert 'name="profiles-0-stream_auth_token"' in pages["the partner's inline form"].text


@pytest.mark.django_db
def test_saving_a_profile_keeps_its_token_unless_a_new_one_is_typed(operator, profile):
    url = f"/admin/callops/streamingprofile/{profile.pk}/change/"
    response = operator.post(url, profile_form(profile, name="renamed"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    profile.refresh_from_db()
    assert (profile.name, profile.stream_auth_token) == ("renamed", TOKEN)

    operator.post(url, profile_form(profile, stream_auth_token="tok-new"))
    profile.refresh_from_db()
    assert profile.stream_auth_token == "tok-new"


@pytest.mark.django_db
def test_secrets_in_command_params_and_event_payloads_are_masked(operator, answered_call):
    from callops.models import Command

    command = Command.objects.create(
        call=answered_call,
        action="streaming_start",
        requested_by="partner",
        params={
            "stream_url": "wss://media.example.com/a",
            "stream_auth_token": TOKEN,
            "transcription_config": {"nested": {"sip_auth_password": TOKEN}},
        },
        expires_at=answered_call.created_at,
    )
    page = operator.get(f"/admin/callops/command/{command.pk}/change/").content.decode()
    assert TOKEN not in page
    assert "wss://media.example.com/a" in page
    assert page.count("********") == 2

    event = envelope("call.initiated", "v3:admin")
    event["data"]["payload"]["stream_auth_token"] = TOKEN
    stored = WebhookEvent.objects.create(
        event_id=event["data"]["id"],
        event_type="call.initiated",
        occurred_at=event["data"]["occurred_at"],
        payload=event,
    )
    page = operator.get(f"/admin/callops/webhookevent/{stored.pk}/change/").content.decode()
    assert TOKEN not in page
    assert "********" in page and "v3:admin" in page


# --- A new API key is shown once, in the page, never in a cookie -------------------------------


@pytest.mark.django_db
def test_a_new_api_key_is_shown_in_the_page_and_never_set_in_a_cookie(client):
    from django.contrib.messages.storage.cookie import CookieStorage

    from callops.api_keys import hash_key
    from callops.models import ApiKey, Partner

    staff = staff_user(client, "create_api_key")
    partner = Partner.objects.create(name="acme")
    # Not followed: the action's own answer is what must carry the key, and only in its body.
    response = staff.post(
        "/admin/callops/partner/", {"action": "create_api_key", "_selected_action": [partner.pk]}
    )
    assert response.status_code == 200

    (shown,) = re.findall(r"cok_[\w-]+", response.content.decode())
    assert ApiKey.objects.get(partner=partner).hashed_key == hash_key(shown)
    assert "no-store" in response["Cache-Control"]
    for cookie in response.cookies.values():
        assert shown not in cookie.value, cookie.key
    # The messages cookie is signed and compressed, not encrypted: decode it to look inside.
    messages_cookie = response.cookies.get("messages")
    if messages_cookie is not None and messages_cookie.value:
        stored = CookieStorage(response.wsgi_request)._decode(messages_cookie.value) or []
        assert not [m for m in stored if shown in m.message]
    assert shown not in str(dict(staff.session.items()))
    # And the changelist shown next does not repeat it.
    assert shown not in staff.get("/admin/callops/partner/").content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["wss://127.0.0.1/s", "wss://media.example.com\\@10.0.0.1/", "wss://[::ffff:10.0.0.1]/"]
)
def test_a_profile_saved_in_the_admin_passes_the_partner_apis_address_check(
    operator, profile, settings, url
):
    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = False
    before = profile.stream_url
    page = operator.post(
        f"/admin/callops/streamingprofile/{profile.pk}/change/",
        profile_form(profile, stream_url=url),
    )
    assert page.status_code == 200  # the form again, with the error
    assert page.context["adminform"].form.errors["stream_url"]
    profile.refresh_from_db()
    assert profile.stream_url == before

    saved = operator.post(
        f"/admin/callops/streamingprofile/{profile.pk}/change/",
        profile_form(profile, stream_url="wss://8.8.8.8/s"),
    )
    assert saved.status_code == 302
    profile.refresh_from_db()
    assert profile.stream_url == "wss://8.8.8.8/s"
