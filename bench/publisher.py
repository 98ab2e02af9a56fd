"""The publishing side of the load: ``--count`` messages at ``--rate`` per second (0: as fast as it
can), each payload carrying ``{"t":<time.monotonic()>,`` for the latency measurement, padded to
``--size`` bytes. Prints one JSON line: ``{"published", "seconds", "rate", "late_seconds",
"errors"}``.

Modes:
- ``http-batch``: ``POST /v1/publish`` (NDJSON), one request in flight; whatever fell due while
  it was in flight goes in the next one (at most ``--max-batch`` lines);
- ``http``: ``POST /v1/topics/<topic>``, one message per request, ``--connections`` keep-alive
  connections in threads;
- ``nats``: core NATS ``PUB`` to ``--subject`` over TCP, batched per tick, flushed with PING;
- ``grpc``: one ``PublishStream`` call.

Blocking sockets and a sleep-based pacer: this process does nothing else.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

TICK_SECONDS = 0.005  # the pacer's resolution: messages due within it go in one batch
# How long after its due time the last paced message went out (0 when unpaced): a publisher held
# back by the server did not publish at the rate asked, and its stamps (taken when a batch is
# sent) would not show the wait. The bench fails such a step.
late_seconds = 0.0


def payload(size: int) -> bytes:
    """A JSON payload of about ``size`` bytes: {"t":<now>,"p":"xxx..."}."""
    head = b'{"t":%.6f,"p":"' % time.monotonic()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def paced(count: int, rate: float, max_batch: int) -> Iterator[int]:
    """Batch sizes: every TICK_SECONDS, how many messages fell due in it, at ``rate`` per second
    (0: unpaced, ``max_batch`` at a time as fast as they are taken). Sets `late_seconds`."""
    global late_seconds
    start = time.monotonic()
    sent = 0
    tick = 0
    while sent < count:
        if rate > 0:
            tick += 1
            wake = start + tick * TICK_SECONDS
            delay = wake - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due = min(count, int((time.monotonic() - start) * rate))
        else:
            due = count
        while sent < due:
            n = min(due - sent, max_batch)
            yield n
            sent += n
    if rate > 0:
        late_seconds = max(0.0, time.monotonic() - (start + count / rate))


class Http:
    """One keep-alive HTTP/1.1 connection, requests one at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """One request; again on a new connection if the server had closed this one between
        requests (hypercorn closes a keep-alive connection after 1,000 requests)."""
        try:
            return self._post(path, body, content_type)
        except (ConnectionError, BrokenPipeError):
            self.sock.close()
            self._connect()
            return self._post(path, body, content_type)

    def _post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        self.sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self.host.encode(), self.port, content_type.encode(), len(body))
            + body
        )
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self._more()
        answer, self.buf = self.buf[:length], self.buf[length:]
        return status, answer

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data


def http_batch(args: argparse.Namespace) -> tuple[int, list[str]]:
    """With ``--topics N`` the topic has ``{i}`` in it and the messages go round N topics."""
    conn = Http(args.host, args.port)
    published, errors = 0, []
    prefixes = [b'{"topic":"%s","data":' % args.topic.replace("{i}", str(i)).encode()
                for i in range(args.topics)]
    for n in paced(args.count, args.rate, args.max_batch):
        data = payload(args.size) + b"}\n"
        if len(prefixes) == 1:
            body = (prefixes[0] + data) * n
        else:
            body = b"".join(prefixes[(published + k) % len(prefixes)] + data for k in range(n))
        status, answer = conn.post(args.path or "/v1/publish", body, "application/x-ndjson")
        if status != 200:
            errors.append(f"{status}: {answer[:200]!r}")
            break
        published += n
    return published, errors


def http_single(args: argparse.Namespace) -> tuple[int, list[str]]:
    lock = threading.Lock()
    batches = paced(args.count, args.rate, 1)
    counts = [0] * args.connections
    errors: list[str] = []
    path = args.path or f"/v1/topics/{args.topic}"

    def worker(k: int) -> None:
        conn = Http(args.host, args.port)
        while True:
            with lock:
                if next(batches, None) is None:
                    return
            status, answer = conn.post(path, payload(args.size), "application/json")
            if status != 200:
                errors.append(f"{status}: {answer[:200]!r}")
                return
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), errors


def nats(args: argparse.Namespace) -> tuple[int, list[str]]:
    sock = socket.create_connection((args.host, args.port))
    # Without it, Nagle holds each tick's PUBs until the previous ones are acknowledged: up to
    # the 40 ms delayed ACK, which once showed up as everyone's p99 (the baseline's too).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.recv(4096)  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
    subject = args.subject.encode()
    published = 0
    for n in paced(args.count, args.rate, args.max_batch):
        body = payload(args.size)
        sock.sendall((b"PUB %s %d\r\n%s\r\n" % (subject, len(body), body)) * n)
        published += n
    sock.sendall(b"PING\r\n")
    answer = b""
    while b"PONG" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            return published, ["the server closed the connection"]
        answer += chunk
    errors = [answer.decode(errors="replace")] if b"-ERR" in answer else []
    return published, errors


def grpc_stream(args: argparse.Namespace) -> tuple[int, list[str]]:
    import grpc

    from broker._pb import broker_pb2 as pb
    from broker._pb import broker_pb2_grpc as rpc

    def requests() -> Iterator[object]:
        for n in paced(args.count, args.rate, args.max_batch):
            for _ in range(n):
                yield pb.PublishRequest(
                    topic=args.topic, payload=payload(args.size), content_type="application/json"
                )

    with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
        answer = rpc.BrokerStub(channel).PublishStream(requests())
    return len(answer.acks), []


MODES: dict[str, Callable[[argparse.Namespace], tuple[int, list[str]]]] = {
    "http-batch": http_batch,
    "http": http_single,
    "nats": nats,
    "grpc": grpc_stream,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--topics", type=int, default=1, help="http-batch: round {i} in --topic")
    parser.add_argument("--subject", default="broker.t.bench", help="nats: the subject")
    parser.add_argument("--path", default="", help="http modes: the request path")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: unpaced")
    parser.add_argument("--size", type=int, default=100, help="payload bytes")
    parser.add_argument("--max-batch", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4, help="http: parallel connections")
    args = parser.parse_args(argv)
    start = time.monotonic()
    published, errors = MODES[args.mode](args)
    seconds = time.monotonic() - start
    json.dump({"published": published, "seconds": round(seconds, 4),
               "rate": round(published / seconds, 1) if seconds else 0,
               "late_seconds": round(late_seconds, 4), "errors": errors[:5]},
              sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
