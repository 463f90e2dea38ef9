"""Plain helpers the tests share. Fixtures live in conftest.py; these are imported."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from contextlib import contextmanager

from django.db import connection
from kombu import pools
from rest_framework.test import APIClient

from callops import events, webhooks
from callops.api_keys import api_key_create
from callops.models import Call, Partner, PartnerConnection
from config.celery_app import app
from tests.telnyx_events import T0, dumps

PUBLIC_DNS = {
    "media.example.com": "93.184.216.34",
    "evil.example.com": "10.0.0.1",
    "sneaky.example.com": "::1",
}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def healthy(port: int) -> bool:
    """A web process on ``port`` answers ``/healthz``."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def database_down():
    """Django's connection points at a closed port until the block ends, then reconnects."""
    connection.close()
    real_port = connection.settings_dict["PORT"]
    connection.settings_dict["PORT"] = closed_port()
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict["PORT"] = real_port


def run_concurrently(*calls) -> tuple[list, list[Exception]]:
    """Run each callable in its own thread, all released together by a barrier.

    Returns ``(results, errors)``. Each thread closes its own database connection, as a worker
    process would.
    """
    barrier = threading.Barrier(len(calls))
    results: list = []
    errors: list[Exception] = []

    def run(call) -> None:
        try:
            barrier.wait()
            results.append(call())
        except Exception as exc:  # reported to the caller
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def use_broker(url: str) -> None:
    """Point the Celery app at ``url`` and drop every pooled connection to the old one."""
    app.conf.broker_url = url
    app.pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    pools.reset()


def deliver(event: dict) -> None:
    """What the webhook view does, then what a drain task does."""
    parsed = webhooks.parse_event(dumps(event))
    webhooks.store_event(parsed, handled=events.has_handler(parsed.event_type))
    events.events_drain()


def partner_with_key(name: str, connection_id: str) -> tuple[Partner, APIClient]:
    partner = Partner.objects.create(name=name)
    PartnerConnection.objects.create(partner=partner, connection_id=connection_id)
    _, key = api_key_create(partner=partner)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    client.key = key
    return partner, client


def make_call(ccid: str, connection_id: str, **fields) -> Call:
    fields.setdefault("status", "answered")
    fields.setdefault("started_at", T0)
    return Call.objects.create(call_control_id=ccid, connection_id=connection_id, **fields)
