"""Run the whole service in one terminal: web, Celery worker and Celery beat.

For local use and demos. Each process's output is prefixed with its name; Ctrl-C (or SIGTERM)
stops all of them, and if one dies the others are stopped too, so nothing is left running.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand

COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m"]
RESET = "\033[0m"


class Command(BaseCommand):
    help = "Run web, worker and beat together with interleaved, prefixed logs."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000", help="where the web server listens")

    def processes(self, addr: str) -> dict[str, list[str]]:
        python = sys.executable
        celery = [python, "-m", "celery", "-A", "config"]
        # mingle and gossip broadcast to other workers; the embedded broker has no fan-out.
        quiet = ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        return {
            "web": [python, "manage.py", "runserver", addr, "--noreload"],
            "worker": [*celery, "worker", "--concurrency", "2", *quiet],
            # Schedules come from the database (django-celery-beat), editable in the admin.
            "beat": [*celery, "beat", "--loglevel", "INFO"],
        }

    def handle(self, *args, addr: str, **options) -> None:
        colour = self.stdout.isatty()
        children: dict[str, subprocess.Popen] = {}
        selector = selectors.DefaultSelector()
        width = max(len(name) for name in self.processes(addr))
        for index, (name, argv) in enumerate(self.processes(addr).items()):
            proc = subprocess.Popen(  # noqa: S603 - our own fixed argv, no shell
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
