"""A stand-in for a partner's media server: accepts Telnyx media streams and reports them.

The demo's streaming profile points here. It checks the stream's auth token against the
streaming profiles' tokens, reads the frames (callops.media) and logs one line per stream.
"""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from callops.media import MediaSession
from callops.models import StreamingProfile

TOKEN_HEADER = "x-telnyx-streaming-auth-token"  # noqa: S105 - a header name


class Command(BaseCommand):
    help = "Accept Telnyx media streams on a WebSocket and log what each delivered."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8090)

    def handle(self, *args, host: str, port: int, **options) -> None:
        def tokens() -> tuple[str, ...]:
            return tuple(
                StreamingProfile.objects.exclude(stream_auth_token="").values_list(
                    "stream_auth_token", flat=True
                )
            )

        def handler(websocket: ServerConnection) -> None:
            session = MediaSession(expected_tokens=tokens())
            if not session.authorised(websocket.request.headers.get(TOKEN_HEADER)):
                self.stdout.write("refused a stream: wrong or missing auth token")
                websocket.close(code=4401, reason="unauthorised")
                return
            try:
                for message in websocket:
                    if session.feed(message) == "start":
                        self.stdout.write(
                            f"stream {session.stream_id} started for "
                            f"{session.call_control_id} ({session.encoding})"
                        )
            except ConnectionClosed:
                pass
            self.stdout.write(session.summary())

        with serve(handler, host, port) as server:
            self.stdout.write(f"media sink listening on ws://{host}:{port}/")
            stopped = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stopped.set())
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            stopped.wait()
            server.shutdown()
