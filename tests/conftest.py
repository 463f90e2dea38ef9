"""Fixtures shared by the suite. The suite runs on the real PostgreSQL and Redis.

If either is unreachable the whole run fails at start with the address it tried: no test is
skipped, so CI can never pass on a machine without the services.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client

from tests import helpers
from tests.telnyx_events import ClientSigner, dumps


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
def signer(settings) -> ClientSigner:
    signer = ClientSigner()
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


@pytest.fixture(scope="session")
def telnyx_sim():
    """The project's Telnyx simulator (command API), shared by the session; reset per test."""
    from telnyx_sim import TelnyxAPISimulator

    with TelnyxAPISimulator(api_key="KEY_TEST") as sim:
        yield sim


@pytest.fixture
def telnyx(telnyx_sim, settings):
    """Point the real SDK at the simulator: ``TELNYX_BASE_URL`` and ``TELNYX_API_KEY``."""
    telnyx_sim.reset()
    settings.TELNYX_BASE_URL = telnyx_sim.base_url
    settings.TELNYX_API_KEY = telnyx_sim.api_key
    settings.TELNYX_TIMEOUT = 2.0
    yield telnyx_sim
    telnyx_sim.reset()


@pytest.fixture
def live_call(db):
    from callops.models import Call

    return Call.objects.create(
        call_control_id="v3:live-call", connection_id="conn-1", status="answered"
    )


@pytest.fixture
def worker_processes(transactional_db, settings):
    """Start real ``celery worker`` processes on the real broker and the test database."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from django.db import connection

    started: list[subprocess.Popen] = []

    def start(count: int = 1, concurrency: int = 1, **env: str) -> list[subprocess.Popen]:
        db = connection.settings_dict
        environment = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": settings.CELERY_BROKER_URL,
            "TELNYX_BASE_URL": settings.TELNYX_BASE_URL,
            "TELNYX_API_KEY": settings.TELNYX_API_KEY,
            "TELNYX_TIMEOUT": str(settings.TELNYX_TIMEOUT),
            "TELNYX_RATE_LIMIT": str(settings.TELNYX_RATE_LIMIT),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        batch = []
        for index in range(count):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "config",
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(concurrency),
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                    "--loglevel",
                    "INFO",
                    "-n",
                    f"test{len(started)}@%h",
                ],
                cwd=Path(__file__).resolve().parent.parent,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            ready = threading.Event()
            proc.log = []

            def pump(proc=proc, ready=ready):
                # Ready once every pool process has imported the SDK (tasks.py warms it up):
                # otherwise the first commands wait seconds for that import.
                warm = 0
                for line in proc.stdout:
                    proc.log.append(line)
                    warm += "Telnyx client ready" in line
                    if warm >= concurrency:
                        ready.set()

            threading.Thread(target=pump, daemon=True).start()
            started.append(proc)
            batch.append((proc, ready))
        for proc, ready in batch:
            if not ready.wait(30):
                raise AssertionError("worker did not start:\n" + "".join(proc.log[-60:]))
        return [proc for proc, _ in batch]

    yield start
    for proc in started:
        # Shown by pytest only when the test failed.
        print(f"--- worker {proc.pid} ---\n" + "".join(proc.log[-60:]))
        proc.terminate()
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def broker_down(settings):
    """The broker is unreachable: the app points at a port where nothing listens."""
    helpers.use_broker(f"redis://127.0.0.1:{helpers.closed_port()}/0")
    yield
    helpers.use_broker(settings.CELERY_BROKER_URL)


@pytest.fixture
def fake_dns(monkeypatch):
    """The internet's DNS is outside: a small table stands in for it."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in helpers.PUBLIC_DNS:
            address = helpers.PUBLIC_DNS[host]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, 0))]
        if host in ("localhost", "127.0.0.1"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(f"{host} not found")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
