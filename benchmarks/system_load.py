"""The whole system under incoming calls at rising rates, and whether draining a backlog of
webhook events scales with worker processes.

    .venv/bin/python benchmarks/system_load.py [--rates 1,5,10,15,20,25] [--hold 60] [--target 20]
        [--no-partners] [--interim] [--delivery-workers 64]
    .venv/bin/python benchmarks/system_load.py --backlog [--events 50000] [--calls 2000]

Load mode (the default), on this machine only:

1. Recreates the database ``callops_sysbench`` on the local PostgreSQL, migrates it, flushes
   Redis db 9 (broker, cache, rate limiter), and creates a Partner owning the simulator's
   connection id, with a StreamingProfile that answers every incoming call with streaming
   (``wss://media.example.com/s``: production refuses private targets, and no media flows)
   and transcription inline: one ``answer`` command per call.
2. Starts the production-like stack from the project's own files, with
   ``config.settings.production`` on the scratch services: gunicorn with ``config/gunicorn.py``
   as docker-compose runs it (its worker count: 2 per core), the Celery workers of
   docker-compose (``worker -Q callops`` for commands and ``worker -Q events`` for drains,
   prefork, ``--concurrency 2`` each; ``worker-partners``, ``-Q partners``, a pool of 16
   threads; INFO logs), Celery beat (the maintenance schedules at their default periods), and
   in this process the simulator: ``TelnyxAPISimulator`` for the command API and
   ``CallSimulator`` placing calls and POSTing signed webhooks from ``--delivery-workers`` (64)
   threads, without media. The simulator's rate limit and ``TELNYX_RATE_LIMIT`` are both
   ``--limit`` (100/s): at 25 calls/s the stack sends 25 answers/s, so no rate limit is what is
   measured. gunicorn's sync workers close the connection after each request (``Connection:
   close``), so each webhook POST opens a connection of its own: a kept-alive pool would buy
   nothing.
   Partner callbacks (off with ``--no-partners``): through the partner API
   (``POST /api/v1/webhook-endpoints/``, with an API key of the partner's), one endpoint for
   every event type (``--interim``: interim transcript segments too) on an HTTPS receiver in a
   process of its own that verifies each request with ``standardwebhooks``
   (``harness.start_receiver``). It listens on loopback: this run's processes trust its
   self-signed certificate (``SSL_CERT_FILE``) and have ``CALLOPS_ALLOW_PRIVATE_TARGETS`` on,
   production's own setting, off by default.
3. Warm-up: a few short calls through the whole stack (not measured).
4. Per rate: calls placed on a fixed schedule for ``--hold`` seconds. Each is answered by
   callops, then sends call.answered, streaming.started, a call.transcription a second and,
   ``--call-duration`` (20 s, +-20 %) after the answer, streaming.stopped and call.hangup: ~25
   webhooks. The number of live calls is steady once one call duration has passed, so the
   measurement window is the rest of the hold (40 s of 60). In the window:
   - webhooks/s (delivered): deliveries answered 2xx; ack p50/p99: the simulator's POST time
     of every delivery attempt (``DeliveryRecord.elapsed``; a timeout counts as 2 s);
   - whether that load was truly offered: offered webhooks/s (events the simulator's calls
     queued for delivery in the window); wait p50/p99 (queued -> the POST started: a delivery
     thread free, the call's earlier events sent); POSTs in flight, mean and most, of the
     delivery threads (a note when all were busy at once: the pool was the limit); how far the
     placer fell behind its schedule (p99 and most, over the hold) and the transcripts' timer
     (their spacing beyond 1 s, p99 and most); the benchmark process's CPU, which is the
     simulator's, in cores (a note above 0.8: one process, one GIL, so the load generator
     itself may be the limit);
   - apply lag p50/p99: ``processed_at - received_at`` of the events received in the window,
     read after the drain below, so an event applied late counts with its whole lag;
   - backlog slope: pending events counted every second, least-squares slope (events/s);
   - call.initiated received -> answer at the simulator p50/p99, for the calls placed in the
     window (the event's ``received_at`` against the answer's ``CommandRecord.wall_time``: the
     same machine's wall clock);
   - partner callbacks: partner events created per second and events delivered per second
     (first receipt at the receiver in the window), delivery latency p50/p99 (the event's
     ``created_at``, taken in the drain's transaction, -> the receiver got it, for the events
     created in the window; and its two parts, -> the claim of the attempt and the claim ->
     receipt, for events delivered at their first attempt), and over the hold the events,
     those received twice, and worker-partners CPU per event delivered;
   - CPU per process (web = the gunicorn tree, worker = the commands and events Celery
     workers' trees, partners = worker-partners, beat, PostgreSQL, Redis, simulator = this
     process) and RSS at the window's end; the receiver's, outside callops like the
     simulator's, on a line of its own per rate;
   - events applied per second of worker CPU: events applied in the window / worker CPU.
   Losses count over the whole hold: calls never answered (200 from the simulator), calls whose
   stream or transcription callops never saw start, events failed, commands failed or never
   finished, webhooks never answered 2xx after the simulator's retries, events left pending;
   with partner callbacks, partner events of the hold never received verified by the end of
   the drain, and requests whose signature did not verify. Then placing stops, the calls end,
   and the run waits until nothing is pending (events, commands, webhooks, partner deliveries)
   before the next rate, at most ``--drain-timeout`` s.
5. A rate is held when ack p99 < 200 ms, apply lag p99 < 1 s, the backlog slope is below
   1 event/s and nothing is lost. The slope threshold: a worker that keeps up leaves a sawtooth
   of at most a few claims pending (CALLOPS_DRAIN_CLAIM events each), whose fitted slope over a
   40 s window stays well within +-1 event/s (the 1 calls/s row shows the noise); a backlog that
   grows by 1 event/s or more means arrivals exceed what the worker applies, and the lag grows
   without bound however small it still is in the window. Rates run in rising order until one
   is not held (``--keep-going``: all of them). Prints the highest rate held; exit status 1 when
   it is below ``--target`` calls/s, or when call.initiated -> answer p99 is 100 ms or more at
   the target rate (the highest rate run up to it).

Backlog mode (``--backlog``), the "no serial point" check, web tier idle (no gunicorn, no beat):

1. Pre-fills the database with ``--events`` pending events over ``--calls`` calls, through
   the webhook's own INSERT (``callops.webhooks.store_event``), interleaved in time as calls
   arriving at 5/s would send them: call.initiated, call.answered, streaming.started,
   call.transcription (the rest of the call's share, ~21) and call.hangup per call. Their
   connection has no partner: no policy sends a command, so only the drain is timed. The
   filled database is kept as a template, and each measurement starts from a fresh copy of it.
2. Times how long one worker process (``--concurrency 1``) takes from ``drain.request()``
   until no event is pending; then the same with two worker processes (``--concurrency 1``
   each). Prints both, the drain tasks each process ran, worker and PostgreSQL CPU, and the
   ratio 1 worker / 2 workers (target >= 1.6: exit status 1 below). Drains that are serial by
   design give ~1.0.

Other processes on this (2-core) machine skew every figure: before each measurement the run
waits up to ``--quiet-wait`` s for the CPU to be idle, repeats one during which others took over
10 % of the CPU (``--attempts``), and prints NOISY when that did not help. Logs are kept in the
printed directory when a target is missed (``--keep-logs``: always).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import psycopg
import redis
from harness import (
    NOISE_LIMIT,
    CpuMeter,
    CpuUse,
    Receipts,
    Scratch,
    add_quiet_options,
    add_scratch_options,
    copy_database,
    create_answering_partner,
    drop_database,
    measure_quietly,
    percentile,
    print_table,
    print_verdicts,
    rss_by_role,
    scratch,
    self_signed,
    simulated_calls,
    start_process,
    start_receiver,
    stop_processes,
    wait_for_quiet,
)
from webhook_throughput import free_port, production_env

from telnyx_sim import CommandRecord, DeliveryRecord, Signer, TelnyxAPISimulator
from telnyx_sim.envelopes import dumps, envelope

SETTINGS = "config.settings.production"
CONNECTION_ID = "sysbench-conn"
BACKLOG_CONNECTION_ID = "sysbench-backlog-conn"  # no partner: no policy, no command
STREAM_URL = "wss://media.example.com/s"
WEBHOOK_PATH = "/webhooks/telnyx/"

TARGET_ACK_P99_MS = 200.0
TARGET_LAG_P99_S = 1.0
TARGET_SLOPE = 1.0  # events/s; see the module docstring
TARGET_ANSWER_P99_MS = 100.0
TARGET_RATIO = 1.6
PARTNER_THREADS = 16  # docker-compose's worker-partners
# The processes of the CPU and RSS tables. "bench" is this process: the simulator and the
# sampling. The partners' receiver, outside callops like the simulator, is printed on its own.
ROLES = ("web", "worker", "partners", "beat", "postgres", "redis", "bench")
ROLE_NAMES = {"bench": "simulator"}


# --- Processes ------------------------------------------------------------------------------


def stack_env(run: Scratch, signer: Signer, work: Path, api: TelnyxAPISimulator | None, limit):
    static = work / "static"
    static.mkdir(exist_ok=True)
    env = production_env(run, SETTINGS, signer, static)
    env.update(
        CALLOPS_RATE_LIMIT_URL=run.redis_url,
        TELNYX_RATE_LIMIT=str(limit),
        TELNYX_TIMEOUT="5",
        PYTHONUNBUFFERED="1",
    )
    if api is not None:
        env.update(TELNYX_BASE_URL=api.base_url, TELNYX_API_KEY=api.api_key)
    return env


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, count: int = 1, timeout=90):
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{log.name}: no {text!r} in time:\n{tail}")
        time.sleep(0.1)


def start_web(env: dict, port: int, log: Path) -> subprocess.Popen:
    """gunicorn exactly as docker-compose's ``web`` runs it, bound to 127.0.0.1:``port``."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = start_process(
        [gunicorn, "-c", "config/gunicorn.py", "config.wsgi:application", "--access-logfile", "-"],
        env={**env, "GUNICORN_BIND": f"127.0.0.1:{port}"},
        log_path=log,
    )
    probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(probe)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("gunicorn did not answer /healthz in time")


def start_worker(
    env: dict, name: str, concurrency: int, log: Path, queue: str, pool: str = "prefork"
) -> subprocess.Popen:
    """A Celery worker as docker-compose runs it: ``worker`` takes queue ``callops``,
    ``worker-events`` queue ``events`` (its name made unique)."""
    proc = start_process(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue),
            *("--loglevel", "INFO", "--pool", pool, "--concurrency", str(concurrency)),
            *("-n", f"{name}@%h"),
        ],
        env=env,
        log_path=log,
    )
    wait_for_log(proc, log, " ready.")
    return proc


def start_partners_worker(env: dict, name: str, log: Path) -> subprocess.Popen:
    """``worker-partners`` as docker-compose runs it: queue ``partners``, 16 threads."""
    return start_worker(env, name, PARTNER_THREADS, log, "partners", pool="threads")


def start_beat(env: dict, work: Path) -> subprocess.Popen:
    log = work / "beat.log"
    proc = start_process(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"),
            *("--pidfile", str(work / "beat.pid"), "--schedule", str(work / "beat-schedule")),
        ],
        env=env,
        log_path=log,
    )
    wait_for_log(proc, log, "beat: Starting")
    return proc


# --- Load mode ------------------------------------------------------------------------------


@dataclass
class Offered:
    """Whether the simulator offered the load it was asked for, in the window."""

    webhooks_per_s: float  # events the simulator's calls queued for delivery
    wait_ms: tuple[float, float]  # queued -> POST started, first attempts, p50 / p99
    in_flight: tuple[float, int]  # POSTs at once: mean (busy thread-seconds / s) and most
    placer_late_ms: tuple[float, float]  # behind the placing schedule: p99 and most
    timer_late_ms: tuple[float, float]  # transcripts' spacing beyond 1 s: p99 and most


@dataclass
class PartnerResult:
    """The partner endpoint's side of one rate."""

    created_per_s: float  # partner events created in the window
    delivered_per_s: float  # events that first reached the receiver in the window
    latency_ms: tuple[float, float]  # created_at -> first receipt, events created in the window
    # The latency's two parts, p50 / p99 (events delivered at their first attempt): created_at
    # -> the claim of that attempt (the drain's commit, the broker, a worker thread, the order
    # and slot checks), and the claim -> the receipt (the POST).
    to_claim_ms: tuple[float, float]
    claim_to_receipt_ms: tuple[float, float]
    created: int  # partner events created over the whole hold
    undelivered: int  # of those, never received verified by the end of the drain
    unverified: int  # requests of the hold whose signature did not verify
    twice: int  # events of the hold received more than once
    receiver_cpu: float  # CPU seconds of the receiver in the window


@dataclass
class RateResult:
    rate: float
    window: float  # seconds
    placed: int
    offered: Offered
    webhooks_per_s: float
    ack_ms: tuple[float, float]
    lag_s: tuple[float, float]
    slope: float
    answer_ms: tuple[float, float]
    applied: int  # events applied in the window
    losses: dict[str, int]
    failed_posts: int
    drained: bool
    drain_seconds: float
    cpu: CpuUse
    rss: dict[str, list[float]]
    pg_exited: float
    sessions: int
    partners: PartnerResult | None

    @property
    def per_worker_cpu_s(self) -> float:
        return self.applied / max(1e-9, self.cpu.roles["worker"])

    @property
    def lost(self) -> int:
        return sum(self.losses.values())

    @property
    def held(self) -> bool:
        return (
            self.ack_ms[1] < TARGET_ACK_P99_MS
            and self.lag_s[1] < TARGET_LAG_P99_S
            and self.slope < TARGET_SLOPE
            and not self.lost
            and self.drained
        )


@dataclass
class Hold:
    """What one rate's hold recorded as it ran; the rest is read from the logs after it."""

    rate: float
    placed: list[tuple[float, str]]  # (monotonic, call_control_id)
    late: list[float]  # ms the placer was behind its schedule, per call placed
    w0: float  # the window, monotonic
    w1: float
    w0_wall: datetime
    w1_wall: datetime
    start_wall: datetime
    cpu: CpuUse
    rss: dict[str, list[float]]
    pg_exited: float  # CPU seconds of PostgreSQL backends that ended in the window
    sessions: int  # database sessions opened on the run's database in the window


class Sampler(threading.Thread):
    """Pending events, counted every second on a connection of its own."""

    def __init__(self, database_url: str):
        super().__init__(name="backlog-sampler", daemon=True)
        self.db = psycopg.connect(database_url, autocommit=True)
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0 - time.monotonic() % 1.0):
            (n,) = self.db.execute(
                "SELECT count(*) FROM callops_webhookevent WHERE status = 'pending'"
            ).fetchone()
            self.samples.append((time.monotonic(), n))

    def slope(self, start: float, end: float) -> float:
        points = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(points) < 3:
            return float("nan")
        return statistics.linear_regression(*zip(*points, strict=True)).slope

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self.db.close()


class LoadBench:
    def __init__(self, args, run: Scratch, work: Path):
        self.args, self.run, self.work = args, run, work
        self.deliveries: list[DeliveryRecord] = []
        self.procs: list[subprocess.Popen] = []

    # Set-up

    def start(self) -> None:
        args = self.args
        self.api = TelnyxAPISimulator(api_key="KEY_SYSBENCH", rate_limit=args.limit).start()
        port = free_port()
        self.calls = simulated_calls(
            webhook_url=f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
            api=self.api,
            connection_id=CONNECTION_ID,
            call_duration=args.call_duration,
            delivery_workers=args.delivery_workers,
            on_delivery=self.deliveries.append,
        )
        env = stack_env(self.run, self.calls.signer, self.work, self.api, args.limit)
        if args.partners:
            # The receiver serves HTTPS on loopback: the workers trust its certificate, and
            # this run lets endpoints point at private addresses (production's own setting,
            # off by default; only this run's processes have it on).
            self.cert, self.key = self_signed(self.work)
            env.update(SSL_CERT_FILE=self.cert, CALLOPS_ALLOW_PRIVATE_TARGETS="true")
        self.run.migrate(env)
        os.environ.update(env)
        import django

        django.setup()
        # Production's logging says INFO to the console: the simulator would log every call.
        logging.getLogger("telnyx_sim").setLevel(logging.WARNING)

        partner = create_answering_partner("sysbench", CONNECTION_ID, STREAM_URL)
        self.web = start_web(env, port, self.work / "gunicorn.log")
        self.procs.append(self.web)
        trees = {"web": [self.web.pid]}
        if args.partners:
            self.receiver = self.register_receiver(partner, f"http://127.0.0.1:{port}/api/v1/")
            self.partners_worker = start_partners_worker(
                env, "sysbench-partners", self.work / "worker-partners.log"
            )
            self.procs.append(self.partners_worker)
            trees.update(partners=[self.partners_worker.pid], receiver=[self.receiver.pid])
        self.worker = start_worker(env, "sysbench", 2, self.work / "worker.log", "callops")
        self.events_worker = start_worker(
            env, "sysbench-events", 2, self.work / "worker-events.log", "events"
        )
        self.procs += [self.worker, self.events_worker]
        wait_for_log(self.worker, self.work / "worker.log", "Telnyx client ready", 2)
        self.beat = start_beat(env, self.work)
        self.procs.append(self.beat)
        self.calls.start()
        trees.update(worker=[self.worker.pid, self.events_worker.pid], beat=[self.beat.pid])
        self.meter = CpuMeter(self.run.database_url, trees)
        self.sampler = Sampler(self.run.database_url)
        self.sampler.start()
        (backend,) = self.meter.db.execute("SELECT pg_backend_pid()").fetchone()
        with open(f"/proc/{backend}/stat") as f:
            self.postmaster = int(f.read().rsplit(")", 1)[1].split()[1])
        partners = (
            f"partners x {PARTNER_THREADS} threads, receiver {self.endpoint_url}"
            if args.partners
            else "no partner callbacks"
        )
        print(
            f"stack up: gunicorn on 127.0.0.1:{port} (config/gunicorn.py), workers: commands x 2"
            f", events x 2, {partners}; beat, simulator {self.api.base_url} (rate limit "
            f"{args.limit}/s, {args.delivery_workers} delivery threads); logs in {self.work}",
            flush=True,
        )

    def register_receiver(self, partner, api: str):
        """The partner's endpoint for every event type, registered through the partner API as
        a partner would, on a receiver that verifies each request's signature."""
        from callops.api_keys import api_key_create
        from callops.management.commands._demo import api_call

        _, key = api_key_create(partner=partner, name="sysbench")
        port = free_port()
        self.endpoint_url = f"https://localhost:{port}/hooks"
        endpoint = api_call(
            api,
            key,
            "POST",
            "webhook-endpoints/",
            {
                "url": self.endpoint_url,
                "event_types": [],  # every type
                "include_interim": self.args.interim,
                "description": "system_load receiver",
            },
        )
        self.receipts = Receipts(self.work / "receiver.log")
        return start_receiver(port, self.cert, self.key, endpoint["secret"], self.receipts.path)

    def stop(self) -> None:
        if hasattr(self, "sampler"):
            self.sampler.stop()
        if hasattr(self, "calls"):
            self.calls.stop(timeout=5)
        if hasattr(self, "meter"):
            self.meter.close()
        stop_processes(self.procs)
        if hasattr(self, "api"):
            self.api.stop()
        if hasattr(self, "receiver"):
            self.receiver.terminate()
            self.receiver.join(5)

    def pg_and_sessions(self) -> tuple[float, int]:
        """(CPU seconds of the PostgreSQL backends that have ended, on any database: the
        postmaster's reaped children; sessions opened on the run's database so far).

        The meter misses a backend that ends between its snapshots, and Celery's Django fixup
        closes a worker child's connection after every task, so most backends end young.
        """
        with open(f"/proc/{self.postmaster}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        (sessions,) = self.meter.db.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return reaped, sessions

    # Waiting

    def open_work(self) -> tuple[int, int, int, int]:
        """(live calls, pending events, commands not finished, partner deliveries not
        finished)."""
        from callops.models import Command, Delivery, WebhookEvent

        return (
            len(self.calls.live_calls),
            WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING).count(),
            Command.objects.filter(
                status__in=[Command.Status.QUEUED, Command.Status.SENDING]
            ).count(),
            Delivery.objects.filter(status__in=Delivery.UNFINISHED).count(),
        )

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not any(self.open_work()) and self.calls.wait_idle(0):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    def warm_up(self) -> None:
        ccids = []
        for _ in range(8):
            ccids.append(self.calls.place_call(duration=3))
            time.sleep(0.25)
        if not self.wait_drained(120):
            raise RuntimeError(f"warm-up did not drain: {self.open_work()}; see {self.work}")
        answered = {r.call_control_id for r in self.api.commands(action="answer")}
        if missing := set(ccids) - answered:
            raise RuntimeError(f"warm-up: {len(missing)} calls not answered; see {self.work}")

    # One rate

    def measure(self, rate: float) -> RateResult:
        args = self.args
        hold = args.hold
        ramp = min(args.call_duration, hold / 2)
        n = max(1, round(rate * hold))
        self.deliveries.clear()
        placed: list[tuple[float, str]] = []
        late: list[float] = []
        start_wall = datetime.now(UTC)
        start = time.monotonic()

        def place() -> None:
            for i in range(n):
                due = start + i / rate
                if (pause := due - time.monotonic()) > 0:
                    time.sleep(pause)
                late.append(max(0.0, time.monotonic() - due) * 1000)
                placed.append((time.monotonic(), self.calls.place_call()))

        placer = threading.Thread(target=place, name="placer", daemon=True)
        placer.start()
        time.sleep(max(0.0, start + ramp - time.monotonic()))
        w0, w0_wall = time.monotonic(), datetime.now(UTC)
        before = self.meter.snapshot()
        pg0, sessions0 = self.pg_and_sessions()
        time.sleep(max(0.0, start + hold - time.monotonic()))
        w1, w1_wall = time.monotonic(), datetime.now(UTC)
        cpu = self.meter.since(before)
        pg1, sessions1 = self.pg_and_sessions()
        rss = rss_by_role(self.meter.snapshot())
        placer.join()
        drain_start = time.monotonic()
        drained = self.wait_drained(args.call_duration * 1.2 + 30 + args.drain_timeout)
        drain_seconds = time.monotonic() - drain_start
        return self.result(
            Hold(
                *(rate, placed, late, w0, w1, w0_wall, w1_wall, start_wall, cpu, rss),
                *(pg1 - pg0, sessions1 - sessions0),
            ),
            drained,
            drain_seconds,
        )

    def result(self, hold: Hold, drained: bool, drain_seconds: float) -> RateResult:
        from django.db import connection

        from callops.models import Call, Command, WebhookEvent

        rate, placed, cpu, rss = hold.rate, hold.placed, hold.cpu, hold.rss
        w0, w1, w0_wall, w1_wall = hold.w0, hold.w1, hold.w0_wall, hold.w1_wall
        start_wall = hold.start_wall
        records = list(self.deliveries)
        in_window = [r for r in records if w0 <= r.monotonic < w1]
        ok_events = {r.event_id for r in records if r.ok}
        never_ok = {r.event_id for r in records} - ok_events
        ccids = [c for _, c in placed]
        window_ccids = [c for t, c in placed if w0 <= t < w1]

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY lag),"
                " percentile_disc(0.99) WITHIN GROUP (ORDER BY lag) FROM ("
                "  SELECT extract(epoch FROM processed_at - received_at) AS lag"
                "  FROM callops_webhookevent WHERE received_at >= %s AND received_at < %s"
                "  AND status IN ('processed', 'failed')) t",
                [w0_wall, w1_wall],
            )
            lag = tuple(float("nan") if v is None else float(v) for v in cursor.fetchone())
        applied = WebhookEvent.objects.filter(
            processed_at__gte=w0_wall,
            processed_at__lt=w1_wall,
            status__in=[WebhookEvent.Status.PROCESSED, WebhookEvent.Status.FAILED],
        ).count()
        initiated = dict(
            WebhookEvent.objects.filter(
                event_type="call.initiated", call_control_id__in=window_ccids
            ).values_list("call_control_id", "received_at")
        )
        answers: dict[str, CommandRecord] = {}
        answered: set[str] = set()
        for record in self.api.commands(action="answer", status=None):
            answers.setdefault(record.call_control_id, record)
            if record.status == 200:
                answered.add(record.call_control_id)
        answer_ms = [
            (answers[c].wall_time - initiated[c].timestamp()) * 1000
            for c in window_ccids
            if c in answers and c in initiated
        ]
        with_media = set(
            Call.objects.filter(
                call_control_id__in=ccids,
                streams__started_at__isnull=False,
                transcriptions__started_at__isnull=False,
            ).values_list("call_control_id", flat=True)
        )
        since = WebhookEvent.objects.filter(received_at__gte=start_wall)
        commands = Command.objects.filter(created_at__gte=start_wall)
        losses = {
            "not answered": len(set(ccids) - answered),
            "no media": len(set(ccids) - with_media),
            "failed events": since.filter(status=WebhookEvent.Status.FAILED).count(),
            "pending events": since.filter(status=WebhookEvent.Status.PENDING).count(),
            "failed commands": commands.filter(
                status__in=[Command.Status.FAILED, Command.Status.CANCELLED]
            ).count(),
            "open commands": commands.filter(
                status__in=[Command.Status.QUEUED, Command.Status.SENDING]
            ).count(),
            "webhooks lost": len(never_ok),
        }
        partners = None
        if self.args.partners:
            partners = self.partner_result(hold)
            losses["partner events undelivered"] = partners.undelivered
            losses["signature failures"] = partners.unverified
        acks = [r.elapsed * 1000 for r in in_window]
        return RateResult(
            rate=rate,
            window=w1 - w0,
            placed=len(placed),
            offered=offered(records, hold, self.args.delivery_workers),
            webhooks_per_s=sum(r.ok for r in in_window) / (w1 - w0),
            ack_ms=(percentile(acks, 50), percentile(acks, 99)),
            lag_s=lag,
            slope=self.sampler.slope(w0, w1),
            answer_ms=(percentile(answer_ms, 50), percentile(answer_ms, 99)),
            applied=applied,
            losses=losses,
            failed_posts=sum(not r.ok for r in records),
            drained=drained,
            drain_seconds=drain_seconds,
            cpu=cpu,
            rss=rss,
            pg_exited=hold.pg_exited,
            sessions=hold.sessions,
            partners=partners,
        )

    def partner_result(self, hold: Hold) -> PartnerResult:
        """The receiver's log against the partner events of the hold, read after the drain."""
        from callops.models import Delivery, PartnerEvent

        w0, w1 = hold.w0_wall.timestamp(), hold.w1_wall.timestamp()
        created = dict(
            PartnerEvent.objects.filter(created_at__gte=hold.start_wall).values_list(
                "event_id", "created_at"
            )
        )
        rows = [r for r in self.receipts.read() if r[2] in created]
        first: dict[str, float] = {}
        for arrived, ok, event_id, _, _ in sorted(rows):
            if ok:
                first.setdefault(event_id, arrived)
        received = Counter(r[2] for r in rows)
        in_window = [e for e, at in created.items() if w0 <= at.timestamp() < w1]
        latency = [(first[e] - created[e].timestamp()) * 1000 for e in in_window if e in first]
        claims = dict(
            Delivery.objects.filter(
                event__event_id__in=in_window, attempts=1, status=Delivery.Status.SUCCEEDED
            ).values_list("event__event_id", "last_attempt_at")
        )
        to_claim = [(at - created[e]).total_seconds() * 1000 for e, at in claims.items()]
        to_receipt = [(first[e] - at.timestamp()) * 1000 for e, at in claims.items() if e in first]
        return PartnerResult(
            created_per_s=len(in_window) / (w1 - w0),
            delivered_per_s=sum(w0 <= at < w1 for at in first.values()) / (w1 - w0),
            latency_ms=(percentile(latency, 50), percentile(latency, 99)),
            to_claim_ms=(percentile(to_claim, 50), percentile(to_claim, 99)),
            claim_to_receipt_ms=(percentile(to_receipt, 50), percentile(to_receipt, 99)),
            created=len(created),
            undelivered=len(created.keys() - first.keys()),
            unverified=sum(not r[1] for r in rows),
            twice=sum(n > 1 for n in received.values()),
            receiver_cpu=hold.cpu.roles["receiver"],
        )


def offered(records: list[DeliveryRecord], hold: Hold, threads: int) -> Offered:
    """What the simulator offered in the window, from its delivery records (read after the
    drain, so every event queued in the window has had its first attempt)."""
    w0, w1 = hold.w0, hold.w1
    firsts = [r for r in records if r.attempt == 1 and not r.duplicate and w0 <= r.queued < w1]
    waits = [(r.monotonic - r.queued) * 1000 for r in firsts]
    # Busy thread-seconds inside the window, and the most POSTs at once (a sweep).
    busy, edges = 0.0, []
    for r in records:
        start, end = r.monotonic, r.monotonic + r.elapsed
        if start < w1 and end > w0:
            busy += min(end, w1) - max(start, w0)
            edges += [(start, 1), (end, -1)]
    most = now = 0
    for _, step in sorted(edges):
        now += step
        most = max(most, now)
    # A call's transcripts are each scheduled 1 s after the one before ran: what their spacing
    # exceeds that by is how late the simulator's timer thread ran them (or waited for its lock).
    spacing: dict[str, list[float]] = {}
    for r in sorted(firsts, key=lambda r: r.queued):
        if r.event_type == "call.transcription":
            spacing.setdefault(r.call_control_id, []).append(r.queued)
    timer_late = [
        max(0.0, b - a - 1.0) * 1000 for times in spacing.values() for a, b in pairwise(times)
    ]
    late = hold.late
    return Offered(
        webhooks_per_s=len(firsts) / (w1 - w0),
        wait_ms=(percentile(waits, 50), percentile(waits, 99)),
        in_flight=(busy / (w1 - w0), most),
        placer_late_ms=(percentile(late, 99), max(late, default=float("nan"))),
        timer_late_ms=(percentile(timer_late, 99), max(timer_late, default=float("nan"))),
    )


def run_load(args, run: Scratch, work: Path) -> bool:
    bench = LoadBench(args, run, work)
    results: list[RateResult] = []
    try:
        bench.start()
        bench.warm_up()
        for rate in args.rates:
            result, _ = measure_quietly(
                f"{rate:g} calls/s for {args.hold:g} s",
                lambda _attempt, rate=rate: bench.measure(rate),
                attempts=args.attempts,
                quiet_wait=args.quiet_wait,
            )
            results.append(result)
            print(
                f"  {rate:g} calls/s: {result.offered.webhooks_per_s:.0f} webhooks/s offered, "
                f"{result.webhooks_per_s:.0f} delivered, ack p99 "
                f"{result.ack_ms[1]:.1f} ms, lag p99 {result.lag_s[1]:.2f} s, slope "
                f"{result.slope:+.2f}/s, lost {result.lost}, drained in "
                f"{result.drain_seconds:.0f} s: {'held' if result.held else 'NOT held'}",
                flush=True,
            )
            if not result.drained:
                print("  the system did not drain in time: stopping here")
                break
            if not result.held and not args.keep_going:
                break
    finally:
        bench.stop()
    return report_load(args, results)


def ms(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"  # nan: no values


def report_load(args, results: list[RateResult]) -> bool:
    partners = (
        f", worker-partners ({PARTNER_THREADS} threads) delivering to one HTTPS receiver "
        f"that verifies each request (every event type, interim transcripts "
        f"{'included' if args.interim else 'left out'})"
        if args.partners
        else ", no partner callbacks (--no-partners)"
    )
    roles = [r for r in ROLES if args.partners or r != "partners"]
    print(
        f"\nWhole system, {os.cpu_count()} cores: gunicorn (config/gunicorn.py), Celery workers "
        f"for commands and for events x 2 children each{partners}, beat, PostgreSQL, Redis, "
        f"simulator without media in the benchmark process ({args.delivery_workers} delivery "
        f"threads).\nCalls of {args.call_duration:g} s (+-20 %), "
        f"answered with streaming and transcription inline; rate limits {args.limit}/s (not "
        "reached). Each rate held "
        f"{args.hold:g} s; figures over the last {results[0].window:.0f} s of it, losses over "
        "all of it.\nanswer: call.initiated received -> the answer at the simulator.\n"
        if results
        else "\nno rate measured"
    )
    print_table(
        (
            "calls/s",
            "calls",
            "webhooks/s",
            "ack p50 ms",
            "ack p99 ms",
            "lag p50 s",
            "lag p99 s",
            "backlog /s",
            "answer p50 ms",
            "answer p99 ms",
            "lost",
            "held",
        ),
        [
            (
                f"{r.rate:g}",
                r.placed,
                f"{r.webhooks_per_s:,.0f}",
                ms(r.ack_ms[0]),
                ms(r.ack_ms[1]),
                f"{r.lag_s[0]:.3f}",
                f"{r.lag_s[1]:.3f}",
                f"{r.slope:+.2f}",
                ms(r.answer_ms[0]),
                ms(r.answer_ms[1]),
                r.lost,
                "yes" if r.held else "no",
            )
            for r in results
        ],
    )
    print(
        "\nLoad offered in the window. offered: webhooks the simulator's calls queued per second;"
        " delivered: answered 2xx.\nwait: queued -> POST started (a delivery thread free, the"
        " call's earlier events sent). in flight: POSTs at once, mean\nand most, of"
        f" {args.delivery_workers} delivery threads. placer late: behind the placing schedule."
        " timer late: transcripts spaced beyond\ntheir 1 s (the simulator's timer thread"
        " behind). simulator: cores of the benchmark process (one process, one GIL)."
    )
    print_table(
        (
            "calls/s",
            "offered/s",
            "delivered/s",
            "wait p50 ms",
            "wait p99 ms",
            "in flight",
            "most",
            "placer late p99 ms",
            "max",
            "timer late p99 ms",
            "max",
            "simulator",
        ),
        [
            (
                f"{r.rate:g}",
                f"{r.offered.webhooks_per_s:,.0f}",
                f"{r.webhooks_per_s:,.0f}",
                ms(r.offered.wait_ms[0]),
                ms(r.offered.wait_ms[1]),
                f"{r.offered.in_flight[0]:.1f}",
                r.offered.in_flight[1],
                ms(r.offered.placer_late_ms[0]),
                ms(r.offered.placer_late_ms[1]),
                ms(r.offered.timer_late_ms[0]),
                ms(r.offered.timer_late_ms[1]),
                f"{r.cpu.cores(r.cpu.roles['bench']):.2f}",
            )
            for r in results
        ],
    )
    if args.partners:
        print(
            "\nPartner callbacks. events/s: partner events created in the window; delivered/s:"
            " events that first reached the\nreceiver in the window; latency: created_at ->"
            " the receiver got it, events created in the window, and its two\nparts (events"
            " delivered at their first attempt): -> claim (drain commit, broker, worker thread,"
            " order and slot\nchecks) and claim -> receipt (the POST); over the hold: events,"
            " never delivered verified by the end of\nthe drain, signature failures, received"
            " twice; partners ms/event: worker-partners CPU per event delivered\nin the window."
        )
        print_table(
            (
                "calls/s",
                "events/s",
                "delivered/s",
                "latency p50 ms",
                "latency p99 ms",
                "-> claim p50",
                "p99",
                "claim -> receipt p50",
                "p99",
                "events",
                "undelivered",
                "sig failures",
                "twice",
                "partners ms/event",
            ),
            [
                (
                    f"{r.rate:g}",
                    f"{p.created_per_s:,.1f}",
                    f"{p.delivered_per_s:,.1f}",
                    ms(p.latency_ms[0]),
                    ms(p.latency_ms[1]),
                    *(ms(v) for v in (*p.to_claim_ms, *p.claim_to_receipt_ms)),
                    p.created,
                    p.undelivered,
                    p.unverified,
                    p.twice,
                    f"{r.cpu.roles['partners'] / max(1, p.delivered_per_s * r.window) * 1000:.2f}",
                )
                for r in results
                if (p := r.partners)
            ],
        )
    print("\nLosses over each hold (after the drain)")
    names = list(results[0].losses) if results else []
    print_table(
        ("calls/s", *names, "failed POSTs", "drain s"),
        [
            (f"{r.rate:g}", *(r.losses[k] for k in names), r.failed_posts, f"{r.drain_seconds:.0f}")
            for r in results
        ],
    )
    print(
        "\nCPU in the window, cores. pg ended: PostgreSQL backends that ended in the window (any"
        " database;\nthey are in no other column); others: every other process and unattributed"
        " time, pg ended included.\nsessions/s: database sessions opened on the run's database."
        " applied/wCPU-s: events applied per second of worker CPU."
    )
    print_table(
        (
            "calls/s",
            *(ROLE_NAMES.get(r, r) for r in roles),
            "pg ended",
            "others",
            "idle %",
            "sessions/s",
            "applied/wCPU-s",
        ),
        [
            (
                f"{r.rate:g}",
                *(f"{r.cpu.cores(r.cpu.roles[role]):.2f}" for role in roles),
                f"{r.cpu.cores(r.pg_exited):.2f}",
                f"{r.cpu.cores(r.cpu.not_ours):.2f}",
                f"{100 * r.cpu.idle_share:.0f}",
                f"{r.sessions / r.window:.1f}",
                f"{r.per_worker_cpu_s:,.0f}",
            )
            for r in results
        ],
    )
    print("\nCPU per webhook delivered in the window, ms")
    print_table(
        ("calls/s", *(ROLE_NAMES.get(r, r) for r in roles), "pg ended"),
        [
            (
                f"{r.rate:g}",
                *(
                    f"{seconds / max(1, r.webhooks_per_s * r.window) * 1000:.2f}"
                    for seconds in (*(r.cpu.roles[role] for role in roles), r.pg_exited)
                ),
            )
            for r in results
        ],
    )
    print("\nRSS at the window's end, MiB: processes x largest (total)")
    print_table(
        ("calls/s", *(ROLE_NAMES.get(r, r) for r in roles)),
        [
            (
                f"{r.rate:g}",
                *(
                    f"{len(v)} x {max(v):.0f} ({sum(v):.0f})" if (v := r.rss.get(role)) else "-"
                    for role in roles
                ),
            )
            for r in results
        ],
    )
    for r in results:
        if p := r.partners:
            rss = r.rss.get("receiver") or [float("nan")]
            print(
                f"receiver (outside callops, like the simulator), {r.rate:g} calls/s: "
                f"{r.cpu.cores(p.receiver_cpu):.2f} cores, "
                f"{p.receiver_cpu / max(1, p.delivered_per_s * r.window) * 1000:.2f} ms per "
                f"event delivered, RSS {max(rss):.0f} MiB"
            )
    print()
    for r in results:
        if r.cpu.others_share > NOISE_LIMIT:
            top = ", ".join(f"{n} {c:.2f}" for n, c in r.cpu.top_others(3))
            print(
                f"NOISY: {r.rate:g} calls/s: other processes took {r.cpu.others_share:.0%} of "
                f"the CPU ({top})"
            )
        if r.offered.placer_late_ms[1] > 100:
            print(
                f"NOTE: {r.rate:g} calls/s: the placer fell up to "
                f"{r.offered.placer_late_ms[1]:.0f} ms behind its schedule (the simulator's "
                "process is saturated, or the machine's CPU)"
            )
        if r.offered.in_flight[1] >= args.delivery_workers:
            print(
                f"NOTE: {r.rate:g} calls/s: all {args.delivery_workers} delivery threads were "
                "busy at once: the pool limited the load offered (--delivery-workers)"
            )
        if r.cpu.cores(r.cpu.roles["bench"]) > 0.8:
            print(
                f"NOTE: {r.rate:g} calls/s: the simulator's process took "
                f"{r.cpu.cores(r.cpu.roles['bench']):.2f} cores, near the one its GIL allows: "
                "the load generator may be the limit"
            )
        if not r.held:
            why = []
            if r.ack_ms[1] >= TARGET_ACK_P99_MS:
                why.append(f"ack p99 {r.ack_ms[1]:.0f} ms")
            if not r.lag_s[1] < TARGET_LAG_P99_S:
                why.append(f"apply lag p99 {r.lag_s[1]:.2f} s")
            if not r.slope < TARGET_SLOPE:
                why.append(f"backlog growing {r.slope:+.1f} events/s")
            why += [f"{v} {k}" for k, v in r.losses.items() if v]
            if not r.drained:
                why.append(f"not drained within {r.drain_seconds:.0f} s")
            print(f"not held at {r.rate:g} calls/s: {', '.join(why)}")
    held = [r.rate for r in results if r.held]
    best = max(held, default=0.0)
    # "Held" must hold from the bottom up: a rate held above one that was not does not count.
    for r in results:
        if not r.held:
            best = min(best, max((h for h in held if h < r.rate), default=0.0))
            break
    print(
        f"\nhighest rate held: {best:g} calls/s (ack p99 < {TARGET_ACK_P99_MS:g} ms, apply lag "
        f"p99 < {TARGET_LAG_P99_S:g} s, backlog slope < {TARGET_SLOPE:g} events/s, nothing lost)"
    )
    # The answer's own target, at the target rate (or the highest one run below it).
    at_target = [r for r in results if r.rate <= args.target]
    answer = max(at_target, key=lambda r: r.rate) if at_target else None
    verdicts = [
        (best >= args.target, f"highest rate held {best:g} calls/s (target >= {args.target:g})")
    ]
    if answer is not None:
        verdicts.append(
            (
                answer.answer_ms[1] < TARGET_ANSWER_P99_MS,
                f"call.initiated -> answer p99 {answer.answer_ms[1]:.0f} ms at "
                f"{answer.rate:g} calls/s (target < {TARGET_ANSWER_P99_MS:g} ms at "
                f"{args.target:g} calls/s)",
            )
        )
    return print_verdicts(verdicts)


# --- Backlog mode ---------------------------------------------------------------------------


@dataclass
class DrainResult:
    workers: int
    seconds: float
    events: int
    failed: int
    tasks: list[int]  # drain tasks each worker process ran
    cpu: CpuUse
    notes: list[str] = field(default_factory=list)


def backlog_events(events: int, calls: int) -> list[bytes]:
    """``events`` webhook bodies over ``calls`` calls, in the order calls arriving at 5/s would
    send them."""
    base = datetime.now(UTC) - timedelta(seconds=calls / 5 + 60)
    per_call, extra = divmod(events, calls)
    timed: list[tuple[datetime, bytes]] = []
    for i in range(calls):
        ccid = f"v3:sysbench-backlog-{i}-{secrets.token_hex(6)}"
        t0 = base + timedelta(seconds=i / 5)
        common = {"connection_id": BACKLOG_CONNECTION_ID, "client_state": None}
        lifecycle = [
            ("call.initiated", 0.0, {"direction": "incoming", "state": "parked"}),
            ("call.answered", 1.0, {"state": "answered"}),
            ("streaming.started", 1.05, {"stream_url": STREAM_URL}),
        ]
        segments = per_call + (i < extra) - 4
        for k in range(segments):
            data = {
                "transcript": "it is four two seven one",
                "confidence": 0.93,
                "is_final": k % 2 == 1,
                "transcription_track": "inbound" if k % 4 < 2 else "outbound",
            }
            lifecycle.append(("call.transcription", 2.0 + k, {"transcription_data": data}))
        hangup = {
            "hangup_cause": "normal_clearing",
            "hangup_source": "caller",
            "sip_hangup_cause": "200",
            "start_time": t0.isoformat().replace("+00:00", "Z"),
        }
        lifecycle.append(("call.hangup", 2.0 + segments, hangup))
        for event_type, offset, payload in lifecycle:
            at = t0 + timedelta(seconds=offset)
            body = envelope(event_type, ccid, occurred_at=at, **common, **payload)
            timed.append((at, dumps(body)))
    timed.sort(key=lambda pair: pair[0])
    return [body for _, body in timed]


def prefill(events: int, calls: int) -> float:
    """Store the backlog through the webhook's own INSERT; returns seconds taken."""
    from callops import drain, webhooks

    start = time.monotonic()
    for body in backlog_events(events, calls):
        webhooks.store_event(webhooks.parse_event(body), handled=True)
    drain.flag_lower()  # no drain was published: the measurement's request() publishes them
    return time.monotonic() - start


def drain_once(args, run: Scratch, env: dict, template: str, workers: int, work: Path):
    from django.db import connections

    from callops import drain

    connections.close_all()
    copy_database(template, args.database, pg=args.pg)
    redis.Redis.from_url(run.redis_url).flushdb()
    logs = [work / f"backlog-{workers}-{i}.log" for i in range(workers)]
    env = {**env, "LOG_LEVEL_CELERY_TASKS": "INFO"}  # tasks are counted from Celery's lines
    procs = []
    meter = None
    try:
        for i, log in enumerate(logs):
            procs.append(start_worker(env, f"sysbench-backlog{i}", 1, log, "events"))
        for proc, log in zip(procs, logs, strict=True):  # its SDK import is over too
            wait_for_log(proc, log, "Telnyx client ready")
        meter = CpuMeter(run.database_url, {"workers": [p.pid for p in procs]})
        wait_for_quiet(min(args.quiet_wait, 60), seconds=3)  # the workers' start-up is over
        with psycopg.connect(run.database_url, autocommit=True) as db:
            pending = "SELECT count(*) FROM callops_webhookevent WHERE status = 'pending'"
            (events,) = db.execute(pending).fetchone()
            before = meter.snapshot()
            start = time.monotonic()
            if not drain.request():
                raise RuntimeError("drain.request() published no drain")
            while db.execute(pending).fetchone()[0]:
                if time.monotonic() - start > args.drain_timeout:
                    raise RuntimeError(f"{workers} workers: not drained in {args.drain_timeout} s")
                time.sleep(0.1)
            seconds = time.monotonic() - start
            cpu = meter.since(before)
            (failed,) = db.execute(
                "SELECT count(*) FROM callops_webhookevent WHERE status = 'failed'"
            ).fetchone()
        time.sleep(1.0)  # the last task's log line
        tasks = [
            log.read_text(errors="replace").count("drain_webhook_events[") // 2 for log in logs
        ]  # "received" and "succeeded" lines
        return DrainResult(workers, seconds, events, failed, tasks, cpu)
    finally:
        if meter is not None:
            meter.close()
        stop_processes(procs)


def run_backlog(args, run: Scratch, work: Path) -> bool:
    env = stack_env(run, Signer(), work, None, args.limit)
    env.update(TELNYX_API_KEY="sysbench-unused", TELNYX_BASE_URL="http://127.0.0.1:9/v2")
    run.migrate(env)
    os.environ.update(env)
    import django

    django.setup()
    from django.db import connections

    print(f"pre-filling {args.events:,} pending events over {args.calls:,} calls ...", flush=True)
    seconds = prefill(args.events, args.calls)
    print(f"  stored in {seconds:.0f} s ({args.events / seconds:,.0f}/s)", flush=True)
    connections.close_all()
    template = f"{args.database}_template"
    copy_database(args.database, template, pg=args.pg)
    results: list[DrainResult] = []
    try:
        for workers in (1, 2):
            result, _ = measure_quietly(
                f"drain with {workers} worker process{'es' if workers > 1 else ''}",
                lambda _attempt, w=workers: drain_once(args, run, env, template, w, work),
                attempts=args.attempts,
                quiet_wait=args.quiet_wait,
            )
            results.append(result)
            print(f"  {result.seconds:.1f} s", flush=True)
    finally:
        drop_database(template, pg=args.pg)
    return report_backlog(args, results)


def report_backlog(args, results: list[DrainResult]) -> bool:
    print(
        f"\nBacklog drain: {args.events:,} pending events over {args.calls:,} calls, web tier "
        f"idle, worker processes with --concurrency 1, {os.cpu_count()} cores\n"
    )
    print_table(
        (
            "workers",
            "events",
            "seconds",
            "events/s",
            "drain tasks per process",
            "worker cores",
            "postgres cores",
            "others",
            "idle %",
            "events/wCPU-s",
            "failed",
        ),
        [
            (
                str(r.workers),
                f"{r.events:,}",
                f"{r.seconds:.1f}",
                f"{r.events / r.seconds:,.0f}",
                " / ".join(str(t) for t in r.tasks),
                f"{r.cpu.cores(r.cpu.roles['workers']):.2f}",
                f"{r.cpu.cores(r.cpu.roles['postgres']):.2f}",
                f"{r.cpu.cores(r.cpu.not_ours):.2f}",
                f"{100 * r.cpu.idle_share:.0f}",
                f"{r.events / max(1e-9, r.cpu.roles['workers']):,.0f}",
                r.failed,
            )
            for r in results
        ],
    )
    print()
    for r in results:
        if r.cpu.others_share > NOISE_LIMIT:
            print(f"NOISY: {r.workers} workers: others took {r.cpu.others_share:.0%} of the CPU")
    one, two = results
    speedup = one.seconds / two.seconds
    return print_verdicts(
        [
            (
                speedup >= TARGET_RATIO,
                f"two worker processes drain {speedup:.2f} x as fast as one "
                f"({one.seconds:.1f} s / {two.seconds:.1f} s; target >= {TARGET_RATIO})",
            ),
            (not one.failed and not two.failed, "no event failed"),
        ]
    )


# --- Main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[1, 5, 10, 15, 20, 25],
        help="calls/s, comma separated, in rising order",
    )
    parser.add_argument("--hold", type=float, default=60, help="seconds each rate is held")
    parser.add_argument("--target", type=float, default=20, help="calls/s that must be held")
    parser.add_argument("--call-duration", type=float, default=20, help="seconds, +-20 %%")
    parser.add_argument(
        "--limit", type=int, default=100, help="TELNYX_RATE_LIMIT and the simulator's, /s"
    )
    parser.add_argument(
        "--delivery-workers",
        type=int,
        default=64,
        help="the simulator's webhook POST threads (enough that the pool is never the limit)",
    )
    parser.add_argument(
        "--no-partners",
        dest="partners",
        action="store_false",
        help="no partner endpoint, no worker-partners, no receiver (for comparison)",
    )
    parser.add_argument(
        "--interim",
        action="store_true",
        help="the partner endpoint takes interim transcript segments too",
    )
    parser.add_argument("--keep-going", action="store_true", help="go on past a rate not held")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600,
        help="seconds to wait for the backlog to drain after a rate (or a backlog drain)",
    )
    parser.add_argument("--backlog", action="store_true", help="the backlog-drain check instead")
    parser.add_argument("--events", type=int, default=50_000, help="--backlog: pending events")
    parser.add_argument("--calls", type=int, default=2_000, help="--backlog: calls they are of")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    add_scratch_options(parser, database="callops_sysbench", redis_db=9)
    add_quiet_options(parser, quiet_wait=120)
    args = parser.parse_args()
    if args.backlog and args.events < 5 * args.calls:
        parser.error("--events must be at least 5 per call (the lifecycle events and one more)")

    work = Path(tempfile.mkdtemp(prefix="sysbench-"))
    passed = False
    try:
        with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
            passed = (run_backlog if args.backlog else run_load)(args, run, work)
    finally:
        if args.keep_logs or not passed:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
