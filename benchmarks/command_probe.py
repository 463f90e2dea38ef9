"""The real Celery app plus a probe, for the workers of ``command_throughput.py``.

    celery -A benchmarks.command_probe worker ...

Same app, settings and tasks as ``celery -A config``; it writes a line per task message received
and per task run (so the benchmark counts messages and task times with Celery's own "received" /
"succeeded" lines left off, as in production), one per limiter decision and one per scheduled
task start, so the benchmark can tell where a command's time went:

- ``cmdbench received NAME`` (the worker's main process) and ``cmdbench done NAME SECONDS
  RESULT`` (its pool process): a task message and how long its task ran;
- ``probe start late_ms=X``: how long after its ETA a scheduled task started in a pool child
  (Celery's timer, a busy pool, a backlog in the queue ahead of it);
- ``probe reserve KIND late_ms=X delay_ms=Y``: what the limiter said. KIND is ``new-ready`` /
  ``new-ticket`` for a first try, and for a ticket holder coming back ``holder-ready``,
  ``holder-early`` (came back more than 1 ms before its ticket) or ``holder-no-room`` (the
  window was still full at its ticket: it gets a new one). ``late_ms`` is how long after its
  ticket the holder asked.

The lines are written straight to the worker's log (``os.write``), not through ``logging``: a
line through callops' formatter costs many times a plain write, there are several per command,
and the worker CPU the benchmark prints would include its own probe. By default nothing else
changes: the wrapper calls the limiter and returns its answer.

``CMDBENCH_VARIANTS`` (comma separated) turns on experiments, candidate changes to callops
tried here before anyone edits it (``command_throughput.py --variant``):

- ``scheduled-queue``: a command rescheduled to a later time (a limiter ticket, a retry) is
  published to its own queue, ``callops.scheduled``, which the workers consume next to
  ``callops``; a woken ticket holder no longer waits behind a burst of new commands.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime

from celery.signals import task_postrun, task_prerun, task_received, worker_process_init

from callops import ratelimit
from config.celery_app import app

__all__ = ["app"]

SCHEDULED_QUEUE = "callops.scheduled"
VARIANTS = {v for v in os.environ.get("CMDBENCH_VARIANTS", "").split(",") if v}

logger = logging.getLogger("cmdbench.probe")
_reserve = ratelimit.RedisRateLimiter.reserve


def _write(line: str) -> None:
    """One line to the worker's log file (its stderr, shared by the pool processes): one
    write of a whole line, so lines of several processes never mix."""
    os.write(2, f"{line}\n".encode())


def _log_reserve(slot: ratelimit.Reservation, reserved_at: float | None) -> None:
    if reserved_at is None:
        kind, late = ("new-ready" if slot.ready else "new-ticket"), 0.0
    else:
        late = time.time() * 1000 - reserved_at
        if slot.ready:
            kind = "holder-ready"
        elif slot.at == reserved_at:
            kind = "holder-early"
        else:
            kind = "holder-no-room"
    _write(f"probe reserve {kind} late_ms={late:.2f} delay_ms={slot.delay * 1000:.2f}")


def _probed_reserve(self, reserved_at: float | None = None) -> ratelimit.Reservation:
    slot = _reserve(self, reserved_at)
    _log_reserve(slot, reserved_at)
    return slot


ratelimit.RedisRateLimiter.reserve = _probed_reserve


_original_enqueue = None


def _enqueue_scheduled(
    *, command_pk: int, countdown: float = 0, reserved_at: float | None = None
) -> None:
    from callops.tasks import send_command

    if countdown <= 0:
        return _original_enqueue(
            command_pk=command_pk, countdown=countdown, reserved_at=reserved_at
        )
    kwargs = {} if reserved_at is None else {"reserved_at": reserved_at}
    try:
        send_command.apply_async(
            (command_pk,), kwargs, countdown=countdown, retry=False, queue=SCHEDULED_QUEUE
        )
    except Exception:
        logger.warning("command %s not enqueued (broker unavailable)", command_pk)


@worker_process_init.connect
def _install_variants(**_) -> None:
    """In each pool child, once Django is set up (callops.commands needs the app registry)."""
    if "scheduled-queue" in VARIANTS:
        from callops import commands

        # callops.tasks calls ``commands.command_enqueue`` through the module: this takes effect.
        global _original_enqueue
        _original_enqueue = commands.command_enqueue
        commands.command_enqueue = _enqueue_scheduled


@task_received.connect
def _received(request=None, **_) -> None:
    _write(f"cmdbench received {request.name}")


_running: dict[str, float] = {}  # task id -> when it started (monotonic)


@task_prerun.connect
def _started(task=None, task_id: str = "", **_) -> None:
    _running[task_id] = time.monotonic()
    eta = getattr(task.request, "eta", None)
    if not eta:
        return
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    _write(f"probe start late_ms={(time.time() - eta.timestamp()) * 1000:.2f}")


@task_postrun.connect
def _done(task=None, task_id: str = "", retval=None, **_) -> None:
    started = _running.pop(task_id, None)
    if started is not None:
        _write(f"cmdbench done {task.name} {time.monotonic() - started:.6f}s: {retval!r}")
