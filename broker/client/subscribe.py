"""Subscribing: one `Subscriber` per subscription, on any transport, that survives disconnects.

A `Subscriber` runs one connection at a time. Whatever ends a connection (refused connect, the
server ending the stream on drain, a reset, ``heartbeat_timeout_seconds`` without a byte) it
connects again after an exponential backoff with full jitter (AWS Architecture Blog,
"Exponential Backoff and Jitter"), resuming from the last position it passed on, so the
iterator yields every event once, in seq order. Only a refusal (a 4xx problem document, or a
WebSocket ``error`` frame answering the subscribe) ends it: `SubscribeError`.

The connection task hands items to the iterator over an unbuffered channel, together with the
position they leave the subscription at, so `Subscriber.position` is always the position of what
the caller has taken: saved and passed back as ``from_seq``, it resumes without loss. One
connection is run by the transport's module: `broker.client._http_stream` (SSE, NDJSON,
long-poll) or `broker.client._websocket`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeAlias

import httpx
import trio

from broker.client._grpc import run_grpc, target_of
from broker.client._http_stream import MAX_POLL_SECONDS, run_ndjson, run_poll, run_sse, sse_topic
from broker.client._limits import CONNECT_TIMEOUT_SECONDS, MAX_FRAME_BYTES
from broker.client._websocket import CLOSE_GRACE_SECONDS, run_ws
from broker.client.events import (
    GapNotice,
    Message,
    Received,
    ResetNotice,
    from_object,
    parse_from_seq,
    server_position,
)
from broker.errors import BrokenError, ProtocolError, Unavailable
from broker.model import Position
from broker.wire.ws import Codec

__all__ = [
    # The limits were defined here before the transports moved out: still importable from here.
    "CLOSE_GRACE_SECONDS",
    "CONNECT_TIMEOUT_SECONDS",
    "MAX_FRAME_BYTES",
    "MAX_POLL_SECONDS",
    "STARTS",
    "TRANSPORTS",
    "State",
    "Subscriber",
    "Transport",
    "subscribe",
]

Transport: TypeAlias = Literal["sse", "ndjson", "ws", "ws-msgpack", "poll", "grpc"]
State: TypeAlias = Literal["connecting", "open", "backoff", "closed"]
TRANSPORTS: tuple[Transport, ...] = ("sse", "ndjson", "ws", "ws-msgpack", "poll", "grpc")
STARTS = ("earliest", "latest")

_MAX_BACKOFF_EXPONENT = 30  # 2**30 backoffs is past any sane maximum; keeps the float finite

# Failures a new connection may cure.
_RETRYABLE = (BrokenError, Unavailable)


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
        base_url: str | Sequence[str],
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
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        for url in urls:
            if transport == "grpc":
                target_of(url)  # grpc://HOST:PORT
            elif not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must be an http:// or https:// URL, got {url!r}")
        if not urls:
            raise ValueError("give at least one base_url")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if start is not None and start not in STARTS:
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if backoff_initial_seconds < 0 or backoff_max_seconds < 0:
            raise ValueError("backoff seconds must be >= 0")
        if heartbeat_timeout_seconds <= 0:
            raise ValueError("heartbeat_timeout_seconds must be > 0")
        # Several nodes of one cluster: after a failure the next connection goes to the next
        # node, resuming from the same position (the seqs are the cluster's, not the node's).
        self.base_urls = tuple(url.rstrip("/") for url in urls)
        self._node = 0
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
        self._sse_topic = sse_topic(self.topics)
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
                        self._node = (self._node + 1) % len(self.base_urls)
                        await trio.sleep(self._backoff_seconds(attempt))
                        attempt += 1
        except Exception as exc:
            if not started:
                raise
            self._error = exc
        finally:
            self.state = "closed"
            self._send.close()

    @property
    def base_url(self) -> str:
        """The node this subscriber connects to now."""
        return self.base_urls[self._node]

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
            await run_sse(self, http, opened)
        elif self.transport == "ndjson":
            await run_ndjson(self, http, opened)
        elif self.transport == "poll":
            await run_poll(self, http, opened)
        elif self.transport == "grpc":
            await run_grpc(self, opened)
        else:
            codec = Codec.JSON if self.transport == "ws" else Codec.MSGPACK
            await run_ws(self, codec, opened)

    # -- position and de-duplication -----------------------------------------------------------

    def _position(self) -> str | None:
        return None if self._seq is None else str(Position(self._seq, self._epoch))

    async def _deliver(self, item: Received, epoch: str | None = None) -> None:
        """Pass ``item`` on unless it was seen already; ``epoch`` is the epoch it came in."""
        if isinstance(item, ResetNotice):
            if item.epoch == self._epoch:
                return  # a reconnect into the same new log: already announced
            self._epoch, self._seq = item.epoch, 0
        elif isinstance(item, GapNotice) and item.topic is not None:
            # One topic's loss: the position stays, other topics' events in the range follow.
            if self._seq is not None and item.to_seq <= self._seq:
                return
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

    async def _on_object(self, obj: dict[str, Any]) -> None:
        """Take an object a JSON or msgpack transport carried: an event, or a stated position."""
        item = from_object(obj)
        if item is not None:
            await self._deliver(item)
        elif obj.get("type") in ("hello", "subscribed"):
            position = obj.get("position")
            if not isinstance(position, str):
                raise ProtocolError(f"{obj.get('type')} without a position: {obj!r:.120}")
            await self._adopt(position)

    def _learn_epoch(self, position: str) -> None:
        """Take the epoch of a position the server stated (a poll answer) if we know none yet.

        No reset can come: the server sends one only for a position with an epoch.
        """
        if self._epoch is None:
            self._epoch = server_position(position).epoch


@asynccontextmanager
async def subscribe(
    base_url: str | Sequence[str],
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
