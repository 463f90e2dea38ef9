"""Drains remember a connection's streaming profile and webhook endpoints across batches
(``callops.lookups``) for ``CALLOPS_LOOKUP_TTL`` seconds: a change in this process is seen at
once, one made elsewhere within the TTL, and a delivery is never sent to an endpoint or
partner deactivated meanwhile."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from callops import lookups, partner_delivery, partner_events
from callops.models import (
    Delivery,
    Partner,
    PartnerConnection,
    StreamingProfile,
    WebhookEndpoint,
)
from tests.helpers import deliver, make_call
from tests.telnyx_events import envelope


@pytest.fixture
def remembered(settings):
    settings.CALLOPS_LOOKUP_TTL = 60
    lookups.forget_all()
    yield settings
    lookups.forget_all()


@pytest.fixture
def acme(db):
    partner = Partner.objects.create(name="acme")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-1")
    StreamingProfile.objects.create(
        partner=partner, connection_id="conn-1", stream_url="wss://a.example.com/s"
    )
    return partner


def profile_in_a_drain() -> StreamingProfile | None:
    with StreamingProfile.looked_up_once():
        return StreamingProfile.for_connection("conn-1")


def test_a_drain_reads_a_profile_once_across_its_batches(remembered, acme):
    assert profile_in_a_drain().stream_url == "wss://a.example.com/s"
    with CaptureQueriesContext(connection) as queries:
        assert profile_in_a_drain().stream_url == "wss://a.example.com/s"
    assert len(queries) == 0


def test_a_profile_saved_in_this_process_is_seen_at_once(remembered, acme):
    profile_in_a_drain()
    profile = StreamingProfile.objects.get(connection_id="conn-1")
    profile.stream_url = "wss://b.example.com/s"
    profile.save()
    assert profile_in_a_drain().stream_url == "wss://b.example.com/s"
    profile.delete()
    assert profile_in_a_drain() is None


def test_a_change_made_elsewhere_is_seen_once_the_ttl_has_passed(remembered, acme):
    remembered.CALLOPS_LOOKUP_TTL = 0.2
    profile_in_a_drain()
    # An update() sends no signal: as if another host had changed it.
    StreamingProfile.objects.filter(connection_id="conn-1").update(
        stream_url="wss://c.example.com/s"
    )
    assert profile_in_a_drain().stream_url == "wss://a.example.com/s"
    time.sleep(0.25)
    assert profile_in_a_drain().stream_url == "wss://c.example.com/s"


def test_outside_a_drain_and_with_a_ttl_of_zero_every_lookup_reads_the_database(remembered, acme):
    profile_in_a_drain()
    StreamingProfile.objects.filter(connection_id="conn-1").update(
        stream_url="wss://d.example.com/s"
    )
    assert StreamingProfile.for_connection("conn-1").stream_url == "wss://d.example.com/s"
    remembered.CALLOPS_LOOKUP_TTL = 0
    assert profile_in_a_drain().stream_url == "wss://d.example.com/s"


def endpoints_in_a_drain() -> list[WebhookEndpoint]:
    with partner_events.looked_up_once():
        return partner_events.endpoints_for("conn-1")


def test_endpoints_are_remembered_and_a_new_one_is_seen_at_once(remembered, acme, fake_dns):
    assert endpoints_in_a_drain() == []
    endpoint = partner_delivery.webhook_endpoint_create(
        partner=acme, url="https://hooks.example.com/in"
    )
    assert endpoints_in_a_drain() == [endpoint]
    with CaptureQueriesContext(connection) as queries:
        assert endpoints_in_a_drain() == [endpoint]
    assert len(queries) == 0


def test_no_delivery_goes_to_a_partner_deactivated_after_its_endpoints_were_remembered(
    remembered, acme, fake_dns
):
    partner_delivery.webhook_endpoint_create(partner=acme, url="https://hooks.example.com/in")
    make_call("v3:call-1", "conn-1")
    endpoints_in_a_drain()  # remembered by this worker
    Partner.objects.filter(pk=acme.pk).update(active=False)  # another host: no signal
    deliver(envelope("call.hangup", "v3:call-1", connection_id="conn-1"))
    delivery = Delivery.objects.get()  # the drain still knew the endpoint
    step = partner_delivery.delivery_process(delivery_pk=delivery.pk)
    delivery.refresh_from_db()
    assert step.status == "dead"
    assert "endpoint inactive" in delivery.last_error
