"""Telnyx's side of a media stream (TELNYX.md section 3): a WebSocket client to a ``stream_url``.

`MediaStream` connects (sending the ``stream_auth_token`` as Telnyx does), reports the socket up
(``on_connected``: the call simulator sends ``streaming.started`` then, not at command time),
sends ``connected`` and ``start``, then a sine tone per track in 20 ms ``media`` frames until
stopped, and ends with ``stop``. In between: ``dtmf`` frames for the caller's key presses
(`send_dtmf`), ``mark`` frames acknowledging the application's marks, and ``error`` frames for
a malformed frame from the application (100003), undecodable media (100004), or at random when
the ``error_rate`` fault is on (100002). What happened on each stream is kept in a
`MediaStreamRecord`.

The ``stream_codec`` decides the ``start`` frame's ``media_format`` and the bytes per chunk
(`ENCODINGS`): PCMU and PCMA at 8 kHz (8 bytes a ms), L16 at 16 kHz (16-bit big-endian, 32
bytes a ms), G722 at 16 kHz (8 bytes a ms); ``default`` is PCMU. OPUS and AMR-WB frames have
those codecs' sizes but are filler, not decodable audio.

Bidirectional (``stream_bidirectional_mode: rtp``): the application's ``media`` frames are
queued as audio to play (their length in ms from ``stream_bidirectional_codec`` and
``_sampling_rate``), a ``mark`` is queued behind that audio and sent back, same name, once the
audio before it has "played" in real time, and ``clear`` drops the queued audio and the marks
waiting behind it (Telnyx does not say whether those marks come back; here they never do, the
worst case for the application). Without it, marks come back at once and media is ignored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import logging
import math
import random
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

from telnyx_sim.envelopes import iso_time

__all__ = ["ENCODINGS", "FRAME_MS", "Encoding", "MediaStream", "MediaStreamRecord", "tone"]

logger = logging.getLogger(__name__)

# Telnyx's account id appears in media frames as ``user_id``; any stable uuid will do here.
SIMULATOR_USER_ID = "5e1a7c00-0000-4000-8000-00000000c0de"

FRAME_MS = 20


@dataclass(frozen=True)
class Encoding:
    """One ``stream_codec`` as the ``start`` frame names it, and its bytes per millisecond."""

    name: str
    sample_rate: int
    bytes_per_ms: float

    @property
    def frame_bytes(self) -> int:
        return round(self.bytes_per_ms * FRAME_MS)

    @property
    def media_format(self) -> dict[str, Any]:
        return {"encoding": self.name, "sample_rate": self.sample_rate, "channels": 1}


ENCODINGS = {
    "PCMU": Encoding("PCMU", 8000, 8),
    "PCMA": Encoding("PCMA", 8000, 8),
    "L16": Encoding("L16", 16000, 32),
    "G722": Encoding("G722", 16000, 8),  # 64 kbit/s
    "OPUS": Encoding("OPUS", 16000, 4),  # ~32 kbit/s
    "AMR-WB": Encoding("AMR-WB", 16000, 3.05),  # 23.85 kbit/s: 61 bytes a 20 ms frame
}


def _bidirectional_ms(codec: str, sampling_rate: int, size: int) -> float:
    """How long ``size`` bytes the application sent take to play."""
    if codec in ("PCMU", "PCMA"):
        return size / (sampling_rate / 1000)
    if codec == "L16":
        return size / (2 * sampling_rate / 1000)
    if codec == "G722":
        return size / 8
    # OPUS, AMR-WB: one frame per message is the usual packing.
    return FRAME_MS


@dataclass
class MediaStreamRecord:
    """What happened on one media WebSocket (a snapshot when read through `media_sessions`)."""

    stream_id: str
    call_control_id: str
    stream_url: str
    tracks: tuple[str, ...]
    encoding: str = "PCMU"
    bidirectional: str | None = None
    connected: bool = False
    media_frames: int = 0
    frames_received: int = 0
    # Milliseconds of audio the application sent (bidirectional rtp) and how much has played.
    audio_received_ms: float = 0.0
    audio_played_ms: float = 0.0
    marks_acknowledged: list[str] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    errors_sent: list[int] = field(default_factory=list)
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


def _alaw(sample: int) -> int:
    """G.711 A-law byte for one signed 16-bit sample (ITU-T reference)."""
    value = sample >> 3  # 13-bit linear
    if value >= 0:
        mask = 0xD5
    else:
        mask, value = 0x55, -value - 1
    value = min(value, 0xFFF)
    segment = max(0, value.bit_length() - 5)
    low = (value >> (segment if segment else 1)) & 0x0F
    return ((segment << 4) | low) ^ mask


@lru_cache(maxsize=16)
def tone(encoding: str, frequency: int, amplitude: float = 0.3) -> bytes:
    """One second of a sine tone in ``encoding``; whole cycles, so it loops without a click."""
    spec = ENCODINGS[encoding]
    scale = amplitude * 32767
    step = 2 * math.pi * frequency / spec.sample_rate
    samples = [round(scale * math.sin(step * i)) for i in range(spec.sample_rate)]
    if encoding == "PCMU":
        return bytes(_ulaw(sample) for sample in samples)
    if encoding == "PCMA":
        return bytes(_alaw(sample) for sample in samples)
    if encoding == "L16":
        return struct.pack(f">{len(samples)}h", *samples)
    # G722, OPUS, AMR-WB: the codec's byte rate, but no encoder here.
    return bytes((i * 7 + frequency) & 0xFF for i in range(round(spec.bytes_per_ms * 1000)))


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

    ``on_connected(stream)`` is called from that thread once the WebSocket handshake is done,
    before the first frame. ``on_end(stream, reason)`` is called from it once the stream is
    over: ``reason`` says why it failed, or is None after a clean stop (or a failure while
    stopping). ``lock`` guards the record, which readers copy. ``error_rate`` is the chance per
    20 ms chunk of an ``error`` frame (a fault to switch on; 0: never), drawn from ``rng``.
    """

    def __init__(
        self,
        call: Parties,
        body: dict[str, Any],
        *,
        connect_timeout: float,
        lock: threading.RLock,
        on_end: Callable[[MediaStream, str | None], None],
        on_connected: Callable[[MediaStream], None] | None = None,
        error_rate: float = 0.0,
        rng: random.Random | None = None,
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
        codec = body.get("stream_codec") or "default"
        self.encoding = ENCODINGS.get(codec, ENCODINGS["PCMU"])
        self.bidirectional: str | None = body.get("stream_bidirectional_mode")
        self._back_codec: str = body.get("stream_bidirectional_codec") or "PCMU"
        self._back_rate: int = body.get("stream_bidirectional_sampling_rate") or (
            16000 if self._back_codec in ("L16", "G722", "AMR-WB") else 8000
        )
        self.record = MediaStreamRecord(
            stream_id=self.stream_id,
            call_control_id=call.call_control_id,
            stream_url=self.url,
            tracks=self.tracks,
            encoding=self.encoding.name,
            bidirectional=self.bidirectional,
        )
        self._connect_timeout = connect_timeout
        self._lock = lock
        self._on_end = on_end
        self._on_connected = on_connected
        self._error_rate = error_rate
        self._rng = rng or random.Random()  # noqa: S311 - simulation, not security
        # What the application asked to play, in order: ("audio", ms) or ("mark", name).
        self._playback: deque[tuple[str, Any]] = deque()
        # Key presses waiting for the media thread (appended from other threads).
        self._dtmf: deque[str] = deque()
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

    def send_dtmf(self, digit: str) -> None:
        """Send a ``dtmf`` frame for ``digit`` with the next chunk (from any thread)."""
        self._dtmf.append(digit)

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
            with self._lock:
                self.record.connected = True
            logger.info("media stream %s connected to %s", self.stream_id, self.url)
            if self._on_connected is not None:
                self._on_connected(self)
            try:
                self._send(ws, self._connected_frame())
                self._send(ws, self._start_frame())
                self._send_media(ws)
                stop = {"user_id": SIMULATOR_USER_ID, "call_control_id": self.call.call_control_id}
                self._send_frame(ws, "stop", stop=stop)
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
                "media_format": self.encoding.media_format,
            },
        }

    def _send_media(self, ws: Any) -> None:
        encoding = self.encoding
        frame_bytes = encoding.frame_bytes
        tones = {track: tone(encoding.name, _TRACK_TONES[track]) for track in self.tracks}
        started = time.monotonic()
        chunk = 0
        # Paced against the start time, so scheduling jitter does not accumulate.
        while not self._stopping.wait(
            max(0.0, started + chunk * FRAME_MS / 1000 - time.monotonic())
        ):
            for track, sound in tones.items():
                offset = (chunk * frame_bytes) % (len(sound) - frame_bytes + 1)
                self._send_frame(
                    ws,
                    "media",
                    media={
                        "track": track,
                        "chunk": str(chunk + 1),
                        "timestamp": str(chunk * FRAME_MS),
                        "payload": base64.b64encode(sound[offset : offset + frame_bytes]).decode(),
                    },
                )
                with self._lock:
                    self.record.media_frames += 1
            chunk += 1
            while self._dtmf:
                digit = self._dtmf.popleft()
                self._send_frame(
                    ws, "dtmf", occurred_at=iso_time(datetime.now(UTC)), dtmf={"digit": digit}
                )
                with self._lock:
                    self.record.dtmf_sent.append(digit)
            if self._error_rate and self._rng.random() < self._error_rate:
                self._send_error(ws, 100002, "unknown_error", "Injected by the simulator.")
            self._read_frames(ws)
            self._play(ws, FRAME_MS)

    def _read_frames(self, ws: Any) -> None:
        """Take in what the application sent since the last chunk."""
        while True:
            try:
                message = ws.recv(timeout=0)
            except TimeoutError:
                return
            with self._lock:
                self.record.frames_received += 1
            try:
                frame = json.loads(message)
            except (TypeError, ValueError):
                frame = None
            if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
                self._send_error(ws, 100003, "malformed_frame", "The frame is not valid JSON.")
                continue
            event = frame["event"]
            if event == "mark":
                mark = frame.get("mark") if isinstance(frame.get("mark"), dict) else {}
                self._playback.append(("mark", mark.get("name")))
            elif event == "clear":
                self._playback.clear()
            elif event == "media" and self.bidirectional:
                self._queue_audio(ws, frame)

    def _queue_audio(self, ws: Any, frame: dict[str, Any]) -> None:
        media = frame.get("media") if isinstance(frame.get("media"), dict) else {}
        try:
            audio = base64.b64decode(media.get("payload") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            audio = b""
        if not audio:
            self._send_error(ws, 100004, "invalid_media", "The media payload is not base64 audio.")
            return
        # mp3 files carry their own length, which nothing here decodes: they play at once.
        ms = (
            0.0
            if self.bidirectional == "mp3"
            else _bidirectional_ms(self._back_codec, self._back_rate, len(audio))
        )
        self._playback.append(("audio", ms))
        with self._lock:
            self.record.audio_received_ms += ms

    def _play(self, ws: Any, budget: float) -> None:
        """Play ``budget`` ms of the queued audio; a mark is acknowledged once reached."""
        while self._playback:
            kind, value = self._playback[0]
            if kind == "mark":
                self._playback.popleft()
                self._send_frame(ws, "mark", mark={"name": value})
                with self._lock:
                    self.record.marks_acknowledged.append(value)
                continue
            if budget <= 0:
                return
            played = min(budget, value)
            budget -= played
            with self._lock:
                self.record.audio_played_ms += played
            if played < value:
                self._playback[0] = ("audio", value - played)
                return
            self._playback.popleft()

    def _send_error(self, ws: Any, code: int, title: str, detail: str) -> None:
        self._send_frame(ws, "error", payload={"code": code, "title": title, "detail": detail})
        with self._lock:
            self.record.errors_sent.append(code)

    def _send_frame(self, ws: Any, event: str, **fields: Any) -> None:
        self._send(
            ws,
            {
                "event": event,
                "sequence_number": str(next(self._sequence)),
                "stream_id": self.stream_id,
                **fields,
            },
        )

    @staticmethod
    def _send(ws: Any, frame: dict[str, Any]) -> None:
        ws.send(json.dumps(frame, separators=(",", ":")))
