"""The demo's outbound calls: the demo partner dials through the partner API, as a partner's
own backend would (``POST /api/v1/calls/`` with its API key), every so often.

For local use with ``./bin/run`` and the Telnyx simulator; it only speaks HTTP to callops.
SIGINT or SIGTERM stops it between dials, quietly.
"""

from __future__ import annotations

import secrets
import signal
import threading
import urllib.error

from django.core.management.base import BaseCommand

from callops.management.commands._demo import api_call, demo_key


class Command(BaseCommand):
    help = "Dial a demo call through the partner API every --every seconds."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--api", default="http://127.0.0.1:8000/api/v1/")
        parser.add_argument("--connection-id", default="sim-connection")
        parser.add_argument("--every", type=float, default=30.0, help="seconds between dials")
        parser.add_argument("--first-after", type=float, default=15.0)
        parser.add_argument("--count", type=int, default=0, help="dials before stopping; 0: no end")

    def handle(self, *args, api: str, connection_id: str, every: float, **options) -> None:
        key = demo_key()
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        if stopped.wait(options["first_after"]):
            return
        dialed = 0
        while not options["count"] or dialed < options["count"]:
            self.dial(api, key, connection_id)
            dialed += 1
            if stopped.wait(every):
                return

    def dial(self, api: str, key: str, connection_id: str) -> None:
        body = {
            "connection_id": connection_id,
            "to": f"+1555{secrets.randbelow(10**7):07d}",
            "from": "+15550199999",
            "timeout_secs": 20,
            "answering_machine_detection": "detect",
        }
        try:
            command = api_call(api, key, "POST", "calls/", body)
            self.stdout.write(f"dialed {body['to']}: command {command['id']} ({command['status']})")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.stderr.write(f"dial {body['to']} not sent: {exc}")
