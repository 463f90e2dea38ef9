"""Webhooks to partners on the whole stack: how many events per second reach partners, how soon
after the state change, and whether a dead endpoint slows a healthy one.

    .venv/bin/python benchmarks/partner_delivery.py [--rate 1] [--hold 60] [--down timeout]

On this machine only:

1. Recreates the database ``callops_partnerbench``, migrates it, flushes Redis db 9, and creates
   a partner whose profile answers every incoming call with streaming and transcription (as
   ``system_load.py`` does), with two webhook endpoints, A and B, that want every event type.
   Each is a real HTTPS receiver (a self-signed certificate the workers trust through
   ``SSL_CERT_FILE``) in a process of its own, which verifies every request with the
   ``standardwebhooks`` package and logs when it arrived.
2. Starts the production-like stack of ``system_load.py`` with ``config.settings.production``:
   gunicorn, the ``callops`` and ``events`` workers (2 processes each), ``worker-partners``
   (``-Q partners``, 16 threads, as in docker-compose), beat, and in this process the Telnyx
   simulator placing calls and POSTing signed webhooks. Every partner event comes from a real
   state change: a signed webhook into the web tier, applied by a drain.
3. **Throughput.** With ``worker-partners`` stopped, ``--backlog-calls`` short calls run to the
   end, leaving their events' deliveries to A and B queued; then the worker starts and the
   receivers time the backlog: delivered events per second, first receipt to last.
4. **Latency, both healthy.** Calls arrive at ``--rate`` per second (below saturation) for
   ``--hold`` seconds: state change -> receipt at A, p50/p99. The state change is the event's
   ``created_at``, taken in the drain's transaction that applies the Telnyx webhook; the
   receipt is the receiver's clock when the request arrived (one machine, one clock).
5. **Latency, B down.** The same for another ``--hold`` seconds with B's URL pointing at a
   port that accepts connections and never answers (``--down timeout``: each attempt waits
   ``CALLOPS_WEBHOOK_TIMEOUT``) or at a closed port (``--down refuse``). A's p99 then against
   its p99 with both healthy.

Targets (exit status 1 when one is missed): state change -> receipt p99 < 250 ms with both
healthy; A's p99 with B down within 1.20 x its p99 with both healthy; and every request
verifies, every event of A's reaches it, none twice. Before each measurement the run waits up
to ``--quiet-wait`` s for the CPU to be idle; other processes on this (2-core) machine skew
every figure, so it prints how much CPU they took.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from harness import (
    CpuMeter,
    Receipts,
    add_quiet_options,
    add_scratch_options,
    create_answering_partner,
    percentile,
    print_table,
    print_verdicts,
    scratch,
    self_signed,
    simulated_calls,
    start_receiver,
    stop_processes,
    wait_for_quiet,
)
from system_load import (
    PARTNER_THREADS,
    stack_env,
    start_beat,
    start_partners_worker,
    start_web,
    start_worker,
    wait_for_log,
)
from webhook_throughput import free_port

from telnyx_sim import TelnyxAPISimulator

CONNECTION_ID = "partnerbench-conn"
STREAM_URL = "wss://media.example.com/s"
TARGET_P99_MS = 250.0
TARGET_RATIO = 1.20


# --- A dead endpoint ------------------------------------------------------------------------


def silent_port(mode: str) -> tuple[int, socket.socket | None]:
    """A port for a dead endpoint: one that accepts and never answers, or a closed one."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if mode == "refuse":
        sock.close()
        return port, None
    sock.listen(1024)  # the kernel completes the handshakes; nobody ever reads or answers
    return port, sock


# --- The run --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, run, work: Path):
        self.args, self.run, self.work = args, run, work
        self.procs: list = []
        self.receivers: list = []

    def start(self) -> None:
        args = self.args
        self.api = TelnyxAPISimulator(api_key="KEY_PARTNERBENCH", rate_limit=100).start()
        web_port = free_port()
        self.calls = simulated_calls(
            webhook_url=f"http://127.0.0.1:{web_port}/webhooks/telnyx/",
            api=self.api,
            connection_id=CONNECTION_ID,
            call_duration=args.call_duration,
            delivery_workers=8,
        )
        self.cert, self.key = self_signed(self.work)
        self.env = stack_env(self.run, self.calls.signer, self.work, self.api, 100)
        self.env.update(SSL_CERT_FILE=self.cert, CALLOPS_ALLOW_PRIVATE_TARGETS="true")
        self.run.migrate(self.env)
        os.environ.update(self.env)
        import django

        django.setup()
        import logging

        logging.getLogger("telnyx_sim").setLevel(logging.WARNING)
        from callops import partner_delivery

        partner = create_answering_partner("partnerbench", CONNECTION_ID, STREAM_URL)
        self.endpoints, self.receipts = {}, {}
        for name in ("A", "B"):
            port = free_port()
            endpoint = partner_delivery.webhook_endpoint_create(
                partner=partner, url=f"https://localhost:{port}/hooks", description=name
            )
            log = self.work / f"receiver-{name}.log"
            self.receivers.append(start_receiver(port, self.cert, self.key, endpoint.secret, log))
            self.endpoints[name], self.receipts[name] = endpoint, Receipts(log)
        self.healthy_url_b = self.endpoints["B"].url

        self.web = start_web(self.env, web_port, self.work / "gunicorn.log")
        self.worker = start_worker(self.env, "pb", 2, self.work / "worker.log", "callops")
        self.events_worker = start_worker(
            self.env, "pb-events", 2, self.work / "worker-events.log", "events"
        )
        wait_for_log(self.worker, self.work / "worker.log", "Telnyx client ready", 2)
        self.procs += [self.web, self.worker, self.events_worker]
        self.partners_worker = self.start_partners_worker()
        self.beat = start_beat(self.env, self.work)
        self.procs.append(self.beat)
        self.calls.start()
        print(
            f"stack up: gunicorn, workers callops x 2, events x 2, partners (16 threads), beat; "
            f"receivers A and B (HTTPS); logs in {self.work}",
            flush=True,
        )

    def start_partners_worker(self):
        """``worker-partners`` as docker-compose runs it; a new name each time (it restarts)."""
        log = self.work / f"worker-partners-{len(self.procs)}.log"
        proc = start_partners_worker(self.env, f"pb-partners-{time.monotonic_ns()}", log)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        if hasattr(self, "calls"):
            self.calls.stop(timeout=5)
        stop_processes(self.procs)
        if hasattr(self, "api"):
            self.api.stop()
        for proc in self.receivers:
            proc.terminate()
            proc.join(5)

    # Waiting

    def open_work(self) -> tuple[int, int, int]:
        """(live calls, pending Telnyx events, unfinished deliveries to A)."""
        from callops.models import Delivery, WebhookEvent

        return (
            len(self.calls.live_calls),
            WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING).count(),
            Delivery.objects.filter(
                endpoint=self.endpoints["A"], status__in=Delivery.UNFINISHED
            ).count(),
        )

    def wait_until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not done in {timeout:.0f} s ({self.open_work()})")
            time.sleep(0.25)

    def place(self, count: int, rate: float, duration: float | None = None) -> None:
        start = time.monotonic()
        for i in range(count):
            if (pause := start + i / rate - time.monotonic()) > 0:
                time.sleep(pause)
            self.calls.place_call(duration=duration)

    def warm_up(self) -> None:
        self.place(4, 2.0, duration=3)
        self.wait_until(lambda: not any(self.open_work()), 120, "warm-up")
        self.wait_until(lambda: self.unfinished("B") == 0, 60, "warm-up")

    def unfinished(self, name: str) -> int:
        from callops.models import Delivery

        return Delivery.objects.filter(
            endpoint=self.endpoints[name], status__in=Delivery.UNFINISHED
        ).count()

    # The measurements

    def throughput(self) -> dict:
        from callops.models import Delivery

        stop_processes([self.partners_worker])
        self.place(self.args.backlog_calls, 4.0, duration=self.args.backlog_duration)
        self.wait_until(lambda: not any(self.open_work()[:2]), 300, "the backlog's calls")
        queued = Delivery.objects.filter(status__in=Delivery.UNFINISHED).count()
        seen = {name: len(r.read()) for name, r in self.receipts.items()}
        wait_for_quiet(self.args.quiet_wait)
        self.partners_worker = self.start_partners_worker()
        # From its " ready." line: its start-up is not the deliveries' (the few it sent before
        # the snapshot are charged to the rest, a slight overstatement per delivery).
        meter = CpuMeter(self.run.database_url, {"partners": [self.partners_worker.pid]})
        before = meter.snapshot()
        self.wait_until(
            lambda: not Delivery.objects.filter(status__in=Delivery.UNFINISHED).exists(),
            600,
            "the backlog",
        )
        cpu = meter.since(before)
        meter.close()
        arrivals = sorted(
            row[0] for name, r in self.receipts.items() for row in r.read()[seen[name] :]
        )
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
        return {
            "queued": queued,
            "delivered": len(arrivals),
            "per_s": (len(arrivals) - 1) / span,
            "others": cpu.others_share,
            "worker_ms": cpu.roles["partners"] * 1000 / max(len(arrivals), 1),
            "postgres_ms": cpu.roles["postgres"] * 1000 / max(len(arrivals), 1),
        }

    def latency(self) -> tuple[dict, dict]:
        """Calls at --rate for two holds: B healthy, then B down. A's receipts of the events
        created in each hold."""
        from callops.models import WebhookEndpoint

        args = self.args
        wait_for_quiet(args.quiet_wait)
        meter = CpuMeter(self.run.database_url, {})
        count = round(args.rate * args.hold * 2)
        placer = threading.Thread(target=self.place, args=(count, args.rate), daemon=True)
        t0 = time.time()
        before = meter.snapshot()
        placer.start()
        time.sleep(args.hold)
        t1 = time.time()
        healthy_cpu = meter.since(before)
        before = meter.snapshot()
        down_port, self.down_socket = silent_port(args.down)
        WebhookEndpoint.objects.filter(pk=self.endpoints["B"].pk).update(
            url=f"https://localhost:{down_port}/hooks"
        )
        placer.join()
        t2 = time.time()
        down_cpu = meter.since(before)
        meter.close()
        self.wait_until(lambda: not any(self.open_work()), 300, "the held calls")
        return self.window("A", t0 + 5, t1, healthy_cpu), self.window("A", t1, t2, down_cpu)

    def window(self, name: str, start: float, end: float, cpu) -> dict:
        from callops.models import Delivery, PartnerEvent

        created = set(
            PartnerEvent.objects.filter(
                created_at__gte=datetime.fromtimestamp(start).astimezone(),
                created_at__lt=datetime.fromtimestamp(end).astimezone(),
            ).values_list("event_id", flat=True)
        )
        rows = [r for r in self.receipts[name].read() if r[2] in created]
        ids = Counter(r[2] for r in rows)
        first = {}
        for arrived, _, event_id, _, created_at in sorted(rows):
            first.setdefault(event_id, (arrived - created_at) * 1000)
        lags = list(first.values())
        # Where the time went: state change -> the claim of the attempt that succeeded (the
        # drain's commit, the broker, a worker thread, the order and slot checks), then the
        # claim -> receipt (the POST).
        claims = dict(
            Delivery.objects.filter(
                endpoint=self.endpoints[name], event__event_id__in=created, attempts=1
            ).values_list("event__event_id", "last_attempt_at")
        )
        to_claim, to_receipt = [], []
        for arrived, _, event_id, _, created_at in rows:
            if claimed := claims.get(event_id):
                to_claim.append((claimed.timestamp() - created_at) * 1000)
                to_receipt.append((arrived - claimed.timestamp()) * 1000)
        return {
            "to_claim": (percentile(to_claim, 50), percentile(to_claim, 99)),
            "to_receipt": (percentile(to_receipt, 50), percentile(to_receipt, 99)),
            "events": len(created),
            "received": len(ids),
            "twice": sum(1 for n in ids.values() if n > 1),
            "unverified": sum(1 for r in rows if not r[1]),
            "p50": percentile(lags, 50) if lags else float("nan"),
            "p99": percentile(lags, 99) if lags else float("nan"),
            "per_s": len(rows) / (end - start),
            "others": cpu.others_share,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1.0, help="calls per second (latency)")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds per latency phase")
    parser.add_argument("--call-duration", type=float, default=20.0)
    parser.add_argument("--down", choices=["timeout", "refuse"], default="timeout")
    parser.add_argument("--backlog-calls", type=int, default=40)
    parser.add_argument("--backlog-duration", type=float, default=10.0)
    parser.add_argument("--keep-logs", action="store_true")
    add_scratch_options(parser, database="callops_partnerbench", redis_db=9)
    add_quiet_options(parser, quiet_wait=60)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="partnerbench-"))
    ok = False
    with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
        bench = Bench(args, run, work)
        try:
            bench.start()
            bench.warm_up()
            through = bench.throughput()
            healthy, down = bench.latency()
        finally:
            bench.stop()
    print()
    print(
        f"throughput: {through['delivered']} deliveries of a backlog of {through['queued']}"
        f" at {through['per_s']:.0f} delivered events/s (worker-partners: {PARTNER_THREADS}"
        f" threads, 2 endpoints; other processes took {through['others']:.0%} of the CPU)"
    )
    print(
        f"CPU per delivery in the backlog: worker-partners {through['worker_ms']:.2f} ms,"
        f" PostgreSQL {through['postgres_ms']:.2f} ms"
    )
    print()
    print_table(
        [
            "phase",
            "events to A",
            "received",
            "twice",
            "unverified",
            "A recv/s",
            "p50 ms",
            "p99 ms",
            "others' CPU",
        ],
        [
            [
                label,
                w["events"],
                w["received"],
                w["twice"],
                w["unverified"],
                f"{w['per_s']:.1f}",
                f"{w['p50']:.1f}",
                f"{w['p99']:.1f}",
                f"{w['others']:.0%}",
            ]
            for label, w in (("both healthy", healthy), (f"B down ({args.down})", down))
        ],
    )
    print()
    print_table(
        ["phase", "-> claim p50", "p99", "claim -> receipt p50", "p99"],
        [
            [label, *(f"{v:.1f}" for v in (*w["to_claim"], *w["to_receipt"]))]
            for label, w in (("both healthy", healthy), (f"B down ({args.down})", down))
        ],
    )
    ratio = down["p99"] / healthy["p99"]
    print(f"\nA's p99 with B down / with both healthy: {ratio:.2f}")
    ok = print_verdicts(
        [
            (
                healthy["p99"] < TARGET_P99_MS,
                f"state change -> receipt p99 {healthy['p99']:.1f} ms < {TARGET_P99_MS:.0f} ms"
                f" at {args.rate:g} calls/s",
            ),
            (ratio <= TARGET_RATIO, f"p99 ratio {ratio:.2f} <= {TARGET_RATIO:.2f}"),
            (
                all(
                    w["received"] == w["events"] and not w["twice"] and not w["unverified"]
                    for w in (healthy, down)
                ),
                "every event of A's received once and verified",
            ),
        ]
    )
    if ok and not args.keep_logs:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
