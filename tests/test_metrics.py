"""Prometheus /metrics: who may scrape it, and that its numbers follow real traffic.

The live case runs gunicorn (config/gunicorn.py, two sync workers) and a Celery worker with two
pool processes, all writing to one PROMETHEUS_MULTIPROC_DIR; it posts signed webhooks (some
duplicated, some forged, stale or unsigned) over HTTP, lets the worker answer each call through
the Telnyx simulator and deliver the partner's webhooks to a local endpoint, then scrapes and
checks that every count is what was sent, whichever process counted it.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time

import pytest
from django.db import connection
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import start_process, stop_processes
from callops.models import Command, Delivery, Partner, PartnerConnection, StreamingProfile
from callops.partner_delivery import webhook_endpoint_create
from telnyx_sim import Signer, dumps, envelope
from tests.helpers import closed_port, deliver, healthy, wait_for
from tests.test_partner_webhooks import drive, local_targets, receiver  # noqa: F401 - fixtures

TOKEN = "metrics-token-for-the-test-0123456789"  # noqa: S105


# --- Who may scrape --------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_answers_404_when_neither_a_token_nor_networks_are_configured(client, settings):
    settings.CALLOPS_METRICS_TOKEN = ""
    settings.CALLOPS_METRICS_ALLOWED_NETWORKS = []
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 404


@pytest.mark.django_db
def test_it_refuses_a_scrape_without_the_token_or_with_another(client, settings):
    settings.CALLOPS_METRICS_TOKEN = TOKEN
    settings.CALLOPS_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]  # the test client is 127.0.0.1
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}x").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 403
    answer = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain; version=")
    assert b"callops_webhook_events_pending 0.0" in answer.content


@pytest.mark.django_db
def test_it_lets_an_allowed_network_scrape_without_a_token(client, settings):
    settings.CALLOPS_METRICS_TOKEN = ""
    settings.CALLOPS_METRICS_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 403


@pytest.mark.django_db
def test_it_answers_before_host_validation_so_prometheus_may_scrape_by_address(client, settings):
    settings.CALLOPS_METRICS_TOKEN = TOKEN
    answer = client.get("/metrics", HTTP_HOST="10.1.2.3:8000", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert answer.status_code == 200


@pytest.mark.django_db
def test_it_leaves_out_what_it_cannot_read_and_counts_it(client, settings):
    settings.CALLOPS_METRICS_TOKEN = TOKEN
    settings.CALLOPS_RATE_LIMIT_URL = f"redis://127.0.0.1:{closed_port()}/0"
    text = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    samples = _samples(text)
    assert samples[("callops_metrics_scrape_errors_total", (("part", "rate_limit"),))] >= 1
    assert "callops_telnyx_rate_limit_pause_seconds" not in text
    assert ("callops_webhook_events_pending", ()) in samples  # the other parts still count


@pytest.mark.django_db
def test_it_counts_a_partner_delivery_by_its_outcome(receiver, local_targets):  # noqa: F811
    partner = Partner.objects.create(name="acme")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-1")
    webhook_endpoint_create(partner=partner, url=receiver.url, event_types=["call.initiated"])
    before = REGISTRY.get_sample_value("callops_partner_deliveries_total", {"outcome": "succeeded"})
    deliver(envelope("call.initiated", "v3:counted", connection_id="conn-1"))
    drive()
    after = REGISTRY.get_sample_value("callops_partner_deliveries_total", {"outcome": "succeeded"})
    assert Delivery.objects.filter(status="succeeded").count() == 1
    assert (after or 0) - (before or 0) == 1


# --- The numbers, from live processes -----------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(port: int, token: str | None = TOKEN) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request("GET", "/metrics", headers=headers)
    response = conn.getresponse()
    return response.status, response.read().decode()


def _post(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/webhooks/telnyx/",
        body=body,
        headers={"Content-Type": "application/json", **headers},
    )
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.fixture
def live(telnyx, settings, worker_processes, tmp_path):
    """gunicorn and a Celery worker sharing one metrics directory, JSON logs, the simulator."""
    partner = Partner.objects.create(name="metrics")
    PartnerConnection.objects.create(partner=partner, connection_id="metrics-conn")
    StreamingProfile.objects.create(
        partner=partner,
        stream_url="wss://media.example.com/audio",
        stream_track="both_tracks",
        auto_start=True,
        answer_policy="answer",
    )
    # Nothing listens there: every delivery attempt fails, and is retried (the success path is
    # test_it_counts_a_partner_delivery_by_its_outcome's; test settings allow https only).
    webhook_endpoint_create(
        partner=partner, url=f"https://127.0.0.1:{closed_port()}/hooks", event_types=[]
    )
    signer = Signer()
    metrics_dir = tmp_path / "metrics"
    db = connection.settings_dict
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "TELNYX_PUBLIC_KEY": signer.public_key,
        "TELNYX_BASE_URL": settings.TELNYX_BASE_URL,
        "TELNYX_API_KEY": settings.TELNYX_API_KEY,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "CALLOPS_METRICS_TOKEN": TOKEN,
        "CALLOPS_ALLOW_PRIVATE_TARGETS": "true",
        "LOG_FORMAT": "json",
    }
    port = closed_port()
    web_env = {
        **os.environ,
        **env,
        "PYTHONUNBUFFERED": "1",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
    }
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"]
    web = start_process(gunicorn, env=web_env, log_path=tmp_path / "web.log")
    try:
        (worker,) = worker_processes(count=1, concurrency=2, **env)
        wait_for(lambda: healthy(port), timeout=30, interval=0.1)
        yield port, signer, worker, tmp_path / "web.log"
    finally:
        stop_processes([web], timeout=10)
        print("--- web.log ---\n" + (tmp_path / "web.log").read_text(errors="replace")[-4000:])


def _json_lines(lines) -> list[dict]:
    parsed = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_it_counts_what_gunicorn_and_the_worker_did(live, telnyx):
    port, signer, worker, web_log = live
    assert _scrape(port, token=None)[0] == 403
    assert _scrape(port, token="not-the-token")[0] == 403
    calls = 4
    for i in range(calls):
        telnyx.add_call(f"v3:metrics-{i}", answered=False)  # parked, waiting for an answer
    bodies = [
        dumps(
            envelope(
                "call.initiated",
                f"v3:metrics-{i}",
                connection_id="metrics-conn",
                direction="incoming",
                state="parked",
            )
        )
        for i in range(calls)
    ]
    for body in bodies:
        assert _post(port, body, signer.headers(body)) == 200
    for body in bodies[:2]:  # Telnyx delivers twice
        assert _post(port, body, signer.headers(body)) == 200
    forged = Signer()
    for body in bodies[:3]:
        assert _post(port, body, forged.headers(body)) == 401
    assert _post(port, bodies[0], signer.headers(bodies[0], int(time.time()) - 3600)) == 401
    assert _post(port, bodies[0], {}) == 401

    def done() -> bool:
        answers = Command.objects.filter(action="answer", status="succeeded").count()
        attempted = Delivery.objects.filter(attempts__gte=1).count()
        return answers == calls and attempted >= calls

    wait_for(done, timeout=45, interval=0.2)
    assert len(telnyx.commands("answer")) == calls

    def attempts_logged() -> int:
        return sum(" attempt " in line and "delivery " in line for line in list(worker.log))

    logged_before = attempts_logged()
    status, text = _scrape(port)
    time.sleep(1)  # each count is logged right after it is made; let the lines arrive
    logged_after = attempts_logged()
    assert status == 200
    samples = _samples(text)

    def value(name: str, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    # The web process's counters, both gunicorn workers added up.
    assert value("callops_webhooks_received_total", event_type="call.initiated") == calls + 2
    assert value("callops_webhooks_duplicated_total") == 2
    assert value("callops_webhooks_rejected_total", reason="bad_signature") == 3
    assert value("callops_webhooks_rejected_total", reason="stale_timestamp") == 1
    assert value("callops_webhooks_rejected_total", reason="missing_signature") == 1
    assert value("callops_webhook_ack_seconds_count") == calls + 2 + 5
    assert value("callops_processes", kind="web") == 2
    # The worker's pool processes', added up as well.
    assert value("callops_events_applied_total", status="processed") == calls
    assert value("callops_event_apply_lag_seconds_count") == calls
    assert value("callops_commands_created_total", action="answer") == calls
    assert value("callops_command_attempts_total", action="answer", result="succeeded") == calls
    assert value("callops_commands_finished_total", action="answer", outcome="succeeded") == calls
    assert value("callops_command_send_delay_seconds_count") == calls
    assert value("callops_command_answer_seconds_count") == calls
    failed = value("callops_partner_deliveries_total", outcome="failed")
    assert calls <= logged_before <= failed <= logged_after
    assert value("callops_partner_deliveries_total", outcome="succeeded") == 0
    assert value("callops_telnyx_rate_limited_total") == 0
    assert value("callops_processes", kind="worker") == 2
    # Read from the database at the scrape.
    assert value("callops_webhook_events_pending") == 0
    assert value("callops_calls_in_progress") == calls
    assert value("callops_commands_unfinished", status="queued") == 0
    backlog = Delivery.objects.filter(status__in=Delivery.UNFINISHED).count()
    assert backlog >= calls
    backlogs = [value("callops_partner_deliveries_backlog", status=s) for s in Delivery.UNFINISHED]
    assert sum(backlogs) == backlog
    assert value("callops_telnyx_rate_limit_pause_seconds") == 0

    # One correlation id from the webhook to the command's send and to the partner's delivery:
    # the Telnyx id of the call.initiated that started it.
    first = json.loads(bodies[0])["data"]
    ccid = first["payload"]["call_control_id"]
    web_lines = _json_lines(web_log.read_text().splitlines())
    rejected = [
        line for line in web_lines if line.get("message", "").startswith("webhook rejected")
    ]
    assert len(rejected) == 5 and all(line["request_id"] for line in rejected)
    worker_lines = _json_lines(worker.log)
    chain = [line for line in worker_lines if line.get("correlation_id") == first["id"]]
    sends = [line for line in chain if line.get("message", "").startswith("telnyx answer")]
    assert len(sends) == 1
    assert sends[0]["call_control_id"] == ccid
    command = Command.objects.get(action="answer", call__call_control_id=ccid)
    assert sends[0]["command_id"] == str(command.command_id)
    partner = Partner.objects.get(name="metrics")
    deliveries = [
        line for line in chain if line.get("task") == "callops.tasks.deliver_partner_event"
    ]
    assert deliveries and all(line.get("partner") == partner.pk for line in deliveries)
    assert TOKEN not in web_log.read_text() + "".join(worker.log)
