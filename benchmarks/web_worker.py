"""What a warmed-up gunicorn web worker holds (memory, modules) and what a webhook costs it (CPU).

    .venv/bin/python benchmarks/web_worker.py [--rate 120] [--duration 30] [--py-spy] [--schema]

Issue 12 asks that a web worker's RSS stay at or below ~88 MiB and what a worker costs; the
whole-system benchmark (system_load.py) reports RSS and CPU per webhook of the web tier, but
with everything else running. This one runs the web tier alone, as system_load.py runs it:

1. Recreates the database ``callops_bench_web`` (and flushes Redis db 11), migrates it,
   collects the static files, and creates an admin login and a partner owning the events'
   connection id (no profile: no commands are sent), with an API key.
2. Starts gunicorn exactly as system_load.py does (``config/gunicorn.py``, its worker count,
   sync workers, the access log on), with ``benchmarks.bench_settings`` (production settings
   plus ``/bench/worker/``, which answers a worker's pid, modules and drain publishes), and one
   Celery worker taking both queues, so drain flags are lowered and raised again as under real
   traffic (how often the web tier publishes a drain depends on it).
3. Warm-up: webhooks (then drained), partner API reads (calls, a call, its transcript and
   timeline, events, deliveries, profiles, endpoints) and admin pages (login, the index, the
   calls, events and commands lists, a call's page, the console's dashboard) until every worker
   has served each kind; the OpenAPI schema and docs are not asked for (only a browser opening
   the docs does; ``--schema`` asks for them too).
4. Prints per worker: RSS (what ``/proc/PID/status`` says, which system_load.py reports, shared
   pages included), its anonymous and file-backed shares, PSS (shared pages divided among
   their sharers) and USS (pages only this worker holds, what stopping it would free), the
   modules it has imported, and whether the telnyx SDK is among them (it must never be); the
   master too, and the PSS of all.
5. Sends signed webhooks open loop at ``--rate`` per second for ``--duration`` s, shaped like
   system_load.py's calls (call.initiated, call.answered, streaming.started, 20
   transcriptions, call.hangup per call, 100 calls interleaved), and prints the web tier's CPU
   per webhook (the gunicorn tree: master and workers, user + system), the drain publishes per
   webhook, and the memory again. ``--py-spy`` runs gunicorn under py-spy (every worker,
   ``--gil``, idle time left out; the warm-up is then webhooks only, so that the profile is the
   webhook's) and prints where the workers' CPU went.
6. Asks every worker to collect its garbage and hand the C heap's free memory back
   (``malloc_trim``) and prints how much that freed: memory held but unused. Exits 1 when a
   worker's RSS is above 88 MiB (issue 12) or a worker imported the telnyx SDK.

Diagnostics: ``--tracemalloc`` prints the first worker's heap by the file that allocated it;
``--heap-growth`` runs one traced worker and prints what the API and admin pages add to its
heap after the webhooks; ``--no-preload`` sets ``GUNICORN_PRELOAD=false`` (each worker imports
the app itself instead of sharing the master's pages: compare PSS and USS); ``--multiproc`` sets
``PROMETHEUS_MULTIPROC_DIR``. Run it with a virtualenv of the production install
(``pip install .``, as the Dockerfile does) to see what a production worker holds: the dev
extras add packages some libraries import when they find them.

The machine is shared: CPU per webhook moves little with contention, wall-clock figures do;
``--quiet-wait`` waits for an idle machine first.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from harness import (
    ROOT,
    CpuMeter,
    add_quiet_options,
    add_scratch_options,
    print_table,
    print_verdicts,
    scratch,
    start_process,
    stop_processes,
    wait_for_quiet,
)
from webhook_throughput import (
    WEBHOOK_PATH,
    _call_events,
    free_port,
    production_env,
    python_load,
    raw_request,
    signed_events,
    wait_until_serving,
)

from telnyx_sim.signing import Signer

CONNECTION_ID = "2518412003405440271"  # the connection id of webhook_throughput's events
ADMIN_USER, ADMIN_PASSWORD = "bench-admin", "bench-admin-password-1"
PY_SPY = os.environ.get("PY_SPY", "/tmp/pyspy/bin/py-spy")

SETUP = f"""
import django; django.setup()
from django.contrib.auth.models import User
from callops.api_keys import api_key_create
from callops.models import Partner, PartnerConnection
User.objects.create_superuser({ADMIN_USER!r}, "", {ADMIN_PASSWORD!r})
partner = Partner.objects.create(name="bench")
PartnerConnection.objects.create(partner=partner, connection_id={CONNECTION_ID!r})
print(api_key_create(partner=partner)[1])
"""


def call_traffic(signer: Signer, count: int, segments: int = 20, live: int = 100) -> list:
    """``count`` signed events as system_load.py's calls send them: call.initiated,
    call.answered, streaming.started, ``segments`` transcriptions and call.hangup per call,
    ``live`` calls interleaved (a call's events in their order)."""
    now = datetime.now(UTC)
    ts = int(time.time())
    calls = []
    while sum(len(c) for c in calls) < count:
        initiated, answered, started, segment, hangup = _call_events(now)
        copies = []
        for _ in range(segments):
            copies.append(copy.deepcopy(segment))
            copies[-1]["data"]["id"] = str(uuid.uuid4())
        calls.append([initiated, answered, started, *copies, hangup])
    order = []
    for first in range(0, len(calls), live):  # round-robin over ``live`` calls at a time
        group = [list(reversed(c)) for c in calls[first : first + live]]
        while any(group):
            order += [c.pop() for c in group if c]
    out = []
    for event in order[:count]:
        body = json.dumps(event).encode()
        signature, _ = signer.sign(body, ts)
        out.append((str(ts), signature, body))
    return out


def setup_records(env: dict[str, str]) -> str:
    """The admin login and the partner; returns the partner's API key."""
    done = subprocess.run(
        [sys.executable, "-c", SETUP], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip().splitlines()[-1]


def start_web(env: dict[str, str], port: int, log: Path, profile: Path | None = None):
    """gunicorn as system_load.py starts it (docker-compose's ``web``), on 127.0.0.1:``port``;
    under py-spy (every worker, ``--gil``, idle time left out) when ``profile`` is given.
    py-spy is started around gunicorn: attaching to a running process fails on this machine."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    command = [gunicorn, "-c", "config/gunicorn.py", "config.wsgi:application"]
    command += ["--access-logfile", "-"]
    if profile is not None:
        spy = [PY_SPY, "record", "--subprocesses", "--gil", "--format", "raw"]
        command = [*spy, "--rate", "200", "-o", str(profile), "--", *command]
    return start_process(command, env={**env, "GUNICORN_BIND": f"127.0.0.1:{port}"}, log_path=log)


def start_worker(env: dict[str, str], log: Path):
    return start_process(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "callops,events"),
            *("--loglevel", "WARNING", "--pool", "prefork", "--concurrency", "2"),
            *("-n", f"bench-web-{os.getpid()}@%h"),
        ],
        env=env,
        log_path=log,
    )


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(child) for child in f.read().split())


def workers_of(web: int, profiled: bool, expected: int) -> tuple[int, list[int]]:
    """(gunicorn's master, its ``expected`` workers, once all are up); under py-spy, the master
    is py-spy's child."""
    deadline = time.monotonic() + 60
    while True:
        master = children(web)[0] if profiled else web
        workers = children(master)
        if len(workers) >= expected or time.monotonic() > deadline:
            return master, workers
        time.sleep(0.2)


def memory(pid: int) -> dict[str, float]:
    """MiB: RSS and its parts (/proc/PID/status), PSS and USS (/proc/PID/smaps_rollup)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Private_Clean", "Private_Dirty"):
                out[key] = int(value.split()[0]) / 1024
    out["USS"] = out.pop("Private_Clean") + out.pop("Private_Dirty")
    return out


class Client:
    """The partner API and the admin, over HTTP, a new connection each request (sync workers
    close it anyway). Cookies are kept by hand: production's are ``Secure``, which a cookie jar
    keeps off plain HTTP."""

    def __init__(self, port: int, api_key: str):
        self.base = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self.cookies: dict[str, str] = {}

    def _keep(self, response: httpx.Response) -> httpx.Response:
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            self.cookies[name.strip()] = rest.split(";")[0]
        return response

    def _cookie(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    def get(self, path: str, *, api: bool = False) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"} if api else self._cookie()
        response = self._keep(httpx.get(self.base + path, headers=headers, timeout=30))
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
        return response

    def login(self) -> None:
        self._keep(httpx.get(self.base + "/admin/login/", timeout=30))
        response = self._keep(
            httpx.post(
                self.base + "/admin/login/?next=/admin/",
                data={
                    "username": ADMIN_USER,
                    "password": ADMIN_PASSWORD,
                    "csrfmiddlewaretoken": self.cookies["csrftoken"],
                    "next": "/admin/",
                },
                headers={"Referer": self.base + "/admin/login/", **self._cookie()},
                timeout=30,
            )
        )
        if response.status_code != 302:
            raise RuntimeError(f"admin login: {response.status_code} {response.text[:300]}")

    def worker(self, trim: bool = False, query: str = "") -> dict:
        query = query or ("trim=1" if trim else "")
        return httpx.get(f"{self.base}/bench/worker/?{query}", timeout=30).json()


def warm_up(
    client: Client,
    port: int,
    signer: Signer,
    workers: int,
    *,
    schema: bool,
    pages: bool,
    marks: bool = False,
):
    """Every worker serves webhooks, API reads and admin pages (step 3 of the docstring);
    ``pages`` False: webhooks only."""
    raws = [raw_request(port, WEBHOOK_PATH, e) for e in signed_events(signer, 100 * workers)]
    result = python_load(port, raws, duration=30, connections=4)
    if result.non2xx or result.completed != len(raws):
        raise RuntimeError(f"warm-up webhooks: {result.completed}/{len(raws)}, {result.non2xx}")
    if not pages:
        return
    if marks:  # one worker (--heap-growth): what the pages add to its heap, from here
        client.worker(query="mark=1")
    deadline = time.monotonic() + 60
    while True:  # the calls exist once the worker has drained their events
        calls = client.get("/api/v1/calls/", api=True).json()["results"]
        if len(calls) >= 10 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not calls:
        raise RuntimeError("no call was drained: is the Celery worker running?")
    ccid = calls[0]["call_control_id"]
    api = [
        "/api/v1/calls/",
        f"/api/v1/calls/{ccid}/",
        f"/api/v1/calls/{ccid}/transcript/",
        f"/api/v1/calls/{ccid}/timeline/",
        "/api/v1/events/",
        "/api/v1/deliveries/",
        "/api/v1/profiles/",
        "/api/v1/webhook-endpoints/",
    ]
    client.login()
    admin = [
        "/admin/",
        "/admin/callops/call/",
        "/admin/callops/webhookevent/",
        "/admin/callops/command/",
        "/admin/console/dashboard/",
    ]
    call_page = client.get(f"/admin/callops/call/?q={ccid[3:20]}").text
    marker = 'href="/admin/callops/call/'
    at = call_page.find(marker, call_page.find("result_list"))
    if at >= 0:
        change = call_page[at + 6 : call_page.index('"', at + 6)]  # /admin/callops/call/N/change/
        admin.append(change)
        admin.append(f"/admin/console/calls/{change.split('/')[4]}/timeline/")
    if schema:
        admin += ["/api/v1/schema/", "/api/v1/docs/"]
    # Sync workers take connections as they come: asking 3 x workers times each leaves every
    # worker very likely to have served every page.
    for _ in range(3 * workers):
        for path in api:
            client.get(path, api=True)
        for path in admin:
            client.get(path)


def survey(client: Client, pids: list[int], trim: bool = False) -> dict[int, dict]:
    """``/bench/worker/`` of every worker (asked until each has answered)."""
    seen: dict[int, dict] = {}
    for _ in range(200):
        answer = client.worker(trim=trim)
        if answer["pid"] in seen:
            continue
        seen[answer["pid"]] = answer
        if set(pids) <= set(seen):
            return seen
    raise RuntimeError(f"workers {sorted(set(pids) - set(seen))} never answered /bench/worker/")


TARGET_RSS_MIB = 88.0  # issue 12: a web worker's RSS stays at or below this


def print_memory(title: str, pids: list[int], seen: dict[int, dict], master: int) -> float:
    """Print the table; returns the largest worker RSS."""
    print(f"\n{title}")
    rows = []
    for pid in [*pids, master]:
        m = memory(pid)
        info = seen.get(pid, {})
        rows.append(
            (
                f"{pid}" if pid != master else f"{pid} (master)",
                f"{m['VmRSS']:.1f}",
                f"{m['RssAnon']:.1f}",
                f"{m['RssFile'] + m['RssShmem']:.1f}",
                f"{m['Pss']:.1f}",
                f"{m['USS']:.1f}",
                str(info.get("modules", "-")),
                "yes" if info.get("telnyx") else "no" if info else "-",
            )
        )
    print_table(("pid", "RSS MiB", "anon", "file+shm", "PSS", "USS", "modules", "telnyx"), rows)
    total = sum(memory(pid)["Pss"] for pid in [*pids, master])
    print(f"web tier in all (PSS of the master and the workers): {total:.1f} MiB")
    return max(memory(pid)["VmRSS"] for pid in pids)


# Inclusive shares: the samples with this frame anywhere in their stack ("name (file").
CALLEES = (
    ("the webhook view (callops.views.telnyx_webhook)", "telnyx_webhook (callops/views.py"),
    ("  verify_signature (Ed25519)", "verify_signature (callops/webhooks.py"),
    ("  parse_event", "parse_event (callops/webhooks.py"),
    ("  store_event (the INSERT)", "store_event (callops/webhooks.py"),
    ("  drain.after_store (publishes)", "after_store (callops/drain.py"),
    ("    Celery apply_async", "apply_async (celery/"),
    ("  metrics.webhook_answered", "webhook_answered (callops/metrics.py"),
    ("  logs.bind", "bind (callops/logs.py"),
    ("  JsonResponse", "JsonResponse.__init__ (django/http/response.py"),
    ("LogContextMiddleware (itself and all inside)", "LogContextMiddleware.__call__"),
    ("request_started / request_finished signals", "Signal.send (django/dispatch/"),
    ("  close_old_connections", "close_old_connections (django/db/"),
    ("gunicorn's access log", "Logger.access (gunicorn/glogging.py"),
    ("gunicorn handle_request (whole request)", "SyncWorker.handle_request"),
    ("  Django WSGIHandler.__call__", "WSGIHandler.__call__"),
    ("  gunicorn: parse the request", "Request.parse (gunicorn/http/message.py"),
    ("  gunicorn: write the response", "Response.write (gunicorn/http/wsgi.py"),
    ("structlog processors (any log line)", "ProcessorFormatter.format (structlog/stdlib.py"),
)


def _package(frame: str) -> str:
    """``func (path/file.py:12)`` -> the file's package: ``django.db``, ``json``, ``callops``."""
    where = frame[frame.rfind("(") + 1 :].rsplit(":", 1)[0]
    parts = where.split("/")
    if parts[0] in ("django", "celery", "kombu") and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0].removesuffix(".py")


def summarise_profile(path: Path) -> None:
    """py-spy's raw output (``frame;frame;... count``, outermost first): inclusive shares of the
    request's parts and own samples by package, start-up imports and frameless samples apart."""
    if not path.exists():
        print("  py-spy wrote no profile")
        return
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = imports = frameless = bench = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            frameless += n  # the GIL held outside any Python frame (py-spy saw no stack)
            continue
        if any("importlib._bootstrap" in f for f in frames):
            imports += n  # start-up and first-use imports: not the steady state
            continue
        if any("benchmarks/bench_urls.py" in f for f in frames):
            bench += n  # this benchmark's own questions to the workers (/bench/worker/)
            continue
        total += n
        for label, key in CALLEES:
            if any(key in f for f in frames):
                inclusive[label] += n
        own[_package(frames[-1])] += n
    print(
        f"\npy-spy: {total} samples of the workers' Python frames holding the GIL"
        f" ({imports} more in imports, {frameless} without a Python frame and {bench} in"
        " /bench/worker/, left out)"
    )
    print_table(
        ("part of a request (inclusive)", "share"),
        [(label, f"{inclusive[label] / total:.1%}") for label, _ in CALLEES],
    )
    print("\nown samples by package (where the CPU is spent)")
    print_table(("package", "share"), [(p, f"{n / total:.1%}") for p, n in own.most_common(20)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=120, help="webhooks per second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load")
    parser.add_argument("--schema", action="store_true", help="warm up the schema and docs too")
    parser.add_argument(
        "--py-spy", action="store_true", help="profile the workers (warm-up: webhooks only)"
    )
    parser.add_argument("--multiproc", action="store_true", help="PROMETHEUS_MULTIPROC_DIR set")
    parser.add_argument(
        "--no-preload", action="store_true", help="GUNICORN_PRELOAD=false: each worker imports"
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="trace the workers' heap and print its top"
    )
    parser.add_argument(
        "--heap-growth",
        action="store_true",
        help="one traced worker: what the API and admin pages add to its heap after webhooks",
    )
    parser.add_argument("--settings", default="benchmarks.bench_settings")
    parser.add_argument("--keep-logs", action="store_true")
    add_scratch_options(parser, database="callops_bench_web", redis_db=11)
    add_quiet_options(parser, quiet_wait=60)
    args = parser.parse_args()

    signer = Signer()
    work = Path(tempfile.mkdtemp(prefix="web-worker-"))
    profile = work / "py-spy.txt" if args.py_spy else None
    procs = []
    passed = False
    try:
        with scratch(args.database, redis_db=args.redis_db, pg=args.pg) as run:
            (work / "static").mkdir()
            env = production_env(run, args.settings, signer, work / "static")
            env["PYTHONUNBUFFERED"] = "1"
            if args.multiproc:
                env["PROMETHEUS_MULTIPROC_DIR"] = str(work / "metrics")
            run.migrate(env)
            # The admin's pages name their static files through production's manifest.
            subprocess.run(
                [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
                cwd=ROOT,
                env=env,
                check=True,
            )
            api_key = setup_records(env)
            port = free_port()
            web_env = dict(env)
            if args.tracemalloc or args.heap_growth:
                web_env["PYTHONTRACEMALLOC"] = "1"
            if args.heap_growth:
                web_env["WEB_CONCURRENCY"] = "1"
            if args.no_preload:
                web_env["GUNICORN_PRELOAD"] = "false"
            web = start_web(web_env, port, work / "gunicorn.log", profile)
            procs.append(web)
            procs.append(start_worker(env, work / "worker.log"))
            wait_until_serving(port, web)
            expected = int(web_env.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))
            master, pids = workers_of(web.pid, profiled=profile is not None, expected=expected)
            print(f"gunicorn on 127.0.0.1:{port}, {len(pids)} sync workers; warming up")
            client = Client(port, api_key)
            warm_up(
                client,
                port,
                signer,
                len(pids),
                schema=args.schema,
                pages=not args.py_spy,
                marks=args.heap_growth,
            )
            if args.heap_growth:
                grown = client.worker(query="since=1")["allocated"]
                print("\nwhat the API and admin pages added to the heap, by allocating file")
                print_table(
                    ("file", "MiB"),
                    [(n.split("site-packages/")[-1][-70:], f"{d / 2**20:+.2f}") for n, d in grown],
                )
            before = survey(client, pids)
            title = "webhooks only, under py-spy" if args.py_spy else "webhooks, API, admin"
            largest = print_memory(f"after the warm-up ({title})", pids, before, master)
            telnyx = [pid for pid, info in before.items() if info["telnyx"]]
            if telnyx:
                print(f"telnyx SDK imported by workers {telnyx}: {before[telnyx[0]]['telnyx']}")
            if before[pids[0]]["allocated"]:
                print("\nthe first worker's heap by the file that allocated it (tracemalloc)")
                print_table(
                    ("file", "MiB"),
                    [
                        (name.split("site-packages/")[-1][-70:], f"{size / 2**20:.2f}")
                        for name, size in before[pids[0]]["allocated"]
                    ],
                )
            print("\nlargest packages by modules imported (first worker)")
            tops = collections.Counter(m.split(".")[0] for m in before[pids[0]]["names"])
            print("  " + ", ".join(f"{name} {n}" for name, n in tops.most_common(25)))

            wait_for_quiet(args.quiet_wait)
            count = int(args.rate * args.duration)
            raws = [raw_request(port, WEBHOOK_PATH, e) for e in call_traffic(signer, count)]
            meter = CpuMeter(run.database_url, {"web": [master]})
            start = meter.snapshot()
            load = python_load(port, raws, duration=args.duration, connections=4, rate=args.rate)
            cpu = meter.since(start)
            meter.close()
            after = survey(client, pids)
            published = sum(after[p]["publishes"] - before[p]["publishes"] for p in pids)
            answered = load.completed - load.non2xx
            print(
                f"\nload: {load.sent} webhooks sent at {args.rate:g}/s, {answered} answered 2xx,"
                f" {load.non2xx} not, {load.socket_errors} socket errors;"
                f" others took {cpu.others_share:.0%} of the CPU (wall-clock figures suffer)"
            )
            lat = sorted(load.latencies)
            per_webhook = cpu.roles["web"] / answered * 1e3
            print_table(
                ("web tier", "figure"),
                [
                    ("CPU per webhook (gunicorn tree), ms", f"{per_webhook:.3f}"),
                    ("  of which kernel, ms", f"{cpu.kernel['web'] / answered * 1e3:.3f}"),
                    ("drain publishes per webhook", f"{published / answered:.3f}"),
                    ("latency p50, ms", f"{lat[len(lat) // 2] * 1e3:.1f}"),
                    ("latency p99, ms", f"{lat[int(len(lat) * 0.99)] * 1e3:.1f}"),
                ],
            )
            largest = max(largest, print_memory("after the load", pids, after, master))
            if profile is None:  # a collection in every worker: not in the profile
                trimmed = survey(client, pids, trim=True)
                print(
                    "\nfree memory the C heap held (returned by malloc_trim, MiB): "
                    + ", ".join(f"{trimmed[p]['trimmed_mib']:.1f}" for p in pids)
                )
            if profile is not None:
                # gunicorn first: py-spy writes its profile when the program it runs exits.
                os.kill(master, signal.SIGTERM)
                web.wait(60)
                summarise_profile(profile)
            print()
            passed = print_verdicts(
                [
                    (
                        largest <= TARGET_RSS_MIB,
                        f"every worker's RSS <= {TARGET_RSS_MIB:g} MiB (largest {largest:.1f})",
                    ),
                    (not telnyx, "no worker imported the telnyx SDK"),
                ]
            )
    finally:
        stop_processes(procs)
        if args.keep_logs:
            print(f"logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
