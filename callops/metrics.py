"""Prometheus metrics counted by the processes themselves (the web workers and Celery's).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``config.settings``), ``prometheus-client`` runs in its
multi-process mode: every process writes its counters to memory-mapped files in that directory,
and ``/metrics`` (``callops.views.metrics``) adds up the files of all of them, gunicorn's
workers and Celery's pool processes alike, the dead ones' counts included. Without it each
process counts for itself (a test, a shell).

Cost: an increment or an observation is a write to a memory-mapped file under a lock of the
process's own; no database, no broker, no lock another process waits on. The webhook and the
drains call these once per request or per batch (benchmarks/webhook_cost.py measures it).
What comes from the database (pending events, open streams, backlogs, the beat's heartbeat) is
not counted here: ``callops.gauges`` reads it at scrape time.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, multiprocess, values

# Files are named by process: the host name too, so a directory shared by the containers of
# one host (whose pids all start at 1) cannot mix two processes' counts. No "_": the collector
# splits file names on it.
_HOST = socket.gethostname().replace("_", "-")
_ids: dict[int, str] = {}


def _process_id(pid: int | None = None) -> str:
    # Called on every increment (prometheus-client checks for a fork): the name is built once
    # per process, not each time.
    pid = os.getpid() if pid is None else pid
    name = _ids.get(pid)
    if name is None:
        name = _ids[pid] = f"{_HOST}-{pid}"
    return name


MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
if MULTIPROCESS:
    values.ValueClass = values.MultiProcessValue(_process_id)

# Telnyx gives a webhook 2 s; most are answered in milliseconds.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# From arrival to applied, and from created to sent: tens of milliseconds to a backlog's minutes.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

WEBHOOKS_RECEIVED = Counter(
    "callops_webhooks_received_total",
    "Authentic Telnyx webhooks stored, duplicates included, by event type",
    ["event_type"],
)
WEBHOOKS_DUPLICATED = Counter(
    "callops_webhooks_duplicated_total",
    "Authentic Telnyx webhooks whose event was already stored (a redelivery)",
)
WEBHOOKS_REJECTED = Counter(
    "callops_webhooks_rejected_total",
    "Webhook requests answered 4xx or 503, by reason",
    ["reason"],
)
WEBHOOK_ACK = Histogram(
    "callops_webhook_ack_seconds",
    "Time the webhook view took to answer Telnyx",
    buckets=ACK_BUCKETS,
)
EVENTS_APPLIED = Counter(
    "callops_events_applied_total",
    "Webhook events a drain finished with, by verdict (processed, ignored, failed)",
    ["status"],
)
EVENT_APPLY_LAG = Histogram(
    "callops_event_apply_lag_seconds",
    "From a webhook's arrival to its event being applied",
    buckets=LAG_BUCKETS,
)
COMMANDS_CREATED = Counter(
    "callops_commands_created_total", "Commands stored in the outbox, by action", ["action"]
)
COMMAND_ATTEMPTS = Counter(
    "callops_command_attempts_total",
    "Commands sent to Telnyx, by action and what the attempt came to"
    " (succeeded, retry, call_ended, failed)",
    ["action", "result"],
)
COMMANDS_FINISHED = Counter(
    "callops_commands_finished_total",
    "Commands done, by action and outcome (succeeded, failed, call_ended)",
    ["action", "outcome"],
)
COMMAND_SEND_DELAY = Histogram(
    "callops_command_send_delay_seconds",
    "From a command's creation to its first attempt going out",
    buckets=LAG_BUCKETS,
)
COMMAND_ANSWER = Histogram(
    "callops_command_answer_seconds",
    "From an attempt going out to Telnyx's answer (or the timeout)",
    buckets=ACK_BUCKETS,
)
TELNYX_RATE_LIMITED = Counter(
    "callops_telnyx_rate_limited_total", "Answers 429 from Telnyx to a command"
)
STALE_SESSIONS = Counter(
    "callops_stale_sessions_total",
    "Streams, forks and transcriptions the sweeper closed, failed or stopped, by reason"
    " (closed_on_ended_call, never_started, over_duration)",
    ["reason"],
)
PARTNER_DELIVERIES = Counter(
    "callops_partner_deliveries_total",
    "Attempts to deliver a webhook to a partner, by outcome (succeeded, failed, dead)",
    ["outcome"],
)
TASK_FAILURES = Counter(
    "callops_task_failures_total", "Celery tasks that raised, by task name", ["task"]
)
# livesum: only processes alive are counted; a dead one's file goes (``process_dead``).
PROCESSES = Gauge(
    "callops_processes",
    "Processes of callops alive, by kind (web, worker)",
    ["kind"],
    multiprocess_mode="livesum",
)


def process_started(kind: str) -> None:
    PROCESSES.labels(kind).set(1)


def process_dead(pid: int) -> None:
    """Bookkeeping when a process ends (gunicorn's ``child_exit``, Celery's shutdown)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(_process_id(pid))


_received: dict[str, Any] = {}  # a child per event type: labels() takes a lock and builds a key


def webhook_answered(*, seconds: float, event_type: str = "", duplicate: bool = False) -> None:
    WEBHOOK_ACK.observe(seconds)
    if event_type:
        child = _received.get(event_type)
        if child is None:
            child = _received[event_type] = WEBHOOKS_RECEIVED.labels(event_type)
        child.inc()
        if duplicate:
            WEBHOOKS_DUPLICATED.inc()


def webhook_rejected(*, reason: str, seconds: float) -> None:
    WEBHOOK_ACK.observe(seconds)
    WEBHOOKS_REJECTED.labels(reason).inc()


def events_applied(*, lags: list[float], counts: dict[str, int]) -> None:
    """One batch's verdicts: ``lags`` of the events applied, ``counts`` by status."""
    for lag in lags:
        EVENT_APPLY_LAG.observe(lag)
    for status, count in counts.items():
        if count:
            EVENTS_APPLIED.labels(status).inc(count)
