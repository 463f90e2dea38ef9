"""Telnyx webhook envelopes (TELNYX.md section 1): the one builder the simulator, the tests and
the benchmarks share.

An envelope is ``{"data": <event>, "meta": {"attempt", "delivered_to"}}``. The event stays the
same across deliveries; only ``meta`` changes with each attempt, hence `event` and `wrap`.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = ["DELIVERED_TO", "dumps", "envelope", "event", "iso_time", "wrap"]

# Where a test's envelope claims to be going: Django's test client serves "testserver".
DELIVERED_TO = "http://testserver/webhooks/telnyx/"


def iso_time(moment: datetime) -> str:
    """Telnyx's form of a datetime: ISO 8601 with microseconds, UTC written ``Z``."""
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event(
    event_type: str,
    call_control_id: str = "v3:call-1",
    *,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
    **payload: Any,
) -> dict[str, Any]:
    """The ``data`` of one webhook. ``payload`` adds to, or replaces, the keys every event has.

    Those common keys default to values derived from ``call_control_id``; ``from`` is a Python
    keyword, so pass it as ``**{"from": ...}``.
    """
    common = {
        "call_control_id": call_control_id,
        "call_leg_id": f"leg-{call_control_id}",
        "call_session_id": f"session-{call_control_id}",
        "connection_id": "conn-1",
        "client_state": None,
        "from": "+15551230000",
        "to": "+15559870000",
    }
    return {
        "record_type": "event",
        "event_type": event_type,
        "id": event_id or str(uuid.uuid4()),
        "occurred_at": iso_time(occurred_at or datetime.now(UTC)),
        "payload": {**common, **payload},
    }


def wrap(data: dict[str, Any], *, attempt: int = 1, delivered_to: str = DELIVERED_TO) -> dict:
    """The envelope of one delivery of the event ``data``."""
    return {"data": data, "meta": {"attempt": attempt, "delivered_to": delivered_to}}


def envelope(
    event_type: str,
    call_control_id: str = "v3:call-1",
    *,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
    attempt: int = 1,
    delivered_to: str = DELIVERED_TO,
    **payload: Any,
) -> dict[str, Any]:
    """One delivery of a new event: `wrap` around `event`."""
    data = event(event_type, call_control_id, occurred_at=occurred_at, event_id=event_id, **payload)
    return wrap(data, attempt=attempt, delivered_to=delivered_to)


def dumps(body: Any) -> bytes:
    """The bytes of a webhook body, compact as Telnyx sends them."""
    return json.dumps(body, separators=(",", ":")).encode()
