"""A TCP fault proxy: stands between the processes under test and PostgreSQL or Redis.

The machine's PostgreSQL and Redis are shared (other test runs, CI), so the fault tests never
stop them. The processes under test connect to a `FaultProxy` instead, which forwards bytes to
the real service until told to fail, and then fails the way the clients would see the service
fail:

- `down` / `up`: the service is stopped: every open connection is closed and new ones are
  refused (nothing listens on the port: ECONNREFUSED, as for a stopped server);
- `restart`: every connection is cut at once, as a server restart cuts them, and new ones are
  refused for a few seconds while it "starts".

Nothing the service stores is touched: a stopped Redis keeps its queues here, as one with
persistence would. Threads, stdlib only: a handful of connections per process under test.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

# Below Linux's ephemeral range (32768-60999): no outgoing connection is given this port as its
# source while the proxy is "down" and not listening, so `up` can always bind it again.
_PORTS = range(20000, 32000)


class FaultProxy:
    """Forward 127.0.0.1:`port` to `upstream` (host, port), with outages on demand."""

    def __init__(self, upstream: tuple[str, int], name: str = "proxy") -> None:
        self.upstream = upstream
        self.name = name
        self.port = 0
        self.accepted = 0  # connections accepted, over the proxy's life
        self.cut = 0  # connections closed by an outage or a restart
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stop_accepting = threading.Event()

    # -- lifecycle --

    def start(self) -> FaultProxy:
        for port in random.sample(_PORTS, 50):
            with contextlib.suppress(OSError):
                self._listen(port)
                self.port = port
                return self
        raise RuntimeError("no free port for the fault proxy")

    def stop(self) -> None:
        self.down()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, url: str) -> str:
        """``url`` (``redis://127.0.0.1:6379/6``, ``postgres://u@h:5432/db``) through the proxy."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults --

    def down(self) -> None:
        """The service stops: refuse new connections and close every open one."""
        self._stop_accepting.set()
        if self._accepting is not None:
            self._accepting.join(5)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.cut_all()

    def up(self) -> None:
        """The service is back on the same port."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self._listen(self.port)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def cut_all(self) -> int:
        """Close every open connection, both sides, as a server going away does."""
        with self._lock:
            links = list(self._open)
            self._open.clear()
        for link in links:
            link.cut()
        self.cut += len(links)
        return len(links)

    def outage(self, seconds: float) -> None:
        """Stopped for ``seconds``, then back (blocks)."""
        self.down()
        time.sleep(seconds)
        self.up()

    def restart(self, refuse_for: float) -> None:
        """A restart: every connection is cut, none is accepted for ``refuse_for`` s (blocks)."""
        self.outage(refuse_for)

    # -- forwarding --

    def _listen(self, port: int) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.1)
        self._listener = listener
        self._stop_accepting = threading.Event()
        self._accepting = threading.Thread(
            target=self._accept, args=(listener, self._stop_accepting), daemon=True
        )
        self._accepting.start()

    def _accept(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()  # the real service is unreachable: so is the proxy
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server, self._open, self._lock)
            with self._lock:
                self._open.add(link)
                self.accepted += 1
            link.start()


class _Link:
    """One client connection and its upstream twin, a thread pumping each way."""

    def __init__(self, client, server, registry: set, lock: threading.Lock) -> None:
        self.sockets = (client, server)
        self._registry, self._lock = registry, lock
        self._running = 2

    def start(self) -> None:
        client, server = self.sockets
        for source, target in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        # One side is gone: the other is told, as a real connection's peer would be.
        self.cut()
        with self._lock:
            self._registry.discard(self)
            self._running -= 1
            last = self._running == 0
        if last:
            for sock in self.sockets:
                sock.close()
