"""POST /webhooks/telnyx/ fuzzed: any body and headers, signed with the real test key or not.

Whatever arrives, the answer is never a 5xx. An unverified request changes nothing; a signed
body is either stored exactly as it was sent or refused with a 400, and a refusal changes
nothing either: no row, no pending event, no delivery counted.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.db import connection
from django.db.models import Count, Sum
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from callops.models import WebhookEvent
from tests.telnyx_events import ClientSigner, envelope

URL = "/webhooks/telnyx/"
NOW = datetime.now(UTC)

# Every character, NUL and lone surrogates included (hypothesis leaves surrogates out unless
# told), and the escapes that are near misses of them once written as JSON.
texts = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["\x00", "\ud800", "\udc00x", "\\u0000", "\\", "\ufeff", "\U0001f600"]
)
numbers = st.integers() | st.floats()  # json.dumps writes NaN, Infinity and -Infinity
values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
offsets = st.sampled_from([UTC, timezone(timedelta(hours=-1)), timezone(timedelta(hours=14))])
times = st.one_of(
    st.builds(
        lambda seconds, naive: (
            (NOW + timedelta(seconds=seconds)).replace(tzinfo=None if naive else UTC).isoformat()
        ),
        st.integers(-20 * 366 * 86400, 20 * 366 * 86400),
        st.booleans(),
    ),
    st.datetimes(timezones=st.none() | offsets).map(lambda at: at.isoformat()),  # years 1-9999
    values,
)
event_types = st.sampled_from(["call.answered", "call.transcription", "call.new.kind"]) | texts
real_envelopes = st.builds(
    lambda kind, ccid, event_id, payload: envelope(kind, ccid, event_id=event_id, **payload),
    event_types,
    st.text(max_size=8) | texts,
    st.uuids().map(str) | texts,
    st.dictionaries(st.sampled_from(["transcription_data", "client_state", "state"]), values),
)
made_envelopes = st.fixed_dictionaries(
    {"data": st.fixed_dictionaries(
        {"id": st.uuids().map(str) | values, "event_type": event_types},
        optional={"occurred_at": times, "payload": values},
    )},
    optional={"meta": st.fixed_dictionaries({}, optional={"attempt": values})},
)  # fmt: skip


def encoded(document, ensure_ascii: bool, encoding: str, bom: bool) -> bytes:
    # ensure_ascii=False leaves NUL and surrogates raw; surrogatepass writes them as bytes.
    text = json.dumps(document, ensure_ascii=ensure_ascii)
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding, "surrogatepass")


def spliced(token: bytes) -> bytes:
    """A real envelope with ``token`` written, unparsed, as its transcript."""
    body = json.dumps(envelope("call.transcription", transcription_data={"transcript": "@"}))
    return body.encode().replace(b'"@"', token)


json_bodies = st.builds(
    encoded,
    real_envelopes | made_envelopes | values,
    st.booleans(),
    st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "utf-32-le"]),
    st.booleans(),
)
tokens = st.sampled_from(
    [b'"\\u0000"', b'"\\\\u0000"', b'"\\\\\\u0000"', b'"\\ud800"', b'"\\ud83d\\ude00"',
     b'"\\uDBFF"', b'"\xed\xa0\x80"', b"NaN", b"-Infinity", b"1e1000000", b"1e400", b"1" * 5000,
     b'"\x00"', b'"\n"', b"[" * 3000 + b"]" * 3000, b"[" * 500 + b"]" * 500, b"01", b"-0",
     b"[NaN," + b"[" * 3000 + b"]" * 3000 + b"]"]
)  # fmt: skip
bodies = st.one_of(json_bodies, json_bodies, tokens.map(spliced), st.binary(max_size=64))

timestamps = st.text(max_size=20) | st.integers().map(str) | st.just("9" * 400)
signatures = st.text(max_size=100) | st.binary(min_size=64, max_size=64).map(
    lambda raw: base64.b64encode(raw).decode()
)


def totals() -> tuple[int, int]:
    """Rows, and deliveries counted on them: a refused request must change neither."""
    found = WebhookEvent.objects.aggregate(rows=Count("pk"), deliveries=Sum("delivery_count"))
    return found["rows"], found["deliveries"] or 0


def request_headers(how: str, body: bytes, signer: ClientSigner, data) -> dict[str, str]:
    if how == "signed":
        return signer.headers(body)
    if how == "tampered":
        return signer.headers(body + b" ")
    if how == "other key":
        return ClientSigner().headers(body)
    if how == "stale":
        # Outside the 300 s window with a margin: a future one comes closer as the test runs.
        skew = data.draw(st.integers(310, 10**30) | st.integers(-(10**30), -310))
        return signer.headers(body, int(time.time()) + skew)
    headers = {
        "HTTP_TELNYX_TIMESTAMP": data.draw(timestamps),
        "HTTP_TELNYX_SIGNATURE_ED25519": data.draw(signatures),
    }
    return {name: value for name, value in headers.items() if data.draw(st.booleans())}


@pytest.mark.django_db(transaction=True)  # a refused INSERT must not abort the test's transaction
@hsettings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=bodies,
    how=st.sampled_from(["signed", "signed", "signed", "tampered", "other key", "stale", "forged"]),
    data=st.data(),
)
def test_every_webhook_is_stored_as_sent_or_refused_with_a_4xx(client, signer, body, how, data):
    before = totals()
    response = client.post(
        URL, data=body, content_type="application/json", **request_headers(how, body, signer, data)
    )
    assert response.status_code < 500, response.content
    event(f"{how}: {response.status_code}")  # --hypothesis-show-statistics shows the spread

    if how != "signed":
        assert response.status_code == 401, response.content
        assert totals() == before
        return
    if response.status_code != 200:
        assert response.status_code == 400, response.content
        assert response.json()["error"]
        assert totals() == before
        return

    sent = body.decode("utf-8-sig")
    stored = WebhookEvent.objects.get(event_id=json.loads(sent)["data"]["id"])
    assert stored.status in ("pending", "ignored")
    if response.json()["duplicate"]:
        assert totals() == (before[0], before[1] + 1)
    else:
        assert stored_as_sent(stored, sent)
        assert totals() == (before[0] + 1, before[1] + 1)


def stored_as_sent(stored: WebhookEvent, sent: str) -> bool:
    """Whether the stored payload is the JSON value of the text sent, compared by PostgreSQL:
    Python would read 1e400 as inf, where jsonb keeps the exact number Telnyx wrote."""
    table = WebhookEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT payload = %s::jsonb FROM {table} WHERE id = %s", [sent, stored.pk])  # noqa: S608
        return cursor.fetchone()[0]
