"""Test data in Telnyx's words: a whole call's webhooks (`call_life`) and a signer for Django's
test client (`ClientSigner`).

Envelopes and signatures are made by the simulator's side, which plays Telnyx: `envelope` and
`dumps` are `telnyx_sim`'s, re-exported so a test imports its Telnyx data from one place.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from telnyx_sim import Signer, dumps, envelope

__all__ = ["T0", "ClientSigner", "call_life", "dumps", "envelope"]


class ClientSigner(Signer):
    """The simulator's signer, with its headers keyed as Django's test client takes them."""

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        return self.wsgi_headers(body, timestamp)


T0 = datetime(2026, 11, 25, 18, 0, 0, tzinfo=UTC)


def call_life(call_control_id: str = "v3:call-1", *, start: datetime = T0) -> list[dict]:
    """A realistic call: answered, streamed, forked, transcribed, hung up, in Telnyx's order."""

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    url = "wss://media.example.com/stream"
    stream_params = {"stream_url": url, "track": "both_tracks"}
    return [
        envelope(
            "call.initiated",
            call_control_id,
            occurred_at=at(0),
            direction="incoming",
            state="parked",
            start_time=at(0).isoformat(),
        ),
        envelope(
            "call.answered",
            call_control_id,
            occurred_at=at(2),
            state="answered",
            client_state=base64.b64encode(b"answered").decode(),
        ),
        envelope("streaming.started", call_control_id, occurred_at=at(3), stream_url=url),
        envelope(
            "call.transcription",
            call_control_id,
            occurred_at=at(5),
            transcription_data={
                "transcript": "hello",
                "confidence": 0.8,
                "is_final": False,
                "transcription_track": "inbound",
            },
        ),
        envelope(
            "call.transcription",
            call_control_id,
            occurred_at=at(6),
            transcription_data={
                "transcript": "hello there",
                "confidence": 0.97,
                "is_final": True,
                "transcription_track": "inbound",
            },
        ),
        envelope("streaming.stopped", call_control_id, occurred_at=at(9), stream_url=url),
        envelope("call.fork.started", call_control_id, occurred_at=at(10), stream_type="raw"),
        envelope(
            "streaming.started",
            call_control_id,
            occurred_at=at(11),
            stream_url="wss://second.example.com/s",
        ),
        envelope(
            "streaming.failed",
            call_control_id,
            occurred_at=at(12),
            failure_reason="connection refused",
            stream_id="st-2",
            stream_type="websocket",
            stream_params={**stream_params, "stream_url": "wss://second.example.com/s"},
        ),
        envelope(
            "call.transcription",
            call_control_id,
            occurred_at=at(14),
            transcription_data={
                "transcript": "bye",
                "confidence": 0.9,
                "is_final": True,
                "transcription_track": "outbound",
            },
        ),
        envelope(
            "call.hangup",
            call_control_id,
            occurred_at=at(20),
            hangup_cause="normal_clearing",
            hangup_source="caller",
            sip_hangup_cause="200",
            start_time=at(0).isoformat(),
            client_state=base64.b64encode(b"hungup").decode(),
        ),
        envelope("call.fork.stopped", call_control_id, occurred_at=at(21), stream_type="raw"),
        envelope("call.dtmf.received", call_control_id, occurred_at=at(7), digit="5"),
    ]
