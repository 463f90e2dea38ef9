"""Fault injection: the whole stack under the faults production will meet, and nothing lost.

Each case runs the real processes (gunicorn with config/gunicorn.py, Celery workers, Celery
beat) on PostgreSQL and Redis against the Telnyx simulator, which places calls and POSTs signed
webhooks to gunicorn, answers commands, and records every request. callops' processes reach
PostgreSQL and Redis through a `FaultProxy` (tests/faultproxy.py), so a case can stop Redis or
restart PostgreSQL as their clients see it without touching the machine's shared services.

Every call is answered elsewhere; callops' profile starts streaming and transcription on
answer (two commands a call); the test hangs the calls up once the commands are done. After
the fault and the recovery each case checks, and prints in one line:

- every webhook the simulator sent was stored once and applied (``processed``; a transcript
  event made exactly one segment), and every call's records end true (ended, stream and
  transcription stopped);
- every command succeeded and was applied by the simulator exactly once by ``command_id``:
  a re-send Telnyx ignores as a repeat of the same ``command_id`` (``duplicate``) is allowed,
  a second application is not; a command whose answer never came may instead be settled by
  its webhooks (``settlement``) once its ``command_id`` window is over.

Time is scaled down for CI (documented knobs, set on the processes): beat runs the sweeper and
the repair every 2 s, with ``CALLOPS_PENDING_EVENT_GRACE`` and ``CALLOPS_STUCK_COMMAND_GRACE``
of 2 s, so a lost message is noticed in seconds rather than a minute. A worker that exits is
started again, as docker-compose's ``restart: unless-stopped`` does, and the line says so:
Celery 5.7 with kombu 5.7 sometimes exits with ``AttributeError: 'NoneType' object has no
attribute 'hostname'`` when Redis goes away while it holds unacknowledged messages (its close
tries to restore them to the Redis that is gone).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.db import connection
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from benchmarks.harness import start_process, stop_processes
from callops.models import (
    Call,
    Command,
    Partner,
    PartnerConnection,
    StreamingProfile,
    TranscriptSegment,
    WebhookEvent,
)
from telnyx_sim import CallSimulator
from tests.faultproxy import FaultProxy
from tests.helpers import closed_port, healthy, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CONNECTION_ID = "faults-conn"
MAINTENANCE = ("sweep_pending_webhook_events", "repair_stuck_commands")
UNFINISHED = ("queued", "sending")


@dataclass
class Stack:
    sim: CallSimulator
    postgres: FaultProxy
    redis: FaultProxy
    workers: list
    logs: Path
    calls: list[str] = field(default_factory=list)
    # (pid, why) of every worker that exited on its own and was started again.
    restarts: list[tuple[int, str]] = field(default_factory=list)

    def place(self, count: int, spacing: float = 0.0) -> list[str]:
        """Incoming calls that stay up until `finish` hangs them up."""
        placed = []
        for _ in range(count):
            placed.append(self.sim.place_call(duration=float("inf")))
            time.sleep(spacing)
        self.calls += placed
        return placed

    def pool_process(self) -> int | None:
        """The pid of the pool process of the first worker, started with concurrency 1 (None
        while there is none, or more than one)."""
        pid = self.workers[0].pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0]) if len(children) == 1 else None


def _commands(calls):
    return Command.objects.filter(call__call_control_id__in=calls)


def _finished(calls) -> bool:
    commands = _commands(calls)
    return (
        commands.count() == 2 * len(calls) and not commands.filter(status__in=UNFINISHED).exists()
    )


def _settled(stack: Stack) -> bool:
    return bool(
        stack.sim.wait_idle(0.1)
        and Call.objects.filter(call_control_id__in=stack.calls, status="ended").count()
        == len(stack.calls)
        and not WebhookEvent.objects.filter(status="pending").exists()
        and not Command.objects.filter(status__in=UNFINISHED).exists()
    )


def _soon(predicate, timeout: float) -> bool:
    try:
        wait_for(predicate, timeout=timeout, interval=0.2)
    except AssertionError:
        return False
    return True


def finish(stack: Stack, timeout: float = 45) -> None:
    """Recovery: every command done, then every call hung up and every webhook applied."""
    _soon(lambda: _finished(stack.calls), timeout)
    for ccid in stack.calls:
        stack.sim.hangup(ccid)
    _soon(lambda: _settled(stack), timeout)


def account(stack: Stack, telnyx, name: str, capsys, details: str = "") -> None:
    """Count what was applied once and what was lost; print the case's line; assert none."""
    sim, calls = stack.sim, stack.calls
    sent = [event for ccid in calls for event in sim.events(ccid)]
    stored = dict(
        WebhookEvent.objects.filter(event_id__in=[e["id"] for e in sent]).values_list(
            "event_id", "status"
        )
    )
    segments = set(
        TranscriptSegment.objects.filter(call__call_control_id__in=calls).values_list(
            "event__event_id", flat=True
        )
    )
    applied = [
        e
        for e in sent
        if stored.get(e["id"]) == "processed"
        and (e["event_type"] != "call.transcription" or e["id"] in segments)
    ]
    requests = telnyx.requests
    once, problems = 0, []
    commands = list(_commands(calls))
    for command in commands:
        attempts = [r for r in requests if r.command_id == str(command.command_id)]
        applications = [r for r in attempts if r.applied and not r.duplicate]
        if command.status == "succeeded" and len(applications) == 1:
            once += 1
        else:
            problems.append((command.action, command.status, len(applications), command.pk))
    expected = 2 * len(calls)
    for call in Call.objects.filter(call_control_id__in=calls):
        statuses = {call.status, *call.streams.values_list("status", flat=True)}
        statuses |= set(call.transcriptions.values_list("status", flat=True))
        if statuses != {"ended", "stopped"}:
            problems.append((call.call_control_id, sorted(statuses)))
    lost = (len(sent) - len(applied)) + (expected - once)
    line = (
        f"fault {name}: webhooks {len(applied)}/{len(sent)} applied once, "
        f"commands {once}/{expected} once by command_id, lost {lost}"
    )
    if stack.restarts:
        restarts = "; ".join(f"worker {pid}: {why}" for pid, why in stack.restarts)
        restarted = f"{len(stack.restarts)} worker exit(s), restarted: {restarts}"
        details = f"{details}; {restarted}" if details else restarted
    with capsys.disabled():
        print(f"\n{line}" + (f" ({details})" if details else ""))
    assert lost == 0 and not problems, (line, problems)


def resent(stack: Stack, telnyx) -> int:
    """Requests the simulator ignored as repeats of a command_id it had applied."""
    ids = {str(c) for c in _commands(stack.calls).values_list("command_id", flat=True)}
    return sum(1 for r in telnyx.requests if r.duplicate and r.command_id in ids)


# --- The stack ------------------------------------------------------------------------------


@pytest.fixture
def proxies(settings):
    db = connection.settings_dict
    broker = urlsplit(settings.CELERY_BROKER_URL)
    postgres = FaultProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)), "postgres")
    redis = FaultProxy((broker.hostname or "127.0.0.1", broker.port or 6379), "redis")
    with postgres, redis:
        yield postgres, redis


@pytest.fixture
def stack(telnyx, settings, proxies, worker_processes, tmp_path):
    """Start gunicorn, workers and beat on the proxies, and the call simulator on gunicorn."""
    postgres, redis = proxies
    partner = Partner.objects.create(name="faults")
    PartnerConnection.objects.create(partner=partner, connection_id=CONNECTION_ID)
    StreamingProfile.objects.create(
        partner=partner,
        stream_url="wss://media.example.com/audio",
        stream_track="both_tracks",
        transcribe=True,
        transcription_engine="Telnyx",
        auto_start=True,
    )
    PeriodicTask.objects.all().delete()
    every = IntervalSchedule.objects.create(every=2, period="seconds")
    for task in MAINTENANCE:
        PeriodicTask.objects.create(name=task, task=f"callops.tasks.{task}", interval=every)

    started: list = []
    sims: list[CallSimulator] = []

    def start(workers: int = 1, concurrency: int = 2, **worker_env: str) -> Stack:
        db = connection.settings_dict
        credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
        redis_url = redis.url(settings.CELERY_BROKER_URL)
        port = closed_port()
        sim = CallSimulator(
            webhook_url=f"http://127.0.0.1:{port}/webhooks/telnyx/",
            api=telnyx,
            connection_id=CONNECTION_ID,
            answered_elsewhere=True,
            answer_delay=0.3,
            media=False,  # streaming.started on the command; no WebSocket to run
            transcription_interval=1.0,
            retry_backoff=0.25,
            max_attempts=12,  # Telnyx retries a 503 for longer than any outage here
            seed=13,
        )
        env = {
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": postgres.url(f"postgres://{credentials}@h/{db['NAME']}"),
            # Reused connections, as in production: a restart breaks them under the process.
            "DATABASE_CONN_MAX_AGE": "60",
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "CACHE_URL": redis_url,
            "CALLOPS_RATE_LIMIT_URL": redis_url,
            "TELNYX_PUBLIC_KEY": sim.public_key,
            "CALLOPS_PENDING_EVENT_GRACE": "2",
            "CALLOPS_STUCK_COMMAND_GRACE": "2",
            **worker_env,
        }
        environment = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        gunicorn = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"]
        web_env = {**environment, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2"}
        started.append(start_process(gunicorn, env=web_env, log_path=tmp_path / "web.log"))
        beat = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"]
        started.append(start_process(beat, env=environment, log_path=tmp_path / "beat.log"))
        procs = worker_processes(count=workers, concurrency=concurrency, **env)
        wait_for(lambda: healthy(port), timeout=30, interval=0.1)
        wait_for(lambda: "beat: Starting" in (tmp_path / "beat.log").read_text(), timeout=30)
        sims.append(sim.start())
        running = Stack(sim, postgres, redis, procs, tmp_path)
        restart = functools.partial(worker_processes, count=1, concurrency=concurrency, **env)
        threading.Thread(target=_supervise, args=(running, restart, done), daemon=True).start()
        return running

    done = threading.Event()
    yield start
    done.set()
    for sim in sims:
        sim.stop(hangup=False, timeout=2)
    stop_processes(started, timeout=10)
    for log in ("web.log", "beat.log"):
        if (tmp_path / log).exists():  # shown by pytest only when the test failed
            print(f"--- {log} ---\n" + (tmp_path / log).read_text(errors="replace")[-4000:])


def _supervise(stack: Stack, restart, done: threading.Event) -> None:
    """Start a worker again when it exits, as production's ``restart: unless-stopped`` does
    (docker-compose.yml). Each restart is counted and reported in the case's line."""
    while not done.wait(0.5):
        for index, worker in enumerate(stack.workers):
            if worker.poll() is None:
                continue
            why = next(
                (
                    line.strip().partition("Unrecoverable error: ")[2]
                    for line in worker.log
                    if "Unrecoverable error: " in line
                ),
                f"exit status {worker.returncode}",
            )
            stack.restarts.append((worker.pid, why))
            (stack.workers[index],) = restart()


# --- The cases ------------------------------------------------------------------------------


def test_redis_stopped_for_10_s_while_webhooks_and_commands_flow(stack, telnyx, capsys):
    # Commands are paced at 4/s, so the outage finds some waiting for their turn, some in
    # flight, and the calls answered meanwhile have theirs created only after it.
    s = stack(TELNYX_RATE_LIMIT="4")
    s.place(6, spacing=0.2)
    s.redis.down()
    cut = s.redis.cut
    s.place(10, spacing=1.0)  # 10 s of calls and webhooks with Redis gone
    s.redis.up()
    finish(s, timeout=60)
    details = f"{cut} connections cut, {resent(s, telnyx)} re-sent and deduped by Telnyx"
    account(s, telnyx, "redis-outage-10s", capsys, details)


def test_a_worker_killed_while_sending_and_right_after_telnyx_answered(stack, telnyx, capsys):
    killed: list[int] = []
    armed: dict = {}

    def kill_after_answer(record) -> None:
        # Called on the simulator's thread as soon as its 200 is on the wire: the worker has
        # the answer and has not recorded it yet.
        target = armed.get("ccid")
        if record.call_control_id == target and record.applied and record.status == 200:
            armed.clear()
            os.kill(armed_pid[0], signal.SIGKILL)
            killed.append(armed_pid[0])

    armed_pid: list[int] = []
    telnyx.on_command = kill_after_answer  # the call simulator chains onto it
    s = stack(workers=1, concurrency=1)  # one pool process: the one that sends

    # 1. Telnyx has the command and applies it, but its answer takes 1.5 s...
    (first,) = s.place(1)
    telnyx.inject(
        status=200,
        body={"data": {"result": "ok"}},
        delay=1.5,
        apply=True,
        action="streaming_start",
        call_control_id=first,
    )
    wait_for(lambda: telnyx.commands("streaming_start", first, status=None))
    sender = s.pool_process()
    os.kill(sender, signal.SIGKILL)  # ...and the process waiting for it is killed
    killed.append(sender)

    # 2. The next pool process is killed the moment Telnyx's 200 leaves for it.
    wait_for(lambda: s.pool_process() not in (None, sender), timeout=10)
    wait_for(lambda: "".join(s.workers[0].log).count("Telnyx client ready") == 2, timeout=15)
    armed_pid.append(s.pool_process())
    armed["ccid"] = s.place(1)[0]
    s.place(2, spacing=0.3)  # and calls go on around them

    finish(s, timeout=40)
    assert len(killed) == 2, killed
    details = f"2 pool processes killed, {resent(s, telnyx)} re-sent and deduped by Telnyx"
    account(s, telnyx, "worker-sigkill-mid-send-and-after-answer", capsys, details)


def test_postgresql_restarted_while_webhooks_arrive(stack, telnyx, capsys):
    s = stack()
    s.place(4, spacing=0.25)
    # The restart cuts every connection (reused ones too: DATABASE_CONN_MAX_AGE=60) and the
    # database refuses connections for 3 s while calls keep coming: gunicorn answers 503 and
    # Telnyx retries.
    s.postgres.down()
    cut = s.postgres.cut
    s.place(6, spacing=0.5)
    s.postgres.up()
    finish(s)
    refused = [d for d in s.sim.deliveries() if d.status == 503]
    assert refused, "no webhook met the restart"
    details = f"{cut} connections cut, {len(refused)} deliveries answered 503 and retried"
    account(s, telnyx, "postgres-restart-3s", capsys, details)


def test_a_429_storm(stack, telnyx, capsys):
    # For 8 s (the 30 s, shortened for CI) Telnyx allows 2 commands a second and on top
    # refuses 2 a second with a bare 429, while the calls want 20 commands in their first 2 s.
    s = stack()
    telnyx.rate_limit = 2
    storm = threading.Thread(target=_refuse_twice_a_second, args=(telnyx, 8.0))
    storm.start()
    s.place(10, spacing=0.2)
    storm.join()
    telnyx.rate_limit = None
    finish(s)
    limited = [r for r in telnyx.requests if r.status == 429]
    # callops also slows down before Telnyx refuses, on a 200 that used the last request of
    # the window (commands._slow_down).
    paused = sum("pausing" in line for worker in s.workers for line in worker.log)
    assert len(limited) >= 8, len(limited)
    details = f"{len(limited)} answered 429, {paused} pauses before a 429"
    account(s, telnyx, "429-storm-2-per-s-8s", capsys, details)


def _refuse_twice_a_second(telnyx, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        telnyx.inject(status=429, headers={"x-ratelimit-reset": "1"}, times=2)
        time.sleep(1.0)
        telnyx.clear_faults()  # refusals unused in their second do not pile up


def test_telnyx_answers_500_to_a_third_of_commands(stack, telnyx, capsys):
    s = stack()
    telnyx.inject(status=500, times=None, every=3)
    s.place(10, spacing=0.2)
    finish(s)
    failed = [r for r in telnyx.requests if r.status == 500]
    assert len(failed) == len(telnyx.requests) // 3
    account(s, telnyx, "500-to-a-third", capsys, f"{len(failed)} answered 500 and retried")


def test_telnyx_applies_a_command_but_its_answer_is_lost(stack, telnyx, capsys):
    # A 5 s command_id window (Telnyx's is 60 s) so that a command whose every answer is lost
    # is settled by its webhooks within the test, not re-sent for a minute.
    s = stack(TELNYX_COMMAND_ID_WINDOW="5")
    telnyx.inject(apply=True, drop=True, times=None, every=2)  # every other answer lost
    (unlucky,) = s.place(1)
    telnyx.inject(
        apply=True, drop=True, times=None, action="streaming_start", call_control_id=unlucky
    )
    s.place(8, spacing=0.2)
    finish(s)
    (start,) = _commands([unlucky]).filter(action="streaming_start")
    assert start.settlement.startswith("applied: streaming.started"), start.settlement
    lost = sum(1 for r in telnyx.requests if r.status == 0)
    settled = _commands(s.calls).exclude(settlement="").count()
    details = (
        f"{lost} answers lost, {resent(s, telnyx)} re-sent and deduped by Telnyx,"
        f" {settled} settled by their webhooks"
    )
    account(s, telnyx, "applied-but-answer-lost", capsys, details)
