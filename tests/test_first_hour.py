"""What a new user meets first: ``create_partner``, ``demo_setup``, the demo's webhook
receiver (``demo_receiver``, a real process verifying with ``standardwebhooks``), the page at
``/`` and ``bin/setup``'s rerun. ``./bin/run`` as a whole is in tests/test_embedded.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from standardwebhooks import Webhook

from callops.api_keys import api_key_create
from callops.management.commands.runstack import split_addr
from callops.models import Partner, PartnerConnection, StreamingProfile, WebhookEndpoint
from callops.partner_delivery import check_webhook_url
from callops.targets import UnsafeTarget
from tests.helpers import closed_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- create_partner ---------------------------------------------------------------------------


def test_it_says_nothing_was_created_when_a_connection_belongs_to_another_partner():
    owner = Partner.objects.create(name="alice")
    PartnerConnection.objects.create(partner=owner, connection_id="conn-alice")
    out = StringIO()
    with pytest.raises(CommandError, match="conn-alice belongs to partner alice"):
        call_command(
            "create_partner", "mallory", "--connection-id", "c-new",
            "--connection-id", "conn-alice", stdout=out,
        )  # fmt: skip
    assert "Created" not in out.getvalue()
    assert out.getvalue() == ""
    assert not Partner.objects.filter(name="mallory").exists()
    assert not PartnerConnection.objects.filter(connection_id="c-new").exists()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["x" * 101], "name"),
        (["  "], "name"),
        (["bob", "--connection-id", ""], "connection id"),
        (["bob", "--connection-id", "c" * 256], "connection id"),
        (["bob", "--key-name", "k" * 101], "key name"),
    ],
)
def test_it_refuses_a_bad_argument_naming_it_and_creates_nothing(args, field):
    out = StringIO()
    with pytest.raises(CommandError, match=field):
        call_command("create_partner", *args, stdout=out)
    assert out.getvalue() == ""
    assert not Partner.objects.exists()


def test_it_prints_created_then_found_and_the_key_last():
    first, _ = run("create_partner", "carol", "--connection-id", "c-1")
    assert first.splitlines()[0] == "Created partner carol"
    assert first.splitlines()[-1].startswith("cok_")
    again, _ = run("create_partner", "carol", "--connection-id", "c-1")
    assert again.splitlines()[0] == "Found partner carol"
    assert Partner.objects.get(name="carol").api_keys.count() == 2


# --- demo_setup -------------------------------------------------------------------------------


def test_it_points_the_demo_profiles_at_the_stream_url_it_is_given(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out, _ = run("demo_setup", "--stream-url", "ws://127.0.0.1:9402/media")
    assert "streaming to ws://127.0.0.1:9402/media" in out
    profiles = StreamingProfile.objects.filter(partner__name="demo")
    assert set(profiles.values_list("stream_url", flat=True)) == {"ws://127.0.0.1:9402/media"}
    key = (tmp_path / "demo_partner_key").read_text().strip()
    assert f"Demo partner API key (also in {tmp_path / 'demo_partner_key'}): {key}" in out
    # Run again (every ./bin/run does): the same partner and profiles, a fresh key.
    run("demo_setup", "--stream-url", "ws://127.0.0.1:9403/media")
    assert set(profiles.values_list("stream_url", flat=True)) == {"ws://127.0.0.1:9403/media"}
    assert (tmp_path / "demo_partner_key").read_text().strip() != key


# --- demo_receiver ----------------------------------------------------------------------------


def receiver(port: int, api: str, var_dir: Path) -> subprocess.Popen:
    ours = ("DJANGO_", "TELNYX_", "CALLOPS_", "DATABASE_URL", "REDIS_URL", "CELERY_", "CACHE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.dev", CALLOPS_VAR_DIR=str(var_dir))
    return subprocess.Popen(
        [sys.executable, "manage.py", "demo_receiver", "--port", str(port), "--api", api],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ready(proc: subprocess.Popen, url: str) -> bool:
    """The receiver answers 200 once registered; True too if it died (the caller checks)."""
    if proc.poll() is not None:
        return True
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def signed(secret: str, payload: dict) -> tuple[bytes, dict]:
    body = httpx.Request("POST", "http://x", json=payload).content
    now = datetime.now(tz=UTC)
    headers = {
        "webhook-id": payload["id"],
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(payload["id"], now, body.decode()),
        "content-type": "application/json",
    }
    return body, headers


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_receiver_registers_through_the_api_and_prints_each_verified_event(
    live_server, settings, tmp_path
):
    # The development settings the demo runs with: http and loopback endpoints allowed.
    settings.DEBUG = settings.CALLOPS_ALLOW_PRIVATE_TARGETS = True
    partner = Partner.objects.create(name="demo")
    _, key = api_key_create(partner=partner)
    (tmp_path / "demo_partner_key").write_text(key + "\n")
    port = closed_port()
    url = f"http://127.0.0.1:{port}/"
    api = f"{live_server.url}/api/v1/"

    first = receiver(port, api, tmp_path)
    try:
        wait_for(lambda: ready(first, url), 30)
        assert first.poll() is None, first.stdout.read()
        (endpoint,) = WebhookEndpoint.objects.filter(partner=partner)
        assert endpoint.url == url and endpoint.active
        event = {"id": "evt_1", "type": "call.answered", "call_control_id": "v3:a", "sequence": 2}
        body, headers = signed(endpoint.secret, event)
        assert httpx.post(url, content=body, headers=headers).status_code == 204
        forged, headers = signed("whsec_" + "A" * 44, {**event, "id": "evt_2"})
        assert httpx.post(url, content=forged, headers=headers).status_code == 401
    finally:
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=10)[0]
    assert first.returncode == 0, output
    lines = output.splitlines()
    assert any(line.split() == ["call.answered", "v3:a", "#2", "verified"] for line in lines), (
        output
    )
    assert any(line.startswith("REJECTED evt_2") for line in lines), output
    assert "Traceback" not in output

    # The next run replaces the endpoint an earlier run left (its secret went with it).
    second = receiver(port, api, tmp_path)
    try:
        wait_for(lambda: ready(second, url), 30)
        assert second.poll() is None, second.stdout.read()
    finally:
        second.send_signal(signal.SIGINT)
        second.communicate(timeout=10)
    assert second.returncode == 0
    (replacement,) = WebhookEndpoint.objects.filter(partner=partner)
    assert replacement.pk != endpoint.pk and replacement.url == url


# --- / ----------------------------------------------------------------------------------------


def test_the_root_page_leads_to_the_admin_the_api_docs_and_the_health_checks(client):
    response = client.get("/")
    assert response.status_code == 200
    page = response.content.decode()
    for link in ("/admin/", "/api/v1/docs/", "/api/v1/schema/", "/healthz", "/readyz"):
        assert f'href="{link}"' in page
        assert client.get(link).status_code != 404, link


# --- bin/setup --------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 and .venv/bin/python: logs what it is asked, makes what venv makes.
echo "$*" >> "$CALLS"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
if [ "$1" = "-c" ]; then echo "3.11.fake"; fi
"""


def test_it_installs_only_when_pyproject_changed_or_the_venv_is_missing(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "setup").write_text((ROOT / "bin" / "setup").read_text())
    (tmp_path / "bin" / "setup").chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls)}

    def setup() -> list[str]:
        calls.write_text("")
        subprocess.run([tmp_path / "bin" / "setup"], env=env, check=True, timeout=30)
        return [line for line in calls.read_text().splitlines() if "pip install" in line]

    assert len(setup()) == 2  # a new venv: pip upgraded, callops installed
    started = time.monotonic()
    assert setup() == []  # nothing changed
    assert time.monotonic() - started < 2
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert len(setup()) == 2
    assert setup() == []
    (tmp_path / ".venv" / "bin" / "python").unlink()
    assert len(setup()) == 2


# --- runstack's --addr ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("8001", ("127.0.0.1", 8001)),
        ("0.0.0.0:8002", ("0.0.0.0", 8002)),  # noqa: S104 - what a user may type
        ("[::1]:8003", ("[::1]", 8003)),
    ],
)
def test_it_reads_the_addresses_runserver_takes(addr, expected):
    assert split_addr(addr) == expected


@pytest.mark.parametrize("addr", ["localhost:", "localhost:http", "127.0.0.1:70000"])
def test_it_refuses_an_address_without_a_port(addr):
    with pytest.raises(CommandError, match="--addr"):
        split_addr(addr)


def test_the_demo_receivers_url_passes_in_development_only(settings):
    settings.DEBUG = settings.CALLOPS_ALLOW_PRIVATE_TARGETS = True  # config.settings.dev
    check_webhook_url("http://127.0.0.1:8091/")
    settings.DEBUG = settings.CALLOPS_ALLOW_PRIVATE_TARGETS = False  # production's defaults
    with pytest.raises(UnsafeTarget, match="https"):
        check_webhook_url("http://127.0.0.1:8091/")
    with pytest.raises(UnsafeTarget, match="not a public address"):
        check_webhook_url("https://127.0.0.1:8091/")
