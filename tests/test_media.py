"""Reading Telnyx's media frames: order, duplicates, duration, and the auth token."""

from __future__ import annotations

import base64
import json

from callops.media import MediaSession


def frame(event: str, **fields) -> str:
    return json.dumps({"event": event, **fields})


def media(chunk: int, track: str = "inbound", size: int = 160) -> str:
    payload = base64.b64encode(b"\xff" * size).decode()
    return frame(
        "media",
        sequence_number=str(chunk + 2),
        media={
            "track": track,
            "chunk": str(chunk),
            "timestamp": str(chunk * 20),
            "payload": payload,
        },
    )


def test_it_reads_a_stream_in_any_order_once():
    session = MediaSession()
    session.feed(frame("connected", version="1.0.0"))
    session.feed(
        frame(
            "start",
            stream_id="st-1",
            sequence_number="1",
            start={
                "call_control_id": "v3:c",
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            },
        )
    )
    for chunk in (1, 2, 4, 3, 3, 5):
        session.feed(media(chunk))
    session.feed(frame("stop", sequence_number="9"))
    assert (session.stream_id, session.call_control_id) == ("st-1", "v3:c")
    assert (len(session.chunks), session.duplicates, session.out_of_order) == (5, 1, 1)
    assert session.audio_ms == 100  # five 20 ms PCMU frames of 160 bytes
    assert session.stopped and not session.errors
    assert "5 media frames, 0.1 s of PCMU audio" in session.summary()


def test_two_tracks_are_counted_side_by_side():
    session = MediaSession(encoding="PCMU")
    for chunk in range(50):
        session.feed(media(chunk, "inbound"))
        session.feed(media(chunk, "outbound"))
    assert session.audio_ms == 1000


def test_malformed_frames_are_counted_not_fatal():
    session = MediaSession()
    assert session.feed("not json") == "invalid"
    assert session.feed(frame("media", media={"chunk": "x", "payload": "!!"})) == "media"
    assert len(session.errors) == 2


def test_the_auth_token_is_checked_against_every_expected_one():
    session = MediaSession(expected_tokens=("a-token", "b-token"))
    assert session.authorised("b-token")
    assert not session.authorised("c-token")
    assert not session.authorised(None)
    assert MediaSession().authorised(None)
