"""Run a local Telnyx: the command API and simulated calls that send webhooks and media.

For demos and local development without a Telnyx account. Start callops (``runstack``), then::

    python manage.py telnyx_simulator --webhook-url http://127.0.0.1:8000/webhooks/telnyx/

and give callops the printed ``TELNYX_BASE_URL``, ``TELNYX_API_KEY`` and ``TELNYX_PUBLIC_KEY``.
The signing key is kept in ``--signing-key-file``, so the public key survives restarts.
Ctrl-C (or SIGTERM) hangs up the live calls, waits briefly for their webhooks and exits.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from callops.simulator import CallSimulator, CommandRecord, DeliveryRecord, TelnyxAPISimulator
from callops.simulator.calls import load_signing_key


class Command(BaseCommand):
    help = "Simulate Telnyx: the call-control API plus calls that send signed webhooks and media."
    # Needs neither the database nor a configured Telnyx account.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        var = Path(settings.VAR_DIR)
        parser.add_argument(
            "--webhook-url",
            default="http://127.0.0.1:8000/webhooks/telnyx/",
            help="where webhooks are POSTed (callops' /webhooks/telnyx/)",
        )
        parser.add_argument("--host", default="127.0.0.1", help="where the command API listens")
        parser.add_argument("--port", type=int, default=8089, help="command API port (0: any)")
        parser.add_argument(
            "--api-key",
            default=settings.TELNYX_API_KEY or "KEY_SIMULATOR",
            help="the Bearer key the command API accepts (default: TELNYX_API_KEY)",
        )
        parser.add_argument("--calls-per-minute", type=float, default=6.0, help="0: none")
        parser.add_argument(
            "--call-duration", type=float, default=30.0, help="seconds from answer to hang-up"
        )
        parser.add_argument(
            "--duration-jitter", type=float, default=0.2, help="± fraction of the duration"
        )
        parser.add_argument("--connection-id", default="sim-conn")
        parser.add_argument("--from-number", default=None, help="default: random +1555 number")
        parser.add_argument("--to-number", default="+15550100000")
        parser.add_argument(
            "--public-key-file",
            default=str(var / "simulator_public_key"),
            help="where the public key (base64) is written",
        )
        parser.add_argument(
            "--signing-key-file",
            default=str(var / "simulator_signing_key"),
            help="the private signing key, created on first run (keep it out of git)",
        )
        parser.add_argument(
            "--duplicate-rate", type=float, default=0.0, help="chance an event is sent twice"
        )
        parser.add_argument(
            "--reorder", action="store_true", help="deliver each call's events shuffled"
        )
        parser.add_argument(
            "--rate-limit", type=int, default=None, help="commands per second before 429"
        )
        parser.add_argument("--max-attempts", type=int, default=4, help="deliveries per event")
        parser.add_argument("--no-media", action="store_true", help="do not open media WebSockets")
        parser.add_argument("--seed", type=int, default=None, help="seed the random choices")

    def handle(self, *args, **options) -> None:
        out_lock = threading.Lock()

        def say(line: str) -> None:
            with out_lock:
                self.stdout.write(f"{datetime.now():%H:%M:%S.%f}"[:-3] + f" {line}")

        def log_command(record: CommandRecord) -> None:
            note = " (repeat, ignored)" if record.duplicate else ""
            say(
                f"command  {record.action or record.path} {record.call_control_id} -> "
                f"{record.status or 'dropped'}{note}"
            )

        def log_delivery(record: DeliveryRecord) -> None:
            outcome = record.status or record.error
            note = " (duplicate)" if record.duplicate else ""
            say(
                f"webhook  {record.event_type:<20} {record.call_control_id} "
                f"attempt {record.attempt} -> {outcome}{note}"
            )

        key = load_signing_key(options["signing_key_file"])
        api = TelnyxAPISimulator(
            api_key=options["api_key"],
            host=options["host"],
            port=options["port"],
            rate_limit=options["rate_limit"],
            on_command=log_command,
        )
        try:
            calls = CallSimulator(
                webhook_url=options["webhook_url"],
                api=api,
                signing_key=key,
                calls_per_minute=options["calls_per_minute"],
                call_duration=options["call_duration"],
                duration_jitter=options["duration_jitter"],
                connection_id=options["connection_id"],
                from_number=options["from_number"],
                to_number=options["to_number"],
                max_attempts=options["max_attempts"],
                duplicate_rate=options["duplicate_rate"],
                reorder=options["reorder"],
                media=not options["no_media"],
                on_delivery=log_delivery,
                seed=options["seed"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        key_file = calls.write_public_key(options["public_key_file"])

        stopping = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())

        try:
            api.start()
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: {exc}"
            ) from exc
        try:
            say(f"Telnyx simulator: command API {api.base_url} (api key {api.api_key})")
            say(f"webhooks to {calls.webhook_url}")
            say(f"public key {calls.public_key} (written to {key_file})")
            say(
                "configure callops with: "
                f"TELNYX_BASE_URL={api.base_url} TELNYX_API_KEY={api.api_key} "
                f"TELNYX_PUBLIC_KEY={calls.public_key}"
            )
            calls.start()
            say(f"placing {options['calls_per_minute']:g} calls a minute; Ctrl-C stops")
            while not stopping.wait(0.5):
                pass
            say("stopping: hanging up live calls")
        finally:
            calls.stop(hangup=True, timeout=5.0)
            api.stop()
        say("stopped")
