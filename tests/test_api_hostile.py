"""The partner API against hostile input and broken services.

Addresses: a stream URL or fork target is checked by callops with Python's parsers, then parsed
again by Telnyx and by WebSocket clients that follow the WHATWG URL Standard. Only URLs both
read the same way are accepted, and the address checked is the one both see.

Breakage: a tampered cursor, a cache outage under the throttle and two creations of one profile
at once each answer in the API's own error shape, never Django's 500 page.
"""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager

import pytest
from django.db import connection, transaction

from callops.models import Command, StreamingProfile
from tests import helpers
from tests.helpers import make_call, partner_with_key, wait_for

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fake_dns")]

CALL = "/api/v1/calls/v3:hostile/"


@pytest.fixture
def alice():
    partner, client = partner_with_key("alice", "conn-alice")
    make_call("v3:hostile", "conn-alice")
    # Show the answer a partner gets, not the exception behind it: a 500 is a 500 here.
    client.raise_request_exception = False
    return partner, client


def stream(client, url):
    return client.post(f"{CALL}streaming/", {"stream_url": url}, format="json")


def assert_refused(response, field: str) -> None:
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    assert field in [e["field"] for e in response.json()["errors"]], response.json()
    assert not Command.objects.exists()


# --- Stream URLs: one reading only --------------------------------------------------------------

# Each is refused. The id says why; "(WHATWG: ...)" is what a WHATWG parser would connect to.
REFUSED_URLS = {
    # A backslash is a path separator to WHATWG in ws(s) URLs, a plain character to RFC 3986.
    "backslash-python-sees-public": "wss://127.0.0.1\\@media.example.com/",  # (WHATWG: 127.0.0.1)
    "backslash-python-sees-private": "wss://media.example.com\\@127.0.0.1/",
    "backslash-in-path": "wss://media.example.com/a\\..\\b",
    # User information: parsers disagree on which "@" ends it.
    "userinfo": "wss://user@media.example.com/",
    "userinfo-looks-like-host": "wss://127.0.0.1:443@media.example.com/",
    "userinfo-twice": "wss://a@b@media.example.com/",
    "userinfo-private-host": "wss://media.example.com@127.0.0.1/",
    # Controls and whitespace: stripped or kept depending on the parser (and DRF trims ends).
    "nul": "wss://media.example.com/\x00",
    "space": "wss://media.example.com/a b",
    "crlf": "wss://media.example.com/\r\nHost: 127.0.0.1",
    "tab-in-host": "wss://media.exa\tmple.com/",
    "leading-space": " wss://media.example.com/",
    "trailing-tab": "wss://media.example.com/\t",
    # Not ASCII: WHATWG maps full-width characters to ASCII (１２７.０.０.１ is 127.0.0.1).
    "full-width-ip": "wss://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",
    "full-width-name": "wss://\uff4dedia.example.com/",
    "non-ascii-path": "wss://media.example.com/caf\u00e9",
    # A percent-encoded host is decoded by WHATWG, not by RFC 3986 name resolution.
    "percent-host": "wss://%31%32%37.0.0.1/",
    "percent-in-name": "wss://media.example.com%2f@127.0.0.1/",
    # IPv4 spellings WHATWG (and inet_aton) read as 127.0.0.1, RFC 3986 as a name.
    "short-ipv4": "wss://127.1/",
    "hex-ipv4": "wss://0x7f000001/",
    "decimal-ipv4": "wss://2130706433/",
    "octal-ipv4": "wss://0177.0.0.1/",
    "ipv4-trailing-dot": "wss://127.0.0.1./",
    "five-part-ipv4": "wss://1.2.3.4.5/",
    "numeric-last-label": "wss://media.example.123/",
    # Not a DNS name.
    "underscore": "wss://media_example.com/",
    "leading-hyphen": "wss://-media.example.com/",
    "empty-label": "wss://media..example.com/",
    "trailing-dot": "wss://media.example.com./",
    "single-label": "wss://intranet/",  # resolved through our search domains, not Telnyx's
    # IP literals.
    "ipvfuture": "wss://[v1.fe80]/",
    "zone-id": "wss://[fe80::1%25eth0]/",
    "bracketed-ipv4": "wss://[127.0.0.1]/",
    "unbracketed-ipv6": "wss://::1/",
    # Ports.
    "empty-port": "wss://media.example.com:/",
    "port-zero": "wss://media.example.com:0/",
    "port-too-big": "wss://media.example.com:65536/",
    "signed-port": "wss://media.example.com:+443/",
    "two-ports": "wss://media.example.com:443:443/",
    # Shape.
    "fragment": "wss://media.example.com/#x",
    "one-slash": "wss:/media.example.com/",
    "three-slashes": "wss:///media.example.com/",
    "no-slashes": "wss:media.example.com",
    "unencoded-brace": "wss://media.example.com/{x}",
    "bad-escape": "wss://media.example.com/%zz",
    # IPv6 that carries a private IPv4 address is judged by that address.
    "nat64-loopback": "wss://[64:ff9b::7f00:1]/",
    "nat64-metadata": "wss://[64:ff9b::a9fe:a9fe]/",
    "nat64-local-use": "wss://[64:ff9b:1::808:808]/",  # RFC 8215: the operator's own mapping
    "6to4-loopback": "wss://[2002:7f00:1::1]/",
    "6to4-private": "wss://[2002:a00:1::1]/",
    "ipv4-compatible": "wss://[::127.0.0.1]/",
    "ipv4-translated": "wss://[::ffff:0:127.0.0.1]/",
    "ipv4-mapped-metadata": "wss://[::ffff:169.254.169.254]/",
    "teredo-private-client": "wss://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "teredo-private-server": "wss://[2001:0:a00:1:8000:63bf:f7f7:f7f7]/",
    "unspecified": "wss://[::]/",
    "name-to-nat64-metadata": "wss://nat64.example.com/",
}


@pytest.fixture
def nat64_dns(monkeypatch):
    monkeypatch.setitem(helpers.PUBLIC_DNS, "nat64.example.com", "64:ff9b::a9fe:a9fe")


@pytest.mark.usefixtures("nat64_dns")
@pytest.mark.parametrize("url", REFUSED_URLS.values(), ids=REFUSED_URLS.keys())
def test_a_stream_url_parsers_could_read_two_ways_is_refused(alice, url):
    _, client = alice
    assert_refused(stream(client, url), "stream_url")


ACCEPTED_URLS = {
    "plain": "wss://media.example.com/audio",
    # Case, a port, escapes, sub-delimiters and "@" in the path and query are read alike.
    "everything-allowed": "wss://Media.Example.COM:8443/a/%7Euser;v=1/@x?token=a:b&c=@d",
    "public-ipv4": "wss://93.184.216.34/",
    "public-ipv6": "wss://[2606:4700::1111]/",
    "nat64-public": "wss://[64:ff9b::808:808]/",
    "6to4-public": "wss://[2002:808:808::1]/",
    "mapped-public": "wss://[::ffff:8.8.8.8]/",
    "teredo-public": "wss://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/",
}


@pytest.mark.parametrize("url", ACCEPTED_URLS.values(), ids=ACCEPTED_URLS.keys())
def test_an_accepted_stream_url_goes_to_telnyx_exactly_as_checked(alice, url):
    _, client = alice
    response = stream(client, url)
    assert response.status_code == 202, response.json()
    assert Command.objects.get().params["stream_url"] == url


# --- Every place a partner names a host ---------------------------------------------------------

SNEAKY_URLS = ["wss://127.0.0.1\\@media.example.com/", "wss://[64:ff9b::7f00:1]/"]
DIAL = {"connection_id": "conn-alice", "to": "+15551230000", "from": "+15551230001"}


@pytest.mark.parametrize("url", SNEAKY_URLS)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("streaming/", {}),
        ("answer/", {}),
        ("answer/", {"transcription": True}),
        ("/api/v1/calls/", DIAL),
    ],
    ids=["streaming", "answer", "answer-with-transcription", "dial"],
)
def test_every_command_that_takes_a_stream_url_checks_it(alice, url, path, body):
    _, client = alice
    response = client.post(
        path if path.startswith("/") else f"{CALL}{path}",
        {**body, "stream_url": url},
        format="json",
    )
    assert_refused(response, "stream_url")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target": "udp:[64:ff9b::7f00:1]:5000"}, "target"),
        ({"target": "udp:[2002:a00:1::1]:5000"}, "target"),
        ({"target": "udp:[127.0.0.1]:5000"}, "target"),
        ({"rx": "udp:[::127.0.0.1]:5000", "tx": "udp:93.184.216.34:5001"}, "rx"),
        ({"rx": "udp:93.184.216.34:5000", "tx": "udp:[64:ff9b::a00:1]:5001"}, "tx"),
        ({"target": " udp:93.184.216.34:5000"}, "target"),
    ],
)
def test_every_fork_target_is_checked(alice, body, field):
    _, client = alice
    assert_refused(client.post(f"{CALL}forking/", body, format="json"), field)


def test_a_fork_target_embedding_a_public_ipv4_is_sent_as_given(alice):
    _, client = alice
    target = "udp:[64:ff9b::808:808]:5000"
    response = client.post(f"{CALL}forking/", {"target": target}, format="json")
    assert response.status_code == 202, response.json()
    assert Command.objects.get().params["target"] == target


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("answer/", {"webhook_url": "https://127.0.0.1/"}, "webhook_url"),
        ("/api/v1/calls/", {**DIAL, "webhook_url": "https://127.0.0.1/"}, "webhook_url"),
        (
            "answer/",
            {
                "stream_url": "wss://media.example.com/",
                "transcription": True,
                "transcription_config": {"webhook_url": "https://127.0.0.1/"},
            },
            "transcription_config.webhook_url",
        ),
        ("transcription/", {"transcription_engine_config": {"url": "wss://x/"}}, None),
    ],
    ids=["answer-webhook", "dial-webhook", "inline-transcription-webhook", "engine-config-url"],
)
def test_no_other_parameter_can_carry_a_url(alice, path, body, field):
    """Telnyx takes webhook URLs on answer and dial; callops does not pass them on, and no
    transcription engine's config has a URL (those refusals name the key)."""
    _, client = alice
    response = client.post(path if path.startswith("/") else f"{CALL}{path}", body, format="json")
    assert response.status_code == 400, response.json()
    fields = [e["field"] for e in response.json()["errors"]]
    assert field in fields if field else any(f and f.endswith(".url") for f in fields), fields


@pytest.mark.parametrize("url", SNEAKY_URLS)
def test_a_profile_stream_url_is_checked_on_create_and_change(alice, url):
    """A profile's URL goes out on its own (auto-start, answer with media inline), so it is
    checked when it is set."""
    partner, client = alice
    assert_refused(
        client.post("/api/v1/profiles/", {"stream_url": url}, format="json"), "stream_url"
    )
    profile = StreamingProfile.objects.create(
        partner=partner, stream_url="wss://media.example.com/"
    )
    response = client.patch(f"/api/v1/profiles/{profile.pk}/", {"stream_url": url}, format="json")
    assert_refused(response, "stream_url")
    profile.refresh_from_db()
    assert profile.stream_url == "wss://media.example.com/"


def test_a_profile_url_with_spaces_is_refused_not_trimmed(alice):
    _, client = alice
    response = client.post(
        "/api/v1/profiles/", {"stream_url": "wss://media.example.com/ "}, format="json"
    )
    assert_refused(response, "stream_url")


# --- Breakage answers in the API's shape --------------------------------------------------------


def cursor(query: str) -> str:
    return base64.b64encode(query.encode()).decode()


@pytest.mark.parametrize(
    "value",
    [
        "not base64 !",
        cursor("p=yesterday"),
        cursor("p=2026-01-01T00:00:00\x00"),
        cursor("p=2026-11-25T00:00:00-19:03"),  # PostgreSQL refuses the offset
        cursor("p=2026-11-25T00:00:00"),  # DRF writes UTC with its offset
        cursor("p=99999-01-01T00:00:00Z"),
        cursor("o=-1"),
        cursor("o=1&r=1&p=" + "9" * 10000),
    ],
    ids=["garbage", "word", "nul", "odd-offset", "naive", "year-99999", "negative-offset", "huge"],
)
def test_a_tampered_cursor_answers_400_naming_it(alice, value):
    _, client = alice
    response = client.get("/api/v1/calls/", {"cursor": value})
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["errors"][0]["field"] == "cursor"


def test_a_real_cursor_still_pages(alice):
    _, client = alice
    make_call("v3:second", "conn-alice")
    first = client.get("/api/v1/calls/", {"page_size": 1}).json()
    second = client.get(first["next"]).json()
    seen = [c["call_control_id"] for c in first["results"] + second["results"]]
    assert sorted(seen) == ["v3:hostile", "v3:second"]


def test_a_cache_outage_under_the_throttle_answers_503_with_retry_after(alice, settings):
    _, client = alice
    # Port 1: nothing listens, the connection is refused at once.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    response = client.get("/api/v1/calls/")
    assert response.status_code == 503, (response.status_code, response.content[:300])
    assert int(response["Retry-After"]) > 0
    assert response.json()["errors"][0]["message"].startswith("rate limit unavailable")


URL = "wss://media.example.com/"


def blocked_on_a_lock() -> bool:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return cur.fetchone()[0] > 0


@contextmanager
def profile_committed_meanwhile(partner, connection_id: str):
    """Insert a profile in another transaction that commits only once the request's own
    INSERT waits for it on the unique index: the request's check saw no profile, its write
    collides with one."""
    inserted = threading.Event()

    def racer():
        try:
            with transaction.atomic():
                StreamingProfile.objects.create(
                    partner=partner, connection_id=connection_id, stream_url=URL
                )
                inserted.set()
                wait_for(blocked_on_a_lock)
        finally:
            connection.close()

    thread = threading.Thread(target=racer)
    thread.start()
    assert inserted.wait(10)
    yield
    thread.join(15)


@pytest.mark.django_db(transaction=True)
def test_creating_a_profile_another_request_creates_meanwhile_answers_400(alice):
    partner, client = alice
    with profile_committed_meanwhile(partner, "conn-alice"):
        response = client.post(
            "/api/v1/profiles/", {"stream_url": URL, "connection_id": "conn-alice"}, format="json"
        )
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["errors"] == [
        {"field": "connection_id", "message": "already has a profile; change that one instead"}
    ]
    assert StreamingProfile.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_moving_a_profile_onto_a_connection_taken_meanwhile_answers_400(alice):
    partner, client = alice
    profile = StreamingProfile.objects.create(partner=partner, stream_url=URL)
    with profile_committed_meanwhile(partner, "conn-alice"):
        response = client.patch(
            f"/api/v1/profiles/{profile.pk}/", {"connection_id": "conn-alice"}, format="json"
        )
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["errors"][0]["field"] == "connection_id"
    profile.refresh_from_db()
    assert profile.connection_id == ""


# PostgreSQL text and jsonb cannot hold NUL, and no UTF-8 encodes an unpaired surrogate: sent
# on to the database, either was a 500.
UNSTORABLE = {"nul": "a\x00b", "surrogate": "a\ud800b"}
# Soniox's config takes a free string (most engines' take enums).
SONIOX = {"transcription_engine": "Soniox", "transcription_engine_config": {"language": "{}"}}


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("hangup/", {"reason": "{}"}),
        ("streaming/", {"stream_url": URL, "dialogflow_config": {"k": "{}"}}),
        ("streaming/", {"stream_url": URL, "dialogflow_config": {"{}": True}}),
        ("/api/v1/calls/", {"connection_id": "conn-alice", "to": "{}", "from": "+15551230001"}),
        ("/api/v1/profiles/", {"stream_url": URL, "name": "{}"}),
        ("transcription/", SONIOX),
        ("/api/v1/profiles/", {"stream_url": URL, "transcribe": True, **SONIOX}),
    ],
    ids=[
        "hangup-reason",
        "mapping-value",
        "mapping-key",
        "dial-to",
        "profile-name",
        "engine-config",
        "profile-engine-config",
    ],
)
def test_text_the_database_cannot_store_answers_400(alice, text, path, body):
    _, client = alice
    raw = json.dumps(body).replace("{}", json.dumps(text)[1:-1])
    url = path if path.startswith("/") else f"{CALL}{path}"
    response = client.post(url, raw, content_type="application/json")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["errors"][0]["message"]
    assert not Command.objects.exists() and not StreamingProfile.objects.exists()


@pytest.mark.parametrize("path", ["", "transcript/", "hangup/"])
def test_a_call_id_with_a_nul_is_no_call(alice, path):
    _, client = alice
    url = f"/api/v1/calls/v3:%00x/{path}"
    response = client.post(url, {}, format="json") if path == "hangup/" else client.get(url)
    assert response.status_code == 404, (response.status_code, response.content[:300])
    assert response.json()["errors"][0]["message"] == "No such call."


def test_an_idempotency_key_with_a_nul_answers_400(alice):
    _, client = alice
    response = client.post(f"{CALL}hangup/", {}, format="json", HTTP_IDEMPOTENCY_KEY="k\x00")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["errors"][0]["field"] == "Idempotency-Key"
