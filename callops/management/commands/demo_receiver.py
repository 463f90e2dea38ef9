"""A stand-in for a partner's webhook receiver: it registers itself as a webhook endpoint of
the demo partner through the partner API, then prints each event callops sends it, verified
with the ``standardwebhooks`` library as a partner's own code would verify it.

For local use with ``./bin/run``. On start it deletes the endpoints an earlier run of it
registered (same description) and registers a new one, keeping the secret the API shows once
in memory only. ``GET /`` answers 200 once it is registered (503 before), so whoever starts it
can wait for that. One line per event: type, call, sequence, and "verified" or why not.
"""

from __future__ import annotations

import signal
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.core.management.base import BaseCommand, CommandError
from standardwebhooks import Webhook, WebhookVerificationError

from callops.management.commands._demo import api_call, demo_key

DESCRIPTION = "demo receiver (manage.py demo_receiver)"
SHOWN = {"transcript.segment": "transcript", "dtmf.digit": "digit", "call.ended": "hangup_cause"}


class Command(BaseCommand):
    help = "Register a webhook endpoint for the demo partner and print the verified events."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8091)
        parser.add_argument("--api", default="http://127.0.0.1:8000/api/v1/")

    def handle(self, *args, host: str, port: int, api: str, **options) -> None:
        key = demo_key()
        state: dict = {"webhook": None}
        write = self.stdout.write

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(200 if state["webhook"] else 503)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if state["webhook"] is None:
                    self._answer(503)
                    return
                try:
                    event = state["webhook"].verify(body, dict(self.headers.items()))
                except WebhookVerificationError as exc:
                    write(f"REJECTED {self.headers.get('webhook-id')}: {exc}")
                    self._answer(401)
                    return
                detail = event.get("data", {}).get(SHOWN.get(event.get("type"), ""), "")
                write(
                    f"{event.get('type', '?'):<26} {event.get('call_control_id')} "
                    f"#{event.get('sequence')} verified"
                    + (f": {str(detail)[:80]}" if detail else "")
                )
                self._answer(204)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass  # one line per event is printed above

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://{host}:{server.server_address[1]}/"
        try:
            endpoint = self.register(api, key, url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            server.shutdown()
            raise CommandError(f"could not register {url} through {api}: {exc}") from None
        state["webhook"] = Webhook(endpoint["secret"])
        write(
            f"webhook receiver on {url}: endpoint {endpoint['id']} of the demo partner, "
            "each event verified with standardwebhooks"
        )
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        stopped.wait()
        server.shutdown()

    def register(self, api: str, key: str, url: str) -> dict:
        """Through the partner API, as a partner would: drop the endpoints an earlier run left
        (their secrets are gone with it), then add this one."""
        for old in api_call(api, key, "GET", "webhook-endpoints/"):
            if old["description"] == DESCRIPTION:
                api_call(api, key, "DELETE", f"webhook-endpoints/{old['id']}/")
        return api_call(
            api, key, "POST", "webhook-endpoints/", {"url": url, "description": DESCRIPTION}
        )
