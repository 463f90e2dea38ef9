"""The operators' console, driven the way an operator drives it: through the changelist."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from callops.models import Call, WebhookEvent
from tests.conftest import wait_for
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
    from tests.test_events import deliver

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
