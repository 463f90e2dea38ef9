"""How long one stale-session sweep takes with 1,000,000 media streams of which 100 are stale.

    .venv/bin/python benchmarks/stale_sweep.py [--streams 1000000] [--stale 100]

Fills a fresh PostgreSQL database (callops_sweepbench) with SQL generate_series, runs the sweep
that beat runs every minute (callops.maintenance.sessions_stop_stale), prints its time and the
EXPLAIN plans of its queries, and checks: under 100 ms, the partial indexes in use, and one stop
command per stale stream. A baseline sweep on the same table with nothing stale is timed too,
so the figure can be read as "cost of the stale rows" against "cost of looking".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from harness import add_scratch_options, print_table, print_verdicts, scratch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1_000_000)
    parser.add_argument("--stale", type=int, default=100)
    add_scratch_options(parser, database="callops_sweepbench", redis_db=11)
    args = parser.parse_args()

    with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
        env = run.env("config.settings.dev", DJANGO_DEBUG="false", LOG_LEVEL="WARNING")
        run.migrate(env)
        os.environ.update(env)
        return sweep_bench(args)


def sweep_bench(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from django.db import connection

    from callops import actions, maintenance
    from callops.models import Command

    calls = max(1, args.streams // 100)
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO callops_call (call_control_id, call_leg_id, call_session_id,
                connection_id, direction, from_number, to_number, status, hangup_cause,
                hangup_source, sip_hangup_cause, client_state, created_at, updated_at,
                started_at)
            SELECT 'v3:bench-' || i, '', '', 'conn', 'incoming', '', '',
                   CASE WHEN i %% 50 = 0 THEN 'answered' ELSE 'ended' END, '', '', '', '',
                   now(), now(), now() - interval '1 day'
            FROM generate_series(1, %s) AS i
            """,
            [calls],
        )
        # Mostly finished streams, some live and healthy, and `stale` running past their limit.
        cursor.execute(
            """
            INSERT INTO callops_mediastream (call_id, stream_id, stream_url, track, codec,
                status, failure_reason, requested_at, started_at, stopped_at, stop_after,
                updated_at)
            SELECT c.id, 'st-' || i, 'wss://media.example.com/s', 'both_tracks', 'PCMU',
                   CASE WHEN i <= %(stale)s OR i %% 1000 = 0 THEN 'active' ELSE 'stopped' END,
                   '', now() - interval '6 hours', now() - interval '5 hours',
                   CASE WHEN i <= %(stale)s OR i %% 1000 = 0 THEN NULL
                        ELSE now() - interval '4 hours' END,
                   CASE WHEN i <= %(stale)s THEN now() - interval '1 hour'
                        ELSE now() + interval '1 hour' END,
                   now()
            FROM generate_series(1, %(streams)s) AS i
            JOIN callops_call c ON c.call_control_id = 'v3:bench-' ||
                 (CASE WHEN i <= %(stale)s OR i %% 1000 = 0
                       THEN ((i / 50) * 50) %% %(calls)s + 50
                       ELSE i %% %(calls)s + 1 END)
            """,
            {"stale": args.stale, "streams": args.streams, "calls": calls},
        )
        cursor.execute("ANALYZE")
        cursor.execute("SELECT count(*) FROM callops_mediastream")
        total = cursor.fetchone()[0]
    print(
        f"filled {total:,} media streams on {calls:,} calls in {time.monotonic() - started:.1f} s"
    )

    from django.utils import timezone

    from callops.models import MediaStream

    now = timezone.now()
    plans = {
        "over duration": maintenance.overdue(actions.get("streaming_stop"), now)[:500],
        "never started": maintenance.unstarted(MediaStream, now)[:500],
    }
    uses_index = True
    for name, queryset in plans.items():
        plan = queryset.explain(analyze=True, buffers=True)
        print(f"\nEXPLAIN {name} (the sweep's own query):\n{plan}")
        uses_index &= "_overdue_idx" in plan or "_unstarted_idx" in plan
        uses_index &= "Seq Scan on callops_mediastream" not in plan

    # Warm the connection and the code paths, then time the sweep that has work to do.
    sweep = maintenance._sweep
    t0 = time.perf_counter()
    done = sweep(500)
    first = (time.perf_counter() - t0) * 1000
    stops = Command.objects.filter(action="streaming_stop").count()
    # The same sweep again: every stale stream now has its stop in flight, nothing to send.
    looks = []
    for _ in range(5):
        t0 = time.perf_counter()
        sweep(500)
        looks.append((time.perf_counter() - t0) * 1000)
    look = statistics.median(looks)

    print()
    print_table(
        ("measure", "value"),
        [
            ("media streams", f"{total:,}"),
            ("stale streams", args.stale),
            (f"sweep with {args.stale} stale (issues the stops)", f"{first:.1f} ms"),
            ("sweep with nothing new to do (median of 5)", f"{look:.1f} ms"),
            ("stop commands created", stops),
        ],
    )
    print(f"result: {done}")
    print()
    passed = print_verdicts(
        [
            (first < 100, f"one sweep under 100 ms ({first:.1f} ms)"),
            (uses_index, "the sweep's queries use the partial indexes"),
            (stops == args.stale, f"one stop per stale stream ({stops})"),
        ]
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
