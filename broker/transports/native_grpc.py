"""gRPC on the broker's own HTTP/2 listener: ``Subscribe`` streams written straight to the socket,
every other call proxied to the grpc.aio server (the complete slow path, on a loopback port).

Why: grpc.aio costs ~44 us of the broker's core per message written (a C-core operation, its
completion thread, and the crossing from trio into asyncio), so 100 subscribers at one write
per 5 ms saturate a core. Here a write is what it is for SSE: the pre-encoded ``Delivery`` with
a 5-byte gRPC prefix and a 9-byte DATA frame head, one non-blocking ``writev`` from the router.

h2 (hypercorn's HTTP/2 library) keeps the connection's state: it parses what the client sends,
answers SETTINGS and PING, encodes HEADERS (HPACK) and keeps the flow-control windows. DATA
frames of a subscription are framed here and written past h2, and the windows h2 keeps are
lowered here by what they carried: h2's counters stay the only ones.

No grpc import: the calls it cannot serve itself go to a `Backend` (``transports/grpc.py``).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import math
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from broker.encoding import Format, Run
from broker.transports.native import _MAX_IOVEC

logger = logging.getLogger("broker.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SUBSCRIBE = b"/broker.v1.Broker/Subscribe"

# Status codes (grpc/doc/statuscodes.md), without importing grpc.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, UNIMPLEMENTED = 8, 13, 14, 12

_DATA_HEAD = struct.Struct(">IBI")  # length << 8 | type 0 (DATA), flags, stream id
_MESSAGE_HEAD = struct.Struct(">BI")  # compressed flag, length
_HEADS = struct.Struct(">IBIBI")  # a DATA frame's head and its one message's, together
# What a client may send on a stream before the call has taken it (at least one whole message
# of the largest size allowed), and on the connection, over all its streams.
_RECEIVE_WINDOW = 2 * 1024 * 1024
_CONNECTION_RECEIVE_WINDOW = 16 * 1024 * 1024
_MAX_STREAMS = 1000
# Headers a proxied call does not pass on as metadata (HTTP/2's and gRPC's own).
_RESERVED = frozenset(
    {
        b"content-type",
        b"te",
        b"grpc-timeout",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"user-agent",
        b"host",
        b"connection",
        b"accept-encoding",
        b"content-length",
    }
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

Metadata = Sequence[tuple[str, str | bytes]]


class BackendCall(Protocol):
    """One call on the grpc.aio server, any of the four kinds (on the wire they are alike)."""

    async def write(self, message: bytes) -> None: ...
    async def done_writing(self) -> None: ...
    async def read(self) -> bytes | None: ...  # None at the end of the responses
    async def initial_metadata(self) -> Metadata: ...
    async def status(self) -> tuple[int, str, Metadata]: ...  # code, details, trailers
    async def cancel(self) -> None: ...


class Backend(Protocol):
    async def open(
        self, method: str, metadata: Metadata, time_limit: float | None
    ) -> BackendCall: ...

    async def subscribe(self, request: bytes, sink: StreamSink) -> tuple[int, str]:
        """Serve one ``Subscribe`` on ``sink`` until it ends: the status to end it with."""
        ...


class CallError(Exception):
    """Ends a call with this status before its answer started."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def grpc_message(details: str) -> bytes:
    """``grpc-message``: percent-encoded UTF-8 (the printable ASCII but ``%`` as it is)."""
    out = bytearray()
    for byte in details.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (e.g. ``100m``) in seconds; None when malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def split_messages(buffer: bytearray, limit: int) -> list[bytes]:
    """Take the whole length-prefixed messages at the front of ``buffer``. `CallError` for a
    compressed one (we announce ``identity`` only) or one over ``limit`` bytes."""
    messages = []
    while len(buffer) >= 5:
        compressed, length = _MESSAGE_HEAD.unpack_from(buffer)
        if compressed:
            raise CallError(UNIMPLEMENTED, "compressed messages are not supported (identity)")
        if length > limit:
            raise CallError(
                RESOURCE_EXHAUSTED, f"a message of {length} bytes is over the limit of {limit}"
            )
        if len(buffer) < 5 + length:
            break
        messages.append(bytes(buffer[5 : 5 + length]))
        del buffer[: 5 + length]
    return messages


class Writer:
    """A connection's bytes out, in the order they are given: written at once when the socket
    takes them, else queued for the connection's writer task (`run`)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        on_drained: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._on_broken = on_broken
        self.broken = False
        self._fd = stream.socket.fileno()
        self._queue: list[bytes | memoryview] = []
        # Bytes are queued or being sent by `run`: what comes next must follow them. A plain
        # attribute, not a property: the router reads it once per subscriber per batch.
        self.blocked = False
        self._wake = trio.Event()
        self._on_drained = on_drained

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write now what the socket takes; the rest goes out next, before anything else."""
        if self.blocked:  # (never once broken: `run` unblocks as it breaks)
            self._queue.extend(parts)
            self._wake.set()
            return
        if len(parts) > _MAX_IOVEC:
            parts = (b"".join(parts),)
        self.send_now(parts, sum(map(len, parts)))

    def send_now(self, parts: Sequence[bytes | memoryview], total: int) -> None:
        """`send` while not `blocked`, of at most `_MAX_IOVEC` parts whose ``total`` size the
        caller knows: the router's one-frame write calls it directly (~0.3 us of ~1.1 us per
        write saved)."""
        if self.broken:
            return
        try:
            sent = os.writev(self._fd, parts)
        except OSError:  # would block, or the peer is gone (`run` will say which)
            sent = 0
        if sent != total:
            self._queue.append(b"".join(parts)[sent:])
            self.blocked = True
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                data = b"".join(self._queue)
                self._queue.clear()
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.broken = True  # what comes next is dropped by `send`
                    self._queue.clear()
                    self.blocked = False
                    self._on_broken()
                    return
            self.blocked = False
            self._on_drained()


# A stream's flow-control credit (`StreamSink`): taken in steps of at most this much beyond
# the write at hand, and only while the connection's window keeps this much for other streams.
CREDIT_STEP = 1 << 20
CREDIT_FLOOR = 1 << 20


class StreamSink:
    """A server stream's `DirectSink`: each write is one gRPC message (a ``Delivery``) in DATA
    frames, written when the socket is free and the flow-control windows allow it whole.

    The sink lowers h2's windows ahead of its writes and keeps the difference as ``_credit``:
    a write then reads only the sink (h2's two window counters and the stream's state machine
    are three more objects per subscriber; at 1,000 subscribers, with every one out of the
    CPU's caches, reading them was ~2 of a write's ~2.5 us of Python). Credit beyond the write
    at hand is taken only from a connection window that keeps `CREDIT_FLOOR` for the other
    streams, and is given back when the stream ends or the peer changes its settings."""

    pending = False  # what the socket does not take is the connection's to send (`Writer`)

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self._h2c = connection.h2
        self._h2_stream = connection.h2.streams[stream_id]
        self._writer = connection.writer
        self._max_frame = connection.max_frame
        self._credit = 0  # bytes by which both windows are lowered and not yet sent
        self.closed = False  # the stream has ended: nothing more is written

    def write_nowait(self, data: bytes) -> bool:
        """The router's case, in one step: one message in one DATA frame, written now (inline,
        not `_send_framed`: this runs once per subscriber per batch)."""
        size = len(data) + 5
        writer = self._writer
        if size > self._credit or size > self._max_frame or writer.blocked:
            # more credit, split into frames, or declined (a closed sink has no credit)
            return self._write_messages((data,))
        self._credit -= size
        writer.send_now((_HEADS.pack(size << 8, 0, self._stream_id, 0, len(data)), data), size + 9)
        return True

    def write_nowait_many(self, frames: Sequence[bytes]) -> bool:
        return self._write_messages(frames)

    def write_run(self, run: Run, fmt: Format) -> bool:
        return self.write_nowait(run.joined(fmt))

    def _write_messages(self, messages: Sequence[bytes]) -> bool:
        """Several messages, or one over the frame size: all now in DATA frames, or nothing."""
        body = b"".join(
            part for data in messages for part in (_MESSAGE_HEAD.pack(0, len(data)), data)
        )
        if self._writer.blocked or self.closed or not self._reserve(len(body)):
            return False
        self._send_framed(memoryview(body))
        return True

    async def write(self, data: bytes) -> None:
        """One message, in as many pieces as the windows allow, waiting for them to open."""
        if self.write_nowait(data):
            return
        connection = self._connection
        body = memoryview(_MESSAGE_HEAD.pack(0, len(data)) + data)
        while body:
            if self.closed:
                raise trio.BrokenResourceError("the stream was reset")
            window = self._credit + self._window()
            if self._writer.blocked or window <= 0:
                await connection.changed()
                continue
            piece = body[:window]
            self._reserve(len(piece))
            self._send_framed(piece)
            body = body[window:]

    def _window(self) -> int:
        """What h2's flow-control windows let us send on this stream now, beyond our credit."""
        return min(
            self._h2c.outbound_flow_control_window, self._h2_stream.outbound_flow_control_window
        )

    def _reserve(self, size: int) -> bool:
        """Credit for ``size`` bytes, taken from the windows now; False (nothing taken) if they
        do not allow it. Takes up to `CREDIT_STEP` more while the connection's window keeps
        `CREDIT_FLOOR` for other streams."""
        need = size - self._credit
        if need <= 0:
            return True
        if need > self._window():
            return False
        h2c, stream = self._h2c, self._h2_stream
        spare = min(
            CREDIT_STEP,
            stream.outbound_flow_control_window,
            h2c.outbound_flow_control_window - CREDIT_FLOOR,
        )
        taken = max(need, spare)
        h2c.outbound_flow_control_window -= taken
        stream.outbound_flow_control_window -= taken
        self._credit += taken
        return True

    def _send_framed(self, body: memoryview) -> None:
        """``body`` (reserved: within our credit) in DATA frames of at most the peer's frame
        size. The frames are slices of ``body``, not copies (one `writev` takes them all)."""
        max_frame = self._max_frame
        parts: list[bytes | memoryview] = []
        for start in range(0, len(body), max_frame):
            piece = body[start : start + max_frame]
            parts.append(_DATA_HEAD.pack(len(piece) << 8, 0, self._stream_id))
            parts.append(piece)
        self._credit -= len(body)
        self._writer.send(parts)

    def _give_back(self) -> None:
        """Return the credit to h2's windows (as if never taken)."""
        if self._credit:
            self._h2c.outbound_flow_control_window += self._credit
            self._h2_stream.outbound_flow_control_window += self._credit
            self._credit = 0
            self._connection.window_opened()

    def settings_changed(self) -> None:
        """The peer changed its settings: a smaller initial window may have shrunk the stream's
        (credit must not outlast it), and the frame size may have changed."""
        self._give_back()
        self._max_frame = self._connection.max_frame

    def close(self) -> None:
        """The stream has ended (reset by the client, or finished by us)."""
        self.closed = True
        self._give_back()

    async def flush(self) -> None:
        return None


class Connection:
    """One client connection: h2's state, its writer, and its calls (by stream id)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        backend: Backend,
        limit: int,
        keepalive: tuple[float, float],
    ) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.keepalive = keepalive  # ping after this long without a frame; give up after this
        self._heard = trio.current_time()
        self._ping_answered = trio.Event()
        self.h2 = h2.connection.H2Connection(config)
        self.stream = stream
        self.backend = backend
        self.limit = limit  # the largest request message
        self.writer = Writer(stream, self._changed, self.abort)
        self._scope = trio.CancelScope()
        self.max_frame = 16_384
        self.calls: dict[int, Call] = {}
        self._change = trio.Event()

    def abort(self) -> None:
        """Close the connection now (its client is gone, or takes nothing)."""
        self._scope.cancel()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    def window_opened(self) -> None:
        """A sink gave credit back: writes waiting for a window may go on."""
        self._changed()

    async def changed(self) -> None:
        """Wait for a window to open or the writer to drain."""
        await self._change.wait()

    def flush_h2(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.send((data,))

    async def serve(self, data: bytes) -> None:
        h2c = self.h2
        h2c.initiate_connection()
        h2c.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: min(
                    2**31 - 1, max(_RECEIVE_WINDOW, self.limit + 5)
                ),
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS,
            }
        )
        h2c.increment_flow_control_window(_CONNECTION_RECEIVE_WINDOW)
        self.flush_h2()
        with self._scope:
            await self._serve(data)

    async def _serve(self, data: bytes) -> None:
        h2c = self.h2
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.writer.run)
            nursery.start_soon(self._keep_alive)
            try:
                while data:
                    self._heard = trio.current_time()
                    try:
                        events = h2c.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        self.flush_h2()  # h2 has queued its GOAWAY
                        break
                    for event in events:
                        self._handle(event)
                    self.flush_h2()
                    data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                for call in list(self.calls.values()):
                    call.reset()
            with trio.move_on_after(1.0):
                await self._drained()
            nursery.cancel_scope.cancel()

    async def _keep_alive(self) -> None:
        """Ping a connection silent for ``keepalive[0]`` seconds; close it if the answer has not
        come ``keepalive[1]`` seconds later (a peer gone without a word, as grpc.aio does).

        Not while a ``Subscribe`` stream is open on it: that stream is written at least once a
        heartbeat, a peer that is gone stops acknowledging those writes, and TCP_USER_TIMEOUT
        (or the stalled-write watchdog) ends the connection, as for SSE. A ping would repeat
        that at a cost: 1,000 idle gRPC subscribers took 2.1 % of the broker's core with one
        every 20 s, 1,000 idle SSE subscribers 0.4 %."""
        idle, patience = self.keepalive
        streaming = -math.inf  # when a Subscribe stream was last seen open
        while True:
            await trio.sleep_until(max(self._heard, streaming) + idle)
            now = trio.current_time()
            if now < max(self._heard, streaming) + idle:
                continue  # heard from meanwhile
            if any(call.subscribed for call in self.calls.values()):
                streaming = now
                continue
            self._ping_answered = trio.Event()
            self.h2.ping(b"keepaliv")
            self.flush_h2()
            with trio.move_on_after(patience):
                await self._ping_answered.wait()
                continue
            logger.info("grpc peer silent: closed", extra={"seconds": idle + patience})
            self.abort()
            return

    async def _drained(self) -> None:
        while self.writer.blocked:
            await self.changed()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            call = Call(self, event.stream_id, dict(event.headers or ()))
            self.calls[event.stream_id] = call
            self.nursery.start_soon(call.run)
        elif isinstance(event, h2.events.DataReceived):
            receiver = self.calls.get(event.stream_id)
            if receiver is None:  # a stream we have ended: give the window back
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                receiver.received(event.data or b"", event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            if (ended := self.calls.get(event.stream_id)) is not None:
                ended.half_closed()
        elif isinstance(event, h2.events.StreamReset):
            if (reset := self.calls.get(event.stream_id)) is not None:
                reset.reset()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_FRAME_SIZE)
            if changed is not None:
                self.max_frame = changed.new_value
            for call in list(self.calls.values()):
                if call.sink is not None:
                    call.sink.settings_changed()
            self._changed()
        elif isinstance(event, h2.events.WindowUpdated):
            self._changed()
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_answered.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            for call in list(self.calls.values()):
                call.reset()


class Call:
    """One stream: a ``Subscribe`` served here, or anything else proxied to the backend."""

    def __init__(self, connection: Connection, stream_id: int, headers: dict[bytes, bytes]):
        self.connection = connection
        self.stream_id = stream_id
        self.headers = headers
        self.scope = trio.CancelScope()
        self._buffer = bytearray()
        self._messages: collections.deque[bytes] = collections.deque()
        self._arrived = trio.Event()
        self._ended = False  # the client sends no more
        self._error: CallError | None = None
        self._answered = False  # response headers sent
        self.sink: StreamSink | None = None  # the responses' sink, once they start
        self.subscribed = False  # a Subscribe stream: written at least once a heartbeat

    # -- from the connection's reader ---------------------------------------------------------

    def received(self, data: bytes, flow_controlled: int) -> None:
        self._ack(flow_controlled - len(data))  # padding
        if self._error is not None:
            self._ack(len(data))
            return
        self._buffer += data
        try:
            self._messages.extend(split_messages(self._buffer, self.connection.limit))
        except CallError as error:
            self._error = error
            self._ack(len(self._buffer) + sum(len(m) + 5 for m in self._messages))
            self._buffer.clear()
            self._messages.clear()
        self._arrived.set()

    def half_closed(self) -> None:
        self._ended = True
        self._arrived.set()

    def reset(self) -> None:
        self.connection.calls.pop(self.stream_id, None)
        if self.sink is not None:
            self.sink.close()
        self._ended = True
        self.scope.cancel()
        self._arrived.set()

    def _ack(self, n: int) -> None:
        if n > 0 and self.stream_id in self.connection.calls:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.connection.h2.acknowledge_received_data(n, self.stream_id)

    async def next_message(self) -> bytes | None:
        """The client's next message, or None after its last."""
        while True:
            if self._error is not None:
                raise self._error
            if self._messages:
                # A message's bytes are given back to the client's window when it is taken:
                # a client cannot send faster than the call takes (the window fits any one).
                message = self._messages.popleft()
                self._ack(len(message) + 5)
                self.connection.flush_h2()
                return message
            if self._ended:
                if self._buffer:
                    raise CallError(INTERNAL, "the request ended inside a message")
                return None
            self._arrived = trio.Event()
            await self._arrived.wait()

    # -- the call's task ----------------------------------------------------------------------

    async def run(self) -> None:
        result: tuple[int, str, Metadata] | None = None
        with self.scope:
            try:
                result = await self._serve()
            except CallError as error:
                result = (error.code, error.message, ())
            except Exception:
                logger.exception("grpc call failed", extra={"path": self.path})
                result = (INTERNAL, "internal error", ())
        if result is None or self.stream_id not in self.connection.calls:
            # reset by the client, gone with its connection, or answered over plain HTTP
            self.connection.calls.pop(self.stream_id, None)
            return
        self._finish(*result)
        if result[0] == DEADLINE_EXCEEDED and self.connection.writer.blocked:
            self.connection.abort()  # a cut stream on a socket that takes nothing

    @property
    def path(self) -> str:
        return self.headers.get(b":path", b"").decode("latin-1")

    async def _serve(self) -> tuple[int, str, Metadata] | None:
        headers = self.headers
        content_type = headers.get(b"content-type", b"")
        if headers.get(b":method") != b"POST" or not content_type.startswith(b"application/grpc"):
            self._respond_http(415 if headers.get(b":method") == b"POST" else 405)
            return None
        time_limit = None
        if b"grpc-timeout" in headers:
            time_limit = parse_timeout(headers[b"grpc-timeout"])
        if headers.get(b":path") == SUBSCRIBE:
            return await self._subscribe(time_limit)
        return await self._proxy(time_limit)

    async def _subscribe(self, time_limit: float | None) -> tuple[int, str, Metadata]:
        request = await self.next_message()
        if request is None:
            raise CallError(UNIMPLEMENTED, "Subscribe takes one request message; none came")
        if await self.next_message() is not None:
            raise CallError(UNIMPLEMENTED, "Subscribe takes one request message; more came")
        self._send_headers(())
        sink = self.sink = StreamSink(self.connection, self.stream_id)
        self.subscribed = True
        with trio.move_on_after(float("inf") if time_limit is None else time_limit) as deadline:
            code, message = await self.connection.backend.subscribe(request, sink)
        if deadline.cancelled_caught:
            return DEADLINE_EXCEEDED, "Deadline Exceeded", ()
        return code, message, ()

    async def _proxy(self, time_limit: float | None) -> tuple[int, str, Metadata]:
        metadata = _metadata(self.headers)
        call = await self.connection.backend.open(self.path, metadata, time_limit)
        refused: list[CallError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_requests, call, refused, nursery.cancel_scope)
                sink = None
                while (response := await call.read()) is not None:
                    if sink is None:
                        self._send_headers(await call.initial_metadata())
                        sink = self.sink = StreamSink(self.connection, self.stream_id)
                    await sink.write(response)
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True):
                await call.cancel()
            raise
        if refused:
            await call.cancel()
            raise refused[0]
        if not self._answered:
            self._send_headers(await call.initial_metadata())
        return await call.status()

    async def _forward_requests(
        self, call: BackendCall, refused: list[CallError], scope: trio.CancelScope
    ) -> None:
        """The client's messages to the backend, then the end of them; a message we refuse
        ends the call (with its status)."""
        try:
            while (message := await self.next_message()) is not None:
                await call.write(message)
        except CallError as error:
            refused.append(error)
            scope.cancel()
            return
        await call.done_writing()

    # -- answering ------------------------------------------------------------------------------

    def _send_headers(self, metadata: Metadata) -> None:
        headers = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-accept-encoding", b"identity"),
        ]
        headers.extend(_headers(metadata))
        self.connection.h2.send_headers(self.stream_id, headers)
        self.connection.flush_h2()
        self._answered = True

    def _finish(self, code: int, message: str, trailers: Metadata) -> None:
        connection = self.connection
        connection.calls.pop(self.stream_id, None)
        if self.sink is not None:
            self.sink.close()
        fields = [(b"grpc-status", str(code).encode())]
        if message:
            fields.append((b"grpc-message", grpc_message(message)))
        fields.extend(_headers(trailers))
        if not self._answered:  # trailers-only
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields]
        try:
            connection.h2.send_headers(self.stream_id, fields, end_stream=True)
        except h2.exceptions.H2Error:
            return  # the stream is gone
        if not self._ended:  # the client may still be sending: it need not
            with contextlib.suppress(h2.exceptions.H2Error):
                connection.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        connection.flush_h2()

    def _respond_http(self, status: int) -> None:
        self.connection.h2.send_headers(
            self.stream_id, [(b":status", str(status).encode())], end_stream=True
        )
        self.connection.flush_h2()


def _metadata(headers: dict[bytes, bytes]) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []
    for key, value in headers.items():
        if key.startswith(b":") or key in _RESERVED:
            continue
        name = key.decode("latin-1")
        if name.endswith("-bin"):
            out.append((name, base64.b64decode(value + b"==")))
        else:
            out.append((name, value.decode("latin-1")))
    return out


def _headers(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    out = []
    for key, value in metadata:
        if isinstance(value, bytes):
            out.append((key.encode(), base64.b64encode(value).rstrip(b"=")))
        else:
            out.append((key.encode(), value.encode()))
    return out


async def serve_connection(
    stream: trio.SocketStream, backend: Backend, limit: int, keepalive: tuple[float, float]
) -> None:
    """One connection from its first byte: HTTP/2 with prior knowledge (gRPC's way)."""
    try:
        data = b""
        with trio.move_on_after(10.0):
            while len(data) < len(PREFACE) and PREFACE.startswith(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        if not data.startswith(PREFACE):
            return
        await Connection(stream, backend, limit, keepalive).serve(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:  # a bug here ends this connection, not the listener and its others
        logger.exception("grpc connection failed")
    finally:
        await trio.aclose_forcefully(stream)


def handler(
    backend: Backend, limit: int, keepalive: tuple[float, float]
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Serve each connection; ``keepalive``: ping after so many seconds of silence, and close
    when no answer comes so many seconds later."""

    async def handle(stream: trio.SocketStream) -> None:
        await serve_connection(stream, backend, limit, keepalive)

    return handle
