"""Reading Telnyx's media stream frames (TELNYX.md section 3), for the demo sink and tests.

Frames may arrive out of order and twice: media is ordered by ``chunk`` (falling back to
``sequence_number``) and duplicates are dropped. Chunk length is not documented, so audio
duration is computed from the payload size and the ``start`` frame's media format.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass, field

# Bytes per sample by encoding (PCMU/PCMA: 8 bytes per ms at 8 kHz; L16 is 16-bit).
BYTES_PER_SAMPLE = {"PCMU": 1, "PCMA": 1, "L16": 2}


@dataclass
class MediaSession:
    """What one WebSocket stream delivered."""

    expected_tokens: tuple[str, ...] = ()
    stream_id: str = ""
    call_control_id: str = ""
    encoding: str = ""
    sample_rate: int = 8000
    channels: int = 1
    started: bool = False
    stopped: bool = False
    audio_bytes: int = 0
    chunks: set[tuple[str, int]] = field(default_factory=set)
    duplicates: int = 0
    out_of_order: int = 0
    errors: list[str] = field(default_factory=list)
    _last_chunk: dict[str, int] = field(default_factory=dict)

    def authorised(self, token: str | None) -> bool:
        """The upgrade's ``x-telnyx-streaming-auth-token``, compared in constant time."""
        if not self.expected_tokens:
            return True
        supplied = (token or "").encode()
        return any(hmac.compare_digest(supplied, t.encode()) for t in self.expected_tokens)

    def feed(self, text: str | bytes) -> str:
        """Take one frame; returns its event name ("invalid" for a frame we cannot read)."""
        try:
            frame = json.loads(text)
            event = frame["event"]
        except (ValueError, KeyError, TypeError):
            self.errors.append("malformed frame")
            return "invalid"
        if event == "start":
            start = frame.get("start") or {}
            fmt = start.get("media_format") or {}
            self.stream_id = str(frame.get("stream_id", ""))
            self.call_control_id = str(start.get("call_control_id", ""))
            self.encoding = str(fmt.get("encoding", "PCMU"))
            self.sample_rate = int(fmt.get("sample_rate") or 8000)
            self.channels = int(fmt.get("channels") or 1)
            self.started = True
        elif event == "media":
            self._media(frame.get("media") or {}, frame.get("sequence_number"))
        elif event == "stop":
            self.stopped = True
        elif event == "error":
            self.errors.append(json.dumps(frame.get("payload")))
        return event

    def _media(self, media: dict, sequence_number: object) -> None:
        track = str(media.get("track", "inbound"))
        try:
            chunk = int(media.get("chunk", sequence_number))
            payload = base64.b64decode(media.get("payload", ""), validate=True)
        except (TypeError, ValueError, binascii.Error):
            self.errors.append("unreadable media frame")
            return
        if (track, chunk) in self.chunks:
            self.duplicates += 1
            return
        if chunk < self._last_chunk.get(track, -1):
            self.out_of_order += 1
        self._last_chunk[track] = max(chunk, self._last_chunk.get(track, -1))
        self.chunks.add((track, chunk))
        self.audio_bytes += len(payload)

    @property
    def audio_ms(self) -> float:
        """Milliseconds of audio per track (tracks are streamed side by side)."""
        per_ms = BYTES_PER_SAMPLE.get(self.encoding, 1) * self.sample_rate / 1000 * self.channels
        tracks = len({track for track, _ in self.chunks}) or 1
        return self.audio_bytes / per_ms / tracks

    def summary(self) -> str:
        return (
            f"stream {self.stream_id or '?'} of {self.call_control_id or '?'}: "
            f"{len(self.chunks)} media frames, {self.audio_ms / 1000:.1f} s of "
            f"{self.encoding or '?'} audio, {self.out_of_order} out of order, "
            f"{self.duplicates} duplicates, {len(self.errors)} errors"
        )
