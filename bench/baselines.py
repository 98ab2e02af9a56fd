"""Servers the broker is measured against, started by the bench itself.

- `starlette_app`: the typical Python pattern: Starlette + sse-starlette on uvicorn, a per-client
  ``asyncio.Queue``; ``POST /v1/publish`` takes the broker's NDJSON batch format and
  ``POST /v1/topics/{topic}`` one message, so the same publisher drives both;
  ``GET /v1/sse?topic=T`` streams ``id:``/``data:`` events. No resume, no bounds: the pattern
  as it is usually written.
- `trivial`: not a broker: a raw socket server that answers every connection with an endless
  chunked SSE response of pre-built events, written as fast as the kernel takes them. Its only
  use is to show how much the load generator can absorb.

``python -m bench.baselines trivial --port P`` runs the trivial server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
from collections.abc import AsyncIterator
from typing import Any


def starlette_app() -> Any:
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    subscribers: dict[str, set[asyncio.Queue[tuple[int, str]]]] = {}
    seq = 0

    def fan_out(topic: str, data: str) -> int:
        nonlocal seq
        seq += 1
        for queue in subscribers.get(topic, ()):
            queue.put_nowait((seq, data))
        return seq

    async def publish_batch(request: Request) -> JSONResponse:
        seqs = []
        for line in (await request.body()).splitlines():
            if line.strip():
                item = json.loads(line)
                data = item["data"]
                text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                seqs.append(fan_out(item["topic"], text))
        return JSONResponse({"seqs": seqs})

    async def publish_one(request: Request) -> JSONResponse:
        body = (await request.body()).decode()
        return JSONResponse({"seq": fan_out(request.path_params["topic"], body)})

    async def sse(request: Request) -> EventSourceResponse:
        topic = request.query_params["topic"]
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        subscribers.setdefault(topic, set()).add(queue)

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                while True:
                    n, data = await queue.get()
                    yield {"id": str(n), "data": data}
            finally:
                subscribers[topic].discard(queue)

        return EventSourceResponse(events(), ping=15)

    return Starlette(routes=[
        Route("/v1/publish", publish_batch, methods=["POST"]),
        Route("/v1/topics/{topic}", publish_one, methods=["POST"]),
        Route("/v1/sse", sse),
    ])


def trivial(port: int, events_per_write: int) -> None:
    """An endless chunked SSE response per connection, pre-built: ``events_per_write`` events
    per chunk (0: 64 KiB of them), written as fast as each socket takes them."""
    event = b'id: 1\ndata: {"t":0.000000,"p":"' + b"x" * 70 + b'"}\n\n'
    body = event * (events_per_write or 65536 // len(event))
    piece = b"%x\r\n" % len(body) + body + b"\r\n"
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    offsets: dict[int, int] = {}  # where in ``piece`` the next write starts (answered ones)
    view = memoryview(piece)
    while True:
        for fd, _ in epoll.poll(1.0):
            if fd == listener.fileno():
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conns[conn.fileno()] = conn
                    epoll.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                if fd not in offsets:  # the request: answer, then keep writing
                    if conn.recv(65536):
                        conn.sendall(head)
                        offsets[fd] = 0
                        epoll.modify(fd, select.EPOLLOUT)
                    continue
                sent = conn.send(view[offsets[fd]:])
                offsets[fd] = (offsets[fd] + sent) % len(piece)
            except BlockingIOError:
                pass
            except OSError:
                epoll.unregister(fd)
                offsets.pop(fd, None)
                conns.pop(fd).close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server", choices=["trivial"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events-per-write", type=int, default=0)
    args = parser.parse_args()
    trivial(args.port, args.events_per_write)


if __name__ == "__main__":
    main()
