"""The subscriber side of the load: N streaming connections in one process, one epoll loop.

Not trio, not asyncio: a plain ``select.epoll`` loop over non-blocking sockets, so that the cost
per received byte is a ``recv`` and a few C-speed ``bytes`` operations. Every published payload
carries the marker ``{"t":<monotonic seconds>,`` exactly once, so counting deliveries is counting
markers in the de-framed stream (HTTP chunked bodies are de-chunked, WebSocket frames de-framed,
so no framing byte can split a marker); on every ``--sample-every``-th connection each marker's
timestamp is also read, giving publish -> delivery latency.

Transports (``--transport``):
- ``sse``, ``ndjson``: ``GET <path>`` over HTTP/1.1 (the broker, the Starlette baseline, the
  trivial server);
- ``ws``: the broker's ``/v1/ws`` with ``broker.v1.json``, subscribing with ``--ws-subscribe``;
- ``nats-ws``: nats-server's WebSocket listener, the NATS protocol in WebSocket frames
  (``CONNECT``, ``SUB``; ``PING`` answered).

Control, one JSON line per command on stdin, one JSON answer line on stdout:
``reset`` (zero the counters and samples), ``report``, ``quit``. At start it prints
``{"ready": N, "failed": F}`` once every connection has its response head (or failed).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import resource
import select
import socket
import sys
import time
from dataclasses import dataclass, field

MARKER = b'{"t":'
_STAMP = re.compile(rb'\{"t":(\d+\.\d+),')
MAX_SAMPLES = 400_000  # latency samples kept per step
CONNECT_BATCH = 256  # connections opened at once (the listen backlog is finite)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Conn:
    sock: socket.socket
    sampled: bool
    request: bytes
    after_head: bytes = b""  # sent once the response head has arrived (WebSocket ops)
    head: bytes = b""
    ready: bool = False
    closed: bool = False
    count: int = 0
    carry: bytes = b""  # the last bytes of the stream: a marker may straddle two reads
    tail: bytes = b""  # sampled connections: the unparsed end of the stream
    # HTTP chunked de-framing
    chunked: bool = False
    chunk_left: int = 0
    chunk_line: bytes = b""
    chunk_crlf: int = 0
    # WebSocket de-framing
    ws: bool = False
    ws_buf: bytes = b""
    ws_left: int = 0
    ws_opcode: int = 0
    ws_control: bytearray = field(default_factory=bytearray)
    nats: bool = False


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.latencies = Samples()
        self.failed = 0
        self.errors: list[str] = []

    # -- connecting --

    def _request(self, i: int) -> tuple[bytes, bytes]:
        args = self.args
        host = f"{args.host}:{args.port}"
        if args.transport in ("sse", "ndjson"):
            accept = "text/event-stream" if args.transport == "sse" else "application/x-ndjson"
            return (
                f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n"
                f"User-Agent: broker-bench\r\n\r\n".encode(),
                b"",
            )
        key = base64.b64encode(os.urandom(16)).decode()
        protocol = "nats" if args.transport == "nats-ws" else "broker.v1.json"
        head = (
            f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if args.transport == "ws":
            head += f"Sec-WebSocket-Protocol: {protocol}\r\n"
            op = json.dumps({"op": "subscribe", "topics": args.ws_subscribe.split(",")})
            after = ws_frame(op.encode())
        else:
            connect = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'
            after = ws_frame(connect + f"SUB {args.nats_subject} {i + 1}\r\n".encode())
        return (head + "\r\n").encode(), after

    def connect_all(self) -> None:
        n = self.args.connections
        pending: list[Conn] = []
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            request, after = self._request(i)
            conn = Conn(sock, i % self.args.sample_every == 0, request, after)
            conn.ws = self.args.transport in ("ws", "nats-ws")
            conn.nats = self.args.transport == "nats-ws"
            sock.connect_ex((self.args.host, self.args.port))  # EINPROGRESS: epoll says when
            self.conns[sock.fileno()] = conn
            self.epoll.register(sock.fileno(), select.EPOLLOUT)
            pending.append(conn)
            if len(pending) >= CONNECT_BATCH or i == n - 1:
                self._wait_heads(pending)
                pending = []
        ready = sum(c.ready for c in self.conns.values())
        emit({"ready": ready, "failed": self.failed, "errors": self.errors[:5]})

    def _wait_heads(self, pending: list[Conn], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while any(not c.ready and not c.closed for c in pending):
            if time.monotonic() > deadline:
                for c in pending:
                    if not c.ready and not c.closed:
                        self._fail(c, "no response head in time")
                return
            self.poll(0.05)

    def _fail(self, conn: Conn, why: str) -> None:
        if not conn.ready:
            self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(why)
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        fd = conn.sock.fileno()
        if fd >= 0:
            self.epoll.unregister(fd)
        conn.sock.close()

    # -- receiving --

    def poll(self, timeout: float) -> None:
        for fd, mask in self.epoll.poll(timeout, 4096):
            self._event(fd, mask)

    def _event(self, fd: int, mask: int) -> None:
        conn = self.conns.get(fd)
        if conn is None or conn.closed:
            return
        if mask & select.EPOLLOUT:  # connected: send the request
            try:
                conn.sock.send(conn.request)
            except OSError as exc:
                self._fail(conn, f"connect: {exc}")
                return
            self.epoll.modify(fd, select.EPOLLIN)
            return
        self._readable(conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, f"recv: {exc}")
            return
        if not data:
            self._fail(conn, "closed by the server")
            return
        if not conn.ready:
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = conn.head[:end], conn.head[end + 4 :]
            status = head.split(b" ", 2)[1] if b" " in head else b"?"
            if status not in (b"200", b"101"):
                self._fail(conn, f"status {status.decode(errors='replace')}: {data[:200]!r}")
                return
            conn.ready = True
            conn.chunked = b"transfer-encoding: chunked" in head.lower()
            if conn.after_head:
                conn.sock.sendall(conn.after_head)
            if not data:
                return
        if conn.chunked:
            data = dechunk(conn, data)
        if conn.ws:
            data = self._deframe(conn, data)
        self._count(conn, data)

    def _count(self, conn: Conn, data: bytes) -> None:
        joined = conn.carry + data
        conn.count += joined.count(MARKER)
        conn.carry = joined[-4:]
        if conn.sampled:
            now = time.monotonic()
            buf = conn.tail + data
            last = 0
            for match in _STAMP.finditer(buf):
                self.latencies.add(now - float(match[1]))
                last = match.end()
            conn.tail = buf[max(last, len(buf) - 64) :]

    def _deframe(self, conn: Conn, data: bytes) -> bytes:
        """Application payload bytes of the complete and partial frames in ``data``."""
        buf = conn.ws_buf + data if conn.ws_buf else data
        out: list[bytes] = []
        i, n = 0, len(buf)
        while True:
            if conn.ws_left:
                take = min(conn.ws_left, n - i)
                if conn.ws_opcode >= 8:
                    conn.ws_control += buf[i : i + take]
                else:
                    out.append(buf[i : i + take])
                i += take
                conn.ws_left -= take
                if conn.ws_left:
                    break
                if conn.ws_opcode >= 8:
                    self._control_frame(conn)
            if n - i < 2:
                break
            second = buf[i + 1] & 0x7F
            size = 2 if second < 126 else (4 if second == 126 else 10)
            if n - i < size:
                break
            if second == 126:
                length = int.from_bytes(buf[i + 2 : i + 4], "big")
            elif second == 127:
                length = int.from_bytes(buf[i + 2 : i + 10], "big")
            else:
                length = second
            conn.ws_opcode = buf[i] & 0x0F
            i += size
            conn.ws_left = length
            if length == 0 and conn.ws_opcode >= 8:
                self._control_frame(conn)
        conn.ws_buf = buf[i:]
        payload = b"".join(out)
        if conn.nats and b"PING\r\n" in payload:
            conn.sock.sendall(ws_frame(b"PONG\r\n"))
        return payload

    def _control_frame(self, conn: Conn) -> None:
        if conn.ws_opcode == 9:  # ping -> pong
            conn.sock.sendall(ws_frame(bytes(conn.ws_control), opcode=10))
        elif conn.ws_opcode == 8:
            self._fail(conn, f"websocket closed: {bytes(conn.ws_control[:2]).hex()}")
        conn.ws_control = bytearray()

    # -- control --

    def report(self, *, percentiles: bool = True) -> dict[str, object]:
        counts = [c.count for c in self.conns.values()]
        return {
            "received": sum(counts),
            "per_connection_min": min(counts, default=0),
            "per_connection_max": max(counts, default=0),
            "open": sum(1 for c in self.conns.values() if c.ready and not c.closed),
            "closed": sum(1 for c in self.conns.values() if c.closed),
            "latency": self.latencies.summary() if percentiles else self.latencies.counts(),
            "errors": self.errors[:5],
        }

    def reset(self) -> None:
        for conn in self.conns.values():
            conn.count = 0
        self.latencies.clear()

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.epoll.register(stdin, select.EPOLLIN)
        pending = b""
        while True:
            for fd, mask in self.epoll.poll(1.0, 4096):
                if fd != stdin:
                    self._event(fd, mask)
                    continue
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command = line.strip().decode()
                    if command == "reset":
                        self.reset()
                        emit({"ok": True})
                    elif command == "report":
                        emit(self.report())
                    elif command == "count":  # no percentiles: cheap enough to poll
                        emit(self.report(percentiles=False))
                    elif command == "quit":
                        return


def dechunk(conn: Conn, data: bytes) -> bytes:
    """The body bytes of an HTTP/1.1 chunked stream, fed in arbitrary pieces."""
    out: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        if conn.chunk_left:
            take = min(conn.chunk_left, n - i)
            out.append(data[i : i + take])
            i += take
            conn.chunk_left -= take
            if not conn.chunk_left:
                conn.chunk_crlf = 2
        elif conn.chunk_crlf:
            skip = min(conn.chunk_crlf, n - i)
            i += skip
            conn.chunk_crlf -= skip
        else:
            end = data.find(b"\r\n", i)
            if end < 0:
                conn.chunk_line += data[i:]
                break
            line = conn.chunk_line + data[i:end]
            conn.chunk_line = b""
            i = end + 2
            size = int(line.split(b";", 1)[0], 16) if line.strip() else 0
            conn.chunk_left = size
            if size == 0:
                conn.chunk_crlf = 2  # the last chunk: the stream is over
    return b"".join(out)


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (a zero mask: masking is required, not secrecy)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Samples:
    """Latency samples, at most ``limit`` kept: past it, each new one replaces a random kept one
    with probability limit / seen (reservoir sampling), so the percentiles stand for the whole
    step and not only for its first second, when the server is still warming up. The max is
    over every sample. Same as loadgen.c."""

    def __init__(self, limit: int = MAX_SAMPLES) -> None:
        self.limit = limit
        self.kept: list[float] = []
        self.seen = 0
        self.max = 0.0
        self._random = random.Random(1)

    def add(self, value: float) -> None:
        self.seen += 1
        self.max = max(self.max, value)
        if len(self.kept) < self.limit:
            self.kept.append(value)
            return
        j = self._random.randrange(self.seen)
        if j < self.limit:
            self.kept[j] = value

    def clear(self) -> None:
        self.kept, self.seen, self.max = [], 0, 0.0

    def counts(self) -> dict[str, float | int]:
        return {"count": len(self.kept), "seen": self.seen}

    def summary(self) -> dict[str, float | int]:
        if not self.kept:
            return self.counts()
        ordered = sorted(self.kept)
        last = len(ordered) - 1

        def at(q: float) -> float:
            return round(ordered[min(last, int(q * len(ordered)))] * 1000, 3)

        return {**self.counts(), "p50_ms": at(0.50), "p99_ms": at(0.99),
                "max_ms": round(self.max * 1000, 3)}


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=["sse", "ndjson", "ws", "nats-ws"], required=True)
    parser.add_argument("--path", default="/v1/sse?topic=bench")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--ws-subscribe", default="bench", help="ws: topics, comma-separated")
    parser.add_argument("--nats-subject", default="bench", help="nats-ws: the subject")
    args = parser.parse_args(argv)
    raise_fd_limit()
    fleet = Fleet(args)
    fleet.connect_all()
    fleet.run()


if __name__ == "__main__":
    main()
