"""Minimal raw subscribers for the integration tests, one per transport, built on the wire
parsers only (not on broker.client), so the tests check what is really on the wire."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.utilities import LocalProtocolError

from broker.wire import ndjson, sse
from broker.wire.ws import Codec

TRANSPORTS = ["sse", "ndjson", "ws", "ws-msgpack", "poll"]


@dataclass(frozen=True)
class Item:
    kind: str  # "event", "gap" or "reset"
    seq: int = 0
    data: bytes = b""
    topic: str = ""
    to_seq: int = 0
    epoch: str = ""


def _payload(obj: dict[str, Any]) -> bytes:
    if "data_b64" in obj:
        return base64.b64decode(obj["data_b64"])
    data = obj.get("data")
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _from_object(obj: dict[str, Any]) -> Item | None:
    kind = obj.get("type", "event")
    if kind == "event":
        return Item("event", obj["seq"], _payload(obj), obj["topic"])
    if kind == "gap":
        return Item("gap", obj["from_seq"], topic=obj.get("topic", ""), to_seq=obj["to_seq"])
    if kind == "reset":
        return Item("reset", epoch=obj["epoch"])
    return None  # hello, subscribed, pong...


class Feed:
    """What a subscription received. A background task fills `received` and the channel that
    `next` reads, so a transport's async generator never yields across a cancel scope of ours."""

    def __init__(self, channel: trio.MemoryReceiveChannel[Item]) -> None:
        self._channel = channel
        self.received: list[Item] = []

    async def next(self, timeout: float = 10.0) -> Item:
        with trio.fail_after(timeout):
            return await self._channel.receive()

    async def take(self, n: int, timeout: float = 20.0) -> list[Item]:
        with trio.fail_after(timeout):
            return [await self._channel.receive() for _ in range(n)]

    async def wait_count(self, n: int, timeout: float = 30.0) -> list[Item]:
        await wait_for(lambda: len(self.received) >= n, timeout)
        return self.received


def _query(
    topics: list[str], from_seq: str | int | None, start: str | None
) -> list[tuple[str, str]]:
    query = [("topic", t) for t in topics]
    if from_seq is not None:
        query.append(("from_seq", str(from_seq)))
    if start is not None:
        query.append(("from", start))
    return query


async def _sse(
    client: httpx.AsyncClient, query: list[tuple[str, str]], last_event_id: str | None
) -> AsyncIterator[Item]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.stream("GET", "/v1/sse", params=query, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        parser = sse.SSEParser()
        async with aclosing(response.aiter_raw()) as chunks:
            async for chunk in chunks:
                for message in parser.feed(chunk):
                    if message.event == "gap":
                        gap = json.loads(message.data)
                        yield Item(
                            "gap", gap["from_seq"], topic=gap.get("topic", ""), to_seq=gap["to_seq"]
                        )
                    elif message.event == "reset":
                        yield Item("reset", epoch=json.loads(message.data)["epoch"])
                    else:
                        seq = int(message.id.rsplit(":", 1)[1])
                        yield Item("event", seq, message.data.encode())


async def _ndjson(client: httpx.AsyncClient, query: list[tuple[str, str]]) -> AsyncIterator[Item]:
    async with client.stream("GET", "/v1/ndjson", params=query) as response:
        assert response.status_code == 200, await response.aread()
        splitter = ndjson.LineSplitter(max_line_bytes=4 * 1024 * 1024)
        async with aclosing(response.aiter_raw()) as chunks:
            async for chunk in chunks:
                for line in splitter.feed(chunk):
                    if line:
                        item = _from_object(json.loads(line))
                        if item is not None:
                            yield item


async def _ws(
    url: str, codec: Codec, topics: list[str], from_seq: str | int | None, start: str | None
) -> AsyncIterator[Item]:
    ws_url = url.replace("http://", "ws://") + "/v1/ws"
    async with open_websocket_url(ws_url, subprotocols=[codec.value]) as socket:
        op: dict[str, Any] = {"op": "subscribe", "topics": topics}
        if from_seq is not None:
            op["from_seq"] = from_seq
        if start is not None:
            op["from"] = start
        if codec is Codec.JSON:
            await socket.send_message(json.dumps(op))
        else:
            await socket.send_message(msgpack.packb(op))
        while True:
            message = await socket.get_message()
            if codec is Codec.JSON:
                assert isinstance(message, str)
                obj = json.loads(message)
            else:
                assert isinstance(message, bytes)
                obj = msgpack.unpackb(message)
            assert obj.get("type") != "error", obj
            item = _from_object(obj)
            if item is not None:
                yield item


async def _poll(
    client: httpx.AsyncClient, topics: list[str], from_seq: str | int | None, start: str | None
) -> AsyncIterator[Item]:
    position = from_seq
    while True:
        query = _query(topics, position, start if position is None else None)
        response = await client.get("/v1/poll", params=[*query, ("timeout", "5")])
        assert response.status_code == 200, response.text
        body = response.json()
        position = body["position"]
        for obj in body["events"]:
            item = _from_object(obj)
            if item is not None:
                yield item


@asynccontextmanager
async def subscribe(
    url: str,
    transport: str,
    topics: list[str],
    *,
    from_seq: str | int | None = None,
    start: str | None = None,
    last_event_id: str | None = None,
) -> AsyncIterator[Feed]:
    """Subscribe in a background task. Wait for the broker to hold the subscription
    (``len(node.hub)``) before relying on live delivery."""
    send, receive = trio.open_memory_channel[Item](math.inf)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30.0) as client,
        trio.open_nursery() as nursery,
    ):
        items: AsyncIterator[Item]
        if transport == "sse":
            items = _sse(client, _query(topics, from_seq, start), last_event_id)
        elif transport == "ndjson":
            items = _ndjson(client, _query(topics, from_seq, start))
        elif transport in ("ws", "ws-msgpack"):
            codec = Codec.JSON if transport == "ws" else Codec.MSGPACK
            items = _ws(url, codec, topics, from_seq, start)
        else:
            items = _poll(client, topics, from_seq, start)
        feed = Feed(receive)

        async def pump() -> None:
            async with aclosing(items):  # type: ignore[type-var]
                async for item in items:
                    feed.received.append(item)
                    send.send_nowait(item)

        nursery.start_soon(pump)
        yield feed
        nursery.cancel_scope.cancel()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true, checking after every scheduling round."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


class RawWebSocket:
    """A wsproto client on a plain socket, for tests where the *server* closes the connection
    (trio-websocket's client leaves its socket unclosed in that case) or refuses the handshake."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.subprotocol: str | None = None
        self._pending: list[Any] = []
        self.close_code_seen: int | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, subprotocols: list[str], *, receive_buffer_bytes: int | None = None
    ) -> AsyncIterator[RawWebSocket]:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        sock = trio.socket.socket()
        if receive_buffer_bytes is not None:  # small: the server's writes block sooner
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        with sock:
            await sock.connect((host, int(port)))
            client = cls(sock)
            request = WsRequest(host=host, target="/v1/ws", subprotocols=subprotocols)
            await sock.send(client.ws.send(request))
            event = await client.event()
            if isinstance(event, RejectConnection):
                raise AssertionError(f"refused with {event.status_code}")
            assert isinstance(event, AcceptConnection), event
            client.subprotocol = event.subprotocol
            yield client

    async def event(self, timeout: float = 10.0) -> Any:
        with trio.fail_after(timeout):
            while not self._pending:
                data = await self.sock.recv(65536)
                self.ws.receive_data(data or None)
                self._pending.extend(self.ws.events())
            return self._pending.pop(0)

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self.sock.send(self.ws.send(TextMessage(data=message)))
        else:
            await self.sock.send(self.ws.send(BytesMessage(data=message)))

    async def message(self) -> str | None:
        """The next whole text message, or None once the server closed (its close answered)."""
        parts: list[str] = []
        while True:
            event = await self.event()
            if isinstance(event, CloseConnection):
                with contextlib.suppress(OSError, LocalProtocolError):
                    await self.sock.send(self.ws.send(event.response()))
                self.close_code_seen = int(event.code)
                return None
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)

    async def close_code(self) -> int:
        """Read until the server closes; answer its close frame; return its code."""
        while True:
            event = await self.event()
            if isinstance(event, CloseConnection):
                with contextlib.suppress(OSError, LocalProtocolError):
                    await self.sock.send(self.ws.send(event.response()))
                return int(event.code)
