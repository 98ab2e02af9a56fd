"""The fast path: subscriber streams served on the raw socket, everything else to hypercorn.

Each accepted connection's request head is read here (h11 parses it). A subscribe request
(``GET`` of an SSE or NDJSON stream, or the ``/v1/ws`` WebSocket upgrade) is served by the same
ASGI handlers as before (`streams.serve`, `websocket.serve`, behind the same app, CORS included),
but with a `NativeSink`: a write goes straight to the socket with one ``os.writev`` when that
cannot block, and through trio only when it would (or to finish a partial write). Any other
connection (publish, long-poll, health, static files, HTTP/2, anything h11 cannot parse) is
handed whole to hypercorn, with the bytes already read put back in front, so hypercorn and the
quart-trio app stay the complete slow path.

Why: a write through hypercorn costs 34-63 us (its protocol stack, a task switch, a lock); a
non-blocking ``writev`` costs ~5 us. With 1,000 subscribers that is the difference between
~20 and ~150+ events per second per core. See docs/performance.md.

On the wire nothing changes: streams are HTTP/1.1 chunked responses (``Connection: close``: a
stream is the connection's last response), WebSocket frames are the same frames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11
import trio
import wsproto
import wsproto.events as wse
from wsproto.connection import ConnectionType

from broker.encoding import Format, Run
from broker.transports import native_publish
from broker.wire import ws

if TYPE_CHECKING:  # asgi imports the node, which imports the listener, which imports us
    from broker.node import Node
    from broker.transports.asgi import ASGIApp, Message, Scope

logger = logging.getLogger("broker.native")

HEAD_TIMEOUT_SECONDS = 10.0
MAX_HEAD_BYTES = 16 * 1024
_MAX_IOVEC = 512  # writev takes at most IOV_MAX (1024 on Linux) pieces
_STREAM_PATH = re.compile(r"/v1/(sse|ndjson)\Z|/v1/topics/[^/]+/(sse|ndjson)\Z")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            503: b"Service Unavailable"}

Fallback = Callable[[trio.abc.Stream], Awaitable[None]]
_ASGI = {"version": "3.0"}  # shared by every scope (nobody writes to it)


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first bytes were already read: they are received again first."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket  # hypercorn reads the peer's address from it
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, b"\r\n"]


def _identity(data: bytes) -> list[bytes]:
    return [data]


def ws_text(data: bytes) -> list[bytes]:
    return [ws.frame_header(ws.Codec.JSON, len(data)), data]


def ws_binary(data: bytes) -> list[bytes]:
    return [ws.frame_header(ws.Codec.MSGPACK, len(data)), data]


class NativeSink:
    """The hub's `Sink` on a raw socket: ``frame`` turns a write into the pieces to send (an HTTP
    chunk, a WebSocket frame). What a non-blocking write leaves unsent is ``pending`` until the
    outlet's writer calls `flush` (or the next awaited write sends it first); until then, and
    while an awaited write holds the lock, `write_nowait` declines, so bytes stay in order."""

    # SSE and NDJSON connections are watched for hang-ups by `Hangups`, not by a task of theirs.
    watched = False
    hung_up = False
    _on_hangup: Callable[[], None] | None = None

    def notify_hangup(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when `Hangups` finds the client gone (at once if it has)."""
        self._on_hangup = callback
        if self.hung_up:
            callback()

    def hang_up(self) -> None:
        self.hung_up = True
        if self._on_hangup is not None:
            self._on_hangup()

    def __init__(self, stream: trio.SocketStream, frame: Callable[[bytes], list[bytes]]) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self.frame = frame
        self._lock: trio.Lock | None = None  # made when a write must wait (~1 KB each)
        self._pending = b""

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def write_nowait(self, data: bytes) -> bool:
        return self.writev_nowait(self.frame(data))

    def write_nowait_many(self, frames: Sequence[bytes]) -> bool:
        """Every frame in one ``writev``, or nothing."""
        if len(frames) == 1:
            return self.write_nowait(frames[0])
        return self.writev_nowait([part for data in frames for part in self.frame(data)])

    def write_run(self, run: Run, fmt: Format) -> bool:
        """A routed run, now or not at all: its bytes are framed once for every connection that
        frames them alike (the router's case, once per subscriber per batch)."""
        return self.send_nowait(run.wired(fmt, self.frame))

    def send_nowait(self, data: bytes) -> bool:
        """These bytes, as they are, in one write now; False (nothing written) when the socket
        would block or a write is in progress. The sink finishes a partial write."""
        if self._pending or (self._lock is not None and self._lock.locked()):
            return False
        try:
            sent = os.write(self._fd, data)
        except OSError:  # would block, or the peer is gone (the async write will say so)
            return False
        if sent < len(data):
            self._pending = data[sent:]
        return True

    def writev_nowait(self, parts: Sequence[bytes]) -> bool:
        """`send_nowait` of these pieces, in one ``writev``."""
        if self._pending or (self._lock is not None and self._lock.locked()):
            return False
        if len(parts) > _MAX_IOVEC:
            parts = (b"".join(parts),)
        try:
            sent = os.writev(self._fd, parts)
        except OSError:  # would block, or the peer is gone (the async write will say so)
            return False
        if sent < sum(map(len, parts)):
            self._pending = b"".join(parts)[sent:]
        return True

    async def write(self, data: bytes) -> None:
        await self.write_raw(b"".join(self.frame(data)))

    async def write_raw(self, data: bytes) -> None:
        """Bytes as they are (a response head, a WebSocket handshake or close), in order."""
        if self.send_nowait(data):
            if self._pending:
                await self.flush()
            return
        async with self._locked():
            await self._finish_pending()
            await self._stream.send_all(data)

    def preframed(self) -> PreframedSink:
        """This socket as a sink for writes that are already whole frames."""
        return PreframedSink(self)

    async def flush(self) -> None:
        """Send what a non-blocking write left unsent (blocks while the client does not read)."""
        async with self._locked():
            await self._finish_pending()

    def _locked(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    async def _finish_pending(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, b""
            await self._stream.send_all(pending)


class PreframedSink:
    """A `NativeSink` whose writes are already framed (WebSocket frames encoded once per event
    with their heads, so that every subscriber shares the same bytes); same socket, same order."""

    def __init__(self, sink: NativeSink) -> None:
        self._sink = sink

    def write_nowait(self, data: bytes) -> bool:
        return self._sink.send_nowait(data)

    def write_run(self, run: Run, fmt: Format) -> bool:
        return self._sink.send_nowait(run.joined(fmt))

    def write_nowait_many(self, frames: Sequence[bytes]) -> bool:
        return self._sink.writev_nowait(frames)

    async def write(self, data: bytes) -> None:
        await self._sink.write_raw(data)

    @property
    def pending(self) -> bool:
        return self._sink.pending

    async def flush(self) -> None:
        await self._sink.flush()


class Hangups:
    """One task that notices SSE and NDJSON clients leaving, for all of them: their sockets are
    in an epoll set of our own, whose descriptor trio watches. A client sends nothing after its
    request, so a readable socket is one that was closed or reset (its sink is told, and the
    outlet's writer ends) or that sent bytes nobody asked for (read and dropped, as the ASGI path
    does). A reading task per connection cost ~4 KB and a task switch per connection, a cancel
    scope ~300 bytes (decisions #22)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[trio.socket.SocketType, NativeSink]] = {}
        self._closing = False
        self._scope = trio.CancelScope()

    def watch(self, sock: trio.socket.SocketType, sink: NativeSink) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._watched[fd] = (sock, sink)

    def unwatch(self, sock: trio.socket.SocketType) -> None:
        fd = sock.fileno()
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        if self._closing and not self._watched:
            self._scope.cancel()

    def close(self) -> None:
        """The server is stopping: return once nothing is watched any more."""
        self._closing = True
        if not self._watched:
            self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                while True:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                    for fd, mask in self._epoll.poll(0):
                        self._ready(fd, mask)
        finally:
            self._epoll.close()

    def _ready(self, fd: int, mask: int) -> None:
        watched = self._watched.get(fd)
        if watched is None:
            return
        sock, sink = watched
        gone = bool(mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR))
        if not gone:
            try:
                gone = not os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                gone = True
        if gone:
            self.unwatch(sock)
            sink.hang_up()


def native_kind(request: h11.Request) -> str | None:
    """"http" or "websocket" when this request is served here, else None."""
    path = request.target.split(b"?", 1)[0].decode("latin-1")
    if request.method in (b"GET", b"HEAD") and _STREAM_PATH.match(path):
        return "http"
    if request.method == b"GET" and path == "/v1/ws":
        upgrade = next((v for k, v in request.headers if k == b"upgrade"), b"")
        if upgrade.lower() == b"websocket":
            return "websocket"
    return None


async def handle(
    stream: trio.SocketStream,
    *,
    app: ASGIApp | None,
    fallback: Fallback,
    max_ws_message: int,
    hangups: Hangups,
    node: Node | None = None,
) -> None:
    """One accepted connection: read its request head, then serve it here or hand it over.
    With ``app``, subscriber streams are served here; with ``node``, publish requests too
    (native_publish.py), one after another on a keep-alive connection, until a request comes
    that is not one."""
    parser, request, head = await _read_head(stream)
    if node is not None:
        served = None
        try:
            served = await _serve_publishes(stream, node, parser, request, head)
        finally:
            if served is None:  # done, broken or cancelled: the connection is ours to close
                await stream.aclose()
        if served is None:
            return None
        parser, request, head = served
        del served  # (it holds the parser: ~2 KB an open stream need not keep)
    kind = native_kind(request) if request is not None and app is not None else None
    if request is None or kind is None or app is None:
        return await fallback(PrefixedStream(stream, head))
    try:
        if kind == "http":
            # Served in this frame, not in a coroutine of its own: each frame a stream keeps
            # is memory per subscriber.
            scope, exchange = _http_exchange(stream, request)
            del request, head, parser
            # The client sends nothing after its request: it is not read by a task of its own,
            # but watched with every other stream by `Hangups`, which tells the sink if it leaves.
            hangups.watch(stream.socket, exchange.sink)
            try:
                await app(scope, exchange.receive, exchange.send)
            finally:
                hangups.unwatch(stream.socket)
        else:
            serve = _serve_websocket(stream, request, head, app, max_ws_message)
            del request, head, parser  # an idle socket keeps only what its handler kept
            await serve
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away, or its connection was cut
    except* Exception:
        logger.exception("native connection failed")
    finally:
        await stream.aclose()


Head = tuple[h11.Connection, h11.Request | None, bytes]


async def _serve_publishes(
    stream: trio.SocketStream, node: Node, parser: h11.Connection, request: h11.Request | None,
    head: bytes,
) -> Head | None:
    """Answer publish requests as long as they come; then the request that is not one (with the
    bytes read of it), or None when the connection is done."""
    try:
        while request is not None:
            route = native_publish.route(request, node)
            if route is None:
                break
            rest = await native_publish.serve(stream, parser, request, route, node)
            if rest is None:
                return None
            parser, request, head = await _read_head(stream, rest)
            if request is None and not head:  # the client closed, or left its connection idle
                return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        return None  # the client went away, or its connection was cut
    except Exception:  # a bug: this connection ends, the others go on
        logger.exception("native publish connection failed")
        return None
    return parser, request, head


async def _read_head(stream: trio.SocketStream, data: bytes = b"") -> Head:
    """The request (None if there is none, or not a valid one) and every byte read, from
    ``data`` (what came after the previous request) on, with the parser that read them."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    head = data
    event: Any = h11.NEED_DATA
    try:
        if data:  # (an empty receive_data is the end of the stream)
            parser.receive_data(data)
            event = parser.next_event()
        with trio.move_on_after(HEAD_TIMEOUT_SECONDS):
            while event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                head += data
                parser.receive_data(data)
                event = parser.next_event()
                if not data:
                    break
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        event = None
    return parser, (event if isinstance(event, h11.Request) else None), head


def _scope(stream: trio.SocketStream, request: h11.Request, kind: str) -> Scope:
    path, _, query = request.target.partition(b"?")
    sock = stream.socket
    headers = list(request.headers)  # h11 gives the names lowercased, as ASGI wants them
    scope: Scope = {
        "type": kind,
        "asgi": _ASGI,
        "http_version": request.http_version.decode(),
        "method": request.method.decode(),
        "scheme": "http" if kind == "http" else "ws",
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": tuple(sock.getpeername()),
        "server": None,  # optional in ASGI; nothing here reads it
        "extensions": {},
    }
    if kind == "websocket":
        scope["subprotocols"] = [
            p.strip().decode("latin-1")
            for name, value in headers if name == b"sec-websocket-protocol"
            for p in value.split(b",") if p.strip()
        ]
        scope["extensions"]["websocket.http.response"] = {}
    return scope


class _Exchange:
    """One native HTTP stream's ASGI ``receive`` and ``send`` (an object, not two closures: it
    lives as long as the stream)."""

    __slots__ = ("asked", "chunked", "head_only", "sink", "stream")

    def __init__(self, stream: trio.SocketStream, request: h11.Request) -> None:
        self.stream = stream
        self.chunked = request.http_version != b"1.0"  # an HTTP/1.0 body ends with the connection
        self.head_only = request.method == b"HEAD"
        self.sink = NativeSink(stream, chunk if self.chunked else _identity)
        self.asked = False

    async def receive(self) -> Message:
        if not self.asked:
            self.asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # nothing more is read from a stream's client: wait for it to leave
        while await self.stream.receive_some(4096):
            pass
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        sink = self.sink
        if message["type"] == "http.response.start":
            status = message["status"]
            lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))]
            lines += [b"%s: %s" % (name, value) for name, value in message.get("headers", ())]
            if self.chunked:
                lines.append(b"transfer-encoding: chunked")
            lines += [b"connection: close", b"", b""]
            await sink.write_raw(b"\r\n".join(lines))
        elif message["type"] == "http.response.body" and not self.head_only:
            body = message.get("body", b"")
            last = not message.get("more_body", False)
            data = b"".join(sink.frame(body)) if body else b""
            await sink.write_raw(data + (b"0\r\n\r\n" if last and self.chunked else b""))


def _http_exchange(stream: trio.SocketStream, request: h11.Request) -> tuple[Scope, _Exchange]:
    scope = _scope(stream, request, "http")
    exchange = _Exchange(stream, request)
    scope["extensions"]["broker.native"] = exchange.sink
    exchange.sink.watched = True
    return scope, exchange


async def _serve_websocket(
    stream: trio.SocketStream, request: h11.Request, head: bytes, app: ASGIApp, max_message: int
) -> None:
    scope = _scope(stream, request, "websocket")
    # The handshake's object (an h11 connection inside) until the upgrade, then only the frame
    # protocol: the handshake's state is ~4 KB that an open socket need not keep.
    connection: Any = wsproto.WSConnection(ConnectionType.SERVER)
    connection.receive_data(head)
    del request, head  # held for the socket's whole life otherwise
    events: Iterator[wse.Event] = connection.events()
    if not isinstance(next(events, None), wse.Request):  # wsproto refused the handshake
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        return
    sink = NativeSink(stream, ws_text)
    scope["extensions"]["broker.native"] = sink
    connected = False
    closed = False
    text: list[str] = []
    binary: list[bytes] = []

    async def receive() -> Message:
        nonlocal connected, closed, events
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        while True:
            for event in events:
                if isinstance(event, wse.TextMessage | wse.BytesMessage):
                    if isinstance(event, wse.TextMessage):
                        text.append(event.data)
                    else:
                        binary.append(bytes(event.data))
                    if sum(map(len, text)) + sum(map(len, binary)) > max_message:
                        await _close(1009, "message too big")
                        return {"type": "websocket.disconnect", "code": 1009}
                    if event.message_finished:
                        message: Message = {"type": "websocket.receive"}
                        if isinstance(event, wse.TextMessage):
                            message["text"] = "".join(text)
                        else:
                            message["bytes"] = b"".join(binary)
                        text.clear()
                        binary.clear()
                        return message
                elif isinstance(event, wse.Ping):
                    await sink.write_raw(connection.send(event.response()))
                elif isinstance(event, wse.CloseConnection):
                    if not closed:
                        closed = True
                        await sink.write_raw(connection.send(event.response()))
                    return {"type": "websocket.disconnect", "code": event.code}
            data = await stream.receive_some(65536)
            if not data:
                return {"type": "websocket.disconnect", "code": 1006}
            connection.receive_data(data)
            events = connection.events()

    async def _close(code: int, reason: str = "") -> None:
        nonlocal closed
        if not closed:
            closed = True
            await sink.write_raw(connection.send(wse.CloseConnection(code=code, reason=reason)))

    async def send(message: Message) -> None:
        kind = message["type"]
        nonlocal connection, events
        if kind == "websocket.accept":
            subprotocol = message.get("subprotocol")
            sink.frame = ws_binary if subprotocol == "broker.v1.msgpack" else ws_text
            accept = connection.send(wse.AcceptConnection(subprotocol=subprotocol))
            connection = connection.connection  # frames from here on (bytes already read too)
            events = connection.events()
            await sink.write_raw(accept)
        elif kind == "websocket.send":
            text = message.get("text")
            if text is not None:
                await sink.write_raw(b"".join(ws_text(text.encode())))
            else:
                await sink.write_raw(b"".join(ws_binary(message["bytes"])))
        elif kind == "websocket.close":
            await _close(message.get("code", 1000), message.get("reason") or "")
        elif kind == "websocket.http.response.start":
            headers = list(message.get("headers", ()))
            reject = wse.RejectConnection(status_code=message["status"], headers=headers,
                                          has_body=True)
            await sink.write_raw(connection.send(reject))
        elif kind == "websocket.http.response.body":
            await sink.write_raw(connection.send(wse.RejectData(data=message.get("body", b""))))

    await app(scope, receive, send)
