"""POST /webhooks/telnyx/: only authentic events are stored, each exactly once."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from callops import drain
from callops.models import DrainFlag, WebhookEvent
from tests.telnyx_events import ClientSigner as Signer
from tests.telnyx_events import dumps, envelope

pytestmark = pytest.mark.django_db

URL = "/webhooks/telnyx/"


def post_raw(client, body: bytes, headers: dict):
    return client.post(URL, data=body, content_type="application/json", **headers)


def test_it_stores_an_authentic_event_as_pending(post_event):
    event = envelope("call.answered", "v3:abc", attempt=2)
    response = post_event(event)
    assert response.status_code == 200
    assert response.json() == {"status": "pending", "duplicate": False}
    stored = WebhookEvent.objects.get()
    assert stored.event_id == event["data"]["id"]
    assert stored.event_type == "call.answered"
    assert stored.call_control_id == "v3:abc"
    assert stored.payload == event
    assert stored.status == "pending"
    assert (stored.delivery_count, stored.last_attempt) == (1, 2)
    assert stored.occurred_at.isoformat().startswith(event["data"]["occurred_at"][:19])


def webhook_statements_prepared() -> list[str]:
    """The webhook INSERTs prepared on this connection (pg_prepared_statements is per session)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement FROM pg_prepared_statements"
            " WHERE statement LIKE '%%INSERT INTO callops_webhookevent%%'"
        )
        return [row[0] for row in cursor.fetchall()]


def test_the_insert_is_prepared_once_per_connection_and_reused(post_event):
    for kind in ("call.initiated", "call.answered", "call.hangup"):
        assert post_event(envelope(kind, attempt=1)).status_code == 200
    assert len(webhook_statements_prepared()) == 1
    assert WebhookEvent.objects.count() == 3


def test_with_prepared_statements_off_the_insert_still_runs(post_event):
    from django.db import connection

    connection.ensure_connection()
    raw = connection.connection
    was, raw.prepare_threshold = raw.prepare_threshold, None  # DATABASE_PREPARED_STATEMENTS=false
    try:
        assert post_event(envelope("call.answered")).status_code == 200
        assert webhook_statements_prepared() == []
    finally:
        raw.prepare_threshold = was
    assert WebhookEvent.objects.get().status == "pending"


def queued_messages() -> int:
    """Messages waiting in the real broker's queues (Redis lists ``callops`` and ``events``)."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    return broker.llen("callops") + broker.llen("events")


def test_it_rings_the_doorbell_once_per_burst(post_event):
    for kind in ("call.initiated", "call.answered", "call.machine.detection.ended"):
        post_event(envelope(kind))
    assert queued_messages() == 1  # one drain for the burst, not one task per event
    assert DrainFlag.objects.get().requested_at is not None
    drain.flag_lower()  # what the drain task does before its last look
    post_event(envelope("call.answered"))
    assert queued_messages() == 2


def drain_messages() -> list[dict]:
    """The tasks waiting in the broker: queue, task, arguments and whether they wait (eta)."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    found = []
    for name in ("callops", "events"):
        for raw in broker.lrange(name, 0, -1):
            message = json.loads(raw)
            found.append(
                {
                    "queue": name,
                    "task": message["headers"]["task"].rpartition(".")[2],
                    "args": json.loads(base64.b64decode(message["body"]))[0],
                    "eta": message["headers"].get("eta"),
                }
            )
    return found


def test_segments_ring_a_delayed_drain_and_an_answer_is_not_held_behind_it(post_event, settings):
    settings.CALLOPS_DRAIN_DELAY = 5.0
    segment = {"transcript": "hello", "is_final": True}
    for _ in range(3):
        post_event(envelope("call.transcription", "v3:lanes", transcription_data=segment))
    (soon,) = drain_messages()  # one drain for the segments, published to run 5 s later
    shard = drain.shard_of("v3:lanes")
    assert (soon["queue"], soon["task"], soon["args"]) == (
        "events",
        "drain_webhook_events",
        [shard, "soon"],
    )
    assert soon["eta"] is not None
    post_event(envelope("call.initiated", "v3:lanes"))  # the soon flag is up: not waited on
    urgent = [m for m in drain_messages() if m["task"] == "drain_urgent_events"]
    assert [(m["queue"], m["args"], m["eta"]) for m in urgent] == [("callops", [shard], None)]
    assert len(drain_messages()) == 2


def test_a_duplicate_of_a_processed_event_rings_nothing(post_event):
    event = envelope("call.answered")
    post_event(event)
    WebhookEvent.objects.update(status="processed")
    drain.flag_lower()
    post_event(event)
    assert queued_messages() == 1


def test_a_lost_drain_is_asked_for_again_after_the_flag_expires(post_event):
    post_event(envelope("call.initiated"))
    DrainFlag.objects.update(requested_at=timezone.now() - timedelta(seconds=31))
    post_event(envelope("call.answered"))
    assert queued_messages() == 2


def test_it_counts_a_duplicate_delivery_and_changes_nothing_else(post_event):
    event = envelope("call.answered")
    post_event(event)
    WebhookEvent.objects.update(status="processed")
    event["meta"]["attempt"] = 3
    response = post_event(event)
    assert response.status_code == 200
    assert response.json() == {"status": "processed", "duplicate": True}
    stored = WebhookEvent.objects.get()
    assert (stored.delivery_count, stored.last_attempt, stored.status) == (2, 3, "processed")


def test_it_stores_unknown_event_types_as_ignored(post_event):
    response = post_event(envelope("call.something.new"))
    assert response.status_code == 200
    stored = WebhookEvent.objects.get()
    assert stored.status == "ignored"
    assert stored.processed_at is not None


def test_it_rejects_a_tampered_body(client, signer):
    body = dumps(envelope("call.answered"))
    headers = signer.headers(body)
    response = post_raw(client, body.replace(b"answered", b"hangup"), headers)
    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


def test_it_rejects_a_signature_by_another_key(client, signer):
    body = dumps(envelope("call.answered"))
    response = post_raw(client, body, Signer().headers(body))
    assert response.status_code == 401
    assert not WebhookEvent.objects.exists()


def test_it_accepts_any_key_of_a_rotation(client, settings):
    old, new = Signer(), Signer()
    settings.TELNYX_PUBLIC_KEYS = [old.public_key, new.public_key]
    for signer in (old, new):
        body = dumps(envelope("call.answered"))
        assert post_raw(client, body, signer.headers(body)).status_code == 200
    stranger = Signer()
    body = dumps(envelope("call.answered"))
    assert post_raw(client, body, stranger.headers(body)).status_code == 401
    assert WebhookEvent.objects.count() == 2


@pytest.mark.parametrize("offset", [-301, 301, -3600, 86400])
def test_it_rejects_stale_and_future_timestamps(client, signer, offset):
    body = dumps(envelope("call.answered"))
    response = post_raw(client, body, signer.headers(body, int(time.time()) + offset))
    assert response.status_code == 401
    assert "away from now" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize("offset", [-299, 299])
def test_it_accepts_timestamps_inside_the_window(client, signer, offset):
    body = dumps(envelope("call.answered"))
    assert (
        post_raw(client, body, signer.headers(body, int(time.time()) + offset)).status_code == 200
    )


@pytest.mark.parametrize("drop", ["HTTP_TELNYX_SIGNATURE_ED25519", "HTTP_TELNYX_TIMESTAMP"])
def test_it_rejects_missing_headers(client, signer, drop):
    body = dumps(envelope("call.answered"))
    headers = signer.headers(body)
    del headers[drop]
    response = post_raw(client, body, headers)
    assert response.status_code == 401
    assert "missing" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize(
    ("signature", "timestamp"),
    [("not base64!", None), (base64.b64encode(b"short").decode(), None), (None, "yesterday")],
)
def test_it_rejects_malformed_headers(client, signer, signature, timestamp):
    body = dumps(envelope("call.answered"))
    headers = signer.headers(body)
    if signature:
        headers["HTTP_TELNYX_SIGNATURE_ED25519"] = signature
    if timestamp:
        headers["HTTP_TELNYX_TIMESTAMP"] = timestamp
    assert post_raw(client, body, headers).status_code == 401


def test_it_rejects_everything_when_no_key_is_configured(client, settings):
    settings.TELNYX_PUBLIC_KEYS = []
    body = dumps(envelope("call.answered"))
    assert post_raw(client, body, Signer().headers(body)).status_code == 401


def test_it_logs_a_line_for_each_rejection(client, signer, caplog):
    body = dumps(envelope("call.answered"))
    post_raw(client, body, Signer().headers(body))
    assert any("webhook rejected status=401" in r.getMessage() for r in caplog.records)


def test_it_refuses_a_body_over_one_mebibyte_before_reading_it(client, signer):
    event = envelope("call.answered", padding="x" * (1024 * 1024))
    body = dumps(event)
    response = post_raw(client, body, signer.headers(body))
    assert response.status_code == 413
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "no data object"),
        (json.dumps({"data": {"event_type": "call.answered"}}).encode(), "data.id"),
        (json.dumps({"data": {"id": "e1"}}).encode(), "data.event_type"),
        (json.dumps({"data": {"id": 5, "event_type": "x"}}).encode(), "data.id"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_it_answers_400_to_authentic_but_malformed_bodies(client, signer, body, reason):
    response = post_raw(client, body, signer.headers(body))
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert not WebhookEvent.objects.exists()


def signed_post(client, signer, body: bytes):
    return post_raw(client, body, signer.headers(body))


def with_payload(raw_payload: bytes, **data: str) -> bytes:
    """A signed-looking envelope whose ``data.payload`` is exactly ``raw_payload``, unparsed."""
    fields = {"id": "e-raw", "event_type": "call.transcription", **data}
    head = json.dumps({"data": fields}, separators=(",", ":")).encode()[:-2]
    return head + b',"payload":' + raw_payload + b"}}"


ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + digit) for digit in range(10)))


@pytest.mark.parametrize(
    "timestamp",
    [
        lambda now: "9" * 400,  # int() took it, then float arithmetic on it overflowed: a 500
        lambda now: "9" * 13,
        lambda now: "+" + now,
        lambda now: " " + now,
        lambda now: now + "\n",
        lambda now: now[:1] + "_" + now[1:],
        lambda now: "-" + now,
        lambda now: now.translate(ARABIC_INDIC),  # int() reads any Unicode digit
    ],
    ids=["400 digits", "13 digits", "plus", "space", "newline", "underscore", "minus", "arabic"],
)
def test_it_refuses_a_timestamp_that_is_not_a_plain_ascii_decimal(client, signer, timestamp):
    body = dumps(envelope("call.answered"))
    headers = signer.headers(body)
    headers["HTTP_TELNYX_TIMESTAMP"] = timestamp(headers["HTTP_TELNYX_TIMESTAMP"])
    response = post_raw(client, body, headers)
    assert response.status_code == 401
    assert "telnyx-timestamp is not a Unix time" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize(
    ("raw_payload", "reason"),
    [
        (b'{"transcript":"a\\u0000b"}', "data.payload.transcript contains \\u0000"),
        (b'{"t":["ok","\\\\\\u0000"]}', "data.payload.t[1] contains \\u0000"),
        (b'{"a\\u0000b":1}', "key data.payload.a\\u0000b contains \\u0000"),
        (b'{"t":"\\ud800"}', "data.payload.t contains a lone surrogate"),
        (b'{"t":"\\udc00\\ud83d"}', "data.payload.t contains a lone surrogate"),
        (b'{"t":NaN}', "data.payload.t is NaN, which is not JSON"),
        (b'{"t":[1,-Infinity]}', "data.payload.t[1] is -Infinity, which is not JSON"),
        (b'{"t":[' + b"1" * 5000 + b"]}", "a number callops cannot read: Exceeds the limit"),
        (b'"\\u0000"', "data.payload contains"),
        (b'{"t":"\xed\xa0\x80"}', "not JSON in UTF-8"),  # a surrogate encoded as bytes
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
        (b"[NaN," + b"[" * 100_000 + b"]" * 100_000 + b"]", "is NaN, which is not JSON"),
    ],
)
def test_it_refuses_json_postgresql_cannot_hold_with_400_naming_where(
    client, signer, raw_payload, reason
):
    response = signed_post(client, signer, with_payload(raw_payload))
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert not WebhookEvent.objects.exists()


@pytest.mark.django_db(transaction=True)  # the refused INSERT aborts a test's transaction
def test_it_refuses_a_number_postgresql_cannot_hold_with_400(client, signer):
    # Valid JSON (RFC 8259 sets no limit) that Python reads as inf but numeric overflows on:
    # PostgreSQL's answer would be the same on every retry.
    response = signed_post(client, signer, with_payload(b'{"t":1e1000000}'))
    assert response.status_code == 400
    assert response.json()["error"] == "body cannot be stored: value overflows numeric format"
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"data":{"id":"e\\u00001","event_type":"call.answered"}}', "data.id contains \\u0000"),
        (b'{"body":{"t":"\\u0000"},"data":{"id":"e1","event_type":"x"}}', "body.t contains"),
        (b'"\\u0000"', "body contains \\u0000"),
    ],
)
def test_it_names_where_the_nul_is_in_the_whole_body(client, signer, body, reason):
    response = signed_post(client, signer, body)
    assert response.status_code == 400
    assert response.json()["error"].startswith(reason)


@pytest.mark.parametrize(
    ("raw_payload", "transcript"),
    [
        (b'{"transcript":"a\\\\u0000b"}', "a\\u0000b"),  # an escaped backslash, then text
        (b'{"transcript":"\\ud83d\\ude00 \\u00e9"}', "\U0001f600 \u00e9"),  # a whole pair
        (b'{"transcript":"\\uD55C"}', "\ud55c"),  # Hangul, not a surrogate
    ],
)
def test_it_stores_escapes_postgresql_can_hold_exactly_as_sent(
    client, signer, raw_payload, transcript
):
    response = signed_post(client, signer, with_payload(raw_payload))
    assert response.status_code == 200
    assert WebhookEvent.objects.get().body == {"transcript": transcript}


def test_it_stores_a_body_after_a_utf8_byte_order_mark_unchanged(client, signer):
    event = envelope("call.answered")
    response = signed_post(client, signer, b"\xef\xbb\xbf" + dumps(event))
    assert response.status_code == 200
    assert WebhookEvent.objects.get().payload == event


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_it_refuses_a_body_not_in_utf8(client, signer, encoding):
    body = json.dumps(envelope("call.answered")).encode(encoding)
    response = signed_post(client, signer, body)
    assert response.status_code == 400
    assert "not JSON" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


@pytest.mark.parametrize(
    "occurred_at",
    [
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC: stored, then no drain could load it
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59Z",
        "2000-01-01T00:00:00Z",
        "yesterday",
        17,
    ],
)
def test_it_refuses_an_occurred_at_it_cannot_order_by(client, signer, occurred_at):
    event = envelope("call.answered")
    event["data"]["occurred_at"] = occurred_at
    response = signed_post(client, signer, dumps(event))
    assert response.status_code == 400
    assert "data.occurred_at" in response.json()["error"]
    assert not WebhookEvent.objects.exists()


def test_an_occurred_at_without_an_offset_is_read_as_utc(client, signer):
    event = envelope("call.answered")
    written = timezone.now().replace(microsecond=0, tzinfo=None)
    event["data"]["occurred_at"] = written.isoformat()
    assert signed_post(client, signer, dumps(event)).status_code == 200
    assert WebhookEvent.objects.get().occurred_at == written.replace(tzinfo=UTC)


def test_an_event_without_occurred_at_is_ordered_by_arrival(client, signer):
    event = envelope("call.answered")
    del event["data"]["occurred_at"]
    before = timezone.now()
    assert signed_post(client, signer, dumps(event)).status_code == 200
    assert WebhookEvent.objects.get().occurred_at >= before


def test_it_only_accepts_post(client):
    assert client.get(URL).status_code == 405


def test_each_shard_gets_its_own_drain_and_a_call_keeps_its_shard(post_event):
    from callops.drain import shard_of

    calls, shards = [], set()
    for index in range(200):  # enough calls to cover three shards
        ccid = f"v3:shard-{index}"
        if shard_of(ccid) not in shards:
            shards.add(shard_of(ccid))
            calls.append(ccid)
        if len(shards) == 3:
            break
    for ccid in calls:
        for kind in ("call.initiated", "call.answered"):
            post_event(envelope(kind, ccid))
    assert queued_messages() == 3  # one drain per shard, not one per event or one in all
    for ccid in calls:
        stored = set(
            WebhookEvent.objects.filter(call_control_id=ccid).values_list("shard", flat=True)
        )
        assert stored == {shard_of(ccid)}
    assert DrainFlag.objects.filter(requested_at__isnull=False).count() == 3
