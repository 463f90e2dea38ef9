"""Fixtures shared by the suite. The suite runs on the real PostgreSQL and Redis.

If either is unreachable the whole run fails at start with the address it tried: no test is
skipped, so CI can never pass on a machine without the services.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client

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
    import threading
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


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def database_down():
    """Django's connection points at a closed port until the block ends, then reconnects."""
    from django.db import connection

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
    from django.db import connection

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
    from kombu import pools

    from config.celery_app import app

    app.conf.broker_url = url
    app.pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    pools.reset()


@pytest.fixture
def broker_down(settings):
    """The broker is unreachable: the app points at a port where nothing listens."""
    use_broker(f"redis://127.0.0.1:{closed_port()}/0")
    yield
    use_broker(settings.CELERY_BROKER_URL)
