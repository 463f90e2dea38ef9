"""The demo's outbound calls: the demo partner dials through the partner API, as a partner's
own backend would (``POST /api/v1/calls/`` with its API key), every so often.

For local use with ``./bin/run`` and the Telnyx simulator; it only speaks HTTP to callops.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Dial a demo call through the partner API every --every seconds."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--api", default="http://127.0.0.1:8000/api/v1/")
        parser.add_argument("--connection-id", default="sim-connection")
        parser.add_argument("--every", type=float, default=30.0, help="seconds between dials")
        parser.add_argument("--first-after", type=float, default=15.0)
        parser.add_argument("--count", type=int, default=0, help="dials before stopping; 0: no end")

    def handle(self, *args, api: str, connection_id: str, every: float, **options) -> None:
        key_file = Path(settings.VAR_DIR) / "demo_partner_key"
        if not key_file.is_file():
            raise CommandError(f"{key_file} is missing: run manage.py demo_setup first")
        key = key_file.read_text().strip()
        time.sleep(options["first_after"])
        dialed = 0
        while not options["count"] or dialed < options["count"]:
            self.dial(api, key, connection_id)
            dialed += 1
            time.sleep(every)

    def dial(self, api: str, key: str, connection_id: str) -> None:
        body = {
            "connection_id": connection_id,
            "to": f"+1555{secrets.randbelow(10**7):07d}",
            "from": "+15550199999",
            "timeout_secs": 20,
            "answering_machine_detection": "detect",
        }
        request = urllib.request.Request(  # noqa: S310 - our own API, http(s) only
            api.rstrip("/") + "/calls/",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Idempotency-Key": secrets.token_hex(16),
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                command = json.loads(response.read())
            self.stdout.write(f"dialed {body['to']}: command {command['id']} ({command['status']})")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.stderr.write(f"dial {body['to']} not sent: {exc}")
