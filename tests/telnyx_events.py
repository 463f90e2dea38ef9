"""Build Telnyx webhook envelopes and sign them the way Telnyx does (Ed25519 over ts|body)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nacl.signing import SigningKey


@dataclass
class Signer:
    key: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def public_key(self) -> str:
        return base64.b64encode(bytes(self.key.verify_key)).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.key.sign(ts.encode() + b"|" + body).signature
        return {
            "HTTP_TELNYX_SIGNATURE_ED25519": base64.b64encode(signature).decode(),
            "HTTP_TELNYX_TIMESTAMP": ts,
        }


def envelope(
    event_type: str,
    call_control_id: str = "v3:call-1",
    *,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
    attempt: int = 1,
    **payload: object,
) -> dict:
    occurred_at = occurred_at or datetime.now(UTC)
    body = {
        "call_control_id": call_control_id,
        "call_leg_id": f"leg-{call_control_id}",
        "call_session_id": f"session-{call_control_id}",
        "connection_id": "conn-1",
        "client_state": None,
        "from": "+15551230000",
        "to": "+15559870000",
    }
    body.update(payload)
    return {
        "data": {
            "record_type": "event",
            "event_type": event_type,
            "id": event_id or str(uuid.uuid4()),
            "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
            "payload": body,
        },
        "meta": {"attempt": attempt, "delivered_to": "http://testserver/webhooks/telnyx/"},
    }


def dumps(event: dict) -> bytes:
    return json.dumps(event).encode()


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
