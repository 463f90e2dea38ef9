"""Telnyx's side of a media stream (TELNYX.md section 3): a WebSocket client to a ``stream_url``.

`MediaStream` connects (sending the ``stream_auth_token`` as Telnyx does), sends ``connected``
and ``start``, then a PCMU sine tone per track in 20 ms ``media`` frames until stopped, answers
the application's ``mark`` frames, and ends with ``stop``. What happened on each stream is kept
in a `MediaStreamRecord`.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = ["FRAME_MS", "MediaStream", "MediaStreamRecord", "pcmu_tone"]

logger = logging.getLogger(__name__)

# Telnyx's account id appears in media frames as ``user_id``; any stable uuid will do here.
SIMULATOR_USER_ID = "5e1a7c00-0000-4000-8000-00000000c0de"

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # PCMU: one byte per sample


@dataclass
class MediaStreamRecord:
    """What happened on one media WebSocket (a snapshot when read through `media_sessions`)."""

    stream_id: str
    call_control_id: str
    stream_url: str
    tracks: tuple[str, ...]
    connected: bool = False
    media_frames: int = 0
    frames_received: int = 0
    error: str = ""
    closed: bool = False


def _ulaw(sample: int) -> int:
    """G.711 mu-law byte for one signed 16-bit sample (Sun's reference, as in CPython's audioop)."""
    value = sample >> 2  # 14-bit linear
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, 8159) + 0x21
    segment = max(0, value.bit_length() - 6)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


@lru_cache(maxsize=4)
def pcmu_tone(frequency: int, amplitude: float = 0.3) -> bytes:
    """One second of a PCMU sine tone; a whole number of cycles, so it loops without a click."""
    scale = amplitude * 32767
    step = 2 * math.pi * frequency / SAMPLE_RATE
    return bytes(_ulaw(round(scale * math.sin(step * i))) for i in range(SAMPLE_RATE))


# Caller and callee sound different, so a listener can tell the tracks apart.
_TRACK_TONES = {"inbound": 440, "outbound": 660}
_STREAM_TRACKS = {
    "inbound_track": ("inbound",),
    "outbound_track": ("outbound",),
    "both_tracks": ("inbound", "outbound"),
}


class Parties(Protocol):
    """The call a stream belongs to, as its ``start`` frame names it."""

    call_control_id: str
    call_session_id: str
    from_number: str
    to_number: str
    client_state: str | None


class MediaStream:
    """One media WebSocket to a ``stream_url``, on its own thread.

    ``on_end(stream, reason)`` is called from that thread once the stream is over: ``reason``
    says why it failed, or is None after a clean stop (or a failure while stopping).
    ``lock`` guards the record, which readers copy.
    """

    def __init__(
        self,
        call: Parties,
        body: dict[str, Any],
        *,
        connect_timeout: float,
        lock: threading.RLock,
        on_end: Callable[[MediaStream, str | None], None],
    ) -> None:
        self.call = call
        self.stream_id = str(uuid.uuid4())
        self.url: str = body["stream_url"]
        self.track: str = body.get("stream_track") or "inbound_track"
        self.token: str | None = body.get("stream_auth_token")
        params = body.get("custom_parameters") or []
        self.custom_parameters = {p["name"]: p.get("value") for p in params}
        self.client_state = call.client_state
        self.tracks = _STREAM_TRACKS.get(self.track, ("inbound",))
        self.record = MediaStreamRecord(
            stream_id=self.stream_id,
            call_control_id=call.call_control_id,
            stream_url=self.url,
            tracks=self.tracks,
        )
        self._connect_timeout = connect_timeout
        self._lock = lock
        self._on_end = on_end
        self._stopping = threading.Event()
        self._sequence = itertools.count(1)
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"call-sim-media:{self.stream_id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self) -> None:
        self._stopping.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        try:
            reason = self._stream()
        except Exception as exc:
            logger.exception("media stream %s crashed", self.stream_id)
            reason = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.record.closed = True
            self.record.error = reason or ""
        if reason and not self._stopping.is_set():
            logger.info("media stream %s to %s failed: %s", self.stream_id, self.url, reason)
            self._on_end(self, reason)
        else:
            self._on_end(self, None)

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        # Our own socket: a plain TCP connect with a short timeout, and no proxy from the
        # environment (Telnyx connects directly).
        sock = socket.create_connection((parts.hostname or "", port), timeout=self._connect_timeout)
        # As websockets does with its own sockets: blocking from here, the handshake is
        # bounded by open_timeout.
        sock.settimeout(None)
        self._socket = sock
        try:
            headers = {"x-telnyx-streaming-auth-token": self.token} if self.token else None
            return connect(
                self.url,
                sock=sock,
                additional_headers=headers,
                open_timeout=self._connect_timeout,
                close_timeout=1,
                compression=None,
                user_agent_header="telnyx-simulator",
            )
        except BaseException:
            sock.close()
            raise

    def _stream(self) -> str | None:
        """Run the session; returns why it failed, or None after a clean stop."""
        try:
            from websockets.exceptions import ConnectionClosed
        except ImportError:
            return "the websockets package is not installed"
        try:
            ws = self._connect()
        except Exception as exc:
            return f"could not connect: {type(exc).__name__}: {exc}".rstrip(": ")
        with ws:
            self.record.connected = True
            logger.info("media stream %s connected to %s", self.stream_id, self.url)
            try:
                self._send(ws, self._connected_frame())
                self._send(ws, self._start_frame())
                self._send_media(ws)
                self._send(
                    ws,
                    {
                        "event": "stop",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "stop": {
                            "user_id": SIMULATOR_USER_ID,
                            "call_control_id": self.call.call_control_id,
                        },
                    },
                )
            except ConnectionClosed as exc:
                return f"websocket closed by the server ({exc})"
        logger.info(
            "media stream %s closed after %d media frames",
            self.stream_id,
            self.record.media_frames,
        )
        return None

    def _connected_frame(self) -> dict[str, Any]:
        frame = {"event": "connected", "version": "1.0.0"}
        if self.token:
            frame["x-telnyx-streaming-auth-token"] = self.token
        return frame

    def _start_frame(self) -> dict[str, Any]:
        call = self.call
        return {
            "event": "start",
            "sequence_number": str(next(self._sequence)),
            "stream_id": self.stream_id,
            "start": {
                "user_id": SIMULATOR_USER_ID,
                "call_control_id": call.call_control_id,
                "call_session_id": call.call_session_id,
                "from": call.from_number,
                "to": call.to_number,
                "client_state": self.client_state,
                "custom_parameters": self.custom_parameters,
                "media_format": {"encoding": "PCMU", "sample_rate": SAMPLE_RATE, "channels": 1},
            },
        }

    def _send_media(self, ws: Any) -> None:
        tones = {track: pcmu_tone(_TRACK_TONES[track]) for track in self.tracks}
        started = time.monotonic()
        chunk = 0
        # Paced against the start time, so scheduling jitter does not accumulate.
        while not self._stopping.wait(
            max(0.0, started + chunk * FRAME_MS / 1000 - time.monotonic())
        ):
            offset = (chunk * FRAME_BYTES) % SAMPLE_RATE
            for track, tone in tones.items():
                self._send(
                    ws,
                    {
                        "event": "media",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "media": {
                            "track": track,
                            "chunk": str(chunk + 1),
                            "timestamp": str(chunk * FRAME_MS),
                            "payload": base64.b64encode(
                                tone[offset : offset + FRAME_BYTES]
                            ).decode(),
                        },
                    },
                )
                self.record.media_frames += 1
            chunk += 1
            self._answer_frames(ws)

    def _answer_frames(self, ws: Any) -> None:
        """Read what the application sent; answer marks at once (no audio is ever queued)."""
        while True:
            try:
                message = ws.recv(timeout=0)
            except TimeoutError:
                return
            self.record.frames_received += 1
            try:
                frame = json.loads(message)
            except (TypeError, ValueError):
                continue
            if isinstance(frame, dict) and frame.get("event") == "mark":
                mark = frame.get("mark") if isinstance(frame.get("mark"), dict) else {}
                self._send(
                    ws,
                    {
                        "event": "mark",
                        "sequence_number": str(next(self._sequence)),
                        "stream_id": self.stream_id,
                        "mark": {"name": mark.get("name")},
                    },
                )

    @staticmethod
    def _send(ws: Any, frame: dict[str, Any]) -> None:
        ws.send(json.dumps(frame, separators=(",", ":")))
