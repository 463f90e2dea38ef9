"""A call's timeline: what Telnyx told us, what we asked of it, and what we told the partner,
merged in time order, one page at a time.

Sources (each entry names its record, so the admin and the API can link to it):

- inbound webhook events (``WebhookEvent``, by Telnyx's ``occurred_at``), except the
  ``call.transcription`` and ``call.dtmf.received`` that were applied: each of those is shown
  as the segment or digit it made;
- commands: created, each attempt (``CommandAttempt``: when it was sent, the answer and how
  long it took), finished;
- DTMF digits; streams, forks and transcriptions (requested, started, stopped or failed);
- final transcript segments (interim ones are guesses the final repeats: the transcript
  endpoint has them);
- deliveries to the partner's endpoints.

A page is cut by a keyset ``(at, source, pk, step)``. The sources that grow with the call's
length (events, segments, digits, deliveries) are asked only for what lies after the cursor, at
most a page of it, so a call with 10,000 segments costs a page per page; commands and sessions
(tens per call) are read whole and cut in Python.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from heapq import merge
from itertools import islice

from django.db.models import F, Q, QuerySet
from django.db.models.functions import Coalesce

from callops.models import (
    Call,
    Command,
    Delivery,
    DtmfDigit,
    Fork,
    MediaStream,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)

# The order of sources at the same instant: what Telnyx said, then what followed from it.
EVENT, SESSION, DTMF, SEGMENT, COMMAND, DELIVERY = range(6)
SOURCE_NAMES = ("event", "session", "dtmf", "segment", "command", "delivery")


# Applied, these events are their segment or digit; unapplied (failed), they are shown.
SHOWN_AS_RECORDS = ("call.transcription", "call.dtmf.received")


class CursorInvalid(ValueError):
    """A cursor this module did not write."""


@dataclass(frozen=True, order=True)
class Key:
    at: datetime
    source: int
    pk: int
    step: int = 0

    def encode(self) -> str:
        raw = f"{self.at.isoformat()}|{self.source}|{self.pk}|{self.step}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> Key:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            at, source, pk, step = raw.split("|")
            parsed = datetime.fromisoformat(at)
            key = cls(parsed.astimezone(UTC), int(source), int(pk), int(step))
        except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
            raise CursorInvalid("not a cursor this timeline gave out") from None
        # Only what this module writes: an aware time, a known source, a pk PostgreSQL can
        # compare with (a larger one would be a database error, not a 400).
        valid = (
            parsed.utcoffset() is not None
            and 0 <= key.source < len(SOURCE_NAMES)
            and 0 <= key.pk < 2**63
            and 0 <= key.step < 100
        )
        if not valid:
            raise CursorInvalid("not a cursor this timeline gave out")
        return key


@dataclass(frozen=True)
class Entry:
    key: Key
    kind: str  # e.g. "call.answered", "command.sent", "stream.started"
    summary: str
    model: str  # the record's model name: "webhookevent", "command", ...
    record_pk: int
    # What the partner API may show of the record: its public id, if it has one.
    public_id: str = ""
    note: str = ""  # for operators only

    @property
    def at(self) -> datetime:
        return self.key.at

    @property
    def source(self) -> str:
        return SOURCE_NAMES[self.key.source]


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    next_cursor: str | None


def _after(source: int, cursor: Key | None, at: str = "at") -> Q:
    """Rows of ``source`` whose (at, source, pk) comes after the cursor's (one entry per row)."""
    if cursor is None:
        return Q()
    if source > cursor.source:
        return Q(**{f"{at}__gte": cursor.at})
    if source < cursor.source:
        return Q(**{f"{at}__gt": cursor.at})
    return Q(**{f"{at}__gt": cursor.at}) | Q(**{at: cursor.at, "pk__gt": cursor.pk})


def _rows(queryset: QuerySet, source: int, cursor: Key | None, limit: int) -> QuerySet:
    return queryset.filter(_after(source, cursor)).order_by("at", "pk")[:limit]


def _events(call: Call, cursor: Key | None, limit: int) -> Iterator[Entry]:
    events = (
        WebhookEvent.objects.filter(call_control_id=call.call_control_id)
        .exclude(event_type__in=SHOWN_AS_RECORDS, status=WebhookEvent.Status.PROCESSED)
        .annotate(at=F("occurred_at"))
        .only("pk", "event_id", "event_type", "occurred_at", "received_at", "status", "error")
    )
    for event in _rows(events, EVENT, cursor, limit):
        yield Entry(
            Key(event.at, EVENT, event.pk),
            event.event_type,
            f"received {_ms(event.received_at)}",
            "webhookevent",
            event.pk,
            public_id=event.event_id,
            # How callops applied it (and why not) is about callops, not the partner's call.
            note=f"{event.status}: {event.error}" if event.error else event.status,
        )


def _dtmf(call: Call, cursor: Key | None, limit: int) -> Iterator[Entry]:
    digits = DtmfDigit.objects.filter(call=call).annotate(at=F("occurred_at"))
    for digit in _rows(digits, DTMF, cursor, limit):
        yield Entry(
            Key(digit.at, DTMF, digit.pk),
            "dtmf",
            f"digit {digit.digit}",
            "dtmfdigit",
            digit.pk,
        )


def _segments(call: Call, cursor: Key | None, limit: int) -> Iterator[Entry]:
    segments = TranscriptSegment.objects.filter(call=call, is_final=True).annotate(
        at=F("occurred_at")
    )
    for segment in _rows(segments, SEGMENT, cursor, limit):
        yield Entry(
            Key(segment.at, SEGMENT, segment.pk),
            "transcript.segment",
            f"{segment.track or '-'}: {segment.transcript}",
            "transcriptsegment",
            segment.pk,
        )


def _deliveries(call: Call, cursor: Key | None, limit: int, partner=None) -> Iterator[Entry]:
    deliveries = Delivery.objects.filter(call=call).select_related("event", "endpoint")
    if partner is not None:
        deliveries = deliveries.filter(endpoint__partner=partner)
    # One entry per delivery, when it last happened: delivered, else last tried, else queued.
    deliveries = deliveries.annotate(at=Coalesce("delivered_at", "last_attempt_at", "created_at"))
    for delivery in _rows(deliveries, DELIVERY, cursor, limit):
        code = f", HTTP {delivery.last_status_code}" if delivery.last_status_code else ""
        error = f": {delivery.last_error}" if delivery.last_error else ""
        yield Entry(
            Key(delivery.at, DELIVERY, delivery.pk),
            f"delivery.{delivery.status}",
            f"{delivery.event.type} #{delivery.sequence or '-'} to {delivery.endpoint.url}, "
            f"{delivery.attempts} attempt(s){code}{error}",
            "delivery",
            delivery.pk,
            public_id=str(delivery.pk),
        )


def _command_steps(command: Command) -> Iterator[tuple[datetime, str, str]]:
    yield command.created_at, "command.created", f"by {command.requested_by}"
    attempts = list(command.attempt_log.all())
    for attempt in attempts:
        answer = f"HTTP {attempt.http_status}" if attempt.http_status else "no answer"
        took = (attempt.answered_at - attempt.sent_at).total_seconds() * 1000
        why = f": {attempt.error}" if attempt.error and attempt.outcome != "succeeded" else ""
        yield (
            attempt.sent_at,
            "command.sent",
            f"attempt {attempt.number}, {answer} in {took:.0f} ms ({attempt.outcome}){why}",
        )
    if not attempts and command.first_sent_at:  # sent before attempts were kept one by one
        yield command.first_sent_at, "command.sent", "attempt 1"
        if command.attempts > 1 and command.sent_at != command.first_sent_at:
            yield command.sent_at, "command.sent", f"attempt {command.attempts}"
    if command.finished_at:
        answer = f"HTTP {command.last_http_status}" if command.last_http_status else "no answer"
        why = f": {command.last_error}" if command.last_error else ""
        settled = f" ({command.settlement})" if command.settlement else ""
        yield command.finished_at, f"command.{command.status}", f"{answer}{why}{settled}"


def _commands(call: Call, cursor: Key | None, limit: int) -> Iterator[Entry]:
    # Several entries per command, so the keyset is applied to the entries in Python: a call
    # has tens of commands (each costs a Telnyx rate-limit slot), not thousands.
    commands = (
        Command.objects.filter(call=call)
        .order_by("created_at", "pk")
        .prefetch_related("attempt_log")
    )
    entries = []
    for command in commands:
        for step, (at, kind, text) in enumerate(_command_steps(command)):
            key = Key(at, COMMAND, command.pk, step)
            if cursor is None or key > cursor:
                entries.append(
                    Entry(
                        key,
                        kind,
                        f"{command.action} {text}",
                        "command",
                        command.pk,
                        public_id=str(command.command_id),
                    )
                )
    return iter(sorted(entries, key=lambda e: e.key)[:limit])


SESSION_MODELS = ((MediaStream, "stream"), (Fork, "fork"), (Transcription, "transcription"))


def _session_steps(session) -> Iterator[tuple[datetime, str, str]]:
    yield session.requested_at, "requested", ""
    if session.started_at:
        yield session.started_at, "started", ""
    if session.stopped_at:
        verb = "failed" if session.status == "failed" else "stopped"
        yield session.stopped_at, verb, session.failure_reason


def _sessions(call: Call, cursor: Key | None, limit: int) -> Iterator[Entry]:
    entries = []
    for model, name in SESSION_MODELS:
        for session in model.objects.filter(call=call):
            for step, (at, verb, why) in enumerate(_session_steps(session)):
                # Three models share the source: pks are told apart by a step per model.
                key = Key(at, SESSION, session.pk, step * 3 + SESSION_MODELS.index((model, name)))
                if cursor is not None and key <= cursor:
                    continue
                what = getattr(session, "stream_url", "") or getattr(session, "engine", "")
                text = " ".join(p for p in (name, verb, what, why and f"({why})") if p)
                entries.append(
                    Entry(
                        key,
                        f"{name}.{verb}",
                        text,
                        model._meta.model_name,
                        session.pk,
                        public_id=getattr(session, "stream_id", ""),
                    )
                )
    return iter(sorted(entries, key=lambda e: e.key)[:limit])


def call_timeline(
    *,
    call: Call,
    cursor: str | None = None,
    limit: int = 100,
    partner=None,
    sources: frozenset[str] = frozenset(SOURCE_NAMES),
) -> Page:
    """One page of the call's timeline after ``cursor`` (``CursorInvalid`` if it is not one).

    ``partner``: only its own deliveries are shown (the call is already known to be its own).
    ``sources``: the sources to merge (``SOURCE_NAMES``); an operator sees those they may view.
    """
    after = Key.decode(cursor) if cursor else None
    # Each source gives at most limit + 1 entries after the cursor: enough to fill the page
    # and know whether there is more.
    take = limit + 1
    readers = {
        "event": lambda: _events(call, after, take),
        "session": lambda: _sessions(call, after, take),
        "dtmf": lambda: _dtmf(call, after, take),
        "segment": lambda: _segments(call, after, take),
        "command": lambda: _commands(call, after, take),
        "delivery": lambda: _deliveries(call, after, take, partner),
    }
    streams: Iterable[Iterator[Entry]] = [
        read() for name, read in readers.items() if name in sources
    ]
    entries = list(islice(merge(*streams, key=lambda e: e.key), take))
    more = len(entries) > limit
    entries = entries[:limit]
    return Page(entries, entries[-1].key.encode() if more and entries else None)


def _ms(at: datetime | None) -> str:
    return format_ms(at) if at else "-"


def format_ms(at: datetime) -> str:
    """UTC to the millisecond: ``2026-11-25 18:00:00.123``."""
    return at.astimezone(UTC).isoformat(sep=" ", timespec="milliseconds").removesuffix("+00:00")
