"""A local Telnyx for tests, demos and benchmarks. Not part of callops' distribution.

It plays Telnyx, so it knows nothing of callops: no Django, no callops imports, and its own
signer rather than callops' verifier run backwards; a test against it proves something.

- `command_api`: `TelnyxAPISimulator`, the call-control command API (answer, reject, hangup,
  dial and the media actions; faults, rate limit, dedupe), checking bodies and call states
  against the table in `actions`;
- `calls`: `CallSimulator`, the life of simulated calls, incoming (parked until answered) and
  dialled, driven by the commands applied;
- `delivery`: their signed webhooks, with Telnyx's retries, duplicates and disorder;
- `media`: the media WebSocket that streams a tone in the requested codec to a ``stream_url``,
  bidirectional if asked;
- `signing`: the one `Signer` (Ed25519 over ``timestamp|body``) and `load_signing_key`;
- `envelopes`: the one webhook `envelope` builder, and `dumps`.

Run one from the command line with ``python -m telnyx_sim --help``.
"""

from telnyx_sim.actions import ACTIONS
from telnyx_sim.calls import CallPlan, CallSimulator
from telnyx_sim.command_api import CallState, CommandRecord, Fault, TelnyxAPISimulator
from telnyx_sim.delivery import DeliveryPolicy, DeliveryRecord
from telnyx_sim.envelopes import dumps, envelope
from telnyx_sim.media import MediaStreamRecord
from telnyx_sim.signing import Signer, load_signing_key

__all__ = [
    "ACTIONS",
    "CallPlan",
    "CallSimulator",
    "CallState",
    "CommandRecord",
    "DeliveryPolicy",
    "DeliveryRecord",
    "Fault",
    "MediaStreamRecord",
    "Signer",
    "TelnyxAPISimulator",
    "dumps",
    "envelope",
    "load_signing_key",
]
