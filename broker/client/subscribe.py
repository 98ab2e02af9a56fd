"""Subscribing: one `Subscriber` per subscription, on any transport, that survives disconnects.

A `Subscriber` runs one connection at a time. Whatever ends a connection (refused connect, the
server ending the stream on drain, a reset, ``heartbeat_timeout_seconds`` without a byte) it
connects again after an exponential backoff with full jitter (AWS Architecture Blog,
"Exponential Backoff and Jitter"), resuming from the last position it passed on, so the
iterator yields every event once, in seq order. Only a refusal (a 4xx problem document, or a
WebSocket ``error`` frame answering the subscribe) ends it: `SubscribeError`.

The connection task hands items to the iterator over an unbuffered channel, together with the
position they leave the subscription at, so `Subscriber.position` is always the position of what
the caller has taken: saved and passed back as ``from_seq``, it resumes without loss.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, Literal, TypeAlias, cast
from urllib.parse import urlsplit

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from broker.client.errors import SubscribeError, describe, problem_from_body, problem_from_ws_error
from broker.client.events import (
    Message,
    Received,
    ResetNotice,
    from_object,
    json_object,
    parse_from_seq,
    server_position,
)
from broker.errors import BrokenError, CloseCode, ProtocolError, Unavailable
from broker.model import Position
from broker.wire.ndjson import LineSplitter
from broker.wire.sse import SSEMessage, SSEParser
from broker.wire.ws import Codec, decode_frame, encode_frame

Transport: TypeAlias = Literal["sse", "ndjson", "ws", "ws-msgpack", "poll"]
State: TypeAlias = Literal["connecting", "open", "backoff", "closed"]
TRANSPORTS: tuple[Transport, ...] = ("sse", "ndjson", "ws", "ws-msgpack", "poll")
STARTS = ("earliest", "latest")

# httpx's default connect timeout is 5 s; a TLS handshake across continents can take longer.
CONNECT_TIMEOUT_SECONDS = 10.0
# A frame or line carries a payload of up to max_payload_bytes (1 MiB by default) as base64 or as
# JSON-escaped text (up to 6 bytes a character), plus its envelope: 16 MiB bounds all of those.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# A long-poll answers within its timeout; the server caps it at 30 s by default.
MAX_POLL_SECONDS = 30.0
CLOSE_GRACE_SECONDS = 1.0  # for the WebSocket close handshake when we leave
_MAX_BACKOFF_EXPONENT = 30  # 2**30 backoffs is past any sane maximum; keeps the float finite
_CLEAN_CLOSE_CODES = {CloseCode.NORMAL, CloseCode.SERVICE_RESTART}  # come back and resume
_SUBSCRIBE_REF = "subscribe"
_PING_REF = "keepalive"

_Stream: TypeAlias = trio.SocketStream | trio.SSLStream[trio.SocketStream]

# Failures a new connection may cure.
_RETRYABLE = (BrokenError, Unavailable)


def _is_literal(topic: str) -> bool:
    return not any(token in ("*", ">") for token in topic.split("."))


class Subscriber:
    """One subscription to ``topics`` (topics or patterns), read as an async iterator.

    Items are `Message`, `GapNotice` and `ResetNotice`, in order. Use `subscribe` to get one
    that is already connected; or start `run` in your own nursery and iterate.

    ``from_seq`` (a seq, or ``"<epoch>:<seq>"``) starts after that position; else ``start``
    (``"earliest"`` or ``"latest"``, the default). ``position`` is the position of the last item
    taken (``"<epoch>:<seq>"`` once the server has told the epoch); ``reconnects`` counts the
    connections made after the first; ``state`` is "connecting", "open", "backoff" or
    "closed".

    Transport notes. SSE does not carry the topic: a `Message` has the subscription's topic when
    it names one literal topic, else ``""``; its ``data`` is the UTF-8 of the SSE data (CR and
    CRLF turned into LF, and a payload that is not UTF-8 arrives as its base64, as the broker
    sends it); an event named ``message`` looks like one with no name. SSE tells the epoch only
    with the first event: a connection that drops before any event resumes from ``start``
    again, so with ``"latest"`` events published while it was away are not replayed. NDJSON,
    ``ws`` and ``poll`` carry no content type and give a JSON payload back as compact JSON;
    ``ws-msgpack`` gives every payload byte for byte.
    """

    def __init__(
        self,
        base_url: str,
        topics: str | Sequence[str],
        *,
        transport: Transport = "sse",
        from_seq: int | str | None = None,
        start: str | None = None,
        reconnect: bool = True,
        backoff_initial_seconds: float = 0.1,
        backoff_max_seconds: float = 5.0,
        # Three missed heartbeats at the broker's default of 15 s (the SSE comment, the NDJSON
        # empty line, the WebSocket heartbeat frame; on WebSocket the client also pings).
        heartbeat_timeout_seconds: float = 45.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if start is not None and start not in STARTS:
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if backoff_initial_seconds < 0 or backoff_max_seconds < 0:
            raise ValueError("backoff seconds must be >= 0")
        if heartbeat_timeout_seconds <= 0:
            raise ValueError("heartbeat_timeout_seconds must be > 0")
        self.base_url = base_url.rstrip("/")
        self.topics: tuple[str, ...] = (topics,) if isinstance(topics, str) else tuple(topics)
        self.transport = transport
        self.start = start
        self.reconnect = reconnect
        self.backoff_initial_seconds = backoff_initial_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.reconnects = 0
        self.state: State = "connecting"
        self.random = random.Random()  # replaceable, for a test that needs fixed delays
        self._client = client
        self._sse_topic = (
            self.topics[0] if len(self.topics) == 1 and _is_literal(self.topics[0]) else ""
        )
        # Where the connection task is: the resume point, also the de-duplication floor.
        self._epoch: str | None = None
        self._seq: int | None = None
        if from_seq is not None:
            initial = parse_from_seq(from_seq)
            self._epoch, self._seq = initial.epoch, initial.seq
        self.position: str | None = self._position()
        self._send, self._receive = trio.open_memory_channel[tuple[Received | None, str | None]](0)
        self._error: BaseException | None = None
        self._cancel_scope = trio.CancelScope()
        self._ran = False

    # -- the caller's side ---------------------------------------------------------------------

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Received:
        while True:
            try:
                item, position = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self._error is not None:
                    raise self._error from None
                raise StopAsyncIteration from None
            self.position = position
            if item is not None:  # None: only the position moved (a hello, an empty poll)
                return item

    async def aclose(self) -> None:
        """Stop the connection task; iteration then ends. Idempotent."""
        self._cancel_scope.cancel()
        self.state = "closed"
        await trio.lowlevel.checkpoint()

    # -- the connection task -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, deliver, reconnect; ``started`` once the first connection is open.

        An error before that (a refusal, or any failure with ``reconnect=False``) is raised
        here; after it, the error is raised by the iterator and this returns.
        """
        if self._ran:
            raise RuntimeError("a Subscriber runs once; make a new one")
        self._ran = True
        started = False
        attempt = 0

        def opened() -> None:
            nonlocal started, attempt
            self.state = "open"
            attempt = 0
            if started:
                self.reconnects += 1
            else:
                started = True
                task_status.started()

        try:
            with self._cancel_scope:
                async with self._http() as http:
                    while True:
                        self.state = "connecting"
                        failure: BrokenError | Unavailable | None = None
                        try:
                            await self._connect(http, opened)
                        except _RETRYABLE as exc:
                            failure = exc
                        if not self.reconnect:
                            if failure is not None:
                                raise failure
                            if not started:
                                raise BrokenError("the server closed the subscription at once")
                            return
                        self.state = "backoff"
                        await trio.sleep(self._backoff_seconds(attempt))
                        attempt += 1
        except Exception as exc:
            if not started:
                raise
            self._error = exc
        finally:
            self.state = "closed"
            self._send.close()

    def _backoff_seconds(self, attempt: int) -> float:
        """Full jitter: uniform over [0, min(max, initial * 2**attempt)]."""
        ceiling = self.backoff_initial_seconds * 2 ** min(attempt, _MAX_BACKOFF_EXPONENT)
        return self.random.uniform(0, min(self.backoff_max_seconds, ceiling))

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient() as http:
            yield http

    async def _connect(self, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
        """One connection, until it ends (returns) or fails (raises)."""
        if self.transport == "sse":
            await self._run_sse(http, opened)
        elif self.transport == "ndjson":
            await self._run_ndjson(http, opened)
        elif self.transport == "poll":
            await self._run_poll(http, opened)
        else:
            codec = Codec.JSON if self.transport == "ws" else Codec.MSGPACK
            await self._run_ws(codec, opened)

    # -- position and de-duplication -----------------------------------------------------------

    def _position(self) -> str | None:
        return None if self._seq is None else str(Position(self._seq, self._epoch))

    async def _deliver(self, item: Received, epoch: str | None = None) -> None:
        """Pass ``item`` on unless it was seen already; ``epoch`` is the epoch it came in."""
        if isinstance(item, ResetNotice):
            if item.epoch == self._epoch:
                return  # a reconnect into the same new log: already announced
            self._epoch, self._seq = item.epoch, 0
        else:
            seq = item.seq if isinstance(item, Message) else item.to_seq
            if self._seq is not None and seq <= self._seq:
                return  # delivered already, or covered by a gap announced already
            self._seq = seq
            if epoch is not None:
                self._epoch = epoch
        await self._send.send((item, self._position()))

    async def _adopt(self, text: str) -> None:
        """Take a position the server stated (NDJSON hello, WS subscribed, a poll answer)."""
        position = server_position(text)
        if position.epoch is not None and self._epoch not in (None, position.epoch):
            return  # the log was replaced: the reset notice that goes with it moves us
        before = self._position()
        self._epoch = position.epoch or self._epoch
        self._seq = position.seq if self._seq is None else max(self._seq, position.seq)
        if self._position() != before:
            await self._send.send((None, self._position()))

    def _query(self, *, with_position: bool = True) -> list[tuple[str, str]]:
        query = [("topic", topic) for topic in self.topics]
        position = self._position()
        if with_position and position is not None:
            query.append(("from_seq", position))
        elif position is None and self.start is not None:
            query.append(("from", self.start))
        return query

    # -- HTTP transports -----------------------------------------------------------------------

    @asynccontextmanager
    async def _stream(
        self,
        http: httpx.AsyncClient,
        path: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """A streaming GET's body chunks; httpx's read timeout is the heartbeat timeout."""
        url = self.base_url + path
        timeout = httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=self.heartbeat_timeout_seconds)
        try:
            async with http.stream(
                "GET", url, params=tuple(query), headers=headers, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    _raise_refusal(response)
                # aiter_raw is an async generator: close it here, not when it is collected.
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                async with aclosing(chunks):
                    yield chunks
        except httpx.ReadTimeout as exc:
            raise BrokenError(f"{url}: no bytes for {self.heartbeat_timeout_seconds} s") from exc
        except httpx.HTTPError as exc:
            raise BrokenError(f"{url}: {describe(exc)}") from exc

    async def _run_sse(self, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
        headers = {"Accept": "text/event-stream"}
        position = self._position()
        if position is not None:
            headers["Last-Event-ID"] = position  # what EventSource sends when it reconnects
        query = self._query(with_position=False)
        async with self._stream(http, "/v1/sse", query, headers) as chunks:
            opened()
            parser = SSEParser(max_line_bytes=MAX_FRAME_BYTES)
            async for chunk in chunks:
                for message in parser.feed(chunk):
                    await self._on_sse(message)
                if parser.last_event_id and parser.last_event_id != self._position():
                    # An id with no data (not sent today) states a position without an event.
                    await self._adopt(parser.last_event_id)

    async def _on_sse(self, message: SSEMessage) -> None:
        position = server_position(message.id) if message.id else None
        epoch = position.epoch if position is not None else None
        if message.event in ("gap", "reset"):
            obj = json_object(message.data)
            item = from_object({**obj, "type": message.event})
            assert item is not None
            await self._deliver(item, epoch)
            return
        if position is None:
            raise ProtocolError(f"SSE event without an id: {message!r:.120}")
        event = None if message.event == "message" else message.event
        data = message.data.encode("utf-8")
        await self._deliver(Message(position.seq, self._sse_topic, data, None, event), epoch)

    async def _run_ndjson(self, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
        async with self._stream(http, "/v1/ndjson", self._query(), {}) as chunks:
            opened()
            splitter = LineSplitter(max_line_bytes=MAX_FRAME_BYTES)
            async for chunk in chunks:
                for line in splitter.feed(chunk):
                    if line:  # an empty line is the heartbeat
                        await self._on_object(json_object(line))

    async def _on_object(self, obj: dict[str, Any]) -> None:
        item = from_object(obj)
        if item is not None:
            await self._deliver(item)
        elif obj.get("type") in ("hello", "subscribed"):
            position = obj.get("position")
            if not isinstance(position, str):
                raise ProtocolError(f"{obj.get('type')} without a position: {obj!r:.120}")
            await self._adopt(position)

    async def _run_poll(self, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
        url = self.base_url + "/v1/poll"
        # The server must answer well before the heartbeat timeout calls the request dead.
        wait_seconds = min(MAX_POLL_SECONDS, self.heartbeat_timeout_seconds / 2)
        timeout = httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=self.heartbeat_timeout_seconds)
        is_open = False
        while True:
            # The first poll of a subscription with no position returns at once: it fixes
            # where "latest" is, so that the subscription is open when `subscribe` returns.
            seconds = 0.0 if self._seq is None else wait_seconds
            query = [*self._query(), ("timeout", f"{seconds:g}")]
            try:
                response = await http.get(url, params=tuple(query), timeout=timeout)
            except httpx.ReadTimeout as exc:
                seconds = self.heartbeat_timeout_seconds
                raise BrokenError(f"{url}: no answer in {seconds} s") from exc
            except httpx.HTTPError as exc:
                raise BrokenError(f"{url}: {describe(exc)}") from exc
            if response.status_code != 200:
                _raise_refusal(response)
            if not is_open:  # a "connection" is a run of answered polls
                opened()
                is_open = True
            body = json_object(response.content)
            events, position = body.get("events"), body.get("position")
            if not isinstance(events, list) or not isinstance(position, str):
                raise ProtocolError(f"poll answer without events and position: {body!r:.120}")
            if self._epoch is None:
                # Learn the epoch before the events, so that they leave "<epoch>:<seq>" behind.
                # No reset can come: the server sends one only for a position with an epoch.
                self._epoch = server_position(position).epoch
            for obj in events:
                if not isinstance(obj, dict):
                    raise ProtocolError(f"poll event is not an object: {obj!r:.120}")
                await self._on_object(obj)
            await self._adopt(position)

    # -- WebSocket -----------------------------------------------------------------------------

    async def _run_ws(self, codec: Codec, opened: Callable[[], None]) -> None:
        url = "ws" + self.base_url.removeprefix("http") + "/v1/ws"
        # We open (and always close) the TCP stream ourselves: trio-websocket 0.12 leaves it
        # open when the server closes first (as it does on drain, code 1012).
        stream = await _open_stream(url)
        session_error: BaseException | None = None
        reader_error: BaseException | None = None
        async with stream:
            try:
                async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                    try:
                        await self._ws_session(nursery, stream, url, codec, opened)
                    except BaseException as exc:  # re-raised below, outside the nursery
                        session_error = exc
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                reader_error = next(
                    (e for e in _leaves(group) if not isinstance(e, trio.Cancelled)), None
                )
        if isinstance(session_error, trio.Cancelled) and reader_error is not None:
            # The reader failed (the handshake was refused, the peer broke the protocol...)
            # and cancelled the session: that is what this connection ended with.
            session_error = reader_error
            if not isinstance(reader_error, HandshakeError | ConnectionClosed):
                session_error = BrokenError(f"{url}: {describe(reader_error)}")
                session_error.__cause__ = reader_error
        # A reader failure after the session ended (while closing) changes nothing.
        if session_error is not None:
            _raise_ws_failure(session_error, url)

    async def _ws_session(
        self,
        nursery: trio.Nursery,
        stream: _Stream,
        url: str,
        codec: Codec,
        opened: Callable[[], None],
    ) -> None:
        parts = urlsplit(url)
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
            socket = await wrap_client_stream(
                nursery,
                stream,
                parts.netloc.rpartition("@")[2],  # the Host header
                parts.path,
                subprotocols=[codec.value],
                max_message_size=MAX_FRAME_BYTES,
            )
        cancelled = False
        try:
            op: dict[str, object] = {"op": "subscribe", "topics": list(self.topics)}
            op["ref"] = _SUBSCRIBE_REF
            position = self._position()
            if position is not None:
                op["from_seq"] = position
            elif self.start is not None:
                op["from"] = self.start
            await socket.send_message(encode_frame(codec, op))
            await self._read_ws(socket, codec, opened)
        except trio.Cancelled:
            # Leaving: the reader task is cancelled too, so no close frame could be answered.
            cancelled = True
            raise
        finally:
            if not cancelled:
                # Say goodbye, briefly: a dead server must not hold up the reconnect.
                with trio.move_on_after(CLOSE_GRACE_SECONDS, shield=True):
                    await socket.aclose()

    async def _read_ws(
        self, socket: WebSocketConnection, codec: Codec, opened: Callable[[], None]
    ) -> None:
        # The server sends a heartbeat frame after heartbeat_seconds of silence, but our timeout
        # may be the shorter: so we also ask for a frame (ping op) when the socket is quiet.
        ping_interval_seconds = self.heartbeat_timeout_seconds / 3
        last_frame = trio.current_time()
        while True:
            message: str | bytes | None = None
            # Only the wait for a frame is timed: handing an item to a slow caller is not silence.
            with trio.move_on_after(ping_interval_seconds):
                message = await socket.get_message()
            if message is not None:
                last_frame = trio.current_time()
                await self._on_frame(decode_frame(codec, message), opened)
                continue
            silent_seconds = trio.current_time() - last_frame
            if silent_seconds >= self.heartbeat_timeout_seconds:
                raise BrokenError(f"no frame for {silent_seconds:.1f} s")
            with trio.move_on_after(self.heartbeat_timeout_seconds - silent_seconds):
                await socket.send_message(encode_frame(codec, {"op": "ping", "ref": _PING_REF}))

    async def _on_frame(self, frame: dict[str, Any], opened: Callable[[], None]) -> None:
        kind = frame.get("type")
        if kind == "error":
            status, problem = problem_from_ws_error(frame)
            if frame.get("ref") != _SUBSCRIBE_REF:
                raise ProtocolError(f"unexpected error frame: {frame!r:.200}")
            if status >= 500:
                raise Unavailable(str(problem.get("detail")))
            raise SubscribeError(status, problem)
        if kind == "subscribed":
            opened()
        if kind not in ("pong", "heartbeat"):
            await self._on_object(frame)


async def _open_stream(url: str) -> _Stream:
    """A TCP (``ws:``) or TLS (``wss:``) stream to the URL's host; BrokenError if none."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
            if tls:
                return await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            return await trio.open_tcp_stream(host, port)
    except (OSError, ValueError, trio.TooSlowError) as exc:  # ValueError: a bad port
        raise BrokenError(f"{url}: cannot connect: {describe(exc)}") from exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _raise_ws_failure(exc: BaseException, url: str) -> None:
    """Raise what a WebSocket session ended with, in our terms; return on a clean close."""
    if isinstance(exc, ConnectionRejected):
        status = exc.status_code
        problem = problem_from_body(status, "", exc.body or b"")
        if status < 500:  # a redirect or a refusal: asking again gets the same answer
            raise SubscribeError(status, problem) from exc
        raise Unavailable(f"{url}: handshake answered {status}: {problem}") from exc
    if isinstance(exc, ConnectionClosed):
        code = exc.reason.code if exc.reason is not None else None
        if code in _CLEAN_CLOSE_CODES:
            return
        raise BrokenError(f"{url}: closed with code {code}: {exc.reason}") from exc
    if isinstance(exc, HandshakeError | trio.BrokenResourceError | trio.ClosedResourceError):
        raise BrokenError(f"{url}: {describe(exc)}") from exc
    if isinstance(exc, trio.TooSlowError):
        raise BrokenError(f"{url}: no handshake in {CONNECT_TIMEOUT_SECONDS} s") from exc
    raise exc


def _raise_refusal(response: httpx.Response) -> None:
    problem = problem_from_body(response.status_code, response.reason_phrase, response.content)
    if response.status_code < 500:  # a redirect or a refusal: asking again gets the same
        raise SubscribeError(response.status_code, problem)
    raise Unavailable(f"{response.url}: {response.status_code} {problem.get('detail', '')}")


@asynccontextmanager
async def subscribe(
    base_url: str,
    topics: str | Sequence[str],
    *,
    transport: Transport = "sse",
    from_seq: int | str | None = None,
    start: str | None = None,
    reconnect: bool = True,
    backoff_initial_seconds: float = 0.1,
    backoff_max_seconds: float = 5.0,
    heartbeat_timeout_seconds: float = 45.0,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[Subscriber]:
    """A connected `Subscriber`: events published after this returns are delivered.

    ``async with subscribe(url, ["chat.*"]) as sub: async for item in sub: ...``. Raises
    `SubscribeError` if the server refuses the subscription. While it cannot connect at all it
    keeps trying (``reconnect=True``; put a deadline around it) or raises `BrokenError`.
    """
    subscriber = Subscriber(
        base_url,
        topics,
        transport=transport,
        from_seq=from_seq,
        start=start,
        reconnect=reconnect,
        backoff_initial_seconds=backoff_initial_seconds,
        backoff_max_seconds=backoff_max_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        client=client,
    )
    # Errors are re-raised outside the nursery, so that neither ours nor the caller's comes out
    # wrapped in an ExceptionGroup (the connection task itself never raises once started).
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(subscriber.run)
            yield subscriber
        except BaseException as exc:
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
