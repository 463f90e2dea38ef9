"""Run a local Telnyx: the command API and simulated calls that send webhooks and media.

For demos and local development without a Telnyx account. Start callops, then::

    python -m telnyx_sim --webhook-url http://127.0.0.1:8000/webhooks/telnyx/

and give callops the printed ``TELNYX_BASE_URL``, ``TELNYX_API_KEY`` and ``TELNYX_PUBLIC_KEY``
(``manage.py runstack`` does all of this itself). Calls are strict like Telnyx's: each rings,
parked, until callops answers it, and the caller gives up after ``--ring-timeout``; with
``--answered-elsewhere`` another application answers them instead. Dials from callops meet a
far end that answers, is busy or never answers by ``--dial-shares``, and answering machine
detection reports human / machine / not sure by ``--machine-shares``. The signing key is kept in
``--signing-key-file``, so the public key survives restarts; ``--print-public-key`` prints it
and exits. Ctrl-C (or SIGTERM) hangs up the live calls, waits briefly for their webhooks and
exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime

from telnyx_sim.calls import CallSimulator
from telnyx_sim.command_api import CommandRecord, TelnyxAPISimulator
from telnyx_sim.delivery import DeliveryRecord
from telnyx_sim.signing import Signer, load_signing_key

# Relative to the working directory: callops' own var/ when run from the repository root.
VAR_DIR = "var"


def _shares(text: str) -> tuple[float, float, float]:
    """``A,B,C``: three non-negative weights."""
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise argparse.ArgumentTypeError(f"expected three weights like 0.8,0.1,0.1, not {text!r}")
    return shares  # type: ignore[return-value]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m telnyx_sim",
        description="Simulate Telnyx: the call-control API plus calls that send signed "
        "webhooks and media.",
    )
    parser.add_argument(
        "--webhook-url",
        default="http://127.0.0.1:8000/webhooks/telnyx/",
        help="where webhooks are POSTed (callops' /webhooks/telnyx/)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="where the command API listens")
    parser.add_argument("--port", type=int, default=8089, help="command API port (0: any)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TELNYX_API_KEY") or "KEY_SIMULATOR",
        help="the Bearer key the command API accepts (default: $TELNYX_API_KEY)",
    )
    parser.add_argument("--calls-per-minute", type=float, default=6.0, help="0: none")
    parser.add_argument(
        "--call-duration", type=float, default=30.0, help="seconds from answer to hang-up"
    )
    parser.add_argument(
        "--duration-jitter", type=float, default=0.2, help="± fraction of the duration"
    )
    parser.add_argument(
        "--ring-timeout",
        type=float,
        default=30.0,
        help="seconds an unanswered incoming call rings before the caller hangs up",
    )
    parser.add_argument(
        "--answered-elsewhere",
        action="store_true",
        help="another application answers incoming calls (callops' answer policy 'none')",
    )
    parser.add_argument(
        "--answer-delay",
        type=float,
        default=1.0,
        help="with --answered-elsewhere: seconds until that answer",
    )
    parser.add_argument(
        "--dial-shares",
        type=_shares,
        default=(0.8, 0.1, 0.1),
        metavar="ANSWERED,BUSY,NO_ANSWER",
        help="how dialled far ends behave, as weights (default 0.8,0.1,0.1)",
    )
    parser.add_argument(
        "--dial-answer-delay",
        type=float,
        default=2.0,
        help="seconds until a dialled far end answers or is busy",
    )
    parser.add_argument(
        "--machine-shares",
        type=_shares,
        default=(0.7, 0.25, 0.05),
        metavar="HUMAN,MACHINE,NOT_SURE",
        help="answering machine detection results, as weights (default 0.7,0.25,0.05)",
    )
    parser.add_argument(
        "--dtmf-interval",
        type=float,
        default=15.0,
        help="mean seconds between a caller's key presses on an answered call (0: none)",
    )
    parser.add_argument("--connection-id", default="sim-conn")
    parser.add_argument("--from-number", default=None, help="default: random +1555 number")
    parser.add_argument("--to-number", default="+15550100000")
    parser.add_argument(
        "--public-key-file",
        default=f"{VAR_DIR}/simulator_public_key",
        help="where the public key (base64) is written",
    )
    parser.add_argument(
        "--signing-key-file",
        default=f"{VAR_DIR}/simulator_signing_key",
        help="the private signing key, created on first run (keep it out of git)",
    )
    parser.add_argument(
        "--print-public-key",
        action="store_true",
        help="create the signing key if needed, print its public key and exit",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    options = cli.parse_args(argv)
    key = load_signing_key(options.signing_key_file)
    if options.print_public_key:
        print(Signer(key).public_key)
        return 0

    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            print(f"{datetime.now():%H:%M:%S.%f}"[:-3] + f" {line}", flush=True)

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

    api = TelnyxAPISimulator(
        api_key=options.api_key,
        host=options.host,
        port=options.port,
        rate_limit=options.rate_limit,
        on_command=log_command,
    )
    try:
        calls = CallSimulator(
            webhook_url=options.webhook_url,
            api=api,
            signing_key=key,
            on_delivery=log_delivery,
            seed=options.seed,
            calls_per_minute=options.calls_per_minute,
            call_duration=options.call_duration,
            duration_jitter=options.duration_jitter,
            ring_timeout=options.ring_timeout,
            answered_elsewhere=options.answered_elsewhere,
            answer_delay=options.answer_delay,
            dial_answered_share=options.dial_shares[0],
            dial_busy_share=options.dial_shares[1],
            dial_no_answer_share=options.dial_shares[2],
            dial_answer_delay=options.dial_answer_delay,
            machine_human_share=options.machine_shares[0],
            machine_machine_share=options.machine_shares[1],
            machine_not_sure_share=options.machine_shares[2],
            dtmf_interval=options.dtmf_interval,
            connection_id=options.connection_id,
            from_number=options.from_number,
            to_number=options.to_number,
            media=not options.no_media,
            max_attempts=options.max_attempts,
            duplicate_rate=options.duplicate_rate,
            reorder=options.reorder,
        )
    except ValueError as exc:
        cli.error(str(exc))
    key_file = calls.write_public_key(options.public_key_file)

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    try:
        api.start()
    except OSError as exc:
        cli.exit(1, f"cannot listen on {options.host}:{options.port}: {exc}\n")
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
        answering = (
            "answered elsewhere"
            if options.answered_elsewhere
            else f"parked until answered, {options.ring_timeout:g} s to answer"
        )
        say(f"placing {options.calls_per_minute:g} calls a minute ({answering}); Ctrl-C stops")
        while not stopping.wait(0.5):
            pass
        say("stopping: hanging up live calls")
    finally:
        calls.stop(hangup=True, timeout=5.0)
        api.stop()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
