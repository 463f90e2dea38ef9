"""A local Telnyx for tests, demos and benchmarks; no Django.

`TelnyxAPISimulator` (api.py, stdlib only) answers call-control commands; `CallSimulator`
(calls.py) places simulated calls and sends their signed webhooks and media streams.
"""

from callops.simulator.api import ACTIONS, CallState, CommandRecord, Fault, TelnyxAPISimulator
from callops.simulator.calls import CallSimulator, DeliveryRecord, MediaSession, load_signing_key

__all__ = [
    "ACTIONS",
    "CallSimulator",
    "CallState",
    "CommandRecord",
    "DeliveryRecord",
    "Fault",
    "MediaSession",
    "TelnyxAPISimulator",
    "load_signing_key",
]
