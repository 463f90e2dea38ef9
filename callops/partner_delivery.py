"""Sending partner events to their endpoints: signed, in order per call, retried, given up.

``delivery_process`` is what the Celery task runs for one ``Delivery``:

1. **Order.** A call's events reach an endpoint in ``sequence`` order: a delivery waits while an
   earlier one of the same call to the same endpoint is unfinished (pending, being sent, or
   failed and due again), and each delivery that finishes (succeeded or dead) publishes the
   next. A partner can rely on ``call.answered`` arriving before ``call.ended``; the price is
   one request in flight per call and endpoint, which a call's event rate never fills. A
   success whose successor is already due hands it its slot in the transaction that records
   it, and the same run sends it (up to ``CHAIN_LIMIT`` in a row): a call's burst, or a
   backlog, costs no task message, claim or wake-up per event.
2. **The circuit breaker.** After ``CALLOPS_WEBHOOK_BREAKER_THRESHOLD`` failed attempts in a
   row an endpoint is parked for ``CALLOPS_WEBHOOK_BREAKER_COOLDOWN``: its deliveries wait
   instead of trying, so a dead endpoint costs one timed-out request per cooldown, not one per
   event. When the cooldown ends one delivery wins the probe (decided under the endpoint's
   row lock, below); its success lets the rest through.
3. **Bounded concurrency.** At most ``CALLOPS_WEBHOOK_CONCURRENCY`` requests are in flight to
   one endpoint, across every worker process and host. The slots are counted in the database,
   under the endpoint's row lock: a slot is a delivery being sent, so a dead worker's slot frees
   when its claim's lease lapses, and no second store (Redis) can disagree with the claims. A
   delivery that finds its endpoint full does not hold a worker: it queues (``waiting_since``)
   and each release wakes the oldest waiter at once (under the lock, after the release: see
   ``_succeed_and_pass_on``), so a slow endpoint holds at most that many workers and the others
   keep the rest. The sweeper publishes no more than an endpoint's free slots and queues the
   rest the same way.
4. **The attempt.** Claimed with a conditional UPDATE (``next_attempt_at`` is then the lease: a
   worker that dies mid-send leaves it to lapse and the sweeper to publish it again), the URL
   checked again (a name may resolve elsewhere by now), then one POST signed with
   ``standardwebhooks``: ``webhook-id`` is the event id, so a partner dedupes retries by it.
5. **The outcome** (``classify``): 2xx succeeded; 429 and 503 wait their ``Retry-After``;
   anything else (another status, a timeout, a refused connection, a redirect) is retried with
   exponential backoff and full jitter, until ``CALLOPS_WEBHOOK_MAX_ATTEMPTS`` or the
   delivery's ``expires_at``, then it is dead.
"""

from __future__ import annotations

import base64
import http.cookiejar
import json
import logging
import os
import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Exists, F, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.db.models.lookups import LessThan
from django.utils import timezone

from callops import logs, metrics, partner_events
from callops.exceptions import CallopsError
from callops.models import Delivery, Partner, PartnerEvent, WebhookEndpoint
from callops.targets import UnsafeTarget, check_host, stream_url_host

if TYPE_CHECKING:
    import httpx

# httpx and standardwebhooks are imported by the functions that send, not here: the web process
# imports this module for the endpoint checks, the redelivery and the replay (admin and API),
# never sends, and would hold both in every worker (~1.3 MiB of RSS, benchmarks/web_worker.py).

logger = logging.getLogger("callops.partner_delivery")

USER_AGENT = "callops-webhooks/1"
LEASE_MARGIN = 30.0  # seconds past the attempt's timeout before a claim counts as lost


class EndpointInvalid(CallopsError):
    """A webhook endpoint's URL or event types are not acceptable."""


# --- Endpoints ------------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: str) -> None:
    """An https URL (http too only with ``DEBUG``) to a public host. The host is read by the
    same strict grammar as stream URLs (``callops.targets``): only the scheme differs, so the
    check is that one with the scheme swapped. Raises ``UnsafeTarget`` saying why."""
    scheme, sep, rest = url.partition("://")
    allowed = {"https": "wss"} | ({"http": "ws"} if settings.DEBUG else {})
    if not sep or scheme.lower() not in allowed:
        raise UnsafeTarget("must be an https:// URL" + (" (or http://)" if settings.DEBUG else ""))
    check_host(stream_url_host(f"{allowed[scheme.lower()]}://{rest}"))


def check_event_types(event_types: list) -> None:
    unknown = [t for t in event_types if t not in partner_events.EVENT_TYPES]
    if unknown:
        raise EndpointInvalid(f"unknown event types: {', '.join(map(str, unknown))}")


def webhook_endpoint_create(
    *,
    partner: Partner,
    url: str,
    event_types: list[str] | None = None,
    include_interim: bool = False,
    description: str = "",
    active: bool = True,
) -> WebhookEndpoint:
    """A new endpoint with a fresh secret (the caller shows it once)."""
    check_event_types(event_types or [])
    return WebhookEndpoint.objects.create(
        partner=partner,
        url=url,
        event_types=event_types or [],
        include_interim=include_interim,
        description=description,
        active=active,
        secret=new_secret(),
    )


def webhook_endpoint_rotate_secret(
    *, endpoint: WebhookEndpoint, overlap_seconds: int | None = None
) -> WebhookEndpoint:
    """A new current secret; the old one keeps signing (a second ``v1,`` signature) for the
    overlap, so the partner can switch its verifier without losing a delivery."""
    overlap = (
        settings.CALLOPS_WEBHOOK_SECRET_OVERLAP if overlap_seconds is None else overlap_seconds
    )
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
        endpoint.previous_secret = endpoint.secret if overlap > 0 else ""
        endpoint.previous_expires_at = (
            timezone.now() + timedelta(seconds=overlap) if overlap > 0 else None
        )
        endpoint.secret = new_secret()
        endpoint.save(update_fields=["secret", "previous_secret", "previous_expires_at"])
    return endpoint


def signed_headers(endpoint: WebhookEndpoint, event_id: str, body: str, now: datetime) -> dict:
    """The Standard Webhooks headers: one ``v1,`` signature per secret that signs now."""
    from standardwebhooks import Webhook  # see the top of the module

    signatures = [
        Webhook(secret).sign(msg_id=event_id, timestamp=now, data=body)
        for secret in endpoint.signing_secrets(now)
    ]
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def body_of(event: PartnerEvent) -> str:
    return json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)


# --- Deciding what an answer means ----------------------------------------------------------


@dataclass
class Outcome:
    succeeded: bool
    status_code: int | None = None
    error: str = ""
    wait: float | None = None  # what the endpoint asked for (Retry-After), in seconds


def backoff(attempt: int, *, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    rng = rng or random
    ceiling = settings.CALLOPS_WEBHOOK_BACKOFF_BASE * 2 ** max(attempt - 1, 0)
    return rng.uniform(0, min(settings.CALLOPS_WEBHOOK_BACKOFF_CAP, ceiling))


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value) if value.isdigit() else None
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or timezone.now())).total_seconds()
    return max(0.0, min(seconds, settings.CALLOPS_WEBHOOK_BACKOFF_CAP))


def classify(response: httpx.Response | None, exc: BaseException | None = None) -> Outcome:
    """The one place an endpoint's answer is judged."""
    import httpx  # see the top of the module

    if exc is not None:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__
        return Outcome(False, error=f"{kind}: {exc}"[:500])
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(True, status_code=code)
    wait = retry_after(response.headers.get("Retry-After")) if code in (429, 503) else None
    reason = "redirect (not followed)" if 300 <= code < 400 else f"HTTP {code}"
    return Outcome(False, status_code=code, error=reason, wait=wait)


# --- One delivery ---------------------------------------------------------------------------


@dataclass
class Step:
    status: str  # what this run did: succeeded, failed, dead, waiting, skipped
    delay: float | None = None  # publish the delivery again after this many seconds
    # The delivery ``status`` and ``delay`` are about: the last one of the run (a run that
    # holds a slot goes on to its call's next due deliveries, see ``delivery_process``).
    delivery_pk: int | None = None
    # Set by ``delivery_record(chain=True)``: the call's next delivery, claimed in the same
    # transaction into the slot this one released.
    follower: Delivery | None = None


# Deliveries one run sends in a row holding one slot (a call's due events), before the slot
# goes back to the endpoint's queue: a long backlog of one call does not keep a slot forever.
CHAIN_LIMIT = 50


def _earlier(delivery: Delivery):
    """The unfinished deliveries of ``delivery``'s call to its endpoint that come before it."""
    return Delivery.objects.filter(
        endpoint_id=delivery.endpoint_id,
        call_id=delivery.call_id,
        sequence__lt=delivery.sequence,
        status__in=Delivery.UNFINISHED,
    ).exclude(pk=delivery.pk)


def _earlier_unfinished(delivery: Delivery) -> bool:
    if delivery.call_id is None or delivery.sequence is None:
        return False
    return _earlier(delivery).exists()


def delivery_process(*, delivery_pk: int) -> Step:
    """Attempt one delivery if it is due, in order, its endpoint not parked and not full; then,
    while each succeeds, the next deliveries of its call to the endpoint that are due, in the
    same slot (up to ``CHAIN_LIMIT``): each is claimed in the transaction that records its
    predecessor, so a call's burst costs one task message, one claim and one wake-up, and the
    slot is never given back and taken again between two of its events. Returns the last
    delivery's step."""
    now = timezone.now()
    delivery = (
        Delivery.objects.select_related("endpoint__partner", "event").filter(pk=delivery_pk).first()
    )
    if delivery is None:
        return Step("skipped", delivery_pk=delivery_pk)
    due = delivery.status in (Delivery.Status.PENDING, Delivery.Status.FAILED) or (
        delivery.status == Delivery.Status.DELIVERING and delivery.next_attempt_at < now
    )
    if not due:
        return Step("skipped", delivery_pk=delivery_pk)
    if delivery.next_attempt_at > now + timedelta(seconds=1):
        # an early message (a redelivery, a waiter's): its own is queued
        return Step("skipped", delivery_pk=delivery_pk)
    logs.bind(
        partner=delivery.endpoint.partner_id,
        endpoint=delivery.endpoint_id,
        partner_event_id=delivery.event.event_id,
    )
    # Read now, not when the event was created: drains remember endpoints for a while.
    inactive = not (delivery.endpoint.active and delivery.endpoint.partner.active)
    if inactive or now > delivery.expires_at:
        why = "endpoint inactive" if inactive else "too old"
        _give_up(delivery, why, now)
        return Step("dead", delivery_pk=delivery_pk)
    endpoint = _claim(delivery, now)
    if not isinstance(endpoint, WebhookEndpoint):
        return Step(endpoint, delivery_pk=delivery_pk)
    delivery.attempts += 1
    for sent in range(1, CHAIN_LIMIT + 1):
        outcome = attempt(endpoint, delivery.event)
        step = delivery_record(delivery=delivery, outcome=outcome, chain=sent < CHAIN_LIMIT)
        metrics.PARTNER_DELIVERIES.labels(step.status).inc()
        logger.info(
            "delivery %s attempt %d: %s (HTTP %s)",
            delivery.pk,
            delivery.attempts,
            step.status,
            outcome.status_code or "-",
        )
        if step.follower is None:
            return step
        delivery, endpoint = step.follower, step.follower.endpoint
        logs.bind(delivery_id=delivery.pk, partner_event_id=delivery.event.event_id)
    raise AssertionError("unreachable: the last of a chain is recorded with chain=False")


def _locked_endpoint(endpoint_pk: int) -> WebhookEndpoint:
    """The endpoint's row, locked until the transaction ends: every claim of one of its slots
    and every release takes it, so a delivery that finds the endpoint full is queued before
    the next release looks for whom to wake. ``no_key``: the drains' inserts of deliveries
    (which share-lock the row they refer to) need not wait for it."""
    return (
        WebhookEndpoint.objects.select_for_update(no_key=True, of=("self",))
        .select_related("partner")
        .get(pk=endpoint_pk)
    )


def _in_flight_deliveries(endpoint_pk: int, now: datetime):
    return Delivery.objects.filter(
        endpoint_id=endpoint_pk, status=Delivery.Status.DELIVERING, next_attempt_at__gt=now
    )


def _in_flight(endpoint_pk: int, now: datetime) -> int:
    """Requests being sent to the endpoint: claims whose lease has not lapsed (a worker that
    died mid-send stops counting when its lease does). Read after the lock is taken, in a
    statement of its own, so it sees every release committed before."""
    return _in_flight_deliveries(endpoint_pk, now).count()


def _in_flight_count(endpoint_pk: int, now: datetime) -> Coalesce:
    """``_in_flight`` as a subquery, for the claim's own statement."""
    counted = (
        _in_flight_deliveries(endpoint_pk, now)
        .order_by()
        .values("endpoint_id")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(counted), Value(0))


def _claim(delivery: Delivery, now: datetime) -> WebhookEndpoint | str:
    """Take one of the endpoint's slots for ``delivery``. Returns the (fresh) endpoint, or why
    not: ``"waiting"`` (an earlier one of its call unfinished, the endpoint parked, or full:
    queued for a slot) or ``"skipped"`` (another worker has it).

    The slot is the claim itself: a delivery being sent is a slot taken, so the count and the
    claims cannot disagree, whatever process or host sent them, and a dead worker's slot
    frees when its lease lapses. A full endpoint's delivery holds no worker: it records since
    when it waits (keeping that place if it waited before) and the next release wakes the
    oldest waiter. Its ``next_attempt_at`` is the fallback should that wake-up be lost (a
    broker outage): by then every slot taken before has been released or has lapsed."""
    limit = max(settings.CALLOPS_WEBHOOK_CONCURRENCY, 1)
    with transaction.atomic():
        endpoint = _locked_endpoint(delivery.endpoint_id)
        mine = Delivery.objects.filter(
            pk=delivery.pk, status=delivery.status, attempts=delivery.attempts
        ).filter(next_attempt_at__lte=delivery.next_attempt_at)
        # A ``delivering`` row here is a dead sender's (its lease lapsed): waiting, it must
        # not stay ``delivering``, or it would count as a slot taken and no release would wake it.
        waits = {"status": Delivery.Status.FAILED} if delivery.status == "delivering" else {}
        if endpoint.parked_until is not None and endpoint.parked_until > now:
            if _earlier_unfinished(delivery):
                return "waiting"
            mine.update(next_attempt_at=endpoint.parked_until, **waits)
            return "waiting"  # the probe's success or the sweeper publishes it
        # The usual case in one statement: in order, a slot free, still the row we read. Under
        # the lock, as every release that wakes is: the earlier delivery either finished
        # before (and this one goes on), or its release, after this, sees this one and
        # publishes it. Checked before taking the lock, its release could commit between the
        # check and this delivery's wait, and nobody would publish it until the sweeper. The
        # slot count is read in a statement after the lock's, so it sees every release
        # committed before.
        ordered = (
            mine.filter(~Exists(_earlier(delivery)))
            if delivery.call_id is not None and delivery.sequence is not None
            else mine
        )
        for _ in range(3):
            claimed = ordered.filter(LessThan(_in_flight_count(endpoint.pk, now), limit)).update(
                **_claim_fields(now)
            )
            if claimed:
                break
            # Why not: out of order, full, or another worker has it. Each read anew: a success
            # that passes its slot on to nobody releases it without this lock (it wakes a
            # waiter under it afterwards), so a slot may have freed since the claim's count.
            if _earlier_unfinished(delivery):
                return "waiting"
            if _in_flight(endpoint.pk, now) < limit:
                if mine.exists():
                    continue  # a slot freed between the two statements: claim it
                return "skipped"
            break
        if not claimed:
            mine.update(
                waiting_since=Coalesce(F("waiting_since"), Value(now)),
                next_attempt_at=now + timedelta(seconds=lease_seconds()),
                **waits,
            )
            return "waiting"
        if endpoint.parked_until is not None:  # the cooldown is over: this one is the probe
            endpoint.parked_until = now + timedelta(
                seconds=settings.CALLOPS_WEBHOOK_BREAKER_COOLDOWN
            )
            endpoint.save(update_fields=["parked_until"])
    return endpoint


def lease_seconds() -> float:
    return settings.CALLOPS_WEBHOOK_TIMEOUT + LEASE_MARGIN


def _claim_fields(now: datetime) -> dict:
    """What claiming a delivery writes: sending, one more attempt, leased until the send's
    timeout has surely passed."""
    return {
        "status": Delivery.Status.DELIVERING,
        "attempts": F("attempts") + 1,
        "next_attempt_at": now + timedelta(seconds=lease_seconds()),
        "last_attempt_at": now,
        "waiting_since": None,
    }


_clients: dict[int, httpx.Client] = {}


def _client() -> httpx.Client:
    """This process's HTTP client. One per process, not one per request (``httpx.post``): its
    pool keeps connections to an endpoint alive between deliveries, so a busy endpoint costs
    one TCP and TLS handshake per connection instead of one per event, which is most of an
    attempt's time and CPU. Keyed by pid: a forked worker child builds its own. httpx's
    client is safe to share between threads."""
    import httpx  # see the top of the module

    client = _clients.get(os.getpid())
    if client is None:
        # No cookie jar: a Set-Cookie from one partner's endpoint must never ride along with
        # another partner's deliveries to the same host.
        refuse_all = http.cookiejar.CookieJar(
            http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        )
        client = _clients[os.getpid()] = httpx.Client(
            headers={"User-Agent": USER_AGENT}, follow_redirects=False, cookies=refuse_all
        )
    return client


def attempt(endpoint: WebhookEndpoint, event: PartnerEvent) -> Outcome:
    """One signed POST. Redirects are not followed: the URL that passed the check is the one
    called."""
    import httpx  # see the top of the module

    body = body_of(event)
    try:
        check_webhook_url(endpoint.url)
    except UnsafeTarget as exc:
        return Outcome(False, error=f"unsafe target: {exc}"[:500])
    headers = {
        "Content-Type": "application/json",
        **signed_headers(endpoint, event.event_id, body, timezone.now()),
    }
    try:
        response = _client().post(
            endpoint.url,
            content=body.encode(),
            headers=headers,
            timeout=settings.CALLOPS_WEBHOOK_TIMEOUT,
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        return classify(None, exc)
    return classify(response)


def delivery_record(*, delivery: Delivery, outcome: Outcome, chain: bool = False) -> Step:
    """Store an attempt's outcome, move the breaker, release the slot (waking the endpoint's
    oldest waiter) and say what comes next. All under the endpoint's lock (``_claim``).

    ``chain``: after a success, if the call's next delivery to the endpoint is due, claim it
    into this slot instead of releasing it (``Step.follower``; the caller sends it): the slot
    count does not change, so nobody waiting for a slot is owed a wake-up."""
    now = timezone.now()
    common = {"last_status_code": outcome.status_code, "last_error": outcome.error[:500]}
    delivering = Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.DELIVERING)
    recorded = False
    if outcome.succeeded and connection.vendor == "postgresql":
        recorded, follower = _succeed_and_pass_on(delivery, outcome, now, chain=chain)
        if follower is not None:
            return Step("succeeded", delivery_pk=delivery.pk, follower=follower)
    with transaction.atomic():
        endpoint = _locked_endpoint(delivery.endpoint_id)
        if outcome.succeeded:
            if not recorded:
                delivering.update(status=Delivery.Status.SUCCEEDED, delivered_at=now, **common)
            _close_breaker(endpoint, now)
            step = Step("succeeded", delivery_pk=delivery.pk)
            following = _next_of_call(delivery)
            if chain and following is not None and _claim_follower(following, endpoint, now):
                step.follower = following
                return step  # the slot passes on: no release, no wake-up
            if following is not None:
                pk = following.pk
                transaction.on_commit(lambda: partner_events.deliveries_enqueue(delivery_pks=[pk]))
        else:
            _trip(endpoint, now)
            delay = outcome.wait if outcome.wait is not None else backoff(delivery.attempts)
            retry_at = now + timedelta(seconds=delay)
            if (
                delivery.attempts >= settings.CALLOPS_WEBHOOK_MAX_ATTEMPTS
                or retry_at > delivery.expires_at
            ):
                _give_up(delivery, outcome.error[:480], now, last_status_code=outcome.status_code)
                step = Step("dead", delivery_pk=delivery.pk)
            else:
                delivering.update(status=Delivery.Status.FAILED, next_attempt_at=retry_at, **common)
                logger.info("delivery %s: %s, retry in %.2f s", delivery.pk, outcome.error, delay)
                step = Step("failed", delay=delay, delivery_pk=delivery.pk)
        _wake_next_waiter(endpoint.pk, now)
    return step


def _succeed_and_pass_on(
    delivery: Delivery, outcome: Outcome, now: datetime, *, chain: bool
) -> tuple[bool, Delivery | None]:
    """A success in one statement, without the endpoint's lock: record it and, with ``chain``,
    claim the call's next delivery into its slot if it is due and the endpoint (active, its
    partner too, neither parked nor failing: read as committed now) may take it. Returns
    (recorded, the follower claimed or None). With no follower the slot is released: the
    caller then wakes a waiter under the lock. That is safe after the fact: a claimer that
    found the endpoint full counted under the lock before this release committed, so it has
    queued itself by the time the caller gets the lock. With a follower the slot count does not
    change (one statement frees and takes it), so nobody is owed a wake-up."""
    table = {m: connection.ops.quote_name(m._meta.db_table) for m in (Delivery, PartnerEvent)}
    endpoints = connection.ops.quote_name(WebhookEndpoint._meta.db_table)
    partners = connection.ops.quote_name(Partner._meta.db_table)
    # Table names from the models; every value is a parameter.
    sql = f"""
        WITH done AS (
            UPDATE {table[Delivery]} SET status = %(succeeded)s, delivered_at = %(now)s,
                last_status_code = %(code)s, last_error = ''
            WHERE id = %(pk)s AND status = %(delivering)s
            RETURNING id
        ), following AS (
            SELECT d.id FROM {table[Delivery]} d
            WHERE %(chain)s AND d.endpoint_id = %(endpoint)s AND d.call_id = %(call)s
                AND d.id <> %(pk)s AND d.status IN (%(pending)s, %(delivering)s, %(failed)s)
            ORDER BY d.sequence LIMIT 1
        ), follower AS (
            UPDATE {table[Delivery]} d SET status = %(delivering)s, attempts = d.attempts + 1,
                next_attempt_at = %(lease)s, last_attempt_at = %(now)s, waiting_since = NULL
            FROM following, {endpoints} e, {partners} p, {table[PartnerEvent]} ev
            WHERE EXISTS (SELECT 1 FROM done) AND d.id = following.id
                AND d.status IN (%(pending)s, %(failed)s) AND d.next_attempt_at <= %(now)s
                AND d.expires_at > %(now)s AND e.id = d.endpoint_id AND e.active
                AND e.parked_until IS NULL AND e.consecutive_failures = 0
                AND p.id = e.partner_id AND p.active AND ev.id = d.event_id
            RETURNING d.id, d.status, d.attempts, d.call_id, d.sequence, d.next_attempt_at,
                d.expires_at, d.created_at, ev.id, ev.event_id, ev.payload::text, e.url,
                e.secret, e.previous_secret, e.previous_expires_at, e.partner_id
        )
        SELECT (SELECT count(*) FROM done), follower.* FROM (SELECT 1) one
        LEFT JOIN follower ON true
    """  # noqa: S608
    params = {
        "succeeded": Delivery.Status.SUCCEEDED,
        "delivering": Delivery.Status.DELIVERING,
        "pending": Delivery.Status.PENDING,
        "failed": Delivery.Status.FAILED,
        "now": now,
        "lease": now + timedelta(seconds=lease_seconds()),
        "code": outcome.status_code,
        "pk": delivery.pk,
        "chain": bool(chain and delivery.call_id is not None),
        "endpoint": delivery.endpoint_id,
        "call": delivery.call_id,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        done, *row = cursor.fetchone()
    if row[0] is None:
        return bool(done), None
    (pk, status, attempts, call_id, sequence, next_at, expires_at, created_at) = row[:8]
    event_pk, event_id, payload, url, secret, previous, previous_expires, partner_id = row[8:]
    endpoint = WebhookEndpoint(
        pk=delivery.endpoint_id,
        partner_id=partner_id,
        url=url,
        secret=secret,
        previous_secret=previous,
        previous_expires_at=previous_expires,
        active=True,
    )
    event = PartnerEvent(pk=event_pk, event_id=event_id, payload=json.loads(payload))
    follower = Delivery(
        pk=pk,
        event=event,
        endpoint=endpoint,
        call_id=call_id,
        sequence=sequence,
        status=status,
        attempts=attempts,
        next_attempt_at=next_at,
        expires_at=expires_at,
        created_at=created_at,
    )
    return True, follower


def _claim_follower(following: Delivery, endpoint: WebhookEndpoint, now: datetime) -> bool:
    """Claim the call's next delivery into the slot its predecessor (just recorded, under the
    endpoint's lock) held: if it is due now, and the endpoint, read under the lock, is active,
    its partner too, and not parked (a failure elsewhere may have parked it meanwhile). Order
    holds by construction: it is the call's first unfinished delivery to the endpoint."""
    due = following.status in (Delivery.Status.PENDING, Delivery.Status.FAILED) and (
        following.next_attempt_at <= now < following.expires_at
    )
    if not due or not (endpoint.active and endpoint.partner.active):
        return False
    if endpoint.parked_until is not None:
        return False
    claimed = Delivery.objects.filter(
        pk=following.pk, status=following.status, attempts=following.attempts
    ).update(**_claim_fields(now))
    if claimed:
        following.status = Delivery.Status.DELIVERING
        following.attempts += 1
        following.endpoint = endpoint
    return bool(claimed)


def _next_of_call(delivery: Delivery) -> Delivery | None:
    """The call's first unfinished delivery to the endpoint (``delivery`` is finished by now),
    with its event, which a follower is sent with."""
    if delivery.call_id is None:
        return None
    return (
        Delivery.objects.filter(
            endpoint_id=delivery.endpoint_id,
            call_id=delivery.call_id,
            status__in=Delivery.UNFINISHED,
        )
        .select_related("event")
        .order_by("sequence")
        .first()
    )


def _wake_next_waiter(endpoint_pk: int, now: datetime) -> None:
    """A slot was released: the endpoint's oldest waiter not yet woken is due now. It keeps its
    place (``waiting_since``) until it gets a slot, so if a newcomer took the slot first it is
    the next one woken again. One per release: each release frees one slot."""
    waiter = (
        Delivery.objects.filter(
            endpoint_id=endpoint_pk,
            waiting_since__isnull=False,
            status__in=[Delivery.Status.PENDING, Delivery.Status.FAILED],
            next_attempt_at__gt=now,
        )
        .order_by("waiting_since", "pk")
        .values_list("pk", flat=True)
        .first()
    )
    if waiter is not None:
        Delivery.objects.filter(pk=waiter).update(next_attempt_at=now)
        transaction.on_commit(lambda: partner_events.deliveries_enqueue(delivery_pks=[waiter]))


def _close_breaker(endpoint: WebhookEndpoint, now: datetime) -> None:
    """A success: the failures in a row start again from 0. If it was the probe of a parked
    endpoint, what waited for the cooldown is due now, not at the cooldown's end."""
    if endpoint.consecutive_failures == 0 and endpoint.parked_until is None:
        return  # the usual case: nothing to reset
    parked_until = endpoint.parked_until
    endpoint.consecutive_failures, endpoint.parked_until = 0, None
    endpoint.save(update_fields=["consecutive_failures", "parked_until"])
    if parked_until is not None:
        Delivery.objects.filter(
            endpoint_id=endpoint.pk,
            status__in=[Delivery.Status.PENDING, Delivery.Status.FAILED],
            next_attempt_at__gt=now,
            next_attempt_at__lte=parked_until,
        ).update(next_attempt_at=now)
        transaction.on_commit(deliveries_sweep)


def _trip(endpoint: WebhookEndpoint, now: datetime) -> None:
    """One more failure in a row; at the threshold the endpoint is parked for the cooldown."""
    endpoint.consecutive_failures += 1
    fields = ["consecutive_failures"]
    if endpoint.consecutive_failures >= settings.CALLOPS_WEBHOOK_BREAKER_THRESHOLD:
        cooldown = timedelta(seconds=settings.CALLOPS_WEBHOOK_BREAKER_COOLDOWN)
        endpoint.parked_until = now + cooldown
        fields.append("parked_until")
        logger.warning("endpoint %s parked for %s after failures in a row", endpoint.pk, cooldown)
    endpoint.save(update_fields=fields)


def _give_up(delivery: Delivery, why: str, now: datetime, **fields) -> None:
    done = Delivery.objects.filter(pk=delivery.pk, status__in=Delivery.UNFINISHED).update(
        status=Delivery.Status.DEAD,
        next_attempt_at=now,
        waiting_since=None,
        **fields,
        last_error=f"gave up: {why}",
    )
    if done:
        _publish_next(delivery)


def _publish_next(delivery: Delivery) -> None:
    """The call's next unfinished delivery to this endpoint, now that this one is done."""
    following = _next_of_call(delivery)
    if following is not None:
        pk = following.pk
        transaction.on_commit(lambda: partner_events.deliveries_enqueue(delivery_pks=[pk]))


# --- Operators, partners and the sweeper ----------------------------------------------------


def delivery_redeliver(*, delivery: Delivery) -> bool:
    """Send a delivery again (a partner's redeliver, an operator's "retry now"): a fresh window
    of attempts. One being sent right now is left to finish."""
    now = timezone.now()
    with transaction.atomic():
        again = (
            Delivery.objects.filter(pk=delivery.pk)
            .exclude(status=Delivery.Status.DELIVERING)
            .update(
                status=Delivery.Status.PENDING,
                attempts=0,
                next_attempt_at=now,
                expires_at=now + timedelta(seconds=settings.CALLOPS_WEBHOOK_MAX_AGE),
                delivered_at=None,
                last_error="",
            )
        )
        if again:
            transaction.on_commit(
                lambda: partner_events.deliveries_enqueue(delivery_pks=[delivery.pk])
            )
    return bool(again)


def endpoints_subscribed(*, event: PartnerEvent) -> list[WebhookEndpoint]:
    """The partner's active endpoints that want ``event`` now (what a replay sends it to)."""
    interim = event.type == "transcript.segment" and not event.payload.get("data", {}).get(
        "is_final", True
    )
    endpoints = WebhookEndpoint.objects.filter(partner_id=event.partner_id, active=True)
    return [e for e in endpoints.order_by("pk") if e.wants(event.type, interim=interim)]


def partner_event_replay(
    *, event: PartnerEvent, endpoints: list[WebhookEndpoint]
) -> list[Delivery]:
    """Send ``event`` again to each of ``endpoints`` (the same event id and bytes, so the
    partner dedupes by it): a delivery it already had starts a fresh window of attempts (one
    being sent right now is left to finish), an endpoint it never went to gets a new one.
    Returns the deliveries, in the endpoints' order."""
    now = timezone.now()
    replayed = []
    for endpoint in endpoints:
        delivery = Delivery.objects.filter(event=event, endpoint=endpoint).first()
        if delivery is None:
            delivery = partner_events.delivery_build(event, endpoint, now)
            try:
                with transaction.atomic():
                    delivery.save()
                    transaction.on_commit(
                        partial(partner_events.deliveries_enqueue, delivery_pks=[delivery.pk])
                    )
                replayed.append(delivery)
                continue
            except IntegrityError:  # a concurrent replay made it first: send that one again
                delivery = Delivery.objects.get(event=event, endpoint=endpoint)
        delivery_redeliver(delivery=delivery)
        delivery.refresh_from_db()
        replayed.append(delivery)
    return replayed


def deliveries_sweep(*, limit: int = 500) -> int:
    """Publish deliveries that are due and first in their call's order: those whose endpoint's
    cooldown ended, whose message was lost (a broker outage) or whose worker died mid-send.
    An endpoint gets at most as many as it has free slots, its oldest waiters first; the rest
    join its queue (``waiting_since``) for its releases to wake, as a delivery that found it
    full would have: under a backlog a sweep publishes a message per free slot, not one per
    delivery due, each of which would only find the endpoint full. Returns how many were
    published."""
    now = timezone.now()
    earlier = Delivery.objects.filter(
        endpoint_id=OuterRef("endpoint_id"),
        call_id=OuterRef("call_id"),
        sequence__lt=OuterRef("sequence"),
        status__in=Delivery.UNFINISHED,
    )
    due = (
        Delivery.objects.filter(status__in=Delivery.UNFINISHED, next_attempt_at__lte=now)
        .exclude(endpoint__parked_until__gt=now)
        .filter(~Exists(earlier))
    )
    by_endpoint: dict[int, list[int]] = {}
    for pk, endpoint_pk in due.order_by("next_attempt_at").values_list("pk", "endpoint_id")[:limit]:
        by_endpoint.setdefault(endpoint_pk, []).append(pk)
    published = []
    for endpoint_pk, pks in by_endpoint.items():
        with transaction.atomic():
            _locked_endpoint(endpoint_pk)  # as a claim that finds the endpoint full queues
            free = max(settings.CALLOPS_WEBHOOK_CONCURRENCY, 1) - _in_flight(endpoint_pk, now)
            ordered = list(
                Delivery.objects.filter(pk__in=pks)
                .order_by(F("waiting_since").asc(nulls_last=True), "next_attempt_at", "pk")
                .values_list("pk", flat=True)
            )
            go, queued = ordered[: max(free, 0)], ordered[max(free, 0) :]
            if queued:
                asleep = {
                    "waiting_since": Coalesce(F("waiting_since"), F("next_attempt_at")),
                    "next_attempt_at": now + timedelta(seconds=lease_seconds()),
                }
                rows = Delivery.objects.filter(pk__in=queued, next_attempt_at__lte=now)
                rows.filter(status__in=[Delivery.Status.PENDING, Delivery.Status.FAILED]).update(
                    **asleep
                )
                # A dead sender's (its lease lapsed): waiting, it must not count as a slot.
                rows.filter(status=Delivery.Status.DELIVERING).update(
                    status=Delivery.Status.FAILED, **asleep
                )
        published += go
    partner_events.deliveries_enqueue(delivery_pks=published)
    return len(published)
