"""Where applying webhook events costs worker CPU, by event type, in one process (no broker
consumer, no HTTP).

    .venv/bin/python benchmarks/apply_cost.py [--calls 300] [--batch 12] [--profile]

Companion of system_load.py: that one says how fast the whole system goes, this one says which
part of applying events costs what. It recreates the database ``callops_bench_apply`` (and
Redis db 11), creates the answering partner system_load uses (one ``answer`` command per
call, streaming and transcription inline), then stores ``--calls`` calls' events through the
webhook's own INSERT in the order calls arriving at 5/s send them (system_load's backlog:
call.initiated, call.answered, streaming.started, a segment a second, call.hangup), a
``--batch`` at a time, and applies each batch as the drains do under load: the urgent lane's
events first, alone (``drain.URGENT_EVENTS``), then the rest. It prints CPU and wall time
per event applied, SQL statements per event, and the CPU inside each handler (cProfile's
cumulative time per call of the handler, with ``--profile`` the top of the whole profile).
The commands the policies create are published to the scratch broker and never sent; so are
the partner deliveries ``--endpoint`` makes the drains create.
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
from collections import Counter
from pathlib import Path

from harness import add_scratch_options, create_answering_partner, scratch
from system_load import BACKLOG_CONNECTION_ID, STREAM_URL, backlog_events
from webhook_throughput import production_env

from telnyx_sim import Signer

HANDLERS = (
    "on_call_initiated",
    "on_call_answered",
    "on_stream_event",
    "on_call_hangup",
    "_apply_segments",
    "_lock_calls",
    "_record_verdicts",
    "webhook_event_applied",
    "segments_applied",
    "_load",
    "after_batch",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--per-call", type=int, default=24, help="events per call")
    parser.add_argument("--batch", type=int, default=12, help="events stored between drains")
    parser.add_argument(
        "--endpoint",
        action="store_true",
        help="the partner has a webhook endpoint for every event type (its deliveries are"
        " published, never sent)",
    )
    parser.add_argument("--profile", action="store_true", help="print the top of the profile")
    parser.add_argument(
        "--callees", nargs="*", default=[], help="--profile: functions whose callees to print"
    )
    add_scratch_options(parser, database="callops_bench_apply", redis_db=11)
    args = parser.parse_args()

    with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
        static = Path(tempfile.mkdtemp(prefix="apply-cost-"))
        env = production_env(run, "config.settings.production", Signer(), static)
        env["LOG_LEVEL"] = "WARNING"
        run.migrate(env)
        os.environ.update(env)
        import django

        django.setup()
        from django.db import connection

        from callops import drain, events, webhooks

        # The backlog's calls, answered: their connection gets the answering partner.
        partner = create_answering_partner("apply-cost", BACKLOG_CONNECTION_ID, STREAM_URL)
        if args.endpoint:
            from callops import partner_delivery

            partner_delivery.webhook_endpoint_create(
                partner=partner, url="https://hooks.example.com/callops"
            )
        backlog = backlog_events(args.calls * args.per_call, args.calls)
        bodies = [webhooks.parse_event(body) for body in backlog]
        kinds = Counter(event.event_type for event in bodies)

        statements = 0

        def count(execute, sql, params, many, context):
            nonlocal statements
            statements += 1
            return execute(sql, params, many, context)

        profile = cProfile.Profile(time.process_time)  # CPU, not waits
        cpu = wall = 0.0
        applied = 0
        for start in range(0, len(bodies), args.batch):
            for event in bodies[start : start + args.batch]:
                webhooks.store_event(event, handled=True)
            c0, w0 = time.process_time(), time.perf_counter()
            with connection.execute_wrapper(count):
                if args.profile:
                    profile.enable()
                applied += events.events_drain(types=drain.URGENT_EVENTS)
                applied += events.events_drain()
                if args.profile:
                    profile.disable()
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        print(
            f"{args.calls} calls: {applied} events applied, {dict(kinds)}; batches of {args.batch}"
        )
        print(
            f"per event: CPU {cpu / applied * 1e3:.3f} ms, wall {wall / applied * 1e3:.3f} ms,"
            f" SQL statements {statements / applied:.2f}"
        )
        if not args.profile:
            return 0
        print("with --profile, cProfile's overhead is in the figures above")
        stats = pstats.Stats(profile)
        print(f"\n{'function':<26}{'calls':>8}{'cum ms/call':>13}{'share of CPU':>14}")
        for (path, _, name), (_, ncalls, _, cum, _) in sorted(stats.stats.items()):
            if name in HANDLERS and "callops" in path:
                print(f"{name:<26}{ncalls:>8}{cum / ncalls * 1e3:>13.3f}{cum / cpu:>14.1%}")
        out = io.StringIO()
        ranked = pstats.Stats(profile, stream=out).sort_stats("cumulative")
        ranked.print_stats(45)
        for name in args.callees:
            ranked.print_callees(name)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
