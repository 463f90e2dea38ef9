"""The command outbox: every call-control command callops sends to Telnyx goes through here.

``command_create`` validates and stores a command (and the intent on the call's records) and
enqueues it after commit. ``command_process`` is what the Celery task runs: claim the command,
take a slot from the fleet-wide rate limit, send it with the real SDK, classify the outcome
(``classify``: the one place a 429, a timeout or a "call has already ended" is decided) and
record it. Retries reuse the command's ``command_id``; a succeeded command is never sent again.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connections, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from callops import actions, logs, metrics, partner_events, prepared, queue, state
from callops.exceptions import CallopsError
from callops.models import DIAL_PLACEHOLDER, Call, CallSession, Command, CommandAttempt
from callops.ratelimit import Reservation, get_limiter

logger = logging.getLogger("callops.commands")

CALL_ENDED_CODE = "90018"
RETRYABLE_STATUSES = {408, 409}
MAX_SERVER_WAIT = 300.0  # never believe a rate-limit reset further away than this


class CallEnded(CallopsError):
    """The call has ended: Telnyx would refuse any command on it."""


class CommandConflict(CallopsError):
    """The same stop is already in flight for this stream, fork or transcription."""


def record_model(action: actions.TelnyxAction) -> type[CallSession]:
    """The model of the record an action creates or targets (``Command.stream`` -> MediaStream)."""
    return Command._meta.get_field(action.record).related_model


# --- Creating -------------------------------------------------------------------------------


def command_create(
    *,
    call: Call,
    action: str,
    params: dict[str, Any] | None = None,
    requested_by: str,
    client_state: str | None = None,
    target: CallSession | None = None,
) -> Command:
    """Validate, store and (after commit) enqueue one command. Raises ``ParamsInvalid``,
    ``CallEnded`` or ``CommandConflict`` before anything is written.

    ``target``: the stream, fork or transcription a stop command is about (so only one stop for
    it can be in flight)."""
    cleaned = actions.validate(action, params or {}, client_state)
    spec = actions.get(action)
    with transaction.atomic():
        call = Call.objects.select_for_update().get(pk=call.pk)
        if call.is_ended:
            raise CallEnded(f"call {call.call_control_id} has ended")
        _check_one_open(spec, call)
        if target is None:
            cleaned = _aim_stop(spec, call, cleaned)
        now = timezone.now()
        command = _new_command(call, action, cleaned, requested_by, now, client_state or "")
        if target is not None:
            setattr(command, spec.record, target)
        _record_intent(command, now)
        try:
            with transaction.atomic():
                command.save()
        except IntegrityError:
            raise CommandConflict(f"a {action} is already in flight for it") from None
        logs.on_commit(lambda: _enqueue_new(command))
    return command


def _check_one_open(spec: actions.TelnyxAction, call: Call) -> None:
    """One WebSocket stream or fork at a time per call (the table's ``one_open``): Telnyx's
    stream webhooks carry no stream_id, so two streams at once could not be told apart, and a
    fork replaces a stream. A second start is refused, never allowed to stop the first."""
    for record in spec.one_open:
        model = Command._meta.get_field(record).related_model
        open_ = model.objects.filter(call=call, status__in=state.OPEN).order_by("pk").first()
        if open_ is not None:
            raise CommandConflict(
                f"{model._meta.verbose_name} {open_.pk} is still {open_.status} on this call;"
                " stop it first"
            )


def _aim_stop(spec: actions.TelnyxAction, call: Call, params: dict) -> dict:
    """A stop that names no record (``streaming_stop`` without ``stream_id``) is aimed at the
    call's one open record when callops knows its id, so it stops that one and no other."""
    if not spec.target_by or any(param in params for param in spec.target_by):
        return params
    model = record_model(spec)
    open_ = list(model.objects.filter(call=call, status__in=state.OPEN)[:2])
    if len(open_) != 1:
        return params
    known = {param: getattr(open_[0], field) for param, field in spec.target_by.items()}
    return {**params, **known} if all(known.values()) else params


def _new_command(
    call: Call, action: str, params: dict, requested_by: str, now: datetime, client_state: str = ""
) -> Command:
    return Command(
        call=call,
        action=action,
        params=params,
        client_state=client_state,
        requested_by=requested_by,
        created_at=now,
        next_attempt_at=now,
        expires_at=now + timedelta(seconds=settings.TELNYX_COMMAND_MAX_AGE),
    )


def call_dial(
    *,
    params: dict[str, Any],
    requested_by: str,
    client_state: str | None = None,
) -> Command:
    """Place an outbound call: a Call that waits for Telnyx's answer to name it, and its dial
    command. Webhooks of the new call may arrive before that answer; ``state.call_adopt``
    merges whichever came first."""
    cleaned = actions.validate("dial", params, client_state)
    command_id = uuid.uuid4()
    with transaction.atomic():
        call = Call.objects.create(
            call_control_id=f"{DIAL_PLACEHOLDER}{command_id}",
            connection_id=cleaned["connection_id"],
            direction="outgoing",
            from_number=cleaned["from"],
            to_number=cleaned["to"],
            client_state=client_state or "",
        )
        now = timezone.now()
        command = _new_command(call, "dial", cleaned, requested_by, now, client_state or "")
        command.command_id = command_id
        _record_intent(command, now)
        if command.stream_id or command.transcription_id:
            call.autostarted_at = now  # media is inline: the answered-call policy adds none
            call.save(update_fields=["autostarted_at"])
        command.save()
        logs.on_commit(lambda: _enqueue_new(command))
    return command


def commands_create_stops(
    *, targets: list[tuple[CallSession, dict[str, Any]]], action: str, requested_by: str
) -> int:
    """Stop many streams, forks or transcriptions at once (the sweeper): one INSERT, one
    message. A target whose stop is already in flight is skipped by the database (the partial
    unique constraint), not by a race-prone check. Returns how many stops were created."""
    now = timezone.now()
    spec = actions.get(action)
    rows = []
    for session, params in targets:
        command = _new_command(
            session.call, action, actions.validate(action, params), requested_by, now
        )
        setattr(command, spec.record, session)
        rows.append(command)
    if not rows:
        return 0
    with transaction.atomic():
        Command.objects.bulk_create(rows, ignore_conflicts=True)
        created = list(
            Command.objects.filter(command_id__in=[r.command_id for r in rows]).values_list(
                "pk", flat=True
            )
        )
        if created:
            metrics.COMMANDS_CREATED.labels(action).inc(len(created))
            logs.on_commit(lambda: commands_enqueue(command_pks=created))
    return len(created)


# Set by ``held_for_sending``: the command this worker will send itself, with the log context
# it was created in.
_HELD: ContextVar[list[tuple[int, contextvars.Context]] | None] = ContextVar(
    "callops_held_command", default=None
)


@contextmanager
def held_for_sending() -> Iterator[list[tuple[int, contextvars.Context]]]:
    """Within the block, the first command created and committed is not published: it is
    kept, with its log context, for the caller to send once its own work is done
    (``commands_send_held``). An urgent drain sends the answer it created this way: no task
    message, and no wait for a free worker while every other one is busy; any further
    command is published as usual, so it goes in parallel on another worker."""
    held: list[tuple[int, contextvars.Context]] = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)


def commands_send_held(held: list[tuple[int, contextvars.Context]]) -> None:
    """Send each held command now, here, as the ``send_command`` task would (a turn to wait
    for is published to come back at). Never raises: if sending cannot even start, the
    command is published instead."""
    for command_pk, context in held:
        try:
            context.run(command_send, command_pk=command_pk)
        except Exception:
            logger.exception("command %s: could not send it inline; publishing it", command_pk)
            command_enqueue(command_pk=command_pk)


def command_send(
    *, command_pk: int, reserved_at: float | None = None, turn: str | None = None
) -> Next:
    """One visit of the sender: process the command, and publish it to come back when its
    turn or retry is due."""
    logs.bind(command=command_pk)
    step = command_process(command_pk=command_pk, reserved_at=reserved_at, turn=turn)
    if step.delay is not None:
        command_enqueue(command_pk=command_pk, countdown=step.delay, reserved_at=step.reserved_at)
    return step


def _enqueue_new(command: Command) -> None:
    metrics.COMMANDS_CREATED.labels(command.action).inc()
    held = _HELD.get()
    if held is not None and not held:
        held.append((command.pk, contextvars.copy_context()))
        return
    command_enqueue(command_pk=command.pk)


def commands_enqueue(*, command_pks: list[int]) -> None:
    """One message for many commands; a worker fans it out (see tasks.send_commands)."""
    try:
        queue.publish(queue.SEND_COMMANDS, command_pks)
    except Exception:
        logger.warning(
            "%d commands not enqueued (broker unavailable); repair will", len(command_pks)
        )


def _record_intent(command: Command, now: datetime) -> None:
    """A start creates the record its webhook will find, in ``requested`` (answer and dial:
    one for each medium they start inline); a stop that names its record by a parameter
    (``stream_id``) is tied to it."""
    spec, params = actions.get(command.action), command.params
    for start_name, (switch, body_key) in spec.inline.items():
        if params.get(switch):
            start = actions.get(start_name)
            body = params.get(body_key) or {} if body_key else params
            setattr(command, start.record, _create_record(start, command.call, body, now))
    if spec.record is None:
        return
    if spec.starts:
        setattr(command, spec.record, _create_record(spec, command.call, params, now))
    elif spec.target_by and all(params.get(param) for param in spec.target_by):
        lookup = {field: params[param] for param, field in spec.target_by.items()}
        model = record_model(spec)
        setattr(command, spec.record, model.objects.filter(call=command.call, **lookup).first())


def _create_record(start: actions.TelnyxAction, call: Call, body: dict, now: datetime):
    fields = {name: body.get(param, empty) for name, (param, empty) in start.intent.items()}
    return record_model(start).objects.create(call=call, requested_at=now, **fields)


def command_enqueue(
    *,
    command_pk: int,
    countdown: float = 0,
    reserved_at: float | None = None,
    turn: str | None = None,
):
    """Hand a command to a worker. Never raises: if the broker is down the command stays
    queued and ``commands_repair`` enqueues it again.

    A new command asks the rate limiter first: it goes with the turn it was given, or, under a
    burst, is published once to arrive at its ticket, instead of visiting a worker only to
    learn when to come back."""
    if reserved_at is None and turn is None and countdown <= 0:
        reserved_at, countdown, turn = _turn_or_ticket(command_pk)
    kwargs: dict[str, Any] = {}
    if reserved_at is not None:
        kwargs["reserved_at"] = reserved_at
    if turn is not None:
        kwargs["turn"] = turn
    try:
        queue.publish(queue.SEND_COMMAND, command_pk, countdown=countdown, **kwargs)
    except Exception:
        logger.warning("command %s not enqueued (broker unavailable); repair will", command_pk)
        if turn is not None:
            _best_effort("give back an unused turn", get_limiter().release, turn)


def _turn_or_ticket(command_pk: int) -> tuple[float | None, float, str | None]:
    """(None, 0, turn) with a turn to send now, or (ticket, seconds until it, None). Best
    effort: without the limiter, the worker asks it itself."""
    try:
        slot = get_limiter().reserve()
    except Exception:
        logger.warning("rate limiter unavailable: command %s goes without a turn", command_pk)
        return None, 0.0, None
    if slot.ready:
        return None, 0.0, slot.send
    # The repair task reads a queued command's next attempt: this one is waiting, not lost.
    Command.objects.filter(pk=command_pk, status=Command.Status.QUEUED).update(
        next_attempt_at=timezone.now() + timedelta(seconds=slot.delay)
    )
    return slot.at, slot.delay, None


# --- Classifying what Telnyx answered -------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: Literal["succeeded", "retry", "call_ended", "failed"]
    delay: float = 0.0  # seconds before the retry
    pause: float = 0.0  # seconds every worker must hold off (a 429)
    http_status: int | None = None
    code: str = ""
    title: str = ""
    detail: str = ""
    reason: str = ""
    # The request may have reached Telnyx without its answer reaching us (TELNYX.md section 6).
    unknown: bool = False
    data: Any = None  # what a succeeded command answered (dial: the new call's ids)
    settlement: str = ""  # how an unknown outcome was settled, and why
    stop_records: bool = False  # a start settled as failed: stop it in case Telnyx started it


def backoff(attempt: int, *, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(
        settings.TELNYX_BACKOFF_CAP, settings.TELNYX_BACKOFF_BASE * 2 ** max(0, attempt - 1)
    )
    return (rng or random).uniform(0, ceiling)


def server_wait(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds Telnyx asked us to wait, from ``retry-after-ms``, ``Retry-After`` (seconds or an
    HTTP date) or ``x-ratelimit-reset`` (seconds, or a Unix time); None if it did not say."""
    now = time.time() if now is None else now
    wait = None
    if value := headers.get("retry-after-ms"):
        wait = _number(value, per=1000)
    if wait is None and (value := headers.get("retry-after")):
        wait = _number(value)
        if wait is None:
            try:
                wait = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, IndexError):
                wait = None
    if wait is None and (value := headers.get("x-ratelimit-reset")):
        wait = _number(value)
        if wait is not None and wait > 1_000_000_000:  # an absolute Unix time
            wait -= now
    if wait is None:
        return None
    return min(max(wait, 0.0), MAX_SERVER_WAIT)


def _number(value: str, per: float = 1.0) -> float | None:
    try:
        number = float(value) / per
    except (TypeError, ValueError):
        return None
    return number if number == number and number != float("inf") else None


def classify(exc: BaseException | None, *, attempt: int) -> Outcome:
    """Decide what one attempt's result means. ``exc`` is what the SDK raised, or None."""
    # Imported here, not at the top: the web process imports this module to create commands and
    # must not pay the SDK's import (over a second and ~40 MiB); only workers send.
    import telnyx

    if exc is None:
        return Outcome("succeeded", http_status=200)
    if isinstance(exc, telnyx.APIStatusError):
        status = exc.status_code
        error = _first_error(exc.body)
        facts = {
            "http_status": status,
            "code": str(error.get("code") or "")[:16],
            "title": str(error.get("title") or "")[:255],
            "detail": str(error.get("detail") or ""),
        }
        if status == 429:
            wait = server_wait(exc.response.headers)
            delay = backoff(attempt) if wait is None else wait
            return Outcome("retry", delay=delay, pause=delay, reason="rate limited", **facts)
        if status in RETRYABLE_STATUSES:
            return Outcome("retry", delay=backoff(attempt), reason=f"HTTP {status}", **facts)
        if status >= 500:  # a gateway may have passed the request on before it failed
            reason = f"HTTP {status}"
            return Outcome("retry", delay=backoff(attempt), reason=reason, unknown=True, **facts)
        if status == 422 and facts["code"] == CALL_ENDED_CODE:
            return Outcome("call_ended", reason="call ended", **facts)
        return Outcome("failed", reason=f"refused by Telnyx (HTTP {status})", **facts)
    if isinstance(exc, telnyx.APITimeoutError):
        return Outcome("retry", delay=backoff(attempt), reason="timeout", unknown=True)
    if isinstance(exc, telnyx.APIConnectionError):
        # A reset after the request went out looks the same as a refused connection.
        return Outcome("retry", delay=backoff(attempt), reason="connection error", unknown=True)
    return Outcome("failed", reason=f"unexpected error: {type(exc).__name__}", detail=str(exc))


def _first_error(body: object) -> dict:
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return errors[0]
    return {}


# --- Sending --------------------------------------------------------------------------------

_client_cache: dict[tuple, Any] = {}


def telnyx_client():
    """One SDK client per worker process, created after the fork (httpx pools are not fork-safe)
    with the SDK's own retries off: retrying is ours, without blocking a worker in a sleep."""
    key = (os.getpid(), settings.TELNYX_API_KEY, settings.TELNYX_BASE_URL, settings.TELNYX_TIMEOUT)
    client = _client_cache.get(key)
    if client is None:
        import telnyx  # only workers get here; see classify() for why not at the top

        _client_cache.clear()
        client = _client_cache[key] = telnyx.Telnyx(
            api_key=settings.TELNYX_API_KEY,
            base_url=settings.TELNYX_BASE_URL,
            max_retries=0,
            timeout=settings.TELNYX_TIMEOUT,
        )
    return client


def _sdk_call(command: Command) -> tuple[Any, Any]:
    """Send the command with the SDK; return Telnyx's headers and its answer's ``data``."""
    spec = actions.get(command.action)
    client = telnyx_client()
    resource = client.calls.actions if spec.on_call else client.calls
    accepted = _parameters(type(resource), spec.sdk_method)
    kwargs: dict[str, Any] = {"command_id": str(command.command_id)}
    extra: dict[str, Any] = {}
    for name, value in command.params.items():
        if name in accepted:
            kwargs[name] = value
        elif f"{name}_" in accepted:  # the SDK spells dial's "from" as from_
            kwargs[f"{name}_"] = value
        else:  # parameters Telnyx takes that this SDK version does not name (actions.NOT_IN_SDK)
            extra[name] = value
    if command.client_state:
        kwargs["client_state"] = command.client_state
    if extra:
        kwargs["extra_body"] = extra
    args = (command.call.call_control_id,) if spec.on_call else ()
    # The raw response: its rate-limit headers say when to slow down before Telnyx refuses.
    raw = getattr(resource.with_raw_response, spec.sdk_method)(*args, **kwargs)
    # Telnyx's JSON as it came: building the SDK's typed model only to turn it back into a
    # dict cost a third of the SDK's share of a send's CPU.
    try:
        answer = raw.http_response.json()
    except ValueError:
        answer = None
    data = answer.get("data") if isinstance(answer, dict) else None
    return raw.headers, data


@functools.cache
def _parameters(resource: type, method: str) -> Mapping[str, inspect.Parameter]:
    """The keyword parameters an SDK method names (read once per process, not per send)."""
    return inspect.signature(getattr(resource, method)).parameters


@dataclass
class Next:
    """What the task should do after ``command_process``: nothing, or run again later."""

    delay: float | None = None
    reserved_at: float | None = None
    outcome: Outcome | None = field(default=None)


def _lease() -> timedelta:
    # Longer than one attempt can take (connect + read timeouts), so a live sender keeps it.
    return timedelta(seconds=settings.TELNYX_TIMEOUT * 2 + 2)


def command_claim(*, command_pk: int) -> Command | None:
    """Take the command for this worker to send now (counting the attempt), or None if it is
    done, early or held by another. The command comes with its call (the send names it); the
    records it creates or targets are read only if recording a failure needs them.

    A conditional UPDATE: of two workers holding the same message, exactly one gets the row.
    A ``sending`` command whose lease ran out belongs to a worker that died mid-send: its
    request may have reached Telnyx, so the outcome is unknown from then on.
    """
    now = timezone.now()
    due = now + timedelta(seconds=0.05)
    db = connections[DEFAULT_DB_ALIAS]  # once: each use of the ``connection`` proxy costs a lookup
    if db.vendor == "postgresql":
        return _claim_returning(db, command_pk, now, due)
    claimable = Q(status=Command.Status.QUEUED, next_attempt_at__lte=due)
    claimable |= Q(status=Command.Status.SENDING, lease_expires_at__lt=now)
    claimed = Command.objects.filter(claimable, pk=command_pk).update(
        outcome_unknown=Case(
            When(status=Command.Status.SENDING, then=Value(True)), default=F("outcome_unknown")
        ),
        status=Command.Status.SENDING,
        lease_expires_at=now + _lease(),
        attempts=F("attempts") + 1,
        sent_at=now,
        first_sent_at=Coalesce(F("first_sent_at"), Value(now)),
    )
    if not claimed:
        return None
    return Command.objects.select_related("call").get(pk=command_pk)


def _claim_returning(db, command_pk: int, now: datetime, due: datetime) -> Command | None:
    """The claim on PostgreSQL: the same conditional UPDATE, joined to the call and returning
    both rows, as one prepared statement (``callops.prepared``). The ORM's UPDATE and
    select_related SELECT were two round trips and most of a send's CPU, in compiling them
    and building the models."""
    sql, command_fields, converters = _claim_statement()
    params = {
        "pk": command_pk,
        "queued": Command.Status.QUEUED,
        "sending": Command.Status.SENDING,
        "now": now,
        "due": due,
        "lease": now + _lease(),
    }
    row = prepared.fetchone(db, sql, params)
    if row is None:
        return None
    values = list(row)
    for index, convert, expression in converters:
        values[index] = convert(values[index], expression, db)
    command = Command.from_db(db.alias, None, values[:command_fields])
    command.call = Call.from_db(db.alias, None, values[command_fields:])
    return command


@functools.cache
def _claim_statement() -> tuple[str, int, list[tuple[int, Any, Any]]]:
    """``_claim_returning``'s SQL, how many of its columns are the command's, and the
    converters its values need (a JSON column arrives as text), read once per process."""
    command, call = Command._meta, Call._meta
    columns = [(command, f) for f in command.concrete_fields]
    columns += [(call, f) for f in call.concrete_fields]
    alias = {command: "c", call: "k"}
    returning = ", ".join(f'{alias[meta]}."{f.column}"' for meta, f in columns)
    db = connections[DEFAULT_DB_ALIAS]
    converters = [
        (index, convert, col)
        for index, (meta, f) in enumerate(columns)
        for col in [f.get_col(meta.db_table)]
        for convert in [*db.ops.get_db_converters(col), *col.get_db_converters(db)]
    ]
    # Only table and column names are formatted in; every value is a bound parameter. SET
    # reads the row as it was: outcome_unknown turns on when a lapsed lease is taken over.
    sql = (
        f'UPDATE "{command.db_table}" AS c SET'  # noqa: S608
        " outcome_unknown = c.outcome_unknown OR c.status = %(sending)s,"
        " status = %(sending)s, lease_expires_at = %(lease)s, attempts = c.attempts + 1,"
        " sent_at = %(now)s, first_sent_at = COALESCE(c.first_sent_at, %(now)s)"
        f' FROM "{call.db_table}" AS k'
        " WHERE c.id = %(pk)s AND k.id = c.call_id"
        " AND ((c.status = %(queued)s AND c.next_attempt_at <= %(due)s)"
        " OR (c.status = %(sending)s AND c.lease_expires_at < %(now)s))"
        f" RETURNING {returning}"
    )
    return sql, len(command.concrete_fields), converters


def command_process(
    *, command_pk: int, reserved_at: float | None = None, turn: str | None = None
) -> Next:
    # The turn comes first: most visits during a burst only learn when to come back, and that
    # answer needs Redis alone, not the claim and release of the row (three round trips).
    # ``turn``: one the enqueuer already took for this command.
    limiter = get_limiter()
    slot = Reservation(at=0.0, delay=0.0, send=turn) if turn else _take_turn(limiter, reserved_at)
    if not slot.ready:
        # No sleeping in a worker: come back at the ticket. next_attempt_at tells the repair
        # task this command is waiting, not lost.
        Command.objects.filter(pk=command_pk, status=Command.Status.QUEUED).update(
            next_attempt_at=timezone.now() + timedelta(seconds=slot.delay)
        )
        return Next(delay=slot.delay, reserved_at=slot.at)

    command = command_claim(command_pk=command_pk)
    if command is not None:
        logs.bind(
            command_id=str(command.command_id),
            action=command.action,
            call_control_id=command.call.call_control_id,
        )
        if command.attempts == 1:
            delay = (command.first_sent_at - command.created_at).total_seconds()
            metrics.COMMAND_SEND_DELAY.observe(max(0.0, delay))
    if command is None:
        limiter.release(slot.send)  # the turn was not used: give it back
        # Held by a sender that may have died (this message is its redelivery): look again
        # when the lease runs out. Done, cancelled or not yet due: nothing to do.
        lease = (
            Command.objects.filter(pk=command_pk, status=Command.Status.SENDING)
            .values_list("lease_expires_at", flat=True)
            .first()
        )
        if lease is not None:
            return Next(delay=max(0.0, (lease - timezone.now()).total_seconds()) + 0.1)
        return Next()
    if _gave_up(command, attempts=command.attempts - 1):  # the claim counted this attempt
        limiter.release(slot.send)
        Command.objects.filter(pk=command.pk).update(attempts=F("attempts") - 1)
        _finish(command, Outcome("failed", reason="gave up"), failed=True)
        return Next()
    if command.outcome_unknown and not _inside_window(command):
        settled = command_settle(command=command)
        if settled is not None:
            limiter.release(slot.send)
            return command_record(command=command, outcome=settled)

    sent = time.monotonic()
    try:
        headers, data = _sdk_call(command)
    except Exception as exc:  # classified below; nothing escapes unrecorded
        outcome = classify(exc, attempt=command.attempts)
        if outcome.kind == "failed" and outcome.http_status is None:
            logger.exception("command %s: unexpected error", command.pk)
    else:
        outcome = Outcome("succeeded", http_status=200, data=data)
        _slow_down(headers)
    answered, answered_at = time.monotonic(), timezone.now()
    # The outcome is stored first: if Redis fails now, the command stays what Telnyx made it.
    # The turn still counts from when the answer came back, not from after the bookkeeping.
    step = command_record(command=command, outcome=outcome, answered_at=answered_at)
    _attempted(command, outcome, answered - sent)
    ago = time.monotonic() - answered
    _best_effort("release the rate-limit turn", limiter.complete, slot.send, ago)
    return step


def _take_turn(limiter, reserved_at: float | None) -> Reservation:
    """A turn now, or the ticket to come back at. A turn due within
    ``CALLOPS_RATE_LIMIT_INLINE_WAIT`` is waited for here: under a burst most ticket holders
    arrive a send's duration before the window has room, and sending them away with a new
    ticket would cost a task message and a database write each time, for a wait of a few ms."""
    slot = limiter.reserve(reserved_at)
    budget = settings.CALLOPS_RATE_LIMIT_INLINE_WAIT
    for _ in range(5):
        if slot.ready or not slot.delay <= budget:  # (a NaN setting never waits)
            break
        time.sleep(slot.delay)
        budget -= slot.delay
        slot = limiter.reserve(slot.at)
    return slot


def _attempt_log(command: Command, outcome: Outcome, answered_at: datetime) -> None:
    """Keep this send and its answer (``CommandAttempt``): the command itself keeps only the
    last. One INSERT per send, after the answer, so it never delays the send. Best effort: the
    outcome is recorded by then; only the timeline's detail would be missing."""
    db = connections[DEFAULT_DB_ALIAS]
    try:
        with _may_fail(db), db.cursor() as cursor:
            cursor.execute(
                _attempt_insert_sql(), _attempt_values(db, command, outcome, answered_at)
            )
    except Exception:
        logger.warning("command %s: attempt not logged", command.pk, exc_info=True)


def _may_fail(db) -> contextlib.AbstractContextManager:
    """Around a statement whose failure the caller survives: in autocommit nothing (the
    statement is its own transaction); in a caller's transaction (a test's) a savepoint, so
    the transaction goes on after it."""
    return contextlib.nullcontext() if db.get_autocommit() else transaction.atomic()


def _attempt_values(db, command: Command, outcome: Outcome, answered_at: datetime) -> list:
    error = " ".join(p for p in (outcome.reason, outcome.code, outcome.title) if p)
    adapt = db.ops.adapt_datetimefield_value
    return [
        command.pk,
        command.attempts,
        adapt(command.sent_at),
        adapt(answered_at),
        outcome.http_status,
        outcome.kind,
        error[:255],
    ]


@functools.cache
def _attempt_insert_sql() -> str:
    # A plain statement, not the ORM's create(), which cost several times its run time to
    # compile. Only names are formatted in; every value is a bound parameter.
    meta = CommandAttempt._meta
    names = ("command", "number", "sent_at", "answered_at", "http_status", "outcome", "error")
    columns = ", ".join(f'"{meta.get_field(name).column}"' for name in names)
    placeholders = ", ".join(["%s"] * len(names))
    return f'INSERT INTO "{meta.db_table}" ({columns}) VALUES ({placeholders})'  # noqa: S608


def _attempted(command: Command, outcome: Outcome, seconds: float) -> None:
    """The outbound call's log line and its metrics."""
    metrics.COMMAND_ANSWER.observe(seconds)
    metrics.COMMAND_ATTEMPTS.labels(command.action, outcome.kind).inc()
    if outcome.http_status == 429:
        metrics.TELNYX_RATE_LIMITED.inc()
    logger.info(
        "telnyx %s attempt %d: %s (HTTP %s) in %.3f s",
        command.action,
        command.attempts,
        outcome.reason or outcome.kind,
        outcome.http_status or "-",
        seconds,
        extra={"outcome": outcome.kind, "http_status": outcome.http_status},
    )


def _inside_window(command: Command) -> bool:
    """Would a re-send, with this command's command_id, reach Telnyx while Telnyx still
    remembers the first one? (It forgets a command_id 60 s after it; TELNYX.md section 2.)"""
    window = timedelta(seconds=settings.TELNYX_COMMAND_ID_WINDOW)
    latest_arrival = timezone.now() + timedelta(seconds=settings.TELNYX_TIMEOUT)
    return command.first_sent_at is not None and latest_arrival < command.first_sent_at + window


def command_settle(*, command: Command) -> Outcome | None:
    """Decide a command whose outcome is unknown, once a re-send could no longer be deduped by
    Telnyx: from the webhooks its action produces, else by its action's rule. Returns the
    outcome to record, or None: send it again (a second copy is harmless)."""
    spec = actions.get(command.action)
    call = Call.objects.get(pk=command.call_id)
    evidence = ", ".join(spec.confirmed_by)
    if _confirmed(spec, command, call):
        return Outcome("succeeded", settlement=f"applied: {evidence} arrived")
    if call.is_ended:
        return Outcome("call_ended", reason="call ended", settlement="the call ended meanwhile")
    if spec.after_window == "resend":
        Command.objects.filter(pk=command.pk).update(
            settlement="outcome unknown after the command_id window; sent again (harmless)"
        )
        return None
    why = (
        f"outcome unknown and no {evidence or 'evidence'} within Telnyx's"
        f" {settings.TELNYX_COMMAND_ID_WINDOW:g} s command_id window; not sent again"
    )
    return Outcome("failed", reason="outcome unknown", settlement=why, stop_records=spec.starts)


def _confirmed(spec: actions.TelnyxAction, command: Command, call: Call) -> bool:
    names = dict.fromkeys(name for name in (*spec.records, spec.record) if name)
    records = [record for name in names if (record := getattr(command, name)) is not None]
    for record in records:
        record.refresh_from_db()
    match spec.confirms:
        case "record_started":
            return any(r.started_at is not None for r in records)
        case "record_stopped":
            return any(r.stopped_at is not None for r in records)
        case "call_answered":
            return call.answered_at is not None
        case "call_ended":
            return call.ended_at is not None
    return False


def _slow_down(headers: Any) -> None:
    """A success that used the last request Telnyx allows pauses every worker until Telnyx's
    reset, before Telnyx has to answer 429, when Telnyx's limit is below ours
    (``TELNYX_RATE_LIMIT``). At or above it, the fleet-wide limiter already paces the sends
    (and Telnyx's whole-second reset would idle the fleet for most of each window)."""
    remaining = _number(headers.get("x-ratelimit-remaining") or "")
    limit = _number(headers.get("x-ratelimit-limit") or "")
    if remaining is None or remaining > 0 or limit is None or limit >= settings.TELNYX_RATE_LIMIT:
        return
    if wait := server_wait(headers):
        logger.warning(
            "Telnyx allows %g requests per window, TELNYX_RATE_LIMIT is %g: pausing %.2f s",
            limit,
            settings.TELNYX_RATE_LIMIT,
            wait,
        )
        _best_effort("pause for Telnyx's rate limit", get_limiter().pause, wait)


def _best_effort(what: str, func, *args) -> None:
    """Bookkeeping that must not undo a recorded outcome when Redis is unavailable."""
    try:
        func(*args)
    except Exception:
        logger.warning("could not %s (the rate limiter is unavailable)", what, exc_info=True)


def _gave_up(command: Command, delay: float = 0.0, attempts: int | None = None) -> bool:
    attempts = command.attempts if attempts is None else attempts
    return attempts >= settings.TELNYX_COMMAND_MAX_ATTEMPTS or (
        timezone.now() + timedelta(seconds=delay) > command.expires_at
    )


def command_record(
    *, command: Command, outcome: Outcome, answered_at: datetime | None = None
) -> Next:
    """Store an attempt's outcome and apply what it means to the call's records.

    ``answered_at``: when Telnyx's answer to the attempt came back (None: nothing was sent, a
    settlement); the attempt is kept too (``CommandAttempt``)."""
    if outcome.kind == "retry":
        if _gave_up(command, outcome.delay):
            reason = f"gave up after {outcome.reason}"
            _finish(command, outcome, failed=True, reason=reason, answered_at=answered_at)
            step = Next(outcome=outcome)
        else:
            retry_at = timezone.now() + timedelta(seconds=outcome.delay)
            unknown = {"outcome_unknown": True} if outcome.unknown else {}
            Command.objects.filter(pk=command.pk, status=Command.Status.SENDING).update(
                status=Command.Status.QUEUED,
                next_attempt_at=retry_at,
                lease_expires_at=None,
                **unknown,
                **_error_fields(outcome),
            )
            if answered_at is not None:
                _attempt_log(command, outcome, answered_at)
            logger.info(
                "command %s: %s, retry in %.2f s", command.pk, outcome.reason, outcome.delay
            )
            step = Next(delay=outcome.delay, outcome=outcome)
        if outcome.pause:
            _best_effort("pause for Telnyx's 429", get_limiter().pause, outcome.pause)
        return step
    _finish(command, outcome, failed=outcome.kind != "succeeded", answered_at=answered_at)
    return Next(outcome=outcome)


def _error_fields(outcome: Outcome, reason: str | None = None) -> dict[str, Any]:
    return {
        "last_http_status": outcome.http_status,
        "error_code": outcome.code,
        "error_title": outcome.title,
        "error_detail": outcome.detail,
        "failure_reason": (reason if reason is not None else outcome.reason)[:255],
    }


def _finish(
    command: Command,
    outcome: Outcome,
    *,
    failed: bool,
    reason: str | None = None,
    answered_at: datetime | None = None,
) -> None:
    """Record a final outcome, and the attempt that got it when ``answered_at`` is given."""
    now = timezone.now()
    spec = actions.get(command.action)
    fields = {
        "status": Command.Status.FAILED if failed else Command.Status.SUCCEEDED,
        "finished_at": now,
        "lease_expires_at": None,
        **({"settlement": outcome.settlement[:255]} if outcome.settlement else {}),
        **_error_fields(outcome, "" if not failed else reason),
    }
    # Each connection's endpoints are read once here, whichever branch below reads them.
    with partner_events.looked_up_once():
        if not failed and not _more_to_record(spec, command):
            # The row is the whole record (most sends): in autocommit, with the attempt.
            if _update_unfinished(command.pk, fields, command, outcome, answered_at):
                metrics.COMMANDS_FINISHED.labels(command.action, "succeeded").inc()
            return
        _finish_in_transaction(
            command, outcome, spec, fields, failed=failed, reason=reason, now=now
        )
    if answered_at is not None:
        _attempt_log(command, outcome, answered_at)


def _more_to_record(spec: actions.TelnyxAction, command: Command) -> bool:
    """Does a success change more than the command's row: the placed call of a dial, the
    records of a stop no webhook confirms, or a partner event?"""
    return (
        not spec.on_call
        or (spec.is_stop and not spec.confirmed_by)
        or bool(partner_events.endpoints_for(command.call.connection_id))
    )


def _update_unfinished(
    command_pk: int,
    fields: dict[str, Any],
    command: Command | None = None,
    outcome: Outcome | None = None,
    answered_at: datetime | None = None,
) -> bool:
    """Set ``fields`` on the command unless it is finished already (cancelled meanwhile, or
    recorded by another worker): True if it was not. With ``answered_at``, the attempt is
    kept too (``_attempt_log``): on PostgreSQL in the same statement, in autocommit.

    Plain statements: the ORM's UPDATE of the same cost more CPU to compile than it takes to
    run."""
    db = connections[DEFAULT_DB_ALIAS]
    names = tuple(fields)
    values = [Command._meta.get_field(name).get_db_prep_save(fields[name], db) for name in names]
    values += [command_pk, Command.Status.SENDING, Command.Status.QUEUED]
    if answered_at is not None and db.vendor == "postgresql":
        attempt = _attempt_values(db, command, outcome, answered_at)
        sql = _update_unfinished_sql(names, with_attempt=True)
        try:
            with _may_fail(db):
                return prepared.fetchone(db, sql, values + attempt)[0] > 0
        except DatabaseError:  # the attempt could not be kept: the outcome alone, as below
            logger.warning("command %s: attempt not kept with its outcome", command_pk)
    with db.cursor() as cursor:
        cursor.execute(_update_unfinished_sql(names), values)
        updated = cursor.rowcount > 0
    if answered_at is not None:
        _attempt_log(command, outcome, answered_at)
    return updated


@functools.cache
def _update_unfinished_sql(names: tuple[str, ...], with_attempt: bool = False) -> str:
    meta = Command._meta
    assignments = ", ".join(f'"{meta.get_field(name).column}" = %s' for name in names)
    # Only names are formatted in; every value is a bound parameter.
    update = f'UPDATE "{meta.db_table}" SET {assignments} WHERE id = %s AND status IN (%s, %s)'  # noqa: S608
    if not with_attempt:
        return update
    # One statement, one commit. A data-modifying WITH runs whether or not it is read.
    counted = "RETURNING (SELECT count(*) FROM finished)"
    return f"WITH finished AS ({update} RETURNING 1) {_attempt_insert_sql()} {counted}"


def _finish_in_transaction(
    command: Command,
    outcome: Outcome,
    spec: actions.TelnyxAction,
    fields: dict[str, Any],
    *,
    failed: bool,
    reason: str | None,
    now: datetime,
) -> None:
    # The records this command created, by the Command field that points at each (read now:
    # only a failure changes them).
    created = {name: getattr(command, name) for name in spec.records} if failed else {}
    created = {name: record for name, record in created.items() if record is not None}
    sessions = list(created.values())
    with transaction.atomic():
        if not _update_unfinished(command.pk, fields):
            return  # cancelled meanwhile, or recorded by another worker
        ended = "call_ended" if outcome.kind == "call_ended" else "failed"
        metrics.COMMANDS_FINISHED.labels(command.action, ended if failed else "succeeded").inc()
        if outcome.kind == "call_ended":
            call = Call.objects.select_for_update().get(pk=command.call_id)
            for session in sessions:  # what it would have started never started: say why
                session.refresh_from_db()
                if session.started_at is None and not session.failure_reason:
                    session.failure_reason = "never started: the call had ended"
            state.call_mark_ended(call=call, at=now)
            for session in sessions:
                state.session_save(call, session, now)
            call.save()
        elif not spec.on_call:  # dial: Telnyx named the call it placed, or placed none
            placeholder = Call.objects.select_for_update().get(pk=command.call_id)
            if failed:
                state.call_mark_ended(call=placeholder, at=now)
                placeholder.save()
            elif isinstance(outcome.data, dict) and outcome.data.get("call_control_id"):
                state.call_adopt(placeholder, named=outcome.data)
        elif failed and sessions:
            Call.objects.select_for_update().get(pk=command.call_id)  # the lock, as for events
            for session in sessions:
                state.session_fail(session, f"{reason or outcome.reason}: {outcome.title}", now)
            if outcome.stop_records:
                for name, session in created.items():
                    stop = actions.STOPS[name]
                    params = stop.params_for_stop_of(session)
                    commands_create_stops(
                        targets=[(session, params)],
                        action=stop.name,
                        requested_by=Command.RequestedBy.SCHEDULE,
                    )
        elif not failed and spec.is_stop and not spec.confirmed_by:
            # A stop no webhook confirms (transcription_stop): Telnyx's 200 is the evidence.
            call = Call.objects.select_for_update().get(pk=command.call_id)
            state.sessions_stop(record_model(spec).objects.filter(call=call), now)
        partner_events.command_finished(command=command, failed=failed, at=now)


# --- Operators and repair -------------------------------------------------------------------


def command_retry(*, command: Command) -> bool:
    """An operator's "retry now" on a failed command: a fresh window of attempts."""
    now = timezone.now()
    with transaction.atomic():
        retried = Command.objects.filter(pk=command.pk, status=Command.Status.FAILED).update(
            status=Command.Status.QUEUED,
            attempts=0,
            next_attempt_at=now,
            expires_at=now + timedelta(seconds=settings.TELNYX_COMMAND_MAX_AGE),
            finished_at=None,
            failure_reason="",
        )
        if retried:
            command.refresh_from_db()
            if actions.get(command.action).starts:
                # The refused start left its record failed; the new attempt gets a new one.
                command.stream = command.fork = command.transcription = None
                _record_intent(command, now)
                command.save(update_fields=["stream", "fork", "transcription"])
            logs.on_commit(lambda: command_enqueue(command_pk=command.pk))
    return bool(retried)


def command_cancel(*, command: Command) -> bool:
    """Cancel a command no worker has sent yet."""
    with transaction.atomic():
        cancelled = Command.objects.filter(pk=command.pk, status=Command.Status.QUEUED).update(
            status=Command.Status.CANCELLED, finished_at=timezone.now()
        )
        spec = actions.get(command.action)
        # What it would have started (a start's record, or an answer's inline ones) never
        # will: failed, so no webhook is ever paired with it (events._repair relies on it).
        sessions = [s for name in spec.records if (s := getattr(command, name)) is not None]
        if cancelled and sessions:
            Call.objects.select_for_update().get(pk=command.call_id)  # the lock, as for events
            for session in sessions:
                state.session_fail(session, "command cancelled", timezone.now())
    return bool(cancelled)


def commands_repair(*, limit: int = 500) -> int:
    """Re-enqueue commands a lost message or a dead worker left behind. Returns how many."""
    now = timezone.now()
    grace = timedelta(seconds=settings.CALLOPS_STUCK_COMMAND_GRACE)
    stuck = Command.objects.filter(
        Q(status=Command.Status.QUEUED, next_attempt_at__lt=now - grace)
        | Q(status=Command.Status.SENDING, lease_expires_at__lt=now)
    ).values_list("pk", flat=True)[:limit]
    pks = list(stuck)
    for pk in pks:
        command_enqueue(command_pk=pk)
    if pks:
        logger.warning("repair: re-enqueued %d stuck commands", len(pks))
    return len(pks)
