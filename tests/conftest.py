"""Fixtures shared by the suite. The suite runs on the real PostgreSQL and Redis.

If either is unreachable the whole run fails at start with the address it tried: no test is
skipped, so CI can never pass on a machine without the services.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client

from tests.telnyx_events import Signer, dumps


def _reachable(url: str, default_port: int) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return host, port, False
    return host, port, True


def pytest_sessionstart(session: pytest.Session) -> None:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        raise pytest.UsageError(f"tests need PostgreSQL, DATABASE_URL gives {db['ENGINE']}")
    checks = [
        ("PostgreSQL", f"postgres://{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}", 5432),
        ("Redis broker", settings.CELERY_BROKER_URL, 6379),
    ]
    for name, url, port in checks:
        host, port, ok = _reachable(url, port)
        if not ok:
            raise pytest.UsageError(
                f"{name} is not reachable at {host}:{port}; start it (see README) and run again"
            )


@pytest.fixture(autouse=True)
def _clean_redis():
    """Each test starts with an empty cache and an empty broker queue (Redis db of the tests)."""
    cache.clear()
    yield


@pytest.fixture
def signer(settings) -> Signer:
    signer = Signer()
    settings.TELNYX_PUBLIC_KEYS = [signer.public_key]
    return signer


@pytest.fixture
def post_event(signer, client: Client):
    """POST one envelope to the webhook endpoint, signed with the configured key."""

    def post(event: dict, **headers):
        body = dumps(event)
        return client.post(
            "/webhooks/telnyx/",
            data=body,
            content_type="application/json",
            **{**signer.headers(body), **headers},
        )

    return post


@pytest.fixture
def celery_worker(transactional_db):
    """A real Celery worker consuming from the real Redis broker, in a thread of this process."""
    from celery.contrib.testing.worker import start_worker

    from config.celery_app import app

    with start_worker(
        app, pool="solo", perform_ping_check=False, shutdown_timeout=10, loglevel="WARNING"
    ) as worker:
        yield worker


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; fail the test with a clear message otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
