"""Throughput and latency of ``POST /webhooks/telnyx/`` against a bare Django view, in one run.

    .venv/bin/python benchmarks/webhook_throughput.py [--duration 10] [--connections 16]

What it does, on this machine only (loopback, plain HTTP):

1. Recreates the database ``callops_bench`` on the local PostgreSQL, migrates it, and flushes
   Redis db 13 (cache and broker of the run).
2. Generates an Ed25519 key pair and starts gunicorn on a free port with production's
   ``config/gunicorn.py`` but 2 sync workers, the setting the targets were set in
   (``--workers 0``: production's 2 per core, 4 here) and ``benchmarks.bench_settings``:
   production settings plus ``/bench/bare/``, a view answering
   ``b"ok"`` behind the same middleware as the webhook. A warm-up opens every worker's database
   and broker connections (a worker's first broker publish costs ~100 ms).
3. Measures, each phase ``--duration`` seconds:
   a. the bare view at maximum rate (wrk, closed loop, ``--connections``);
   b. the webhook at maximum rate, every request a distinct, freshly signed ~900-byte event;
   a and b alternate for ``--rounds`` rounds (3), and each round gives a ratio b / a: a slow
   spell of this shared machine then spoils one round, not the result, which is the median;
   c. the webhook at half of b's median rate, open loop: requests leave on a fixed schedule
      whatever the server does, and latency counts from the scheduled time, so a stall is not
      hidden (wrk's own pacing would hold a connection idle, which blocks a sync worker).
4. Checks that every 2xx in b and c stored exactly one row and that no event was a duplicate,
   prints req/s, p50, p99, the ratio to bare and the CPU each process spent per request, then
   PASS/FAIL against the targets: webhook >= 0.3 x bare (median round), p99 < 50 ms at half
   the maximum rate.
5. Stops gunicorn, drops the database and flushes the Redis db.

Two cores are easily disturbed: before each phase the script waits for the machine to be idle,
repeats a phase during which other processes took over 10 % of the CPU (``--attempts``), and
says NOISY when that did not help. ``--settings`` runs the server with a variant of the
settings (which must keep ``ROOT_URLCONF = "benchmarks.bench_urls"``) to compare a change.

Without wrk (``apt-get install wrk``) phases a and b fall back to a Python load generator in
two processes; its own CPU competes with the server, so its absolute figures are lower.
No Celery worker runs: the drain flag stays raised, so the broker sees one publish per
``DRAIN_FLAG_TTL`` (30 s), as during a burst while a drain task is in flight.
See webhook_cost.py for the cost of each step of a request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import runpy
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from harness import (
    NOISE_LIMIT,
    ROOT,
    CpuMeter,
    CpuUse,
    Scratch,
    add_quiet_options,
    add_scratch_options,
    measure_quietly,
    percentile,
    print_table,
    print_verdicts,
    ratio,
    scratch,
    start_process,
    stop_processes,
)

from telnyx_sim.envelopes import envelope
from telnyx_sim.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, Signer

BENCH_DIR = Path(__file__).resolve().parent

WEBHOOK_PATH = "/webhooks/telnyx/"
BARE_PATH = "/bench/bare/"
EVENT_TABLE = "callops_webhookevent"
TARGET_RATIO = 0.3
TARGET_P99_MS = 50.0


# --- Events ---------------------------------------------------------------------------------


def _ccid() -> str:
    return "v3:" + base64.urlsafe_b64encode(secrets.token_bytes(39)).decode()


def _call_events(now: datetime) -> list[dict]:
    """Five events of one call, shaped like Telnyx's (payloads of 700-1,100 bytes)."""
    ccid = _ccid()
    common = {
        "call_leg_id": str(uuid.uuid4()),
        "call_session_id": str(uuid.uuid4()),
        "connection_id": "2518412003405440271",
        "from": "+15551230000",
        "to": "+15559870000",
    }
    start = now.isoformat().replace("+00:00", "Z")
    client_state = base64.b64encode(b'{"tenant":"acme","flow":"inbound-ai"}').decode()
    headers = [
        {"name": "X-Campaign", "value": "spring-renewals-2026"},
        {"name": "X-Customer-Ref", "value": secrets.token_hex(12)},
    ]
    stream_url = "wss://media.callops.example.com/telnyx/stream?tenant=acme&call=" + ccid[3:20]
    quality = {
        "jitter_max_variance": "4.97",
        "jitter_packet_count": "0",
        "mos": "4.49",
        "packet_count": "1251",
        "skip_packet_count": "12",
    }
    events = [
        envelope(
            "call.initiated",
            ccid,
            occurred_at=now,
            direction="incoming",
            state="parked",
            start_time=start,
            caller_id_name="+15551230000",
            client_state=None,
            custom_headers=headers,
            shaken_stir_attestation="A",
            shaken_stir_validated=True,
            connection_codecs="G722,PCMU,PCMA,OPUS",
            **common,
        ),
        envelope(
            "call.answered",
            ccid,
            occurred_at=now,
            state="answered",
            start_time=start,
            client_state=client_state,
            custom_headers=headers,
            **common,
        ),
        envelope(
            "streaming.started",
            ccid,
            occurred_at=now,
            stream_url=stream_url,
            client_state=client_state,
            **common,
        ),
        envelope(
            "call.transcription",
            ccid,
            occurred_at=now,
            client_state=client_state,
            transcription_data={
                "transcript": "Hi, I am calling about the renewal of my contract, the one"
                " that ends next month.",
                "confidence": 0.9734,
                "is_final": True,
                "transcription_track": "inbound",
            },
            **common,
        ),
        envelope(
            "call.hangup",
            ccid,
            occurred_at=now,
            hangup_cause="normal_clearing",
            hangup_source="caller",
            sip_hangup_cause="200",
            start_time=start,
            end_time=start,
            client_state=client_state,
            call_quality_stats={"inbound": quality, "outbound": dict(quality, mos="4.36")},
            **common,
        ),
    ]
    for event in events:
        event["meta"]["delivered_to"] = "https://callops.example.com/webhooks/telnyx/"
    return events


def signed_events(signer: Signer, count: int) -> list[tuple[str, str, bytes]]:
    """``count`` distinct events as (timestamp, base64 signature, body), signed now."""
    now = datetime.now(UTC)
    ts = str(int(time.time()))
    out: list[tuple[str, str, bytes]] = []
    while len(out) < count:
        for event in _call_events(now):
            body = json.dumps(event).encode()
            signature, _ = signer.sign(body, int(ts))
            out.append((ts, signature, body))
    return out[:count]


def write_event_files(events: list[tuple[str, str, bytes]], prefix: Path, threads: int) -> None:
    """Thread i of the wrk script reads ``prefix.i`` (events i, i + threads, ...)."""
    for tid in range(threads):
        with open(f"{prefix}.{tid}", "wb") as f:
            for ts, signature, body in events[tid::threads]:
                f.write(ts.encode() + b"\t" + signature.encode() + b"\t" + body + b"\n")


def raw_request(port: int, path: str, event: tuple[str, str, bytes]) -> bytes:
    ts, signature, body = event
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{TIMESTAMP_HEADER}: {ts}\r\n{SIGNATURE_HEADER}: {signature}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


# --- Python load generator ------------------------------------------------------------------
# Used for the open-loop phase, and for every phase when wrk is missing. One request per
# connection, as gunicorn's sync workers close the connection after each response anyway.


class _Exchange(asyncio.Protocol):
    def __init__(self, raw: bytes, done: asyncio.Future):
        self.raw, self.done, self.buf = raw, done, bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.raw)

    def data_received(self, data):
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = 0
        for line in bytes(self.buf[:head_end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) >= head_end + 4 + length:
            self._finish()
            self.transport.close()

    def connection_lost(self, exc):
        self._finish(exc)

    def _finish(self, exc=None):
        if self.done.done():
            return
        if not self.buf and exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(bytes(self.buf))


@dataclass
class LoadResult:
    elapsed: float = 0.0
    sent: int = 0
    completed: int = 0
    non2xx: int = 0
    duplicates: int = 0
    socket_errors: int = 0
    late_sends: int = 0  # open loop: requests that left over 5 ms after their scheduled time
    max_late_ms: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    slow: list[tuple[float, float]] = field(default_factory=list)  # (sent at, latency) > 20 ms

    def merge(self, other: LoadResult) -> None:
        self.elapsed = max(self.elapsed, other.elapsed)
        for name in ("sent", "completed", "non2xx", "duplicates", "socket_errors", "late_sends"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_late_ms = max(self.max_late_ms, other.max_late_ms)
        self.latencies += other.latencies
        self.slow += other.slow


async def _drive(
    port: int, requests: list[bytes], *, duration: float, connections: int, rate: float | None
) -> LoadResult:
    """Closed loop with ``connections`` clients, or open loop at ``rate`` requests/s."""
    loop = asyncio.get_running_loop()
    result = LoadResult()
    pending: set[asyncio.Task] = set()

    async def one(raw: bytes, t0: float) -> None:
        done = loop.create_future()
        try:
            await loop.create_connection(lambda: _Exchange(raw, done), "127.0.0.1", port)
            response = await done
        except OSError:
            result.socket_errors += 1
            return
        latency = loop.time() - t0
        result.latencies.append(latency)
        if latency > 0.020:
            result.slow.append((t0 - start, latency))
        result.completed += 1
        status = response[9:12]
        if not status.startswith(b"2"):
            result.non2xx += 1
        if b'"duplicate": true' in response:
            result.duplicates += 1

    start = loop.time()
    deadline = start + duration
    if rate is None:
        feed = iter(requests)

        async def client() -> None:
            while loop.time() < deadline:
                raw = next(feed, None)
                if raw is None:
                    return
                result.sent += 1
                await one(raw, loop.time())

        await asyncio.gather(*(client() for _ in range(connections)))
    else:
        for i, raw in enumerate(requests):
            scheduled = start + i / rate
            if scheduled >= deadline:
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late_ms = (loop.time() - scheduled) * 1000
            if late_ms > 5:
                result.late_sends += 1
                result.max_late_ms = max(result.max_late_ms, late_ms)
            result.sent += 1
            task = loop.create_task(one(raw, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
        result.elapsed = result.sent / rate  # the schedule's span: completions after it count
        return result
    result.elapsed = loop.time() - start
    return result


def python_load(
    port: int,
    requests: list[bytes],
    *,
    duration: float,
    connections: int,
    rate: float | None = None,
    processes: int = 1,
) -> LoadResult:
    """Run ``_drive`` in this process (open loop) or in ``processes`` forked processes."""
    if processes <= 1:
        return asyncio.run(
            _drive(port, requests, duration=duration, connections=connections, rate=rate)
        )
    ctx = multiprocessing.get_context("fork")
    children = []
    for n in range(processes):
        reader, writer = ctx.Pipe(duplex=False)
        share = requests[n::processes]
        per = max(1, connections // processes)

        def target(w=writer, share=share, per=per):
            w.send(
                asyncio.run(
                    _drive(
                        port,
                        share,
                        duration=duration,
                        connections=per,
                        rate=rate and rate / processes,
                    )
                )
            )

        proc = ctx.Process(target=target)
        proc.start()
        children.append((proc, reader))
    total = LoadResult()
    for proc, reader in children:
        total.merge(reader.recv())
        proc.join()
    return total


async def _fetch_all(port: int, raws: list[bytes]) -> list[bytes]:
    loop = asyncio.get_running_loop()

    async def one(raw: bytes) -> bytes:
        done = loop.create_future()
        await loop.create_connection(lambda: _Exchange(raw, done), "127.0.0.1", port)
        return await done

    return await asyncio.gather(*(one(raw) for raw in raws))


def warm_workers(port: int, workers: int) -> None:
    """Call /bench/warm/ until every worker has rung the doorbell once (see bench_urls.warm)."""
    probe = "GET /bench/warm/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    pids: set[bytes] = set()
    for _ in range(100):
        for response in asyncio.run(_fetch_all(port, [probe.encode()] * workers)):
            if not response.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"/bench/warm/ failed: {response[:200]!r}")
            pids.add(response.partition(b"\r\n\r\n")[2])
        if len(pids) >= workers:
            return
    raise RuntimeError(f"only {len(pids)} of {workers} workers answered /bench/warm/")


# --- Measurement ----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    path: str
    load: LoadResult | None = None
    wrk: dict | None = None
    cpu: CpuUse | None = None
    rows: int | None = None
    target_rate: float | None = None
    attempts: int = 1
    baseline: Phase | None = None  # the bare view's phase of the same round (its own, for one)

    @property
    def ratio(self) -> float | None:
        return ratio(self.rps, self.baseline and self.baseline.rps)

    @property
    def completed(self) -> int:
        return self.wrk["completed"] if self.wrk else self.load.completed

    @property
    def sent(self) -> int:
        return self.wrk["sent"] if self.wrk else self.load.sent

    @property
    def rps(self) -> float:
        if self.wrk:
            return self.wrk["completed"] / (self.wrk["duration_us"] / 1e6)
        return self.load.completed / self.load.elapsed

    def percentile_ms(self, p: int) -> float:
        if self.wrk:
            return self.wrk[f"p{p}_us"] / 1000
        return percentile(self.load.latencies, p) * 1000

    @property
    def bad(self) -> dict[str, int]:
        src = self.wrk or vars(self.load)
        return {
            "non-2xx": src["non2xx"],
            "duplicates": src["duplicates"],
            "socket errors": src["socket_errors"],
            "timeouts": src.get("timeouts", 0),
            "events reused": src.get("wraps", 0),
        }


def run_wrk(
    port: int,
    path: str,
    events_prefix: Path,
    *,
    duration: float,
    threads: int,
    connections: int,
    verbose: bool,
) -> dict:
    cmd = [
        "wrk",
        "--latency",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "webhook_wrk.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        str(events_prefix),
        path,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if verbose:
        print(out)
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise RuntimeError(f"wrk printed no result:\n{out}")


# --- Set-up and tear-down -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_rows(db_url: str) -> tuple[int, int]:
    """(rows, rows delivered more than once) in the event table."""
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            f"SELECT count(*), count(*) FILTER (WHERE delivery_count > 1) FROM {EVENT_TABLE}"
        ).fetchone()


def wait_until_serving(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    probe = f"GET {BARE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(probe)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("gunicorn did not answer 200 on the bare view in time")


def production_env(run: Scratch, settings: str, signer: Signer, static_root: Path) -> dict:
    """Production settings on the scratch services, with a throw-away secret and signing key."""
    return run.env(
        settings,
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        DJANGO_SECURE_SSL_REDIRECT="false",
        DJANGO_STATIC_ROOT=str(static_root),
        TELNYX_API_KEY="bench-unused",
        TELNYX_PUBLIC_KEY=signer.public_key,
    )


def start_gunicorn(
    env: dict[str, str], port: int, workers: int, log_path: Path, *, threads: int = 1
) -> subprocess.Popen:
    """gunicorn on 127.0.0.1:``port`` with production's ``config/gunicorn.py``, ``workers``
    sync workers (gthread with ``threads`` > 1); wait for it with ``wait_until_serving``."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    worker_class = (
        ["--worker-class", "gthread", "--threads", str(threads)]
        if threads > 1
        else ["--worker-class", "sync"]
    )
    return start_process(
        [
            *(gunicorn, "--config", str(ROOT / "config" / "gunicorn.py")),
            *("--workers", str(workers), *worker_class),
            *("--bind", f"127.0.0.1:{port}", "--chdir", str(ROOT), "--log-level", "warning"),
            "config.wsgi:application",
        ],
        env=env,
        log_path=log_path,
    )


def measure(
    args: argparse.Namespace, run: Scratch, signer: Signer, work: Path, use_wrk: bool
) -> tuple[dict[str, Phase], int]:
    """Start gunicorn, warm it up and run the phases: (phases by name, events stored twice)."""
    (work / "static").mkdir()
    env = production_env(run, args.settings, signer, work / "static")
    run.migrate(env)
    port = free_port()
    server = start_gunicorn(
        env, port, args.workers, work / "gunicorn.log", threads=args.threads_per_worker
    )
    meter: CpuMeter | None = None
    try:
        wait_until_serving(port, server)
        print(f"gunicorn serving on 127.0.0.1:{port}; warming up", flush=True)

        # Warm-up: every worker imports its views, opens its database and Redis connections.
        warm = [raw_request(port, WEBHOOK_PATH, e) for e in signed_events(signer, 200)]
        warm += [raw_request(port, BARE_PATH, e) for e in signed_events(signer, 200)]
        warmed = python_load(port, warm, duration=10, connections=4)
        if warmed.non2xx or warmed.completed != len(warm):
            raise RuntimeError(
                f"warm-up failed: {warmed.completed}/{len(warm)} answered, "
                f"{warmed.non2xx} non-2xx; see {work / 'gunicorn.log'}"
            )
        warm_workers(port, args.workers)
        meter = CpuMeter(run.database_url, {"gunicorn": [server.pid]})
        phases: dict[str, Phase] = {}

        def attempt(phase: Phase, count: int) -> Phase:
            events = signed_events(signer, count)  # signed now: the timestamps are fresh
            rows_before = count_rows(run.database_url)[0]
            if phase.target_rate is None and use_wrk:
                prefix = work / "events"  # one file per wrk thread: events.0, events.1
                write_event_files(events, prefix, args.threads)
                before = meter.snapshot()
                phase.wrk = run_wrk(
                    port,
                    phase.path,
                    prefix,
                    duration=args.duration,
                    threads=args.threads,
                    connections=args.connections,
                    verbose=args.verbose,
                )
            else:
                raws = [raw_request(port, phase.path, e) for e in events]
                before = meter.snapshot()
                phase.load = python_load(
                    port,
                    raws,
                    duration=args.duration,
                    connections=args.connections,
                    rate=phase.target_rate,
                    processes=1 if phase.target_rate else 2,
                )
            phase.cpu = meter.since(before)
            time.sleep(0.5)  # requests in flight when the generator stopped finish
            phase.rows = count_rows(run.database_url)[0] - rows_before
            return phase

        def measured(
            name: str, path: str, count: int, *, rate: float | None = None, baseline=None
        ) -> Phase:
            def one(n: int) -> Phase:
                phase = Phase(name, path, target_rate=rate, attempts=n, baseline=baseline)
                phase.baseline = phase.baseline or (phase if path == BARE_PATH else None)
                return attempt(phase, count)

            phase, _ = measure_quietly(
                name, one, attempts=args.attempts, quiet_wait=args.quiet_wait
            )
            phases[name] = phase
            return phase

        # Rounds of a then b: a slow spell of the machine (another tenant, a checkpoint) hits
        # one round's pair, and the median round decides.
        for n in range(1, args.rounds + 1):
            # a. Bare view: bodies are ignored, so a small pool of events is cycled.
            bare = measured(f"bare view, round {n}", BARE_PATH, 2000)
            # b. Webhook at max rate: it cannot outrun the bare view, so that many events do.
            count = int(bare.rps * args.duration * 1.3) + 10 * args.connections
            measured(f"webhook, round {n}", WEBHOOK_PATH, count, baseline=bare)
        # c. Webhook at half the median round's rate, open loop.
        rate = statistics.median(p.rps for p in phases.values() if p.path == WEBHOOK_PATH) / 2
        measured(
            f"webhook, open loop {rate:,.0f}/s",
            WEBHOOK_PATH,
            int(rate * args.duration) + 1,
            rate=rate,
        )
        return phases, count_rows(run.database_url)[1]
    finally:
        if meter is not None:
            meter.close()
        stop_processes([server], timeout=15)
        if args.verbose or server.returncode not in (0, None):
            print((work / "gunicorn.log").read_text(errors="replace")[-4000:])


# --- Main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per phase")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of bare view then webhook at max rate"
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="gunicorn workers: 2, as the targets were set; 0 takes config/gunicorn.py's "
        "(2 per core, or WEB_CONCURRENCY)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="over 1: gunicorn gthread workers with this many threads (a request waiting on "
        "PostgreSQL's commit no longer leaves its worker's core idle)",
    )
    parser.add_argument(
        "--settings",
        default="benchmarks.bench_settings",
        help="settings module of the server, to compare a variant (must keep bench_urls)",
    )
    add_scratch_options(parser, database="callops_bench", redis_db=13)
    parser.add_argument(
        "--load",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="generator of the maximum-rate phases",
    )
    add_quiet_options(parser, quiet_wait=300)
    parser.add_argument("--verbose", action="store_true", help="show wrk and gunicorn output")
    args = parser.parse_args()
    if not args.workers:  # what production runs on this machine
        args.workers = runpy.run_path(str(ROOT / "config" / "gunicorn.py"))["workers"]

    use_wrk = args.load != "python" and shutil.which("wrk") is not None
    if args.load == "wrk" and not use_wrk:
        parser.error("wrk is not installed: apt-get install wrk")
    if not use_wrk and args.load == "auto":
        print(
            "wrk not found (install it with: apt-get install wrk); using the Python load "
            "generator, whose own CPU lowers the figures\n"
        )

    signer = Signer()
    work = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    try:
        with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
            phases, redelivered = measure(args, run, signer, work, use_wrk)
    except subprocess.CalledProcessError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        if exc.stdout:
            print(exc.stdout, exc.stderr, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, use_wrk, phases, redelivered)


def report(args, use_wrk: bool, phases: dict[str, Phase], redelivered: int) -> int:
    *rounds, half = phases.values()
    pairs = list(zip(rounds[::2], rounds[1::2], strict=True))  # (bare, webhook) per round
    hooks = [hook for _, hook in pairs]
    generator = (
        f"wrk -t{args.threads} -c{args.connections}"
        if use_wrk
        else f"Python, 2 processes, {args.connections} connections"
    )
    settings = (
        "production settings"
        if args.settings == "benchmarks.bench_settings"
        else f"settings {args.settings}"
    )
    kind = (
        "sync workers"
        if args.threads_per_worker < 2
        else f"gthread workers x {args.threads_per_worker} threads"
    )
    print(
        f"\ngunicorn {args.workers} {kind}, {settings}, loopback, "
        f"{args.duration:g} s per phase, {len(pairs)} rounds.\nMax rate: {generator}, closed loop. "
        "Open loop: Python, one connection per request, latency from the scheduled send time.\n"
    )
    print_table(
        ("phase", "req/s", "p50 ms", "p99 ms", "x bare", "non-2xx", "rows"),
        [
            (
                phase.name,
                f"{phase.rps:,.0f}",
                f"{phase.percentile_ms(50):.2f}",
                f"{phase.percentile_ms(99):.2f}",
                phase.ratio,
                phase.bad["non-2xx"],
                None if phase.path == BARE_PATH else f"{phase.rows:,}",
            )
            for phase in (*rounds, half)
        ],
    )

    # Where the cores went, per completed request. "(kernel)" is the part of gunicorn's time spent
    # in the kernel. "other" is every other process plus kernel time no process is charged for:
    # when it is large, someone else was using the machine.
    print(f"\nCPU per request, microseconds ({os.cpu_count()} cores)")
    table = []
    for phase in (*rounds, half):
        cpu, n = phase.cpu, max(1, phase.completed)
        seconds = [cpu.roles["gunicorn"], cpu.kernel["gunicorn"]]
        seconds += [cpu.roles[role] for role in ("postgres", "redis", "bench")] + [cpu.not_ours]
        table.append(
            (
                phase.name,
                *(f"{s / n * 1e6:,.0f}" for s in seconds),
                f"{100 * cpu.idle_share:.0f}",
            )
        )
    print_table(
        ("phase", "gunicorn", "(kernel)", "postgres", "redis", "generator", "other", "idle %"),
        table,
    )
    noisy = [
        f"{phase.name}: other processes took {phase.cpu.others_share:.0%} of the CPU "
        f"(runs: {phase.attempts})"
        for phase in (*rounds, half)
        if phase.cpu.others_share > NOISE_LIMIT
    ]

    problems = []
    for phase in (*rounds, half):
        for what, value in phase.bad.items():
            if value and not (phase.path == BARE_PATH and what == "events reused"):
                problems.append(f"{phase.name}: {value} {what}")
    for phase in (*hooks, half):
        # Rows = 2xx answers, plus at most the requests still in flight when the phase ended.
        ok = phase.completed - phase.bad["non-2xx"]
        if not ok <= phase.rows <= phase.sent:
            problems.append(
                f"{phase.name}: {phase.rows} rows stored for {ok} 2xx answers ({phase.sent} sent)"
            )
    if redelivered:
        problems.append(f"{redelivered} events were stored from more than one delivery")
    if half.load and half.load.max_late_ms > 20:
        problems.append(
            f"the open-loop generator fell behind its schedule by up to "
            f"{half.load.max_late_ms:.0f} ms ({half.load.late_sends} sends > 5 ms late)"
        )
    if half.rps < 0.95 * half.target_rate:
        problems.append(f"open loop reached {half.rps:,.0f}/s of {half.target_rate:,.0f}/s")

    print(
        f"\nrows: {sum(h.rows for h in hooks):,} stored for {sum(h.completed for h in hooks):,} "
        f"answers at max rate ({sum(h.sent for h in hooks):,} sent), {half.rows:,} for "
        f"{half.completed:,} in the open loop; {redelivered} delivered twice"
    )
    if half.load and half.load.slow:
        # Spread in time = queueing; bunched = one stall (a first broker publish, a reconnect,
        # another process taking a core).
        slow = sorted(half.load.slow)
        seconds = Counter(int(t) for t, _ in slow)
        busiest = ", ".join(f"{s}-{s + 1} s: {n}" for s, n in sorted(seconds.most_common(3)))
        print(
            f"open loop: {len(slow)} answers over 20 ms (max {max(x for _, x in slow) * 1000:.0f}"
            f" ms), sent between {slow[0][0]:.1f} s and {slow[-1][0]:.1f} s; most in {busiest}"
        )
    ratios = [hook.ratio for hook in hooks]
    median = statistics.median(ratios)
    p99 = half.percentile_ms(99)
    print()
    for line in noisy:
        print(f"NOISY: {line}; the figures are low, run again on a quiet machine")
    for problem in problems:
        print(f"INVALID RUN: {problem}")
    verdicts = [
        (
            median >= TARGET_RATIO,
            f"webhook throughput {median:.2f} x bare, the median of rounds "
            f"{', '.join(f'{r:.2f}' for r in ratios)} (target >= {TARGET_RATIO})",
        ),
        (
            p99 < TARGET_P99_MS,
            f"p99 {p99:.1f} ms at {half.rps:,.0f} req/s, half the max "
            f"(target < {TARGET_P99_MS:g} ms)",
        ),
    ]
    passed = print_verdicts(verdicts) and not problems
    print(f"{'PASS' if passed else 'FAIL'}: overall")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
