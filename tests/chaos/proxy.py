"""A TCP proxy the chaos harness owns, on loopback: cut, blackhole, hold and slow connections.

Relays and consumers reach Kafka and PostgreSQL through it, so the harness can break
the network between them without touching the servers. It can also tell which client
process has a Kafka request held back in it: that is how the harness finds a relay
with a send in flight, to kill or stop it at exactly that moment.
"""

from __future__ import annotations

import contextlib
import copy
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a reset
KAFKA_PRODUCE = 0  # the API key of a Kafka Produce request
KAFKA_ADD_PARTITIONS_TO_TXN = 24  # a transactional producer's, before its first Produce
KAFKA_END_TXN = 26  # a transactional producer's commit (or abort)


class TcpProxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:target_port, with faults on demand."""

    def __init__(self, listen_port: int, target_port: int, name: str,
                 kafka: bool = False) -> None:
        self.name = name
        self.kafka = kafka  # follow the framing of the client's Kafka requests
        self.target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=True)
        self.listen_port: int = self._server.getsockname()[1]  # listen_port, or the one given for 0
        self.listen_ports = {self.listen_port}  # as ProxyGroup's
        self._server.settimeout(0.5)
        self._clients: dict[socket.socket, socket.socket] = {}  # client side -> upstream
        self._frames: dict[socket.socket, KafkaFrames] = {}  # client side -> its requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._holds = 0  # while > 0, bytes are held back (see hold())
        self.blackhole_until = 0.0  # until then, bytes are held back (not lost)
        self.latency = 0.0  # seconds added before each chunk is forwarded
        self.refuse_until = 0.0  # until then, new connections are closed at once
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{name}").start()

    # -- faults -----------------------------------------------------------------------

    def cut(self, refuse_for: float = 0.0) -> int:
        """Close every open connection with a reset, dropping the bytes held in them (they
        never reach the other side); optionally refuse new connections for a while."""
        self.refuse_until = time.monotonic() + refuse_for
        with self._lock:
            pairs, self._clients, self._frames = list(self._clients.items()), {}, {}
        for pair in pairs:
            for c in pair:
                with contextlib.suppress(OSError):
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                    c.close()
        return len(pairs)

    def blackhole(self, seconds: float) -> None:
        """Hold every byte back for `seconds` (extends a blackhole already running)."""
        self.blackhole_until = max(self.blackhole_until, time.monotonic() + seconds)

    def isolate(self, seconds: float) -> None:
        """Cut the server off from clients for `seconds`, as a partition would: bytes of
        open connections are held back (not lost), new connections are refused."""
        self.blackhole(seconds)
        self.refuse_until = max(self.refuse_until, time.monotonic() + seconds)

    def hold(self) -> None:
        """Hold every byte back until the matching release(); holds nest."""
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)

    def slow(self, seconds: float) -> None:
        self.latency = seconds

    def heal(self) -> None:
        with self._lock:
            self._holds = 0
        self.blackhole_until = self.refuse_until = 0.0
        self.latency = 0.0

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._server.close()

    def held(self) -> bool:
        return self._holds > 0 or time.monotonic() < self.blackhole_until

    # -- what is held -----------------------------------------------------------------

    def held_kafka_requests(self) -> dict[int, list[int]]:
        """For each client connection with bytes held back (by the client's port): the API
        keys of the Kafka requests among them, read without consuming them."""
        with self._lock:
            clients = [(c, self._frames.get(c)) for c in self._clients]
        out: dict[int, list[int]] = {}
        for c, frames in clients:
            try:
                data = c.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                port = c.getpeername()[1]
            except (BlockingIOError, OSError):
                continue
            if data:  # the hold may have begun mid-request: go on from where forwarding was
                out[port] = copy.deepcopy(frames).feed(data) if frames else kafka_api_keys(data)
        return out

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
                self._clients[client] = upstream
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        requests = KafkaFrames() if self.kafka else None
        if requests:
            with self._lock:
                self._frames[a] = requests
        try:
            while not self._stop.is_set():
                if self.held():
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.2)
                if self.held():
                    continue  # it started while we waited: hold these bytes back too
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.latency:
                        time.sleep(self.latency)
                    peers[sock].sendall(data)
                    if requests and sock is a:
                        requests.feed(data)  # so what is held later is read from a boundary
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._clients.pop(a, None)
                self._frames.pop(a, None)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


class KafkaFrames:
    """The API keys of the Kafka requests in a client's byte stream, fed chunk by chunk."""

    def __init__(self) -> None:
        self._left = 0  # bytes of the current request still to come
        self._head = b""  # the start of the next request's size and API key

    def feed(self, data: bytes) -> list[int]:
        keys: list[int] = []
        i = 0
        while i < len(data):
            if self._left:
                step = min(self._left, len(data) - i)
                self._left -= step
                i += step
                continue
            take = data[i:i + 6 - len(self._head)]
            self._head += take
            i += len(take)
            if len(self._head) < 6:
                break
            keys.append(int.from_bytes(self._head[4:6], "big", signed=True))
            self._left = max(0, int.from_bytes(self._head[:4], "big", signed=True) - 2)
            self._head = b""
        return keys


def kafka_api_keys(data: bytes) -> list[int]:
    """The API keys of the Kafka requests framed in `data` (each: int32 size, int16 key,
    ...); the last may be cut short."""
    keys: list[int] = []
    i = 0
    while i + 6 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big", signed=True)
        if size < 2:
            break
        keys.append(int.from_bytes(data[i + 4:i + 6], "big", signed=True))
        i += 4 + size
    return keys


class ProxyGroup:
    """Several proxies (one per broker, or per PostgreSQL server) faulted as one: what the
    harness does to "the Kafka proxy" it does to every broker's. `members` stay
    reachable for faults aimed at one of them (isolating one broker)."""

    def __init__(self, members: list[TcpProxy], name: str) -> None:
        self.members, self.name = members, name
        self.listen_ports = {p.listen_port for p in members}

    def cut(self, refuse_for: float = 0.0) -> int:
        return sum(p.cut(refuse_for) for p in self.members)

    def blackhole(self, seconds: float) -> None:
        self._each(TcpProxy.blackhole, seconds)

    def hold(self) -> None:
        self._each(TcpProxy.hold)

    def release(self) -> None:
        self._each(TcpProxy.release)

    def slow(self, seconds: float) -> None:
        self._each(TcpProxy.slow, seconds)

    def heal(self) -> None:
        self._each(TcpProxy.heal)

    def close(self) -> None:
        self._each(TcpProxy.close)

    def _each(self, method: Callable[..., None], *args: float) -> None:
        for p in self.members:
            method(p, *args)

    def held_kafka_requests(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for p in self.members:  # client ports are distinct across the members
            out.update(p.held_kafka_requests())
        return out


def port_owners(ports: Iterable[int], remote_port: int | Iterable[int],
                pids: Iterable[int]) -> dict[int, int]:
    """Which of `pids` owns the loopback TCP socket from each local port to `remote_port`
    (or one of several) (Linux: /proc/net/tcp gives the socket's inode, /proc/PID/fd the
    process)."""
    remote = {remote_port} if isinstance(remote_port, int) else set(remote_port)
    wanted = set(ports)
    inodes: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, peer = fields[1], fields[2]
            port = int(local.rsplit(":", 1)[1], 16)
            if port in wanted and int(peer.rsplit(":", 1)[1], 16) in remote:
                inodes[f"socket:[{fields[9]}]"] = port
    owners: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                owned = inodes.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if owned is not None:
                    owners[owned] = pid
    return owners
