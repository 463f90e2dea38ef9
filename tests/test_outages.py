"""Outages: the database down answers 503 (Telnyx retries); the broker down loses nothing."""

from __future__ import annotations

import time

import pytest

from callops import tasks
from callops.models import Call, WebhookEvent
from tests.helpers import database_down, use_broker, wait_for
from tests.telnyx_events import envelope


@pytest.mark.django_db(transaction=True)
def test_it_answers_503_when_the_database_is_down(post_event):
    with database_down():
        response = post_event(envelope("call.answered"))
    assert response.status_code == 503
    assert WebhookEvent.objects.count() == 0
    # Telnyx retries the same delivery once the database is back: stored exactly once.


@pytest.mark.django_db(transaction=True)
def test_it_stores_the_event_and_answers_200_when_the_broker_is_down(
    post_event, broker_down, caplog
):
    started = time.monotonic()
    response = post_event(envelope("call.answered", "v3:outage"))
    # Telnyx's budget is 2 s: the doorbell gives up on the broker fast, it does not retry.
    assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    assert WebhookEvent.objects.get().status == "pending"
    assert any("broker unavailable" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_applies_what_the_outage_left_pending(post_event, settings, request):
    settings.CALLOPS_PENDING_EVENT_GRACE = 0
    request.getfixturevalue("broker_down")
    assert post_event(envelope("call.answered", "v3:outage")).status_code == 200
    # The outage ends; beat's schedule sends the sweeper through the real broker.
    use_broker(settings.CELERY_BROKER_URL)
    request.getfixturevalue("celery_worker")
    tasks.sweep_pending_webhook_events.delay()
    wait_for(lambda: WebhookEvent.objects.filter(status="processed").exists())
    assert Call.objects.get(call_control_id="v3:outage").status == "answered"


@pytest.mark.django_db(transaction=True)
def test_a_webhook_reaches_the_records_through_the_real_broker(post_event, celery_worker):
    for event in (envelope("call.initiated", "v3:live"), envelope("call.answered", "v3:live")):
        assert post_event(event).status_code == 200
    wait_for(lambda: not WebhookEvent.objects.filter(status="pending").exists())
    assert Call.objects.get(call_control_id="v3:live").status == "answered"
