"""A `Subscriber`'s connection over WebSocket (``ws`` with JSON frames, ``ws-msgpack``).

`run_ws` runs one session until it ends (returns, also on a clean close: codes 1000 and 1012)
or fails (raises); it calls ``opened`` on the ``subscribed`` frame and hands what arrives to the
`Subscriber`, which resumes and de-duplicates. A refused handshake or an ``error`` frame
answering the subscribe is `SubscribeError` (5xx: `Unavailable`), anything else `BrokenError`.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from broker.client._limits import CONNECT_TIMEOUT_SECONDS, MAX_FRAME_BYTES
from broker.client.errors import SubscribeError, describe, problem_from_body, problem_from_ws_error
from broker.errors import BrokenError, CloseCode, ProtocolError, Unavailable
from broker.wire.ws import Codec, decode_frame, encode_frame

if TYPE_CHECKING:
    from broker.client.subscribe import Subscriber

CLOSE_GRACE_SECONDS = 1.0  # for the WebSocket close handshake when we leave
_CLEAN_CLOSE_CODES = {CloseCode.NORMAL, CloseCode.SERVICE_RESTART}  # come back and resume
_SUBSCRIBE_REF = "subscribe"
_PING_REF = "keepalive"

_Stream: TypeAlias = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def run_ws(sub: Subscriber, codec: Codec, opened: Callable[[], None]) -> None:
    url = "ws" + sub.base_url.removeprefix("http") + "/v1/ws"
    # We open (and always close) the TCP stream ourselves: trio-websocket 0.12 leaves it
    # open when the server closes first (as it does on drain, code 1012).
    stream = await _open_stream(url)
    session_error: BaseException | None = None
    reader_error: BaseException | None = None
    async with stream:
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                try:
                    await _session(sub, nursery, stream, url, codec, opened)
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


async def _session(
    sub: Subscriber,
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
        op: dict[str, object] = {"op": "subscribe", "topics": list(sub.topics)}
        op["ref"] = _SUBSCRIBE_REF
        position = sub._position()
        if position is not None:
            op["from_seq"] = position
        elif sub.start is not None:
            op["from"] = sub.start
        await socket.send_message(encode_frame(codec, op))
        await _read(sub, socket, codec, opened)
    except trio.Cancelled:
        # Leaving: the reader task is cancelled too, so no close frame could be answered.
        cancelled = True
        raise
    finally:
        if not cancelled:
            # Say goodbye, briefly: a dead server must not hold up the reconnect.
            with trio.move_on_after(CLOSE_GRACE_SECONDS, shield=True):
                await socket.aclose()


async def _read(
    sub: Subscriber, socket: WebSocketConnection, codec: Codec, opened: Callable[[], None]
) -> None:
    # The server sends a heartbeat frame after heartbeat_seconds of silence, but our timeout
    # may be the shorter: so we also ask for a frame (ping op) when the socket is quiet.
    ping_interval_seconds = sub.heartbeat_timeout_seconds / 3
    last_frame = trio.current_time()
    while True:
        message: str | bytes | None = None
        # Only the wait for a frame is timed: handing an item to a slow caller is not silence.
        with trio.move_on_after(ping_interval_seconds):
            message = await socket.get_message()
        if message is not None:
            last_frame = trio.current_time()
            await _on_frame(sub, decode_frame(codec, message), opened)
            continue
        silent_seconds = trio.current_time() - last_frame
        if silent_seconds >= sub.heartbeat_timeout_seconds:
            raise BrokenError(f"no frame for {silent_seconds:.1f} s")
        with trio.move_on_after(sub.heartbeat_timeout_seconds - silent_seconds):
            await socket.send_message(encode_frame(codec, {"op": "ping", "ref": _PING_REF}))


async def _on_frame(sub: Subscriber, frame: dict[str, Any], opened: Callable[[], None]) -> None:
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
        await sub._on_object(frame)


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
