"""What every benchmark shares: scratch services, processes, the CPU meter, the quiet wait, tables.

A benchmark runs on this (small, shared) machine only, against the local PostgreSQL and Redis:

- ``scratch()`` gives it a fresh database and an empty Redis db, dropped and flushed at the end;
- ``copy_database()`` starts several measurements from the same filled database;
- ``start_process()`` / ``stop_processes()`` run the servers it measures (gunicorn, Celery);
- ``CpuMeter`` says where the CPU went during a measurement, ours and everybody else's;
- ``rss_by_role()`` says how much memory each of those processes holds;
- ``measure_quietly()`` waits for the machine to be idle before a measurement and repeats one
  that other processes disturbed;
- ``simulated_calls()`` is the Telnyx simulator the whole-stack benchmarks drive;
- ``start_receiver()`` runs a partner's HTTPS webhook receiver that verifies every request
  (``Receipts`` reads what it got);
- ``percentile()`` and ``print_table()`` report.

Linux only: the meter and the quiet wait read /proc.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol, TypeVar

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks run as scripts and import callops and config

from telnyx_sim import CallPlan, CallSimulator, DeliveryPolicy, DeliveryRecord  # noqa: E402

PG = "postgres://postgres@127.0.0.1:5432"
NOISE_LIMIT = 0.10  # share of the machine's CPU other processes may take during a measurement


# --- Scratch services -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    database_url: str
    redis_url: str

    def env(self, settings: str, **extra: str) -> dict[str, str]:
        """The environment of a Django process of this run: this one's, on the scratch services."""
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": settings,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.redis_url,
            "CACHE_URL": self.redis_url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra,
        }

    def migrate(self, env: dict[str, str]) -> None:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "--skip-checks", "-v0"],
            cwd=ROOT,
            env=env,
            check=True,
        )


def add_scratch_options(parser: argparse.ArgumentParser, *, database: str, redis_db: int) -> None:
    parser.add_argument("--database", default=database, help="recreated, then dropped")
    parser.add_argument(
        "--pg", default=PG, help="PostgreSQL server (the database name is --database)"
    )
    parser.add_argument("--redis-db", type=int, default=redis_db, help="flushed before and after")


@contextmanager
def scratch(database: str, *, redis_db: int, pg: str = PG) -> Iterator[Scratch]:
    """A fresh database ``database`` on ``pg`` and an empty Redis db ``redis_db`` for one run.

    Both are dropped and flushed when the block ends. Two runs on one database name would drop
    each other's database: a second one stops at once.
    """
    lock = open(Path(tempfile.gettempdir()) / f"{database}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"another run is using the database {database}") from None
    admin_url = f"{pg}/postgres"
    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{database}"')
        redis.Redis.from_url(redis_url).flushdb()
        yield Scratch(f"{pg}/{database}", redis_url)
    finally:
        if "django.db" in sys.modules:  # this process's own connections go first, cleanly
            from django.db import connections

            connections.close_all()
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            redis.Redis.from_url(redis_url).flushdb()
        except Exception as exc:  # noqa: BLE001 - an error of the run itself may be propagating
            print(f"clean-up failed: {exc}", file=sys.stderr)
        lock.close()


def copy_database(source: str, target: str, *, pg: str = PG) -> None:
    """(Re)create the database ``target`` on ``pg`` as a copy of ``source`` (PostgreSQL's
    ``TEMPLATE``): the same starting state for each of several measurements. Nobody may be
    connected to ``source``; whoever is connected to ``target`` is disconnected."""
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')


def drop_database(name: str, *, pg: str = PG) -> None:
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- Processes ------------------------------------------------------------------------------


def start_process(command: list[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``command`` in the project's root, its output to ``log_path``.

    In its own process group, so that stopping it stops its children (pool processes, workers).
    """
    with open(log_path, "wb") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM to each process group at once (a graceful stop), SIGKILL after ``timeout`` s."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --- The Telnyx simulator -------------------------------------------------------------------


def simulated_calls(
    *,
    webhook_url: str,
    api,
    connection_id: str,
    call_duration: float,
    delivery_workers: int,
    on_delivery: Callable[[DeliveryRecord], None] | None = None,
) -> CallSimulator:
    """The calls of the whole-stack benchmarks, placed by hand (``place_call``): incoming on
    ``connection_id``, parked until callops answers through ``api`` (a running
    ``TelnyxAPISimulator``), then ``call_duration`` s (+-20 %) with a transcript a second and no
    media (production refuses the private stream URL media would need). Their webhooks go to
    ``webhook_url`` from ``delivery_workers`` threads. Seeded; its own logs stay short, a
    benchmark keeps what it needs through ``on_delivery``."""
    return CallSimulator(
        webhook_url=webhook_url,
        api=api,
        plan=CallPlan(
            call_duration=call_duration,
            connection_id=connection_id,
            transcription_interval=1.0,
            media=False,
        ),
        delivery=DeliveryPolicy(delivery_workers=delivery_workers),
        on_delivery=on_delivery,
        log_size=1000,
        seed=1,
    )


# --- Partners' webhook receivers ------------------------------------------------------------


def self_signed(work: Path) -> tuple[str, str]:
    """A throw-away certificate for ``localhost`` and its key (paths in ``work``): receivers
    serve HTTPS, as production wants of an endpoint, and the workers trust it through
    ``SSL_CERT_FILE``."""
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def serve_receiver(port: int, cert: str, key: str, secret: str, log_path: str) -> None:
    """A partner's HTTPS webhook server (its own process): verify, log, answer 204. One log
    line per request: arrival (wall clock), verified or not, then the body's fields."""
    from standardwebhooks import Webhook

    verifier = Webhook(secret)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            arrived = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                event = verifier.verify(body, dict(self.headers.items()))
                ok = True
            except Exception:  # noqa: BLE001 - any failure to verify is what is counted
                event, ok = json.loads(body), False
            line = json.dumps(
                [arrived, ok, event["id"], event["type"], event["created_at"]],
                separators=(",", ":"),
            )
            with lock:
                log.write(line + "\n")
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # listening from here on
    server.daemon_threads = True
    # The log appears once the port is open: start_receiver waits for it.
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - the process's lifetime
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # The handshake in the request's own thread, not in the accepting loop.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    server.serve_forever()


def start_receiver(
    port: int, cert: str, key: str, secret: str, log_path: Path
) -> multiprocessing.Process:
    """``serve_receiver`` in a fresh interpreter (spawned, so nothing of this process's
    threads or Django comes along), once it listens. ``log_path`` must not exist yet."""
    proc = multiprocessing.get_context("spawn").Process(
        target=serve_receiver, args=(port, cert, key, secret, str(log_path)), daemon=True
    )
    proc.start()
    deadline = time.monotonic() + 30
    while not log_path.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the receiver on port {port} did not start")
        time.sleep(0.05)
    return proc


class Receipts:
    """What a receiver logged: (arrival, verified, event id, type, created_at) per request,
    both times Unix seconds."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[tuple[float, bool, str, str, float]]:
        rows = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                arrived, ok, event_id, kind, created = json.loads(line)
                created_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
                rows.append((arrived, ok, event_id, kind, created_at))
        return rows


# --- CPU ------------------------------------------------------------------------------------


def _machine() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def _name(pid: str, comm: str) -> str:
    """What to call a process in "others": its command, or for Python its first arguments."""
    if comm.startswith("python"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            comm = " ".join(a.decode(errors="replace") for a in argv[1:4])[:40]
        except OSError:
            pass
    return comm.split("/")[0]


@dataclass(frozen=True)
class CpuSnapshot:
    at: float  # monotonic
    processes: dict[tuple[int, str], tuple[str | None, str, float, float]]
    # (pid, start time) -> (role or None, name, user s, system s); pids are reused
    machine: tuple[int, int]


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during one measurement."""

    seconds: float  # wall time
    roles: Counter[str]  # per role (see CpuMeter), user + system
    kernel: Counter[str]  # per role, system only
    others: Counter[str]  # per process name, the processes without a role
    busy: float  # the whole machine's busy CPU seconds
    total: float  # the whole machine's CPU seconds, busy or not

    def cores(self, cpu_seconds: float) -> float:
        return cpu_seconds / self.seconds

    @property
    def ours(self) -> float:
        return sum(self.roles.values())

    @property
    def not_ours(self) -> float:
        """Busy time outside our roles: other processes, and kernel work charged to none."""
        return max(0.0, self.busy - self.ours)

    @property
    def unattributed(self) -> float:
        """Busy time no process accounts for (on this VM, loopback-heavy runs show some)."""
        return max(0.0, self.busy - self.ours - sum(self.others.values()))

    @property
    def others_share(self) -> float:
        """The share of the machine's CPU the other processes took: the noise of a measurement.

        Unattributed time is left out: it comes and goes with our own load, not with others'.
        """
        return sum(self.others.values()) / (self.total or 1)

    @property
    def idle_share(self) -> float:
        return 1 - self.busy / (self.total or 1)

    def top_others(self, n: int = 4) -> list[tuple[str, float]]:
        """The ``n`` biggest other consumers by name, in cores (short-lived ones are missed)."""
        return [(name, self.cores(s)) for name, s in self.others.most_common(n) if s > 0]


class CpuMeter:
    """CPU time of every process between two snapshots, by role, from /proc.

    Roles: each of ``trees`` (role -> root pids: gunicorn, Celery workers) with all their
    descendants; "bench": this process and the children it reaped (wrk, forked load generators);
    "postgres": the backends of the run's database and the server's own processes; "redis": the
    Redis server (shared, counted whole). Every other process counts in ``CpuUse.others``.
    A process is keyed by pid and start time, so one that exits during a measurement (someone
    else's test run, a short-lived backend) subtracts nothing, and a reused pid adds nothing.
    """

    def __init__(self, database_url: str, trees: dict[str, Iterable[int]] | None = None):
        self.db = psycopg.connect(database_url, autocommit=True)
        self.trees = {role: set(pids) for role, pids in (trees or {}).items()}
        self.tick = os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.db.close()

    def snapshot(self) -> CpuSnapshot:
        backends = {
            pid
            for (pid,) in self.db.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname IS NULL OR datname = current_database()"
            )
        }
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        stats[entry.name] = f.read()
                except OSError:
                    continue
        parents: dict[int, int] = {}
        rows = []
        for pid, stat in stats.items():
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(pid)] = int(fields[1])
            rows.append((pid, comm, fields))
        tree_of = {}
        for role, roots in self.trees.items():
            for pid in parents:
                ancestor = pid
                while ancestor > 1 and ancestor not in roots:
                    ancestor = parents.get(ancestor, 0)
                if ancestor in roots:
                    tree_of[pid] = role
        me = os.getpid()
        processes = {}
        for pid, comm, fields in rows:
            n, ppid = int(pid), int(fields[1])
            if n in tree_of:
                role = tree_of[n]
            elif n == me:
                role = "bench"
            elif comm == "postgres" and (n in backends or ppid == 1):
                role = "postgres"
            elif comm.startswith("redis-server"):
                role = "redis"
            else:
                role = None
            name = comm if role else _name(pid, comm)
            user, system = int(fields[11]) / self.tick, int(fields[12]) / self.tick
            processes[(n, fields[19])] = (role, name, user, system)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        processes[(0, "reaped")] = ("bench", "", children.ru_utime, children.ru_stime)
        return CpuSnapshot(time.monotonic(), processes, _machine())

    def since(self, before: CpuSnapshot) -> CpuUse:
        after = self.snapshot()
        roles: Counter[str] = Counter()
        kernel: Counter[str] = Counter()
        others: Counter[str] = Counter()
        for key, (role, name, user, system) in after.processes.items():
            _, _, user0, system0 = before.processes.get(key, (role, name, 0.0, 0.0))
            used = max(0.0, user + system - user0 - system0)  # not -1e-16 from float seconds
            if role:
                roles[role] += used
                kernel[role] += max(0.0, system - system0)
            else:
                others[name] += used
        return CpuUse(
            seconds=after.at - before.at,
            roles=roles,
            kernel=kernel,
            others=others,
            busy=(after.machine[0] - before.machine[0]) / self.tick,
            total=(after.machine[1] - before.machine[1]) / self.tick,
        )


def rss_by_role(snapshot: CpuSnapshot) -> dict[str, list[float]]:
    """Resident memory (MiB) of each process the snapshot gave a role, by role, read now.

    PostgreSQL's and Redis's figures include the shared memory each process has touched.
    """
    out: dict[str, list[float]] = {}
    for (pid, _), (role, *_) in snapshot.processes.items():
        if not role or pid <= 0:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue  # exited, or a kernel thread
        out.setdefault(role, []).append(kib / 1024)
    return out


# --- Quiet ----------------------------------------------------------------------------------


def wait_for_quiet(max_wait: float, seconds: int = 5) -> float:
    """Wait (at most ``max_wait`` s) for ``seconds`` in a row in which the machine is at most
    NOISE_LIMIT busy: other work on this small machine skews every figure.

    Returns the last second's busy share.
    """
    start, quiet, told = time.monotonic(), 0, False
    while True:
        b0, t0 = _machine()
        time.sleep(1.0)
        b1, t1 = _machine()
        share = (b1 - b0) / max(1, t1 - t0)
        quiet = quiet + 1 if share <= NOISE_LIMIT else 0
        if quiet >= seconds:
            return share
        if time.monotonic() - start > max_wait:
            print(f"  machine still {share:.0%} busy after {max_wait:g} s; measuring anyway")
            return share
        if not quiet and not told:
            print(f"  machine {share:.0%} busy with other work; waiting up to {max_wait:g} s")
            told = True


def add_quiet_options(parser: argparse.ArgumentParser, *, quiet_wait: float) -> None:
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help="before each measurement, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        # argparse formats help with %: the percent sign is doubled.
        help=f"runs of a measurement at most, while other processes take over {NOISE_LIMIT:.0%}% "
        "of the CPU during it",
    )


class Measured(Protocol):
    cpu: CpuUse


M = TypeVar("M", bound=Measured)


def measure_quietly(
    name: str, run: Callable[[int], M], *, attempts: int, quiet_wait: float
) -> tuple[M, int]:
    """Run a measurement once the machine is quiet; again (up to ``attempts`` runs) while other
    processes took over NOISE_LIMIT of the CPU during it.

    ``run`` takes the attempt's number; returns the last result and the number of runs.
    """
    for attempt in range(1, attempts + 1):
        wait_for_quiet(quiet_wait)
        print(f"  {name} ...", flush=True)
        result = run(attempt)
        share = result.cpu.others_share
        top = ", ".join(f"{n} {c:.2f}" for n, c in result.cpu.top_others(3))
        print(f"  {name}, attempt {attempt}: others took {share:.0%} of the CPU ({top})")
        if share <= NOISE_LIMIT:
            break
    return result, attempt


# --- Report ---------------------------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]


def ratio(value: float, baseline: float | None) -> float | None:
    """A figure against the same run's baseline: every "x bare" cell and verdict is this."""
    return value / baseline if baseline else None


def print_verdicts(verdicts: Iterable[tuple[bool, str]]) -> bool:
    """Print PASS or FAIL per target; True when every target is met."""
    verdicts = list(verdicts)
    for ok, text in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return all(ok for ok, _ in verdicts)


def print_table(header: Sequence[str], rows: Iterable[Sequence[str | float | None]]) -> None:
    """Print aligned columns: the first (what a row is) left, figures right.

    A float cell prints with two decimals (a ratio), None as "-"; format other figures before.
    """
    cells = [list(header)] + [
        [
            "-" if cell is None else f"{cell:.2f}" if isinstance(cell, float) else str(cell)
            for cell in row
        ]
        for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        first, *rest = row
        print(
            " ".join(
                [
                    first.ljust(widths[0]),
                    *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)),
                ]
            )
        )


def create_answering_partner(name: str, connection_id: str, stream_url: str):
    """A partner whose profile has callops answer each incoming call on ``connection_id`` with
    streaming and transcription inline: one ``answer`` command per call."""
    # Imported here: the harness is loaded before the benchmark sets Django up.
    from callops.models import Partner, PartnerConnection, StreamingProfile

    partner = Partner.objects.create(name=name)
    PartnerConnection.objects.create(partner=partner, connection_id=connection_id)
    StreamingProfile.objects.create(
        partner=partner,
        connection_id=connection_id,
        stream_url=stream_url,
        stream_track="both_tracks",
        auto_start=True,
        transcribe=True,
        transcription_engine="Google",
        transcription_tracks="both",
        answer_policy=StreamingProfile.AnswerPolicy.ANSWER,
    )
    return partner
