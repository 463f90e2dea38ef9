"""Structured logs: what each line carries, in JSON, and what it never carries (a secret)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callops import commands, logs, queue
from callops.models import Command, Partner, PartnerConnection, StreamingProfile
from tests.helpers import deliver, make_call, partner_with_key
from tests.telnyx_events import dumps, envelope


@pytest.fixture
def json_log():
    """The root logger's lines, rendered by the production formatter, as parsed JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.Formatter(format="json"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    yield lines
    root.removeHandler(handler)
    root.setLevel(level)
    logs.clear()


def test_it_masks_configured_secrets_bearer_credentials_url_passwords_and_secret_fields(
    json_log, settings
):
    settings.TELNYX_API_KEY = "KEY0123456789ABCDEFsecret"
    settings.CALLOPS_METRICS_TOKEN = "scrape-token-0123456789"
    log = logging.getLogger("callops.test")
    log.warning("calling Telnyx with %s", settings.TELNYX_API_KEY)
    log.warning("Authorization: Bearer cok_0a1b2c3d4e5f_abcDEF-123 was refused")
    log.warning("cannot reach redis://user:hunter2hunter2@redis:6379/0", extra={"api_key": "k1"})
    log.warning("partner secret whsec_c2VjcmV0c2VjcmV0c2VjcmV0", extra={"token": "t0k3n"})
    with logs.bound(call_control_id="v3:x"):
        try:
            raise RuntimeError(f"refused {settings.CALLOPS_METRICS_TOKEN}")
        except RuntimeError:
            log.exception("scrape failed")
    lines = json_log()
    text = json.dumps(lines)
    for secret in (
        "KEY0123456789ABCDEFsecret",
        "cok_0a1b2c3d4e5f_abcDEF-123",
        "hunter2hunter2",
        "whsec_c2VjcmV0c2VjcmV0c2VjcmV0",
        "t0k3n",
        "k1",
        "scrape-token-0123456789",
    ):
        assert secret not in text
    assert lines[0]["message"] == "calling Telnyx with [masked]"
    assert lines[1]["message"] == "Authorization: Bearer [masked] was refused"
    assert lines[2]["message"] == "cannot reach redis://user:[masked]@redis:6379/0"
    assert lines[2]["api_key"] == lines[3]["token"] == "[masked]"
    assert lines[4]["call_control_id"] == "v3:x" and "RuntimeError" in lines[4]["exception"]
    assert {line["level"] for line in lines} == {"warning", "error"}
    assert all(line["logger"] == "callops.test" and line["timestamp"] for line in lines)


@pytest.mark.django_db
def test_it_binds_the_request_and_correlation_ids_on_the_webhook_s_lines(
    json_log, client, signer, settings
):
    body = dumps(envelope("call.initiated", "v3:logs"))
    answer = client.post(
        "/webhooks/telnyx/",
        data=body,
        content_type="application/json",
        HTTP_X_REQUEST_ID="lb-req-42",
    )
    assert answer.status_code == 401 and answer["X-Request-ID"] == "lb-req-42"
    (line,) = [line for line in json_log() if line["logger"] == "callops.webhooks"]
    assert line["request_id"] == line["correlation_id"] == "lb-req-42"
    assert line["reason"] == "missing_signature"
    # A request id that is not a plain token is replaced, never echoed.
    answer = client.get("/healthz/", HTTP_X_REQUEST_ID="a b\r\nSet-Cookie: x")
    assert answer["X-Request-ID"] != "a b\r\nSet-Cookie: x"


@pytest.mark.django_db
def test_it_carries_the_event_s_id_to_the_command_its_drain_creates(
    json_log, monkeypatch, django_capture_on_commit_callbacks
):
    partner = Partner.objects.create(name="logs")
    PartnerConnection.objects.create(partner=partner, connection_id="logs-conn")
    StreamingProfile.objects.create(
        partner=partner, stream_url="wss://media.example.com/a", answer_policy="answer"
    )
    published: list[tuple[str, dict]] = []
    # The broker is the boundary: what would cross it is what the worker's lines will carry.
    monkeypatch.setattr(
        queue, "publish", lambda name, *args, **kwargs: published.append((name, logs.carried()))
    )
    event = envelope(
        "call.initiated",
        "v3:chain",
        connection_id="logs-conn",
        direction="incoming",
        state="parked",
    )
    with django_capture_on_commit_callbacks(execute=True):
        deliver(event)
    assert Command.objects.get().action == "answer"
    carried = {"correlation_id": event["data"]["id"], "call_control_id": "v3:chain"}
    assert (queue.SEND_COMMAND, carried) in published


@pytest.mark.django_db
def test_it_logs_each_outbound_telnyx_call_with_the_command_s_ids(json_log, telnyx, settings):
    call = make_call("v3:sent", "conn-1", status="initiated")
    telnyx.add_call("v3:sent", answered=False)
    command = commands.command_create(call=call, action="answer", requested_by="api")
    commands.command_process(command_pk=command.pk)
    (line,) = [line for line in json_log() if line["message"].startswith("telnyx answer")]
    assert line["command_id"] == str(command.command_id)
    assert line["call_control_id"] == "v3:sent"
    assert line["outcome"] == "succeeded" and line["http_status"] == 200
    assert settings.TELNYX_API_KEY not in json.dumps(json_log())


@pytest.mark.django_db
def test_it_carries_an_api_request_s_id_and_partner_to_the_command_it_creates(
    json_log, monkeypatch, django_capture_on_commit_callbacks
):
    partner, client = partner_with_key("api-logs", "api-conn")
    make_call("v3:api", "api-conn")
    published: list[dict] = []
    monkeypatch.setattr(queue, "publish", lambda *args, **kwargs: published.append(logs.carried()))
    with django_capture_on_commit_callbacks(execute=True):
        answer = client.post(
            "/api/v1/calls/v3:api/hangup/", {}, format="json", HTTP_X_REQUEST_ID="api-req-7"
        )
    assert answer.status_code == 202 and answer["X-Request-ID"] == "api-req-7"
    assert published == [{"correlation_id": "api-req-7"}]
    logging.getLogger("callops.test").info("after the view")  # the request's context, still
    assert json_log()[-1]["partner"] == partner.pk


@given(
    st.lists(
        st.sampled_from(
            ["Bearer", "basic", "TOKEN", "tokens", " ", "\t", "://", "user", ":", "pw", "@", "/"]
            + ["cok_", "a1", "_", "-", "whsec_", "c2Vj=", "'", ",", "x"]
        ),
        max_size=12,
    ).map("".join)
)
def test_the_quick_scan_for_secret_shapes_never_spares_a_text_they_would_change(text):
    changed = text
    for pattern, replacement in logs._SECRET_TEXT:
        changed = pattern.sub(replacement, changed)
    assert logs._mask_text(text, []) == changed
