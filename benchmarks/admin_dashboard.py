"""How fast the operators' dashboard and a call's timeline load on a database of millions of rows.

    .venv/bin/python benchmarks/admin_dashboard.py [--events 2000000] [--requests 30]

Fills a fresh PostgreSQL database (callops_dashbench) with SQL generate_series: 2,000,000
webhook events over 30 days (a few hundred pending, some failed), 500,000 calls, 1,000,000
commands with an attempt each, 500,000 streams, 200,000 forks and transcriptions each,
1,000,000 partner events and deliveries, 2,000,000 transcript segments of which 10,000 on one
call; then ANALYZE (autovacuum may be off, and the planner needs the statistics).

It requests, through Django's whole stack (the test client, a logged-in superuser):

- the admin index page: the baseline, measured in the same run;
- the dashboard (``/admin/console/dashboard/``);
- the timeline of the call with 10,000 segments (its first page and a later one).

It prints p50 / p95 per page, in ms and against the baseline, and the EXPLAIN ANALYZE of every
query the dashboard runs. Targets: the dashboard's p95 under 300 ms, none of its queries a
sequential scan of a large table; the timeline's p95 under 300 ms too.
"""

from __future__ import annotations

import argparse
import os
import re
import time

from harness import add_scratch_options, percentile, print_table, print_verdicts, ratio, scratch

TARGET_MS = 300
LARGE_TABLES = (
    "callops_webhookevent",
    "callops_call",
    "callops_command",
    "callops_commandattempt",
    "callops_mediastream",
    "callops_fork",
    "callops_transcription",
    "callops_transcriptsegment",
    "callops_partnerevent",
    "callops_delivery",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--requests", type=int, default=30, help="per page")
    add_scratch_options(parser, database="callops_dashbench", redis_db=11)
    args = parser.parse_args()

    with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
        env = run.env(
            "config.settings.dev",
            DJANGO_DEBUG="false",
            LOG_LEVEL="WARNING",
            DJANGO_ALLOWED_HOSTS="testserver",
        )
        run.migrate(env)
        os.environ.update(env)
        return bench(args)


FILL = [
    # Calls: mostly ended; 200 answered and 50 ringing now.
    """
    INSERT INTO callops_call (call_control_id, call_leg_id, call_session_id, connection_id,
        direction, from_number, to_number, status, hangup_cause, hangup_source,
        sip_hangup_cause, client_state, machine_detection, partner_event_seq, created_at,
        updated_at, started_at)
    SELECT 'v3:bench-' || i, '', '', 'conn-bench', 'incoming', '+1555', '+1666',
           CASE WHEN i <= 200 THEN 'answered' WHEN i <= 250 THEN 'initiated' ELSE 'ended' END,
           '', '', '', '', '', 0,
           now() - (i %% 720) * interval '1 hour', now(), now() - (i %% 720) * interval '1 hour'
    FROM generate_series(1, %(calls)s) AS i
    """,
    # Webhook events over 30 days, newest first in id; 300 pending, 1 in 1000 failed.
    """
    INSERT INTO callops_webhookevent (event_id, event_type, occurred_at, call_control_id,
        payload, received_at, delivery_count, status, error, processed_at, shard, priority)
    SELECT 'evt-' || i,
           (ARRAY['call.initiated', 'call.answered', 'call.transcription', 'call.hangup',
                  'streaming.started'])[1 + i %% 5],
           now() - i * (interval '30 days' / %(events)s),
           'v3:bench-' || (1 + i %% %(calls)s),
           '{"data": {"payload": {}}}'::jsonb,
           now() - i * (interval '30 days' / %(events)s), 1,
           CASE WHEN i <= 300 THEN 'pending' WHEN i %% 1000 = 0 THEN 'failed'
                ELSE 'processed' END,
           CASE WHEN i %% 1000 = 0 THEN 'KeyError: x' ELSE '' END,
           CASE WHEN i <= 300 THEN NULL
                ELSE now() - i * (interval '30 days' / %(events)s) + interval '40 ms' END,
           i %% 4, (i %% 5 = 2)::int
    FROM generate_series(1, %(events)s) AS i
    """,
    # Commands: mostly succeeded; 100 queued (20 after a 429), 1 in 500 failed.
    """
    INSERT INTO callops_command (action, params, command_id, client_state, requested_by,
        status, attempts, next_attempt_at, expires_at, error_code, error_title, error_detail,
        failure_reason, created_at, call_id, outcome_unknown, settlement, last_http_status,
        finished_at)
    SELECT (ARRAY['answer', 'streaming_start', 'hangup', 'transcription_start'])[1 + i %% 4],
           '{}'::jsonb, gen_random_uuid(), '', 'policy',
           CASE WHEN i <= 100 THEN 'queued' WHEN i %% 500 = 0 THEN 'failed'
                ELSE 'succeeded' END,
           CASE WHEN i <= 20 THEN 1 ELSE 1 + (i %% 500 = 0)::int * 4 END,
           now() - (i %% 720) * interval '1 hour', now() + interval '5 minutes', '', '', '',
           CASE WHEN i %% 500 = 0 THEN 'gave up after HTTP 503' ELSE '' END,
           now() - i * (interval '30 days' / %(commands)s),
           1 + i %% %(calls)s, false, '',
           CASE WHEN i <= 20 THEN 429 WHEN i %% 500 = 0 THEN 503 WHEN i > 100 THEN 200 END,
           CASE WHEN i > 100 THEN now() - i * (interval '30 days' / %(commands)s) END
    FROM generate_series(1, %(commands)s) AS i
    """,
    # One attempt per command (1 in 1000 answered 429, spread over the 30 days).
    """
    INSERT INTO callops_commandattempt (command_id, number, sent_at, answered_at, http_status,
        outcome, error)
    SELECT id, 1, created_at, created_at + interval '30 ms',
           CASE WHEN id %% 1000 = 0 THEN 429 ELSE 200 END,
           CASE WHEN id %% 1000 = 0 THEN 'retry' ELSE 'succeeded' END, ''
    FROM callops_command
    """,
    """
    INSERT INTO callops_mediastream (call_id, stream_id, stream_url, track, codec, status,
        failure_reason, requested_at, started_at, stopped_at, updated_at)
    SELECT 1 + i %% %(calls)s, 'st-' || i, 'wss://media.example.com/s', 'both_tracks', 'PCMU',
           CASE WHEN i <= 200 THEN 'active' ELSE 'stopped' END, '',
           now() - (i %% 720) * interval '1 hour', now() - (i %% 720) * interval '1 hour',
           CASE WHEN i > 200 THEN now() - (i %% 720) * interval '1 hour' + interval '5 min' END,
           now()
    FROM generate_series(1, %(streams)s) AS i
    """,
    """
    INSERT INTO callops_fork (call_id, rx, tx, target, stream_type, status, failure_reason,
        requested_at, started_at, stopped_at, updated_at)
    SELECT 1 + i %% %(calls)s, '', '', 'udp:192.0.2.1:5000', 'raw',
           CASE WHEN i <= 50 THEN 'active' ELSE 'stopped' END, '',
           now() - interval '1 day', now() - interval '1 day', now() - interval '23 hours',
           now()
    FROM generate_series(1, %(sessions)s) AS i
    """,
    """
    INSERT INTO callops_transcription (call_id, engine, tracks, engine_config, status,
        failure_reason, requested_at, started_at, stopped_at, updated_at)
    SELECT 1 + i %% %(calls)s, 'Google', 'inbound', '{}'::jsonb,
           CASE WHEN i <= 150 THEN 'active' ELSE 'stopped' END, '',
           now() - interval '1 day', now() - interval '1 day', now() - interval '23 hours',
           now()
    FROM generate_series(1, %(sessions)s) AS i
    """,
    # Segments: 10,000 on call 1 (the timeline's), the rest spread over transcriptions.
    """
    INSERT INTO callops_transcriptsegment (call_id, transcription_id, transcript, confidence,
        is_final, track, occurred_at)
    SELECT CASE WHEN i <= 10000 THEN 1 ELSE 1 + i %% %(calls)s END,
           1 + i %% %(sessions)s,
           'some words said on the call', 0.9, i %% 3 = 0, 'inbound',
           now() - interval '2 hours' + i * interval '7 ms'
    FROM generate_series(1, %(segments)s) AS i
    """,
    "INSERT INTO callops_partner (name, active, created_at) VALUES ('bench', true, now())",
    """
    INSERT INTO callops_partnerconnection (partner_id, connection_id)
        SELECT id, 'conn-bench' FROM callops_partner
    """,
    """
    INSERT INTO callops_webhookendpoint (partner_id, url, description, event_types,
        include_interim, active, secret, previous_secret, consecutive_failures, created_at,
        updated_at)
        SELECT id, 'https://hooks.example.com/in', '', '[]'::jsonb, false, true, 'whsec_x', '',
               0, now(), now() FROM callops_partner
    """,
    """
    INSERT INTO callops_partnerevent (event_id, partner_id, call_id, type, sequence, payload,
        source_key, occurred_at, created_at)
    SELECT 'evt_' || i, (SELECT min(id) FROM callops_partner), 1 + i %% %(calls)s,
           'call.answered', i, '{}'::jsonb, 'k' || i, now(),
           now() - i * (interval '30 days' / %(deliveries)s)
    FROM generate_series(1, %(deliveries)s) AS i
    """,
    # Deliveries: succeeded but for 500 unfinished (pending or retrying) and 1 in 1000 dead.
    """
    INSERT INTO callops_delivery (event_id, endpoint_id, call_id, sequence, status, attempts,
        next_attempt_at, last_error, expires_at, created_at, delivered_at, last_attempt_at)
    SELECT e.id, (SELECT min(id) FROM callops_webhookendpoint), e.call_id, e.sequence,
           CASE WHEN e.sequence <= 250 THEN 'pending' WHEN e.sequence <= 500 THEN 'failed'
                WHEN e.sequence %% 1000 = 0 THEN 'dead' ELSE 'succeeded' END,
           1, now() - interval '2 minutes', '', now() + interval '1 day', e.created_at,
           CASE WHEN e.sequence > 500 THEN e.created_at + interval '80 ms' END,
           e.created_at + interval '80 ms'
    FROM callops_partnerevent e
    """,
]


def bench(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from callops.models import Call, TaskRun

    sizes = {
        "events": args.events,
        "calls": max(1000, args.events // 4),
        "commands": max(1000, args.events // 2),
        "streams": max(1000, args.events // 4),
        "sessions": max(1000, args.events // 10),
        "segments": max(20_000, args.events),
        "deliveries": max(1000, args.events // 2),
    }
    started = time.monotonic()
    with connection.cursor() as cursor:
        for statement in FILL:
            cursor.execute(statement, sizes)
        cursor.execute("ANALYZE")
    now = timezone.now()
    for name in ("beat_heartbeat", "stop_stale_sessions", "purge_old_records"):
        TaskRun.objects.create(name=name, last_started_at=now, last_finished_at=now, runs=10)
    print(f"filled {sizes} in {time.monotonic() - started:.0f} s")

    user = get_user_model().objects.create_superuser("bench", "bench@example.com", "pw")
    client = Client()
    client.force_login(user)
    timeline_call = Call.objects.get(call_control_id="v3:bench-1")
    timeline_url = f"/admin/console/calls/{timeline_call.pk}/timeline/"
    first = client.get(timeline_url)
    later = re.search(r'href="(\?cursor=[^"]+)"', first.content.decode())
    assert later, "the timeline's first page has no next page"
    pages = {
        "admin index (baseline)": "/admin/",
        "dashboard": "/admin/console/dashboard/",
        "timeline, first page": timeline_url,
        "timeline, second page": timeline_url + later.group(1).replace("&amp;", "&"),
    }
    timings: dict[str, list[float]] = {name: [] for name in pages}
    for url in pages.values():  # warm the templates and the connection
        assert client.get(url).status_code == 200, url
    for _ in range(args.requests):
        for name, url in pages.items():  # interleaved: a disturbance hits every page alike
            t0 = time.perf_counter()
            response = client.get(url)
            timings[name].append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, url

    with CaptureQueriesContext(connection) as captured:
        client.get(pages["dashboard"])
    seq_scans = []
    print(f"\nThe dashboard's {len(captured.captured_queries)} queries, EXPLAIN ANALYZE:")
    with connection.cursor() as cursor:
        for query in captured.captured_queries:
            sql = query["sql"]
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
            plan = "\n".join(row[0] for row in cursor.fetchall())
            print(f"\n{sql[:300]}\n{plan}")
            seq_scans += [t for t in LARGE_TABLES if f"Seq Scan on {t} " in plan + " "]

    base = percentile(timings["admin index (baseline)"], 50)
    print()
    print_table(
        ("page", "p50 ms", "p95 ms", "p50 x index"),
        [
            (
                name,
                f"{percentile(values, 50):.1f}",
                f"{percentile(values, 95):.1f}",
                ratio(percentile(values, 50), base),
            )
            for name, values in timings.items()
        ],
    )
    dash95 = percentile(timings["dashboard"], 95)
    timeline95 = max(percentile(timings[n], 95) for n in pages if n.startswith("timeline"))
    print()
    passed = print_verdicts(
        [
            (dash95 < TARGET_MS, f"dashboard p95 under {TARGET_MS} ms ({dash95:.1f} ms)"),
            (not seq_scans, f"no sequential scan of a large table ({sorted(set(seq_scans))})"),
            (timeline95 < TARGET_MS, f"timeline p95 under {TARGET_MS} ms ({timeline95:.1f} ms)"),
        ]
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
