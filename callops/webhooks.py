"""Inbound Telnyx webhooks: verify the signature, then store the event once.

Verification uses PyNaCl directly rather than the ``telnyx`` SDK helper: importing the SDK costs
~1.3 s and ~40 MiB per web process, and its helper re-parses the public key on every call. The
scheme is the one Telnyx documents: Ed25519 over ``f"{telnyx-timestamp}|{raw body}"``.

An authentic body is stored as the exact text Telnyx sent, or refused with a 400 that names
the field: what PostgreSQL's jsonb cannot hold (NUL, lone surrogates, NaN) is never cut out
to make it fit, and no body is answered with a 503 that every retry would get again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import NoReturn

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from callops import drain, prepared
from callops.models import WebhookEvent

logger = logging.getLogger("callops.webhooks")

SIGNATURE_HEADER = "HTTP_TELNYX_SIGNATURE_ED25519"
TIMESTAMP_HEADER = "HTTP_TELNYX_TIMESTAMP"

# Unix seconds as Telnyx writes them. int() alone would take a sign, spaces, underscores and any
# Unicode digit, and hundreds of digits that overflow the float arithmetic of the window check;
# twelve ASCII digits reach the year 33658.
_UNIX_TIME = re.compile(r"[0-9]{1,12}")


class WebhookRejected(Exception):
    """The request is not an authentic, well-formed Telnyx event. ``str()`` is the reason;
    ``reason`` is its kind, a short fixed word the metrics count by."""

    status_code = 400
    reason = "invalid_body"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class SignatureRejected(WebhookRejected):
    status_code = 401
    reason = "bad_signature"


@lru_cache(maxsize=8)
def _verify_keys(keys: tuple[str, ...]) -> tuple[VerifyKey, ...]:
    parsed = []
    for key in keys:
        try:
            parsed.append(VerifyKey(base64.b64decode(key, validate=True)))
        except (binascii.Error, ValueError, TypeError):
            logger.error("TELNYX_PUBLIC_KEY contains a key that is not base64 Ed25519; ignored")
    return tuple(parsed)


def verify_signature(
    body: bytes,
    signature_b64: str | None,
    timestamp: str | None,
    *,
    public_keys: tuple[str, ...] | list[str] | None = None,
    tolerance: int | None = None,
    now: float | None = None,
) -> None:
    """Raise ``SignatureRejected`` unless one configured key signed ``timestamp|body`` recently."""
    if not signature_b64 or not timestamp:
        raise SignatureRejected(
            "missing telnyx-signature-ed25519 or telnyx-timestamp header", "missing_signature"
        )
    if not _UNIX_TIME.fullmatch(timestamp):
        raise SignatureRejected(
            "telnyx-timestamp is not a Unix time (1 to 12 ASCII digits)", "bad_timestamp"
        )
    sent_at = int(timestamp)
    tolerance = settings.TELNYX_WEBHOOK_TOLERANCE if tolerance is None else tolerance
    skew = (time.time() if now is None else now) - sent_at
    if abs(skew) > tolerance:
        raise SignatureRejected(
            f"telnyx-timestamp is {int(skew)} s away from now", "stale_timestamp"
        )
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected("telnyx-signature-ed25519 is not base64") from None
    if len(signature) != 64:
        raise SignatureRejected("telnyx-signature-ed25519 is not a 64-byte signature")
    keys = _verify_keys(tuple(settings.TELNYX_PUBLIC_KEYS if public_keys is None else public_keys))
    if not keys:
        raise SignatureRejected("no TELNYX_PUBLIC_KEY is configured", "no_public_key")
    signed = timestamp.encode() + b"|" + body
    for key in keys:
        try:
            key.verify(signed, signature)
            return
        except BadSignatureError:
            continue
    raise SignatureRejected("signature does not match any configured public key")


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    event_id: str
    event_type: str
    occurred_at: datetime
    call_control_id: str
    attempt: int | None
    envelope_json: str
    shard: int = 0
    priority: int = 0
    lane: str = drain.NOW  # the drain flag it raises (``callops.drain``)


def parse_event(body: bytes) -> ParsedEvent:
    """Check the envelope of an authentic body; raise ``WebhookRejected`` naming what is wrong."""
    text, envelope = _load(body)
    data = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(data, dict):
        raise WebhookRejected("body has no data object")
    event_id, event_type = data.get("id"), data.get("event_type")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 100:
        raise WebhookRejected("data.id is missing or not a string of at most 100 characters")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 100:
        raise WebhookRejected("data.event_type is missing or not a string")
    payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
    call_control_id = payload.get("call_control_id")
    if not isinstance(call_control_id, str):
        call_control_id = ""
    if len(call_control_id) > 255:
        raise WebhookRejected("data.payload.call_control_id is longer than 255 characters")
    meta = envelope.get("meta")
    attempt = meta.get("attempt") if isinstance(meta, dict) else None
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt < 2**31:
        attempt = None
    return ParsedEvent(
        event_id=event_id,
        event_type=event_type,
        occurred_at=_occurred_at(data.get("occurred_at")),
        call_control_id=call_control_id,
        attempt=attempt,
        envelope_json=text,
        shard=drain.shard_of(call_control_id),
        priority=drain.priority_of(event_type),
        lane=drain.lane_of(event_type),
    )


def _load(body: bytes) -> tuple[str, object]:
    """The body as text, as it will be stored, and as JSON; ``WebhookRejected`` if it is not."""
    try:
        # RFC 8259: JSON between systems is UTF-8. Decoding strictly, once, also refuses a
        # surrogate encoded as bytes, which json.loads(bytes) lets through and jsonb does not.
        text = body.decode()
    except UnicodeDecodeError:
        raise WebhookRejected("body is not JSON in UTF-8") from None
    if text.startswith("\ufeff"):
        # A byte order mark is not part of the JSON text (RFC 8259 lets a parser ignore it),
        # but jsonb refuses it: without it the event is stored exactly as sent.
        text = text[1:]
    try:
        envelope = _DECODER.decode(text)
    except _NotJSON as exc:
        raise WebhookRejected(f"{_where_constant(text)} is {exc}, which is not JSON") from None
    except RecursionError:
        raise WebhookRejected("body nests deeper than callops can read") from None
    except json.JSONDecodeError as exc:
        raise WebhookRejected(f"body is not JSON ({exc})") from None
    except ValueError as exc:
        # JSON sets no limit on a number's digits; Python refuses to read an integer of more
        # than 4300 (a guard against quadratic conversion). Its advice on raising the limit is
        # for us, not for the sender, so it is cut.
        raise WebhookRejected(
            f"body has a number callops cannot read: {exc}".split(";")[0]
        ) from None
    # jsonb holds neither NUL nor half of a UTF-16 surrogate pair, and either can only arrive as
    # a \u escape (raw, one is not JSON and the other not UTF-8): the values are searched only
    # when the text has such an escape. Storing the rest of the text without them would store
    # something Telnyx did not send, so the body is refused, naming the field.
    if "\\u0000" in text or "\\ud" in text or "\\uD" in text:
        found = _first(envelope, _unstorable)
        if found:
            path, problem = found
            raise WebhookRejected(f"{path} contains {problem}, which callops cannot store")
    return text, envelope


class _NotJSON(Exception):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON and jsonb do not."""


def _refuse_constant(name: str) -> NoReturn:
    raise _NotJSON(name)


# One decoder: json.loads with a hook would build a new one (and its scanner) for every body.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _not_json(value: object) -> str | None:
    return str(value) if isinstance(value, _NotJSON) else None


def _where_constant(text: str) -> str:
    """The path of the first NaN or Infinity in ``text``. Rare, so it may read the text again,
    keeping the constants; that read goes past where the first one stopped, so it may find the
    nesting too deep, and then the reason says only "body"."""
    try:
        found = _first(json.loads(text, parse_constant=_NotJSON), _not_json)
    except RecursionError:
        return "body"
    return found[0] if found else "body"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unstorable(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return "\\u0000"
    if not value.isascii() and _SURROGATE.search(value):
        return "a lone surrogate"
    return None


def _first(document: object, problem: Callable[[object], str | None]) -> tuple[str, str] | None:
    """``(path, problem)`` of the first key or value of ``document`` with a problem, in document
    order; a path reads like ``data.payload.items[2]``. Without recursion: Python's limit is
    what bounds the nesting json.loads accepts, so a walk must not need more of it."""
    stack: list[tuple[str, object]] = [("", document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            children = []
            for key, child in node.items():
                # json.dumps escapes a NUL or surrogate the key holds, so the reason shows it.
                label = json.dumps(key)[1:-1]
                child_path = f"{path}.{label}" if path else label
                if found := problem(key):
                    return f"key {child_path}"[:200], found
                children.append((child_path, child))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(node)]))
        elif found := problem(node):
            return (path or "body")[:200], found
    return None


# Telnyx's occurred_at is a moment of a live call, delivered within hours of it. Ten years either
# way of now leave room for any clock, and keep every sum the drains make with it (durations,
# grace periods, retention) inside Python's years 1 to 9999: 9999-12-31T23:59-01:00 is stored
# by PostgreSQL as year 10000, which no drain could load again.
OCCURRED_AT_RANGE = timedelta(days=3653).total_seconds()


def _occurred_at(value: object) -> datetime:
    if value is None:
        return timezone.now()  # an envelope without a time is ordered by its arrival
    at = parse_time(value)
    # In seconds: timestamp() of an aware datetime does not overflow, and is cheaper than now().
    if at is None or abs(at.timestamp() - time.time()) > OCCURRED_AT_RANGE:
        raise WebhookRejected("data.occurred_at is not an ISO 8601 time within ten years of now")
    return at


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Without an offset, UTC (Telnyx writes Z). Not timezone.utc: Django 5 removed it.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@lru_cache(maxsize=4)
def _insert_sql(vendor: str) -> str:
    # Only table names and a cast are formatted in; every value is a bound parameter.
    table = WebhookEvent._meta.db_table
    insert = (
        f"INSERT INTO {table} (event_id, event_type, occurred_at, call_control_id, payload,"  # noqa: S608
        " received_at, delivery_count, last_attempt, status, error, processed_at, shard, priority)"
        " VALUES (%(event_id)s, %(event_type)s, %(occurred_at)s, %(call_control_id)s,"
        f" {'%(payload)s::jsonb' if vendor == 'postgresql' else '%(payload)s'}, %(now)s, 1,"
        " %(attempt)s, %(status)s, '', %(processed_at)s, %(shard)s, %(priority)s)"
        " ON CONFLICT (event_id) DO UPDATE SET"
        f" delivery_count = {table}.delivery_count + 1,"
        f" last_attempt = COALESCE(EXCLUDED.last_attempt, {table}.last_attempt)"
        " RETURNING status, delivery_count"
    )
    # PostgreSQL raises the drain flag in the same statement; elsewhere the caller does.
    return drain.raise_in(insert) if vendor == "postgresql" else insert


def store_event(event: ParsedEvent, *, handled: bool) -> tuple[str, bool, bool | None]:
    """Insert the event, or count one more delivery of it.

    Returns ``(status, created, raised)``: ``raised`` is whether this statement raised the
    drain flag, or None where the database cannot do it in the same statement (SQLite); the
    caller hands both to ``drain.after_store``.

    One statement in autocommit: it is the whole transaction, so the row is committed (and safe
    to hand to a worker) when it returns, and two concurrent deliveries of one event cannot both
    insert. The ORM's create() would cost three round trips and a savepoint for the duplicate.
    """
    db = connections[DEFAULT_DB_ALIAS]  # once: each use of the ``connection`` proxy costs a lookup
    params = insert_params(db, event, handled=handled)
    sql = _insert_sql(db.vendor)
    if db.vendor == "postgresql":
        row = prepared.fetchone(db, sql, params)
    else:
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
    stored_status, deliveries = row[0], row[1]
    raised = bool(row[2]) if len(row) > 2 else None
    return stored_status, deliveries == 1, raised


def insert_params(db: BaseDatabaseWrapper, event: ParsedEvent, *, handled: bool) -> dict:
    """The bound parameters of ``_insert_sql`` for ``event``."""
    now = timezone.now()
    adapt = db.ops.adapt_datetimefield_value
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "occurred_at": adapt(event.occurred_at),
        "call_control_id": event.call_control_id,
        "payload": event.envelope_json,
        "now": adapt(now),
        "attempt": event.attempt,
        "status": WebhookEvent.Status.PENDING if handled else WebhookEvent.Status.IGNORED,
        "processed_at": None if handled else adapt(now),
        "stale": adapt(now - drain.FLAG_TTL),
        "shard": event.shard,
        "priority": event.priority,
        "flag": drain.flag_id(event.shard, event.lane),
    }
