"""A TCP proxy the chaos harness owns, on loopback: cut, blackhole and slow connections.

Relays and consumers reach Kafka and PostgreSQL through it, so the harness can break
the network between them without touching the servers.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a reset


class TcpProxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:target_port, with faults on demand."""

    def __init__(self, listen_port: int, target_port: int, name: str) -> None:
        self.name = name
        self.target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=True)
        self._server.settimeout(0.5)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.blackhole_until = 0.0  # until then, bytes are held back (not lost)
        self.latency = 0.0  # seconds added before each chunk is forwarded
        self.refuse_until = 0.0  # until then, new connections are closed at once
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{name}").start()

    # -- faults -----------------------------------------------------------------------

    def cut(self, refuse_for: float = 0.0) -> int:
        """Close every open connection (both sides see a reset); optionally refuse new ones."""
        self.refuse_until = time.monotonic() + refuse_for
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                c.close()
        return len(conns) // 2

    def blackhole(self, seconds: float) -> None:
        self.blackhole_until = time.monotonic() + seconds

    def slow(self, seconds: float) -> None:
        self.latency = seconds

    def heal(self) -> None:
        self.blackhole_until = self.refuse_until = 0.0
        self.latency = 0.0

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._server.close()

    # -- forwarding -------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if time.monotonic() < self.refuse_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                if time.monotonic() < self.blackhole_until:
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.2)
                if time.monotonic() < self.blackhole_until:
                    continue  # it started while we waited: hold these bytes back too
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.latency:
                        time.sleep(self.latency)
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
