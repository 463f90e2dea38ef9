"""Where a webhook request's time goes, step by step, in one process (no HTTP server).

    .venv/bin/python benchmarks/webhook_cost.py [--requests 3000] [--profile] [--multiproc]

Companion of webhook_throughput.py: that one says how fast, this one says why. It recreates the
database ``callops_bench_cost`` (and Redis db 10), loads ``benchmarks.bench_settings`` in this
process, then times each step of the webhook path in a loop (wall and CPU time per call; wall
minus CPU is waiting on PostgreSQL or Redis) and whole requests through Django's WSGI handler
(middleware and request signals included). ``--profile`` adds a cProfile of the webhook loop.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import add_scratch_options, print_table, scratch
from webhook_throughput import BARE_PATH, WEBHOOK_PATH, production_env, signed_events

from telnyx_sim.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, Signer, wsgi_name


def timed(name: str, n: int, step: Callable[[int], object], rows: list) -> None:
    step(0)  # first call outside the loop: imports, connections
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(1, n + 1):
        step(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows.append((name, wall / n * 1e6, cpu / n * 1e6))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="calls per step")
    parser.add_argument("--settings", default="benchmarks.bench_settings")
    add_scratch_options(parser, database="callops_bench_cost", redis_db=10)
    parser.add_argument("--profile", action="store_true", help="cProfile the webhook loop")
    parser.add_argument(
        "--multiproc",
        action="store_true",
        help="PROMETHEUS_MULTIPROC_DIR set: metrics written to memory-mapped files",
    )
    args = parser.parse_args()

    signer = Signer()
    with (
        tempfile.TemporaryDirectory(prefix="webhook-cost-") as work,
        scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run,
    ):
        env = production_env(run, args.settings, signer, Path(work))
        env["LOG_LEVEL"] = "WARNING"
        if args.multiproc:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(work) / "metrics")
        run.migrate(env)
        os.environ.update(env)
        rows = measure(args.requests, signer, args.profile)

    print()
    print_table(
        ("step", "wall us", "CPU us"), [(name, f"{w:,.0f}", f"{c:,.0f}") for name, w, c in rows]
    )
    return 0


def measure(n: int, signer: Signer, profile: bool) -> list:
    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import close_old_connections, connection
    from django.http import JsonResponse

    from callops import drain, metrics, webhooks

    handler = WSGIHandler()
    events = signed_events(signer, 3 * n + 3)
    parsed = [webhooks.parse_event(body) for _, _, body in events[n + 1 : 2 * n + 2]]

    def environ(path: str, event: tuple[str, str, bytes]) -> dict:
        ts, signature, body = event
        return {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "127.0.0.1:8000",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            wsgi_name(TIMESTAMP_HEADER): ts,
            wsgi_name(SIGNATURE_HEADER): signature,
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
        }

    statuses: list[str] = []

    def request(path: str, event) -> None:
        response = handler(environ(path, event), lambda status, headers: statuses.append(status))
        b"".join(response)
        response.close()  # sends request_finished, as gunicorn does

    drain.flag_lower()
    drain.request()  # first publish of this process: broker connection (~100 ms)
    rows: list = []
    timed("whole request: bare view", n, lambda i: request(BARE_PATH, events[i]), rows)
    timed("whole request: webhook", n, lambda i: request(WEBHOOK_PATH, events[n + 1 + i]), rows)
    if any(not s.startswith("2") for s in statuses):
        raise RuntimeError(f"non-2xx answers: {sorted(set(statuses))}")

    def verify(i):
        ts, sig, body = events[i]
        webhooks.verify_signature(body, sig, ts)

    timed("  verify_signature (Ed25519, PyNaCl)", n, verify, rows)
    timed(
        "  parse_event (json.loads, checks, fromisoformat)",
        n,
        lambda i: webhooks.parse_event(events[i][2]),
        rows,
    )
    timed(
        "  store_event (prepared INSERT ... ON CONFLICT + drain flag)",
        n,
        lambda i: webhooks.store_event(parsed[i], handled=True),
        rows,
    )
    unprepared = [webhooks.parse_event(body) for _, _, body in events[2 * n + 2 :]]

    def store_client_bound(i):
        # The same statement through Django's own cursor, which binds parameters on the client:
        # PostgreSQL parses and plans it every time (what store_event did before it prepared).
        params = webhooks.insert_params(connection, unprepared[i - 1], handled=True)
        with connection.cursor() as cursor:
            cursor.execute(webhooks._insert_sql("postgresql"), params)
            cursor.fetchone()

    timed("  the same INSERT, not prepared (Django's cursor)", n, store_client_bound, rows)
    # What the view does once the event is stored (drain.after_store): on PostgreSQL the
    # INSERT itself raised the flag or found it up, so most webhooks publish nothing and the
    # one that raised it publishes one drain task.
    stored = parsed[0]
    timed(
        "  drain.after_store, flag already up (most webhooks)",
        n,
        lambda i: drain.after_store(
            status="pending", raised=False, shard=stored.shard, lane=stored.lane
        ),
        rows,
    )
    timed(
        "  drain.after_store, flag just raised (one Celery publish)",
        n,
        lambda i: drain.after_store(
            status="pending", raised=True, shard=stored.shard, lane=stored.lane
        ),
        rows,
    )
    timed(
        "  drain.request(shard), flag already up (a second UPDATE: SQLite)",
        n,
        lambda i: drain.request(stored.shard, stored.lane),
        rows,
    )
    timed(
        "  metrics.webhook_answered",
        n,
        lambda i: metrics.webhook_answered(seconds=0.004, event_type="call.transcription"),
        rows,
    )
    timed(
        "  JsonResponse", n, lambda i: JsonResponse({"status": "pending", "duplicate": False}), rows
    )

    def health_check(i):
        # What CONN_HEALTH_CHECKS=True costs once per request: Django runs "SELECT 1" before
        # the first query of a request on a reused connection.
        connection.health_check_done = False
        connection.close_if_health_check_failed()

    timed("  connection health check (CONN_HEALTH_CHECKS)", n, health_check, rows)
    timed(
        "  close_old_connections (request_started/finished)",
        n,
        lambda i: close_old_connections(),
        rows,
    )

    if profile:
        more = signed_events(signer, n)
        profiler = cProfile.Profile()
        profiler.enable()
        for event in more:
            request(WEBHOOK_PATH, event)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        stats.print_stats(30)
        print(out.getvalue())
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumtime").print_stats(40)
        print(out.getvalue())
    return rows


if __name__ == "__main__":
    sys.exit(main())
