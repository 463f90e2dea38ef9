"""A local Telnyx for tests and benchmarks; stdlib only, no Django."""

from callops.simulator.api import ACTIONS, CallState, CommandRecord, Fault, TelnyxAPISimulator

__all__ = ["ACTIONS", "CallState", "CommandRecord", "Fault", "TelnyxAPISimulator"]
