"""Run the whole service in one terminal: web, Celery worker, Celery beat, and, without a
``TELNYX_API_KEY``, the Telnyx simulator with the demo partner's stand-ins: a media sink its
streams go to, a webhook receiver its partner events go to, and a dialer placing its calls.

For local use and demos. It migrates and runs ``demo_setup`` (with this command's ports), then
starts the processes in stages, each once the one before answers: web, worker, beat and the
media sink; once the web server answers ``/healthz``, the webhook receiver (it registers itself
through the partner API); once that is registered, the simulator and the dialer. So the
simulator's first webhook finds a server, and its first call's events reach the receiver.

Each process's output is prefixed with its name. Ctrl-C (or SIGTERM) stops them in reverse:
the dialer and the simulator first (the simulator hangs up its live calls and sends their
webhooks), then, once callops has applied those (every call of this run ended, with its
streams and transcriptions, and the partner told) or after ``STOP_GRACE`` seconds, the rest. A
second Ctrl-C skips the wait. If one process dies the others are stopped too, so nothing is
left running.

With the simulator, every process is given its API URL and key and its webhook public key, so
callops talks to it exactly as it would to Telnyx. This command runs no system checks itself:
it would judge its own environment, without those keys. The web server runs them, with the
environment it is given, and prints what it finds.

The simulator is the top-level ``telnyx_sim`` package of the source tree, which callops'
distribution does not ship: it is only ever run as ``python -m telnyx_sim``, never imported.
"""

from __future__ import annotations

import io
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from callops.management.commands._demo import demo_key_file, shown
from callops.models import Call, Delivery, WebhookEvent

COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"
START_TIMEOUT = 60.0  # seconds a stage may take to answer before the run gives up
STOP_GRACE = 15.0  # seconds, at Ctrl-C, for callops to apply the simulator's last webhooks
# Each process's quiet way out: runserver exits 0 on SIGINT (it dies of SIGTERM); Celery's
# warm shutdown exits 0 on SIGTERM (1 on SIGINT); the others take either.
STOP_SIGNAL = {"web": signal.SIGINT}
# Where the processes reach each other: never through a proxy from the environment.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Stage:
    processes: dict[str, list[str]]
    ready_url: str | None = None  # the next stage starts once this answers 200


def answers(url: str) -> bool:
    try:
        with LOCAL.open(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def split_addr(addr: str) -> tuple[str, int]:
    """``runserver``'s addrport (``host:port``, ``port``, ``[::1]:port``) as host and port."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--addr {addr!r}: expected host:port or a port")
    return host or "127.0.0.1", int(port)


class Command(BaseCommand):
    help = "Run web, worker and beat (and the demo around them) with prefixed logs."
    requires_system_checks: list = []  # the web process runs them, with the real environment

    def add_arguments(self, parser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000", help="where the web server listens")
        parser.add_argument("--simulator-port", type=int, default=8089)
        parser.add_argument("--media-port", type=int, default=8090, help="the media sink's port")
        parser.add_argument(
            "--receiver-port", type=int, default=8091, help="the webhook receiver's port"
        )
        parser.add_argument("--calls-per-minute", type=float, default=6.0)
        parser.add_argument("--call-duration", type=float, default=20.0)
        parser.add_argument(
            "--dials-per-minute",
            type=float,
            default=1.5,
            help="outbound calls the demo partner dials through the API (0: none)",
        )
        parser.add_argument(
            "--simulator",
            choices=["auto", "on", "off"],
            default="auto",
            help="auto: on when TELNYX_API_KEY is not set",
        )

    def stages(self, options: dict) -> list[Stage]:
        python = sys.executable
        web = f"http://{self.local}"
        celery = [python, "-m", "celery", "-A", "config"]
        # mingle and gossip broadcast to other workers; the embedded broker has no fan-out.
        quiet = ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        core = {
            "web": [python, "manage.py", "runserver", self.addr, "--noreload"],
            # No -Q: it takes every queue, "partners" (the deliveries to partners) included.
            "worker": [*celery, "worker", "--concurrency", "2", *quiet],
            # Schedules come from the database (django-celery-beat), editable in the admin.
            "beat": [*celery, "beat", "--loglevel", "INFO"],
        }
        if not self.simulated:
            return [Stage(core, f"{web}/healthz")]
        core["partner"] = [
            python, "manage.py", "media_sink", "--port", str(options["media_port"])
        ]  # fmt: skip
        receiver = {
            "webhooks": [
                python, "manage.py", "demo_receiver", "--port", str(options["receiver_port"]),
                "--api", f"{web}/api/v1/",
            ]
        }  # fmt: skip
        calls = {
            "telnyx": [
                python, "-m", "telnyx_sim",
                "--webhook-url", f"{web}/webhooks/telnyx/",
                "--port", str(options["simulator_port"]),
                "--api-key", self.env["TELNYX_API_KEY"],
                # One incoming call in three is on the connection whose profile rejects.
                "--connection-id", "sim-connection,sim-connection,sim-reject",
                "--calls-per-minute", str(options["calls_per_minute"]),
                "--call-duration", str(options["call_duration"]),
                # Strict like Telnyx: the demo profile's answer policy has callops answer.
                "--ring-timeout", "30",
                "--signing-key-file", str(self.signing_key_file),
                "--public-key-file", str(settings.VAR_DIR / "simulator_public_key"),
            ]
        }  # fmt: skip
        if options["dials_per_minute"] > 0:
            calls["dialer"] = [
                python, "manage.py", "demo_dialer", "--api", f"{web}/api/v1/",
                "--every", str(60.0 / options["dials_per_minute"]),
            ]  # fmt: skip
        return [
            Stage(core, f"{web}/healthz"),
            Stage(receiver, f"http://127.0.0.1:{options['receiver_port']}/"),
            Stage(calls),
        ]

    def prepare_simulator(self, options: dict) -> None:
        """Give every process the simulator's API URL, key and webhook public key."""
        self.signing_key_file = settings.VAR_DIR / "simulator_signing_key"
        # The simulator makes (or reads) its own key; asking it keeps callops free of its code.
        found = subprocess.run(  # noqa: S603 - our own fixed argv, no shell
            [sys.executable, "-m", "telnyx_sim", "--print-public-key"]
            + ["--signing-key-file", str(self.signing_key_file)],
            capture_output=True,
            text=True,
        )
        if found.returncode != 0:
            raise CommandError(
                "the Telnyx simulator (telnyx_sim, in the source tree, not in the package) "
                f"did not start: {found.stderr.strip()}"
            )
        public_key = found.stdout.strip()
        self.env.update(
            TELNYX_API_KEY="KEY_SIMULATOR_" + secrets.token_hex(8),
            TELNYX_BASE_URL=f"http://127.0.0.1:{options['simulator_port']}/v2",
            TELNYX_PUBLIC_KEY=public_key,
        )
        self.stdout.write(
            "No TELNYX_API_KEY: calls come from the Telnyx simulator "
            f"(command API {self.env['TELNYX_BASE_URL']}, webhook key {public_key})."
        )

    def handle(self, *args, addr: str, **options) -> None:
        host, port = split_addr(addr)
        self.addr = addr
        # Where the other processes reach the web server (a wildcard address is not a host).
        local_host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # noqa: S104
        self.local = f"{local_host}:{port}"
        self.started_at = timezone.now()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not self.env.get("PROMETHEUS_MULTIPROC_DIR"):
            # Web, worker and beat add up their counters for /metrics here (callops.metrics).
            metrics_dir = settings.VAR_DIR / "metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)  # this run's counts start at 0
            self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        wanted = options["simulator"]
        self.simulated = wanted == "on" or (wanted == "auto" and not settings.TELNYX_API_KEY)
        call_command("migrate", interactive=False, stdout=self.stdout, stderr=self.stderr)
        demo = io.StringIO()
        call_command(
            "demo_setup", stream_url=f"ws://127.0.0.1:{options['media_port']}/media", stdout=demo
        )
        if self.simulated:
            self.prepare_simulator(options)
        self.run_stages(self.stages(options), demo.getvalue().splitlines())

    # --- Running the processes --------------------------------------------------------------

    def run_stages(self, stages: list[Stage], greeting: list[str]) -> None:
        self.children: dict[str, subprocess.Popen] = {}
        self.selector = selectors.DefaultSelector()
        names = [name for stage in stages for name in stage.processes]
        self.prefixes = {name: f"{name:<{max(map(len, names))}} | " for name in names}
        if self.stdout.isatty():
            for index, name in enumerate(names):
                self.prefixes[name] = COLOURS[index % len(COLOURS)] + self.prefixes[name] + RESET
        self.stopping = self.hurry = False

        def stop(*_):
            self.hurry = self.stopping  # a second Ctrl-C: no more waiting
            self.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        waiting = list(stages)
        try:
            while waiting and not self.stopping and self.all_alive():
                stage = waiting.pop(0)
                self.start(stage.processes)
                if stage.ready_url and not self.wait_until_ready(stage.ready_url):
                    break
                if stage is stages[0]:
                    self.greet(greeting)
            while not self.stopping and self.all_alive():
                self.pump(0.5)
        finally:
            self.shutdown(stages)

    def start(self, processes: dict[str, list[str]]) -> None:
        for name, argv in processes.items():
            proc = subprocess.Popen(  # noqa: S603 - our own fixed argv, no shell
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
            self.children[name] = proc
            self.selector.register(proc.stdout, selectors.EVENT_READ, self.prefixes[name])

    def all_alive(self) -> bool:
        return all(proc.poll() is None for proc in self.children.values())

    def pump(self, timeout: float) -> None:
        """Print what the children wrote, for up to ``timeout`` seconds."""
        for key, _ in self.selector.select(timeout=timeout):
            line = key.fileobj.readline()
            if line:
                self.stdout.write(key.data + line.decode(errors="replace").rstrip())
            else:
                self.selector.unregister(key.fileobj)

    def wait_until_ready(self, url: str) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.stopping and self.all_alive():
            if answers(url):
                return True
            if time.monotonic() > deadline:
                self.stderr.write(f"{url} did not answer within {START_TIMEOUT:g} s: stopping")
                return False
            self.pump(0.3)
        return False

    def greet(self, greeting: list[str]) -> None:
        for line in greeting:
            self.stdout.write(line)
        web = f"http://{self.local}"
        self.stdout.write(
            f"callops is up: {web}/ (admin {web}/admin/, API docs {web}/api/v1/docs/)"
        )
        self.stdout.write(
            "For the README's Partner API examples, as the demo partner: "
            f"export KEY=$(cat {shown(demo_key_file())})"
        )
        self.stdout.write("Ctrl-C stops everything.")

    # --- Stopping ---------------------------------------------------------------------------

    def shutdown(self, stages: list[Stage]) -> None:
        """The callers first, then what serves them, once it has caught up."""
        callers = [name for stage in stages[1:] for name in stage.processes]
        orderly = self.stopping  # not when a process died: then stop everything at once
        for name, proc in self.children.items():
            if not orderly and proc.poll() is not None:
                self.pump(0)
                self.stderr.write(f"{name} exited (exit {proc.returncode}): stopping the rest")
        if orderly:
            self.stop([name for name in reversed(callers) if name != "webhooks"])
            self.settle()
            # The receiver last: the worker may be sending it one more event.
            self.stop([name for name in self.children if name != "webhooks"])
        self.stop(list(self.children))

    def stop(self, names: list[str], timeout: float = 10.0) -> None:
        running = [name for name in names if name in self.children]
        for name in running:
            if self.children[name].poll() is None:
                self.children[name].send_signal(STOP_SIGNAL.get(name, signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            self.children[name].poll() is None for name in running
        ):
            self.pump(0.2)
        for name in running:
            proc = self.children.pop(name)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.pump(0)
            self.stdout.write(f"{name} stopped (exit {proc.returncode})")

    def outstanding(self) -> dict[str, int]:
        """What callops has still to do about this run's calls."""
        counts = {
            "webhook events to apply": WebhookEvent.objects.filter(status="pending").count(),
            "calls not ended": Call.objects.filter(created_at__gte=self.started_at)
            .exclude(status=Call.Status.ENDED)
            .count(),
            "partner deliveries": Delivery.objects.filter(
                created_at__gte=self.started_at, status__in=Delivery.UNFINISHED
            ).count(),
        }
        return {what: count for what, count in counts.items() if count}

    def settle(self) -> None:
        deadline = time.monotonic() + STOP_GRACE
        left = self.outstanding()
        if left:
            self.stdout.write("waiting for callops to apply the last webhooks (Ctrl-C: stop now)")
        while left and not self.hurry and time.monotonic() < deadline:
            self.pump(0.5)
            left = self.outstanding()
        ended = Call.objects.filter(created_at__gte=self.started_at).count() - left.get(
            "calls not ended", 0
        )
        if left:
            still = ", ".join(f"{count} {what}" for what, count in left.items())
            self.stdout.write(f"stopping with {still} left")
        else:
            self.stdout.write(f"all {ended} calls of this run ended, every webhook applied")
