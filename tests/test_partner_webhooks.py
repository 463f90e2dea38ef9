"""Webhooks to partners: each fact of a partner's call is one event, delivered to its endpoints
signed the Standard Webhooks way (verified here with the ``standardwebhooks`` package, not
callops' code), in per-call order, retried through 500s, 429s and timeouts, parked by the
circuit breaker, and visible to its partner alone."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from callops import commands, events, partner_delivery, queue, tasks, webhooks
from callops.models import (
    Command,
    Delivery,
    Partner,
    PartnerConnection,
    PartnerEvent,
    WebhookEndpoint,
    WebhookEvent,
)
from tests.helpers import deliver, partner_with_key, wait_for
from tests.telnyx_events import T0, call_life, dumps, envelope

# What call_life's webhooks make for a partner (interim segments only for who opts in).
LIFE_TYPES = sorted(
    [
        "call.initiated",
        "call.answered",
        "stream.started",
        "stream.stopped",
        "transcript.segment",
        "transcript.segment",
        "dtmf.digit",
        "fork.started",
        "stream.started",
        "stream.failed",
        "call.ended",
        "fork.stopped",
    ]
)


class Receiver:
    """A partner's webhook server on a real socket. ``script`` answers the first requests in
    turn (a status code, a ``(code, headers)`` pair, or ``"hang"``: answer nothing for
    ``hang_for`` seconds); after it, 200."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list = []
        self.hang_for = 1.0
        self.delay = 0.0  # seconds each 200 takes (a slow partner)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                    answer = receiver.script.pop(0) if receiver.script else 200
                    receiver.requests.append(
                        {
                            "at": time.monotonic(),
                            "headers": dict(self.headers.items()),
                            "body": body,
                            "answer": answer,
                        }
                    )
                if answer == "hang":
                    time.sleep(receiver.hang_for)
                    self.done()
                    return
                time.sleep(receiver.delay if answer == 200 else 0)
                code, headers = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.done()  # before the answer leaves: the sender's slot frees only after it
                self.end_headers()

            def done(self) -> None:
                with receiver.lock:
                    receiver.in_flight -= 1

            def log_message(self, *args) -> None:
                pass

            def handle(self) -> None:
                # The client gave up (a timeout): as a real server would see it.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def verified(self, secret: str, since: int = 0) -> list[dict]:
        """Every request's payload (from the ``since``-th on), each verified with ``secret``."""
        return [Webhook(secret).verify(r["body"], r["headers"]) for r in self.requests[since:]]

    def answered(self, code: int = 200) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["answer"] == code]


@pytest.fixture
def receiver():
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def local_targets(settings):
    """The receiver is http://127.0.0.1: allowed as in development."""
    settings.DEBUG = True
    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = True
    settings.CALLOPS_WEBHOOK_TIMEOUT = 0.5
    settings.CALLOPS_WEBHOOK_BACKOFF_BASE = 0.05
    settings.CALLOPS_WEBHOOK_BACKOFF_CAP = 2.0


@pytest.fixture
def acme(db):
    partner = Partner.objects.create(name="acme")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-1")
    return partner


def endpoint_for(partner, receiver, **options) -> WebhookEndpoint:
    return partner_delivery.webhook_endpoint_create(partner=partner, url=receiver.url, **options)


def drive(timeout: float = 20.0) -> None:
    """What the task, its countdowns and the sweeper do together: attempt every due delivery,
    in call order, until none is unfinished."""
    deadline = time.monotonic() + timeout
    while Delivery.objects.filter(status__in=Delivery.UNFINISHED).exists():
        assert time.monotonic() < deadline, "deliveries still unfinished"
        due = Delivery.objects.filter(
            status__in=Delivery.UNFINISHED, next_attempt_at__lte=timezone.now()
        ).order_by("call_id", "sequence")
        pks = list(due.values_list("pk", flat=True))
        if not pks:
            time.sleep(0.02)
        for pk in pks:
            partner_delivery.delivery_process(delivery_pk=pk)


def life_with_duplicates_reordered(ccid: str = "v3:call-1", seed: int = 7) -> list[dict]:
    life = call_life(ccid)
    again = [dict(e, meta={**e["meta"], "attempt": 2}) for e in life[::2]]
    shuffled = life + again
    random.Random(seed).shuffle(shuffled)
    return shuffled


# --- Events: once per fact, in the transaction of the fact -------------------------------------


@pytest.mark.django_db
def test_it_signs_every_delivery_and_sends_each_fact_once_whatever_telnyx_repeats(
    acme, receiver, local_targets
):
    endpoint = endpoint_for(acme, receiver)
    for event in life_with_duplicates_reordered():
        deliver(event)
    # A replay of every stored event applies them all again: it adds no partner event.
    events.events_replay(event_ids=WebhookEvent.objects.values_list("pk", flat=True))
    events.events_drain()
    drive()

    bodies = receiver.verified(endpoint.secret)
    assert sorted(b["type"] for b in bodies) == LIFE_TYPES
    ids = [b["id"] for b in bodies]
    assert len(ids) == len(set(ids)) == PartnerEvent.objects.count()
    assert [r["headers"]["webhook-id"] for r in receiver.requests] == ids
    # Delivered in the call's order: 1, 2, 3, ... as callops learned the facts.
    assert [b["sequence"] for b in bodies] == list(range(1, len(bodies) + 1))
    assert {b["call_control_id"] for b in bodies} == {"v3:call-1"}
    ended = next(b for b in bodies if b["type"] == "call.ended")
    assert ended["data"]["hangup_cause"] == "normal_clearing"
    assert ended["api_version"] == "v1"
    assert not any(b["data"].get("is_final") is False for b in bodies)
    assert set(Delivery.objects.values_list("status", flat=True)) == {"succeeded"}


@pytest.mark.django_db
def test_it_sends_interim_segments_and_only_the_chosen_types_to_endpoints_that_ask(
    acme, receiver, local_targets
):
    interim = endpoint_for(acme, receiver, include_interim=True, event_types=["transcript.segment"])
    for event in call_life():
        deliver(event)
    drive()
    bodies = receiver.verified(interim.secret)
    assert [b["data"]["transcript"] for b in bodies] == ["hello", "hello there", "bye"]
    assert [b["data"]["is_final"] for b in bodies] == [False, True, True]


def drain_segments(count: int, ccid: str) -> int:
    """Store ``count`` transcript segments of a call, then drain them: the queries it took."""
    for index in range(count):
        event = envelope(
            "call.transcription",
            ccid,
            occurred_at=T0 + timedelta(seconds=index),
            transcription_data={"transcript": f"w{index}", "is_final": True},
        )
        parsed = webhooks.parse_event(dumps(event))
        webhooks.store_event(parsed, handled=True)
    with CaptureQueriesContext(connection) as queries:
        assert events.events_drain() == count
    return len(queries)


@pytest.mark.django_db
def test_a_batch_of_segments_costs_the_same_few_queries_however_many_it_holds(
    acme, receiver, local_targets, settings
):
    settings.CALLOPS_DRAIN_CLAIM = settings.CALLOPS_DRAIN_BATCH = 100
    deliver(envelope("call.initiated", "v3:quiet", occurred_at=T0))
    deliver(envelope("call.initiated", "v3:heard", occurred_at=T0))
    drain_segments(5, "v3:quiet")  # the first batch creates the call's transcription
    without = drain_segments(40, "v3:quiet")  # no endpoint yet: the lookup alone
    endpoint_for(acme, receiver)
    drain_segments(5, "v3:heard")
    few, many = drain_segments(10, "v3:heard"), drain_segments(40, "v3:heard")
    # One existence check, the call's sequence, the events and their deliveries in one
    # INSERT each.
    assert few == many == without + 4
    assert PartnerEvent.objects.filter(type="transcript.segment").count() == 55


@pytest.mark.django_db
def test_it_creates_no_event_for_a_call_no_partner_listens_to(acme, receiver, local_targets):
    for event in call_life():
        deliver(event)  # acme has no endpoint yet
    other = envelope("call.initiated", "v3:other", occurred_at=T0, connection_id="conn-unowned")
    endpoint_for(acme, receiver)
    deliver(other)
    assert PartnerEvent.objects.count() == 0


@pytest.mark.django_db
def test_it_creates_one_event_per_command_outcome(acme, receiver, local_targets, live_call):
    endpoint = endpoint_for(acme, receiver, event_types=["command.succeeded", "command.failed"])
    command = Command.objects.create(
        call=live_call,
        action="hangup",
        requested_by="partner",
        status="sending",
        expires_at=timezone.now() + timedelta(minutes=5),
    )
    commands.command_record(command=command, outcome=commands.Outcome("succeeded", http_status=200))
    # A second record of the same outcome (another worker) changes nothing.
    commands.command_record(command=command, outcome=commands.Outcome("succeeded", http_status=200))
    drive()
    (body,) = receiver.verified(endpoint.secret)
    assert body["type"] == "command.succeeded"
    assert body["data"]["command_id"] == str(command.command_id)
    assert body["data"]["action"] == "hangup"


# --- Delivery: retries, Retry-After, timeouts, order, the breaker ---------------------------------


@pytest.mark.django_db
def test_it_gets_every_event_through_500_429_and_a_timeout_in_order(acme, receiver, local_targets):
    endpoint = endpoint_for(acme, receiver)
    receiver.script = [500, (429, {"Retry-After": "1"}), "hang", 503, 200, 500]
    for event in call_life():
        deliver(event)
    drive()

    bodies = receiver.verified(endpoint.secret)
    succeeded = receiver.answered(200)
    assert sorted(b["type"] for b in succeeded) == LIFE_TYPES
    assert len({b["id"] for b in succeeded}) == len(succeeded)  # each accepted exactly once
    assert [b["sequence"] for b in succeeded] == list(range(1, len(succeeded) + 1))
    # The first event took five attempts (500, 429, timeout, 503, 200) under one id; the
    # sixth answer (500) was the second event's first attempt.
    first = bodies[0]["id"]
    assert [b["id"] for b in bodies[:5]] == [first] * 5
    assert len(bodies) == len(succeeded) + 5
    # The 429's Retry-After was honoured.
    after_429 = receiver.requests[2]["at"] - receiver.requests[1]["at"]
    assert after_429 >= 0.95
    delivery = Delivery.objects.get(event__event_id=first)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("succeeded", 5, 200)


@pytest.mark.django_db
def test_a_later_event_waits_for_an_earlier_one_of_its_call(acme, receiver, local_targets):
    endpoint_for(acme, receiver)
    receiver.script = [500]
    deliver(call_life()[0])  # call.initiated
    deliver(call_life()[1])  # call.answered
    first, second = Delivery.objects.order_by("sequence")
    assert partner_delivery.delivery_process(delivery_pk=first.pk).status == "failed"
    # The answer is not sent while the call's start is still to be delivered.
    assert partner_delivery.delivery_process(delivery_pk=second.pk).status == "waiting"
    assert len(receiver.requests) == 1
    drive()
    assert [json.loads(r["body"])["type"] for r in receiver.requests] == [
        "call.initiated",
        "call.initiated",
        "call.answered",
    ]


@pytest.mark.django_db
def test_a_failing_endpoint_is_parked_then_probed_then_let_through(
    acme, receiver, local_targets, settings
):
    settings.CALLOPS_WEBHOOK_BREAKER_THRESHOLD = 2
    settings.CALLOPS_WEBHOOK_BREAKER_COOLDOWN = 1
    endpoint = endpoint_for(acme, receiver)
    receiver.script = [500, 500, 500]
    for ccid in ("v3:a", "v3:b", "v3:c"):
        deliver(envelope("call.initiated", ccid, occurred_at=T0))
    a, b, c = Delivery.objects.order_by("pk")
    partner_delivery.delivery_process(delivery_pk=a.pk)
    partner_delivery.delivery_process(delivery_pk=b.pk)
    endpoint.refresh_from_db()
    assert endpoint.consecutive_failures == 2 and endpoint.parked_until is not None
    # Parked: the third call's event waits for the cooldown instead of trying.
    assert partner_delivery.delivery_process(delivery_pk=c.pk).status == "waiting"
    assert len(receiver.requests) == 2
    c.refresh_from_db()
    assert c.next_attempt_at == endpoint.parked_until and c.attempts == 0
    assert partner_delivery.deliveries_sweep() == 0  # nothing is due while parked

    drive()  # the probe fails once more (500), the next one succeeds and lets the rest through
    endpoint.refresh_from_db()
    assert (endpoint.consecutive_failures, endpoint.parked_until) == (0, None)
    assert len(receiver.answered(200)) == 3


@pytest.mark.django_db
def test_what_waited_for_the_cooldown_goes_as_soon_as_the_probe_succeeds(
    acme, receiver, local_targets, settings
):
    settings.CALLOPS_WEBHOOK_BREAKER_THRESHOLD = 1
    settings.CALLOPS_WEBHOOK_BREAKER_COOLDOWN = 600
    endpoint = endpoint_for(acme, receiver)
    receiver.script = [500]
    for ccid in ("v3:a", "v3:b"):
        deliver(envelope("call.initiated", ccid, occurred_at=T0))
    a, b = Delivery.objects.order_by("pk")
    partner_delivery.delivery_process(delivery_pk=a.pk)  # parks the endpoint for 10 minutes
    assert partner_delivery.delivery_process(delivery_pk=b.pk).status == "waiting"
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(parked_until=timezone.now())
    Delivery.objects.filter(pk=a.pk).update(next_attempt_at=timezone.now())
    assert partner_delivery.delivery_process(delivery_pk=a.pk).status == "succeeded"  # the probe
    b.refresh_from_db()
    assert b.next_attempt_at <= timezone.now()  # not 10 minutes on
    assert partner_delivery.delivery_process(delivery_pk=b.pk).status == "succeeded"


@pytest.mark.django_db
def test_a_parked_endpoints_new_deliveries_wait_for_its_cooldown_without_a_task_each(
    acme, receiver, local_targets, monkeypatch, django_capture_on_commit_callbacks
):
    endpoint = endpoint_for(acme, receiver)
    parked_until = timezone.now() + timedelta(seconds=60)
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(parked_until=parked_until)
    published = []
    monkeypatch.setattr(queue, "publish", lambda name, *args, **_: published.append(name))
    with django_capture_on_commit_callbacks(execute=True):
        deliver(call_life()[0])
    assert Delivery.objects.get().next_attempt_at == parked_until
    assert queue.DELIVER_PARTNER_EVENT not in published


@pytest.mark.django_db
def test_a_delivery_is_given_up_after_its_attempts_and_the_next_goes(
    acme, receiver, local_targets, settings
):
    settings.CALLOPS_WEBHOOK_MAX_ATTEMPTS = 2
    endpoint_for(acme, receiver)
    receiver.script = [500, 410]
    deliver(call_life()[0])
    deliver(call_life()[1])
    drive()
    first, second = Delivery.objects.order_by("sequence")
    assert (first.status, first.attempts, first.last_status_code) == ("dead", 2, 410)
    assert first.last_error.startswith("gave up")
    assert second.status == "succeeded"


def test_retry_after_is_read_in_seconds_or_as_a_date_and_capped(settings):
    settings.CALLOPS_WEBHOOK_BACKOFF_CAP = 60
    now = timezone.now()
    assert partner_delivery.retry_after("7") == 7
    assert partner_delivery.retry_after("100000") == 60
    assert partner_delivery.retry_after(None) is None
    assert partner_delivery.retry_after("soon") is None
    date = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 28 <= partner_delivery.retry_after(date, now=now) <= 30


# --- Signing secrets --------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_rotated_secret_signs_alongside_the_old_one_during_the_overlap(
    acme, receiver, local_targets
):
    endpoint = endpoint_for(acme, receiver)
    old = endpoint.secret
    assert old.startswith("whsec_") and len(base64.b64decode(old[6:])) == 32
    endpoint = partner_delivery.webhook_endpoint_rotate_secret(
        endpoint=endpoint, overlap_seconds=3600
    )
    new = endpoint.secret
    deliver(call_life()[0])
    drive()
    (request,) = receiver.requests
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a verifier with either secret accepts it
        Webhook(secret).verify(request["body"], request["headers"])

    partner_delivery.webhook_endpoint_rotate_secret(endpoint=endpoint, overlap_seconds=0)
    endpoint.refresh_from_db()
    deliver(call_life()[1])
    drive()
    latest = receiver.requests[-1]
    Webhook(endpoint.secret).verify(latest["body"], latest["headers"])
    for retired in (old, new):
        with pytest.raises(WebhookVerificationError):
            Webhook(retired).verify(latest["body"], latest["headers"])


# --- The partner API --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_api_shows_a_secret_once_and_each_partner_only_its_own(fake_dns, settings):
    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = False
    acme, acme_api = partner_with_key("acme", "conn-1")
    _, rival_api = partner_with_key("rival", "conn-2")
    made = acme_api.post(
        "/api/v1/webhook-endpoints/",
        {"url": "https://media.example.com/hooks", "event_types": ["call.ended"]},
        format="json",
    )
    assert made.status_code == 201, made.content
    secret, pk = made.json()["secret"], made.json()["id"]
    Webhook(secret)  # a secret the library takes as it is
    shown = acme_api.get(f"/api/v1/webhook-endpoints/{pk}/").json()
    assert "secret" not in shown and shown["event_types"] == ["call.ended"]

    for method in ("get", "patch", "delete"):
        answer = getattr(rival_api, method)(f"/api/v1/webhook-endpoints/{pk}/", {}, format="json")
        assert answer.status_code == 404
    assert rival_api.post(f"/api/v1/webhook-endpoints/{pk}/rotate-secret/").status_code == 404
    assert rival_api.get("/api/v1/webhook-endpoints/").json() == []

    rotated = acme_api.post(
        f"/api/v1/webhook-endpoints/{pk}/rotate-secret/", {"overlap_seconds": 60}, format="json"
    )
    assert rotated.status_code == 200
    assert rotated.json()["secret"] != secret and rotated.json()["secret_rotating_until"]

    patched = acme_api.patch(f"/api/v1/webhook-endpoints/{pk}/", {"active": False}, format="json")
    assert patched.status_code == 200 and patched.json()["active"] is False


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("http://media.example.com/hooks", "url"),  # https only outside DEBUG
        ("https://evil.example.com/hooks", "url"),  # resolves to a private address
        ("https://10.0.0.1/hooks", "url"),
        ("https://user@media.example.com/", "url"),
    ],
)
def test_the_api_refuses_an_endpoint_that_is_not_public_https(fake_dns, settings, url, field):
    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = False
    _, api = partner_with_key("acme", "conn-1")
    answer = api.post("/api/v1/webhook-endpoints/", {"url": url}, format="json")
    assert answer.status_code == 400
    assert [e["field"] for e in answer.json()["errors"]] == [field]


@pytest.mark.django_db
def test_the_api_refuses_an_unknown_event_type(fake_dns):
    _, api = partner_with_key("acme", "conn-1")
    answer = api.post(
        "/api/v1/webhook-endpoints/",
        {"url": "https://media.example.com/h", "event_types": ["call.exploded"]},
        format="json",
    )
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["field"] == "event_types.0"


@pytest.mark.django_db
def test_deliveries_are_listed_newest_first_to_their_partner_and_can_be_redelivered(
    receiver, local_targets
):
    acme, acme_api = partner_with_key("acme", "conn-1")
    _, rival_api = partner_with_key("rival", "conn-2")
    endpoint_for(acme, receiver)
    deliver(call_life()[0])
    deliver(call_life()[1])
    drive()
    listed = acme_api.get("/api/v1/deliveries/", {"page_size": 1})
    assert listed.status_code == 200
    page = listed.json()
    assert [d["event_type"] for d in page["results"]] == ["call.answered"]
    assert page["next"]
    older = acme_api.get(page["next"]).json()["results"]
    assert [d["event_type"] for d in older] == ["call.initiated"]
    assert rival_api.get("/api/v1/deliveries/").json()["results"] == []

    pk = older[0]["id"]
    assert rival_api.post(f"/api/v1/deliveries/{pk}/redeliver/").status_code == 404
    again = acme_api.post(f"/api/v1/deliveries/{pk}/redeliver/")
    assert again.status_code == 202 and again.json()["status"] == "pending"
    drive()
    assert [r["headers"]["webhook-id"] for r in receiver.requests][-1] == older[0]["event_id"]
    assert acme_api.get("/api/v1/deliveries/?cursor=bogus").status_code == 400


# --- Events in the API: listed, filtered, replayed; each partner its own -------------------------


@pytest.fixture
def two_partners(receiver, local_targets):
    """acme (two calls, an endpoint on the receiver) and rival (a call, its own endpoint)."""
    acme, acme_api = partner_with_key("acme", "conn-1")
    rival, rival_api = partner_with_key("rival", "conn-2")
    endpoint = endpoint_for(acme, receiver)
    rival_endpoint = endpoint_for(rival, receiver)
    for event in call_life("v3:call-1")[:3] + call_life("v3:call-2")[:2]:
        deliver(event)
    for event in call_life("v3:rival")[:2]:
        event["data"]["payload"]["connection_id"] = "conn-2"
        deliver(event)
    drive()
    return acme_api, rival_api, endpoint, rival_endpoint


@pytest.mark.django_db
def test_a_partner_lists_its_own_events_newest_first_and_filters_them(two_partners):
    acme_api, rival_api, _, _ = two_partners
    listed = acme_api.get("/api/v1/events/").json()["results"]
    assert len(listed) == 5
    assert {e["call_control_id"] for e in listed} == {"v3:call-1", "v3:call-2"}
    assert [e["created_at"] for e in listed] == sorted(
        (e["created_at"] for e in listed), reverse=True
    )
    assert listed[0]["payload"]["id"] == listed[0]["id"]

    def ids(**query) -> list:
        answer = acme_api.get("/api/v1/events/", query)
        assert answer.status_code == 200, answer.json()
        return [(e["call_control_id"], e["type"], e["sequence"]) for e in answer.json()["results"]]

    assert ids(call="v3:call-1", after_sequence=1) == [
        ("v3:call-1", "stream.started", 3),
        ("v3:call-1", "call.answered", 2),
    ]
    assert ids(type="call.answered") == [
        ("v3:call-2", "call.answered", 2),
        ("v3:call-1", "call.answered", 2),
    ]
    assert ids(since=(timezone.now() + timedelta(minutes=1)).isoformat()) == []
    assert ids(call="v3:rival") == []
    assert len(rival_api.get("/api/v1/events/").json()["results"]) == 2

    one = listed[-1]
    assert acme_api.get(f"/api/v1/events/{one['id']}/").json() == one
    assert rival_api.get(f"/api/v1/events/{one['id']}/").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query, field",
    [
        ({"type": "call.bogus"}, "type"),
        ({"since": "yesterday"}, "since"),
        ({"after_sequence": "1.5"}, "after_sequence"),
        ({"after_sequence": "-1"}, "after_sequence"),
        ({"after_sequence": str(2**40)}, "after_sequence"),
        ({"call": "v3:\x00"}, "call"),
        ({"cursor": "bogus"}, "cursor"),
    ],
)
def test_a_bad_event_filter_is_a_400_naming_it(two_partners, query, field):
    acme_api = two_partners[0]
    answer = acme_api.get("/api/v1/events/", query)
    assert answer.status_code == 400
    assert [e["field"] for e in answer.json()["errors"]] == [field]


@pytest.mark.django_db
def test_an_event_is_replayed_to_its_subscribers_or_a_chosen_endpoint_of_its_partner(
    two_partners, receiver
):
    acme_api, rival_api, endpoint, rival_endpoint = two_partners
    event = acme_api.get("/api/v1/events/", {"call": "v3:call-1", "type": "call.answered"})
    event = event.json()["results"][0]
    sent_before = len(receiver.requests)

    assert rival_api.post(f"/api/v1/events/{event['id']}/replay/").status_code == 404
    again = acme_api.post(f"/api/v1/events/{event['id']}/replay/")
    assert again.status_code == 202
    assert [(d["endpoint"], d["status"]) for d in again.json()] == [(endpoint.pk, "pending")]
    drive()
    assert len(receiver.requests) == sent_before + 1
    (replayed,) = receiver.verified(endpoint.secret, since=sent_before)
    assert replayed == event["payload"]  # the same id and body: the partner dedupes by it

    # An endpoint added since never had it: named, it gets a delivery of its own.
    acme = endpoint.partner
    later = endpoint_for(acme, receiver, event_types=["call.ended"])
    named = acme_api.post(
        f"/api/v1/events/{event['id']}/replay/", {"endpoint": later.pk}, format="json"
    )
    assert named.status_code == 202 and [d["endpoint"] for d in named.json()] == [later.pk]
    drive()
    assert receiver.verified(later.secret, since=sent_before + 1) == [event["payload"]]
    assert Delivery.objects.filter(event__event_id=event["id"]).count() == 2

    refused = acme_api.post(
        f"/api/v1/events/{event['id']}/replay/", {"endpoint": rival_endpoint.pk}, format="json"
    )
    assert refused.status_code == 400 and refused.json()["errors"][0]["field"] == "endpoint"
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(active=False)
    nobody = acme_api.post(f"/api/v1/events/{event['id']}/replay/")  # later wants call.ended
    assert nobody.status_code == 409


@pytest.mark.django_db
def test_replay_in_the_admin_needs_the_retry_permission(acme, receiver, local_targets, client):
    from django.contrib.auth.models import Permission, User

    endpoint_for(acme, receiver)
    deliver(call_life()[0])
    drive()
    event = PartnerEvent.objects.get()
    user = User.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_partnerevent"))
    client.force_login(user)
    form = {"action": "replay", "_selected_action": [event.pk]}
    client.post("/admin/callops/partnerevent/", form)
    assert Delivery.objects.get().status == "succeeded"  # without retry_delivery: refused

    user.user_permissions.add(Permission.objects.get(codename="retry_delivery"))
    client.force_login(User.objects.get(pk=user.pk))
    client.post("/admin/callops/partnerevent/", form)
    assert Delivery.objects.get().status == "pending"
    drive()
    assert [r["headers"]["webhook-id"] for r in receiver.requests] == [event.event_id] * 2
    assert client.get("/admin/callops/partnerevent/").status_code == 200
    assert client.get(f"/admin/callops/partnerevent/{event.pk}/change/").status_code == 200


# --- Retention and the admin ------------------------------------------------------------------


@pytest.mark.django_db
def test_the_purge_deletes_finished_deliveries_and_old_events_but_not_unfinished_ones(
    acme, receiver, local_targets
):
    endpoint_for(acme, receiver)
    receiver.script = [500]
    deliver(call_life()[0])
    deliver(call_life()[1])
    first, second = Delivery.objects.order_by("sequence")
    partner_delivery.delivery_process(delivery_pk=first.pk)  # 500: still unfinished
    Delivery.objects.filter(pk=second.pk).update(status="succeeded")
    old = timezone.now() - timedelta(days=400)
    Delivery.objects.update(created_at=old)
    PartnerEvent.objects.update(created_at=old)
    assert tasks.purge_partner_records() == {
        "partner_deliveries": 1,
        "partner_events": 1,
        "batches": 2,
    }
    assert list(Delivery.objects.values_list("pk", flat=True)) == [first.pk]
    assert PartnerEvent.objects.get().pk == first.event_id


@pytest.mark.django_db
def test_retry_now_in_the_admin_needs_its_permission(acme, receiver, local_targets, client):
    from django.contrib.auth.models import Permission, User

    endpoint_for(acme, receiver)
    deliver(call_life()[0])
    delivery = Delivery.objects.get()
    Delivery.objects.filter(pk=delivery.pk).update(status="dead", attempts=15)
    user = User.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_delivery"))
    client.force_login(user)
    form = {"action": "retry_now", "_selected_action": [delivery.pk]}
    client.post("/admin/callops/delivery/", form)
    delivery.refresh_from_db()
    assert delivery.status == "dead"  # without retry_delivery: refused

    user.user_permissions.add(Permission.objects.get(codename="retry_delivery"))
    user = User.objects.get(pk=user.pk)
    client.force_login(user)
    client.post("/admin/callops/delivery/", form)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 0)
    assert client.get("/admin/callops/delivery/").status_code == 200
    assert client.get(f"/admin/callops/delivery/{delivery.pk}/change/").status_code == 200


@pytest.mark.django_db
def test_an_operator_adds_an_endpoint_in_the_admin_with_a_fresh_secret_never_shown(
    acme, admin_client, fake_dns, settings
):
    settings.CALLOPS_ALLOW_PRIVATE_TARGETS = False
    form = {"partner": acme.pk, "url": "https://10.0.0.1/h", "event_types": "[]", "active": "on"}
    refused = admin_client.post("/admin/callops/webhookendpoint/add/", form)
    assert refused.status_code == 200 and "url" in refused.context["adminform"].form.errors
    form["url"] = "https://media.example.com/h"
    assert admin_client.post("/admin/callops/webhookendpoint/add/", form).status_code == 302
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.secret.startswith("whsec_")
    page = admin_client.get(f"/admin/callops/webhookendpoint/{endpoint.pk}/change/")
    assert endpoint.secret not in page.content.decode()


# --- Bounded concurrency per endpoint ------------------------------------------------------------


def calls_begin(count: int, events_each: int = 3) -> list[str]:
    """``count`` calls on conn-1, the first ``events_each`` webhooks of each applied."""
    ccids = [f"v3:call-{n}" for n in range(count)]
    for ccid in ccids:
        for event in call_life(ccid)[:events_each]:
            deliver(event)
    return ccids


def one_slot_taken(partner, receiver, settings, *, calls: int) -> list[Delivery]:
    """An endpoint with one slot, taken by the first of ``calls`` calls' first deliveries."""
    settings.CALLOPS_WEBHOOK_CONCURRENCY = 1
    endpoint_for(partner, receiver)
    calls_begin(calls, events_each=1)
    deliveries = list(Delivery.objects.order_by("pk"))
    lease = timezone.now() + timedelta(seconds=30)
    Delivery.objects.filter(pk=deliveries[0].pk).update(status="delivering", next_attempt_at=lease)
    return deliveries


@pytest.mark.django_db
def test_a_full_endpoint_queues_a_delivery_until_a_slot_frees_or_its_lease_lapses(
    acme, receiver, local_targets, settings
):
    first, second = one_slot_taken(acme, receiver, settings, calls=2)

    assert partner_delivery.delivery_process(delivery_pk=second.pk).status == "waiting"
    second.refresh_from_db()
    assert second.status == "pending" and second.waiting_since is not None
    assert second.next_attempt_at > timezone.now()  # asleep: a stray message skips it
    assert partner_delivery.delivery_process(delivery_pk=second.pk).status == "skipped"
    place = second.waiting_since

    # The worker sending the first died: once its lease lapses its slot is free again.
    Delivery.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now())
    Delivery.objects.filter(pk=second.pk).update(next_attempt_at=timezone.now())
    assert partner_delivery.delivery_process(delivery_pk=second.pk).status == "succeeded"
    second.refresh_from_db()
    assert second.waiting_since is None and place is not None
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_a_release_wakes_the_oldest_waiter_at_once_one_per_slot_freed(
    acme, receiver, local_targets, settings
):
    sending, older, newer = one_slot_taken(acme, receiver, settings, calls=3)
    assert partner_delivery.delivery_process(delivery_pk=older.pk).status == "waiting"
    assert partner_delivery.delivery_process(delivery_pk=newer.pk).status == "waiting"

    sending.refresh_from_db()
    sending.attempts = 1
    partner_delivery.delivery_record(delivery=sending, outcome=partner_delivery.Outcome(True, 200))
    older.refresh_from_db()
    newer.refresh_from_db()
    assert older.next_attempt_at <= timezone.now() < newer.next_attempt_at  # one slot, one wake
    assert partner_delivery.delivery_process(delivery_pk=older.pk).status == "succeeded"
    newer.refresh_from_db()
    assert newer.next_attempt_at <= timezone.now()  # and its release woke the next
    assert partner_delivery.delivery_process(delivery_pk=newer.pk).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_the_next_of_a_call_is_checked_under_the_lock_its_predecessor_releases_under(
    acme, receiver, local_targets
):
    """Checked outside the lock, the second found the first still being sent while the first's
    release had already looked for its successor: nobody published it until the sweeper."""
    endpoint = endpoint_for(acme, receiver)
    deliver(call_life()[0])
    deliver(call_life()[1])
    first, second = Delivery.objects.order_by("sequence")
    Delivery.objects.filter(pk=first.pk).update(status="delivering")
    locked, release = threading.Event(), threading.Event()

    def first_releases() -> None:  # what delivery_record does, held open
        with transaction.atomic():
            WebhookEndpoint.objects.select_for_update(no_key=True).get(pk=endpoint.pk)
            Delivery.objects.filter(pk=first.pk).update(status="succeeded")
            locked.set()
            release.wait(5)
        connection.close()

    releasing = threading.Thread(target=first_releases)
    releasing.start()
    locked.wait(5)
    threading.Timer(0.3, release.set).start()
    assert partner_delivery.delivery_process(delivery_pk=second.pk).status == "succeeded"
    releasing.join()


@pytest.mark.django_db
def test_a_success_hands_its_slot_to_the_calls_next_due_delivery_without_a_message(
    acme, receiver, local_targets, monkeypatch, django_capture_on_commit_callbacks
):
    endpoint_for(acme, receiver)
    for event in call_life()[:3]:
        deliver(event)
    published = []
    monkeypatch.setattr(queue, "publish", lambda name, *args, **_: published.append(args[0]))
    first = Delivery.objects.order_by("sequence").first()
    with django_capture_on_commit_callbacks(execute=True):
        assert partner_delivery.delivery_process(delivery_pk=first.pk).status == "succeeded"
    assert [json.loads(r["body"])["sequence"] for r in receiver.requests] == [1, 2, 3]
    assert set(Delivery.objects.values_list("status", "attempts")) == {("succeeded", 1)}
    assert published == []


@pytest.mark.django_db
def test_a_new_delivery_behind_an_unfinished_one_of_its_call_gets_no_message_of_its_own(
    acme, receiver, local_targets, monkeypatch, django_capture_on_commit_callbacks
):
    endpoint_for(acme, receiver)
    published = []
    monkeypatch.setattr(queue, "publish", lambda name, *args, **_: published.append(args[0]))
    with django_capture_on_commit_callbacks(execute=True):
        deliver(call_life()[0])
        deliver(call_life()[1])
    first, second = Delivery.objects.order_by("sequence")
    assert published == [first.pk]  # the second goes when the first is done
    assert partner_delivery.delivery_process(delivery_pk=first.pk).status == "succeeded"
    second.refresh_from_db()
    assert second.status == "succeeded"


@pytest.mark.django_db
def test_the_sweeper_publishes_no_more_than_an_endpoints_free_slots_and_queues_the_rest(
    acme, receiver, local_targets, settings, monkeypatch
):
    settings.CALLOPS_WEBHOOK_CONCURRENCY = 2
    endpoint_for(acme, receiver)
    calls_begin(5, events_each=1)  # five calls' first deliveries, due, their messages lost
    sending, *due = Delivery.objects.order_by("pk")
    lease = timezone.now() + timedelta(seconds=30)
    Delivery.objects.filter(pk=sending.pk).update(status="delivering", next_attempt_at=lease)
    published = []
    monkeypatch.setattr(queue, "publish", lambda name, *args, **_: published.append(args[0]))

    assert partner_delivery.deliveries_sweep() == 1  # one slot of two is free
    assert published == [due[0].pk]
    queued = Delivery.objects.filter(pk__in=[d.pk for d in due[1:]])
    assert all(d.waiting_since and d.next_attempt_at > timezone.now() for d in queued)
    # They wait their turn: each release wakes the oldest.
    sending.refresh_from_db()
    sending.attempts = 1
    partner_delivery.delivery_record(delivery=sending, outcome=partner_delivery.Outcome(True, 200))
    woken = [d.pk for d in queued.all() if d.next_attempt_at <= timezone.now()]
    assert woken == [due[1].pk]


@pytest.mark.slow
def test_workers_never_send_an_endpoint_more_than_its_slots_and_another_is_unaffected(
    transactional_db, local_targets, settings
):
    """Six worker threads on the real broker; a partner with a slow endpoint (0.3 s an answer)
    and a fast one. The slow one never sees more than two requests at once, each event once,
    with no pause between a slot freeing and the next request; the fast one is done long
    before."""
    from celery.contrib.testing.worker import start_worker

    from config.celery_app import app

    settings.CALLOPS_WEBHOOK_CONCURRENCY = 2
    partner = Partner.objects.create(name="acme")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-1")
    with contextlib.ExitStack() as stack:
        slow, fast = Receiver(), Receiver()
        for server in (slow, fast):
            server.thread.start()
            stack.callback(server.server.server_close)
            stack.callback(server.server.shutdown)
        slow.delay = 0.3
        slow_endpoint, fast_endpoint = endpoint_for(partner, slow), endpoint_for(partner, fast)
        stack.enter_context(
            start_worker(
                app,
                pool="threads",
                concurrency=6,
                perform_ping_check=False,
                shutdown_timeout=10,
                loglevel="WARNING",
            )
        )
        started = time.monotonic()
        calls_begin(8)
        total = Delivery.objects.filter(endpoint=slow_endpoint).count()
        assert total == 24
        wait_for(lambda: len(fast.requests) == total, timeout=20)
        fast_done = time.monotonic() - started
        wait_for(lambda: len(slow.answered()) == total, timeout=30)
        slow_done = time.monotonic() - started

    assert slow.max_in_flight == 2
    assert fast_done < slow_done / 2
    # Two at a time, 0.3 s each: the slots were never left idle waiting for a fallback.
    assert slow_done < total * slow.delay / 2 + 2.0
    for server, endpoint in ((slow, slow_endpoint), (fast, fast_endpoint)):
        bodies = server.verified(endpoint.secret)
        assert len({b["id"] for b in bodies}) == len(bodies) == total
        for ccid in {b["call_control_id"] for b in bodies}:
            sequences = [b["sequence"] for b in bodies if b["call_control_id"] == ccid]
            assert sequences == sorted(sequences)
    finished = Delivery.objects.values_list("status", "waiting_since")
    assert set(finished) == {("succeeded", None)}


# --- End to end, on the broker -------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_delivers_on_the_partners_queue_after_commit(
    celery_worker, receiver, local_targets
):
    partner = Partner.objects.create(name="acme")
    PartnerConnection.objects.create(partner=partner, connection_id="conn-1")
    endpoint = endpoint_for(partner, receiver)
    receiver.script = [503]  # one retry through the task's own countdown
    for event in call_life()[:3]:
        deliver(event)
    wait_for(lambda: len(receiver.answered(200)) == 3, timeout=20)
    bodies = receiver.answered(200)
    assert [b["type"] for b in bodies] == ["call.initiated", "call.answered", "stream.started"]
    receiver.verified(endpoint.secret)


def test_it_never_carries_an_endpoints_cookie_to_another_request():
    """One pooled client serves every partner: a Set-Cookie from one endpoint must not ride along
    with the next delivery (another partner's, perhaps, on the same host)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class SetsCookies(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("Cookie"))
            self.send_response(200)
            self.send_header("Set-Cookie", "session=partner-a; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SetsCookies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        for _ in range(3):
            partner_delivery._client().post(url, content=b"{}")
    finally:
        server.shutdown()
    assert seen == [None, None, None]
