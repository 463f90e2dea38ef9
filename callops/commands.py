"""The command outbox: every call-control command callops sends to Telnyx goes through here.

``command_create`` validates and stores a command (and the intent on the call's records) and
enqueues it after commit. ``command_process`` is what the Celery task runs: claim the command,
take a slot from the fleet-wide rate limit, send it with the real SDK, classify the outcome
(``classify``: the one place a 429, a timeout or a "call has already ended" is decided) and
record it. Retries reuse the command's ``command_id``; a succeeded command is never sent again.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from callops import actions, queue, state
from callops.exceptions import CallopsError
from callops.models import Call, CallSession, Command
from callops.ratelimit import get_limiter

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
        transaction.on_commit(lambda: command_enqueue(command_pk=command.pk))
    return command


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
            transaction.on_commit(lambda: commands_enqueue(command_pks=created))
    return len(created)


def commands_enqueue(*, command_pks: list[int]) -> None:
    """One message for many commands; a worker fans it out (see tasks.send_commands)."""
    try:
        queue.publish(queue.SEND_COMMANDS, command_pks)
    except Exception:
        logger.warning(
            "%d commands not enqueued (broker unavailable); repair will", len(command_pks)
        )


def _record_intent(command: Command, now: datetime) -> None:
    """A start creates the record its webhook will find, in ``requested``; a stop that names
    its record by a parameter (``stream_id``) is tied to it."""
    spec, params = actions.get(command.action), command.params
    if spec.record is None:
        return
    model = record_model(spec)
    if spec.starts:
        fields = {name: params.get(param, empty) for name, (param, empty) in spec.intent.items()}
        record = model.objects.create(call=command.call, requested_at=now, **fields)
        setattr(command, spec.record, record)
    elif spec.target_by and all(params.get(param) for param in spec.target_by):
        lookup = {field: params[param] for param, field in spec.target_by.items()}
        setattr(command, spec.record, model.objects.filter(call=command.call, **lookup).first())


def command_enqueue(*, command_pk: int, countdown: float = 0, reserved_at: float | None = None):
    """Hand a command to a worker. Never raises: if the broker is down the command stays
    queued and ``commands_repair`` enqueues it again."""
    kwargs = {} if reserved_at is None else {"reserved_at": reserved_at}
    try:
        queue.publish(queue.SEND_COMMAND, command_pk, countdown=countdown, **kwargs)
    except Exception:
        logger.warning("command %s not enqueued (broker unavailable); repair will", command_pk)


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
        if status in RETRYABLE_STATUSES or status >= 500:
            return Outcome("retry", delay=backoff(attempt), reason=f"HTTP {status}", **facts)
        if status == 422 and facts["code"] == CALL_ENDED_CODE:
            return Outcome("call_ended", reason="call ended", **facts)
        return Outcome("failed", reason=f"refused by Telnyx (HTTP {status})", **facts)
    if isinstance(exc, telnyx.APITimeoutError):
        return Outcome("retry", delay=backoff(attempt), reason="timeout")
    if isinstance(exc, telnyx.APIConnectionError):
        return Outcome("retry", delay=backoff(attempt), reason="connection error")
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


def _sdk_call(command: Command) -> None:
    method = getattr(telnyx_client().calls.actions, actions.get(command.action).sdk_method)
    accepted = inspect.signature(method).parameters
    kwargs: dict[str, Any] = {"command_id": str(command.command_id)}
    extra: dict[str, Any] = {}
    for name, value in command.params.items():
        # Parameters Telnyx takes that this SDK version does not name (fork ``target``).
        (kwargs if name in accepted else extra)[name] = value
    if command.client_state:
        kwargs["client_state"] = command.client_state
    if extra:
        kwargs["extra_body"] = extra
    method(command.call.call_control_id, **kwargs)


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
    done, early or held by another.

    A conditional UPDATE: of two workers holding the same message, exactly one gets the row.
    A ``sending`` command whose lease ran out belongs to a worker that died mid-send.
    """
    now = timezone.now()
    claimable = Q(status=Command.Status.QUEUED, next_attempt_at__lte=now + timedelta(seconds=0.05))
    claimable |= Q(status=Command.Status.SENDING, lease_expires_at__lt=now)
    claimed = Command.objects.filter(claimable, pk=command_pk).update(
        status=Command.Status.SENDING,
        lease_expires_at=now + _lease(),
        attempts=F("attempts") + 1,
        sent_at=now,
    )
    if not claimed:
        return None
    return Command.objects.select_related("call").get(pk=command_pk)


def command_process(*, command_pk: int, reserved_at: float | None = None) -> Next:
    # The turn comes first: most visits during a burst only learn when to come back, and that
    # answer needs Redis alone, not the claim and release of the row (three round trips).
    limiter = get_limiter()
    slot = limiter.reserve(reserved_at)
    if not slot.ready:
        # No sleeping in a worker: come back at the ticket. next_attempt_at tells the repair
        # task this command is waiting, not lost.
        Command.objects.filter(pk=command_pk, status=Command.Status.QUEUED).update(
            next_attempt_at=timezone.now() + timedelta(seconds=slot.delay)
        )
        return Next(delay=slot.delay, reserved_at=slot.at)

    command = command_claim(command_pk=command_pk)
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

    try:
        _sdk_call(command)
    except Exception as exc:  # classified below; nothing escapes unrecorded
        outcome = classify(exc, attempt=command.attempts)
        if outcome.kind == "failed" and outcome.http_status is None:
            logger.exception("command %s: unexpected error", command.pk)
    else:
        outcome = classify(None, attempt=command.attempts)
    finally:
        limiter.complete(slot.send)
    return command_record(command=command, outcome=outcome)


def _gave_up(command: Command, delay: float = 0.0, attempts: int | None = None) -> bool:
    attempts = command.attempts if attempts is None else attempts
    return attempts >= settings.TELNYX_COMMAND_MAX_ATTEMPTS or (
        timezone.now() + timedelta(seconds=delay) > command.expires_at
    )


def command_record(*, command: Command, outcome: Outcome) -> Next:
    """Store an attempt's outcome and apply what it means to the call's records."""
    if outcome.kind == "retry":
        if outcome.pause:
            get_limiter().pause(outcome.pause)
        if _gave_up(command, outcome.delay):
            _finish(command, outcome, failed=True, reason=f"gave up after {outcome.reason}")
            return Next(outcome=outcome)
        retry_at = timezone.now() + timedelta(seconds=outcome.delay)
        Command.objects.filter(pk=command.pk, status=Command.Status.SENDING).update(
            status=Command.Status.QUEUED,
            next_attempt_at=retry_at,
            lease_expires_at=None,
            **_error_fields(outcome),
        )
        logger.info("command %s: %s, retry in %.2f s", command.pk, outcome.reason, outcome.delay)
        return Next(delay=outcome.delay, outcome=outcome)
    _finish(command, outcome, failed=outcome.kind != "succeeded")
    return Next(outcome=outcome)


def _error_fields(outcome: Outcome, reason: str | None = None) -> dict[str, Any]:
    return {
        "last_http_status": outcome.http_status,
        "error_code": outcome.code,
        "error_title": outcome.title,
        "error_detail": outcome.detail,
        "failure_reason": (reason if reason is not None else outcome.reason)[:255],
    }


def _finish(command: Command, outcome: Outcome, *, failed: bool, reason: str | None = None):
    now = timezone.now()
    spec = actions.get(command.action)
    session = getattr(command, spec.record) if spec.record else None
    touches_call = (
        outcome.kind == "call_ended"
        or (failed and session is not None and spec.starts)
        or (not failed and spec.record is not None and not spec.confirmed_by and spec.is_stop)
    )
    with transaction.atomic():
        updated = Command.objects.filter(
            pk=command.pk, status__in=[Command.Status.SENDING, Command.Status.QUEUED]
        ).update(
            status=Command.Status.FAILED if failed else Command.Status.SUCCEEDED,
            finished_at=now,
            lease_expires_at=None,
            **_error_fields(outcome, "" if not failed else reason),
        )
        if not updated or not touches_call:
            return  # cancelled meanwhile, recorded by another worker, or nothing else to do
        call = Call.objects.select_for_update().get(pk=command.call_id)
        if outcome.kind == "call_ended":
            state.call_mark_ended(call=call, at=now)
            call.save()
        elif failed:
            state.session_fail(session, f"{reason or outcome.reason}: {outcome.title}", now)
        else:
            # A stop no webhook confirms (transcription_stop): Telnyx's 200 is the evidence.
            state.sessions_stop(record_model(spec).objects.filter(call=call), now)


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
            transaction.on_commit(lambda: command_enqueue(command_pk=command.pk))
    return bool(retried)


def command_cancel(*, command: Command) -> bool:
    """Cancel a command no worker has sent yet."""
    with transaction.atomic():
        cancelled = Command.objects.filter(pk=command.pk, status=Command.Status.QUEUED).update(
            status=Command.Status.CANCELLED, finished_at=timezone.now()
        )
        spec = actions.get(command.action)
        session = getattr(command, spec.record) if spec.record else None
        if cancelled and session is not None and spec.starts:
            Call.objects.select_for_update().get(pk=command.call_id)  # the lock, as for events
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
