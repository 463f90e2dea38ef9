"""Run the whole service in one terminal: web, Celery worker, Celery beat, and, without a
``TELNYX_API_KEY``, the Telnyx simulator and a media sink standing in for a partner.

For local use and demos. Each process's output is prefixed with its name; Ctrl-C (or SIGTERM)
stops all of them, and if one dies the others are stopped too, so nothing is left running.
With the simulator, every process is given its API URL and key and its webhook public key, so
callops talks to it exactly as it would to Telnyx.

The simulator is the top-level ``telnyx_sim`` package of the source tree, which callops'
distribution does not ship: it is only ever run as ``python -m telnyx_sim``, never imported.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m"]
RESET = "\033[0m"


class Command(BaseCommand):
    help = "Run web, worker and beat together with interleaved, prefixed logs."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000", help="where the web server listens")
        parser.add_argument("--simulator-port", type=int, default=8089)
        parser.add_argument("--media-port", type=int, default=8090)
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

    def processes(self, addr: str, options: dict) -> dict[str, list[str]]:
        python = sys.executable
        celery = [python, "-m", "celery", "-A", "config"]
        # mingle and gossip broadcast to other workers; the embedded broker has no fan-out.
        quiet = ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        processes = {
            "web": [python, "manage.py", "runserver", addr, "--noreload"],
            "worker": [*celery, "worker", "--concurrency", "2", *quiet],
            # Schedules come from the database (django-celery-beat), editable in the admin.
            "beat": [*celery, "beat", "--loglevel", "INFO"],
        }
        if self.simulated:
            processes["telnyx"] = [
                python, "-m", "telnyx_sim",
                "--webhook-url", f"http://{addr}/webhooks/telnyx/",
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
            ]  # fmt: skip
            processes["partner"] = [
                python, "manage.py", "media_sink", "--port", str(options["media_port"])
            ]  # fmt: skip
            if options["dials_per_minute"] > 0:
                processes["dialer"] = [
                    python, "manage.py", "demo_dialer", "--api", f"http://{addr}/api/v1/",
                    "--every", str(60.0 / options["dials_per_minute"]),
                ]  # fmt: skip
        return processes

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
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        wanted = options["simulator"]
        self.simulated = wanted == "on" or (wanted == "auto" and not settings.TELNYX_API_KEY)
        if self.simulated:
            self.prepare_simulator(options)
        colour = self.stdout.isatty()
        children: dict[str, subprocess.Popen] = {}
        selector = selectors.DefaultSelector()
        processes = self.processes(addr, options)
        width = max(len(name) for name in processes)
        for index, (name, argv) in enumerate(processes.items()):
            proc = subprocess.Popen(  # noqa: S603 - our own fixed argv, no shell
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
            children[name] = proc
            prefix = f"{name:<{width}} | "
            if colour:
                prefix = COLOURS[index % len(COLOURS)] + prefix + RESET
            selector.register(proc.stdout, selectors.EVENT_READ, prefix)

        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self.stdout.write(f"callops running: http://{addr}/admin/  (Ctrl-C stops everything)")
        try:
            while not stopping and all(p.poll() is None for p in children.values()):
                for key, _ in selector.select(timeout=0.5):
                    line = key.fileobj.readline()
                    if line:
                        self.stdout.write(key.data + line.decode(errors="replace").rstrip())
        finally:
            for proc in children.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            for name, proc in children.items():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                self.stdout.write(f"{name} stopped (exit {proc.returncode})")
