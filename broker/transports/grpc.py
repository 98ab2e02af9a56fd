"""The gRPC transport (``protos/broker/v1/broker.proto``): grpc.aio hosted on a trio-asyncio
loop. This is the only module that imports grpc.

With ``native_grpc`` (the default) clients connect to the broker's own HTTP/2 listener
(`broker.transports.native_grpc`), which writes ``Subscribe`` streams itself (`serve_subscribe`
with its own sink) and passes every other call on to the grpc.aio server here, which then
listens on a loopback port (`_NativeBackend`, `_ProxiedCall`).

Each call's work runs in trio (``trio_as_aio``), sharing the node, its hub and its outlets with
every other transport: the same subscriptions, bounded buffers, catch-up, gaps and resets. The
writer sends everything pending as *one* ``Delivery`` message (events are pre-encoded once per
event by `broker.wire.pb`; the bytes pass through grpc unserialized), so one crossing into
asyncio costs one message, not one event. Requests cross the other way once per message
(``Session``) or once per batch of what arrived meanwhile (``PublishStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import sniffio
import trio
import trio_asyncio
import trio_asyncio._base
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from broker._pb import broker_pb2 as pb2
from broker.backplane.base import AppendResult
from broker.errors import Problem, RequestError, StartupError, Unavailable
from broker.model import AppendRequest, Reset, parse_position
from broker.node import Node
from broker.subscription import CloseReason, Subscription
from broker.transports import native_grpc
from broker.transports.listener import listen
from broker.wire import pb
from broker.wire.ndjson import checked_publish

logger = logging.getLogger("broker.grpc")

SERVICE = "broker.v1.Broker"
TRANSPORT = "grpc"
# A Delivery is at most this big unless one event is bigger, so that clients' default receive
# limit (4 MiB) holds: max_payload_bytes is 1 MiB by default.
MAX_DELIVERY_BYTES = 1024 * 1024

STATUS_OF_PROBLEM = {
    Problem.POSITION_AHEAD: grpc.StatusCode.OUT_OF_RANGE,
    Problem.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Problem.TOO_MANY_SUBSCRIPTIONS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Problem.UNKNOWN_SUBSCRIPTION: grpc.StatusCode.NOT_FOUND,
    Problem.DUPLICATE_SUBSCRIPTION: grpc.StatusCode.ALREADY_EXISTS,
    Problem.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: RequestError | Unavailable) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an error; the message starts with the problem's slug."""
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, f"unavailable: {error}"
    code = STATUS_OF_PROBLEM.get(error.problem, grpc.StatusCode.INVALID_ARGUMENT)
    return code, f"{error.problem.slug}: {error.detail}"


def _host_cython_async_generators() -> None:
    """Let trio-asyncio's loop host grpc's async generators.

    trio-asyncio's async-generator hooks tag each generator's frame with its loop, but grpc's
    are Cython async generators, which have no frame: their first iteration raised
    AttributeError (every ``async for`` over a request stream, e.g. the reflection service).
    These hooks give frameless generators the loop's own hooks and remember the loop in a
    weak map instead; everything else goes to trio-asyncio's hooks unchanged.
    """
    dispatcher: Any = trio_asyncio._base.AsyncGeneratorDispatcher
    if getattr(dispatcher, "_broker_patched", False):
        return
    original_firstiter, original_finalizer = dispatcher.firstiter, dispatcher.finalizer
    loops: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def firstiter(self: Any, agen: Any) -> Any:
        if not hasattr(agen, "ag_frame") and sniffio.current_async_library() == "asyncio":
            loop: Any = asyncio.get_running_loop()
            with contextlib.suppress(TypeError):  # not weakly referenceable: trio finalizes it
                loops[agen] = loop
            return loop._asyncgen_firstiter_hook(agen)
        return original_firstiter(self, agen)

    def finalizer(self: Any, agen: Any) -> Any:
        if not hasattr(agen, "ag_frame"):
            loop = loops.pop(agen, None) if _weakly_referenceable(agen) else None
            if loop is not None and not loop.is_closed():
                return loop._asyncgen_finalizer_hook(agen)
            return self.prev_hooks.finalizer(agen)
        return original_finalizer(self, agen)

    dispatcher.firstiter, dispatcher.finalizer = firstiter, finalizer
    dispatcher._broker_patched = True


def _weakly_referenceable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


_host_cython_async_generators()


class CallEnded(Exception):
    """Ends a call with this status (when no problem type says it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _malformed(detail: str) -> RequestError:
    return RequestError(Problem.BAD_MESSAGE, detail)


def append_request(node: Node, request: Any) -> AppendRequest:
    """A validated `AppendRequest` from a ``PublishRequest``; `RequestError` if it is bad."""
    fields = {
        "topic": request.topic,
        "content_type": request.content_type or None,
        "event": request.event or None,
        "idempotency_key": request.idempotency_key or None,
    }
    checked = checked_publish(
        fields,
        request.payload,
        "application/octet-stream",
        key_field="idempotency_key",
        max_payload_bytes=node.settings.max_payload_bytes,
        malformed=_malformed,
    )
    return AppendRequest(
        checked.topic, checked.payload, checked.content_type, checked.event, checked.key
    )


def open_subscription(
    node: Node, request: Any, sub_id: str | None = None
) -> tuple[Subscription, list[Reset]]:
    """A subscription as a ``SubscribeRequest`` asks; `RequestError` if it is bad."""
    start = "earliest" if request.start == pb2.START_EARLIEST else None
    position = parse_position(request.position) if request.position else None
    return node.open_subscription(
        node.parse_filter(list(request.topics)),
        position=position,
        start=start,
        transport=TRANSPORT,
        sub_id=sub_id,
    )


class GrpcSink:
    """Writes one ``Delivery`` (bytes) per call: one crossing into grpc.aio. Writes are
    serialised: grpc.aio allows one at a time per call."""

    def __init__(self, context: Any, loop: Any) -> None:
        self._write = trio_asyncio.aio_as_trio(context.write, loop=loop)
        self._lock = trio.Lock()

    def write_nowait(self, data: bytes) -> bool:
        return False

    async def write(self, data: bytes) -> None:
        async with self._lock:
            await self._write(data)


class _EndCall:
    """The `Cutter` of a gRPC call's outlet: a call has no socket of its own to shut down, so a
    stuck write ends the call (its writer's cancel scope)."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope

    def cut(self, addr: tuple[object, ...] | None) -> bool:
        self._scope.cancel()
        return True


class GrpcServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._loop: Any = None
        self._server: Any = None
        self._health: HealthServicer | None = None
        self._channel: Any = None  # to the grpc.aio server, for the native listener's calls

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status`` gets the ``HOST:PORT`` listened on.

        With ``native_grpc`` the clients' port is the broker's own HTTP/2 listener
        (`broker.transports.native_grpc`) and grpc.aio listens on a loopback port of its own,
        for the calls that listener passes on."""
        settings = self.node.settings
        async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
            self._loop = loop
            listen_on = "127.0.0.1:0" if settings.native_grpc else settings.grpc_listen
            address: str = await trio_asyncio.aio_as_trio(self._aio_start, loop=loop)(listen_on)
            try:  # from here on grpc.aio's server is stopped on the way out, whatever happens
                if settings.native_grpc:
                    self._channel = await trio_asyncio.aio_as_trio(self._aio_channel, loop=loop)(
                        address
                    )
                    address = await nursery.start(self._serve_native)
                task_status.started(address)
                serving = None
                while True:  # health follows readiness: draining, backplane down
                    if self.node.ready is not serving:
                        serving = self.node.ready
                        await trio_asyncio.aio_as_trio(self._aio_health, loop=loop)(serving)
                    await trio.sleep(0.25)
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio_asyncio.aio_as_trio(self._aio_stop, loop=loop)()

    async def _serve_native(self, *, task_status: trio.TaskStatus[str]) -> None:
        settings = self.node.settings
        host, _, port = settings.grpc_listen.rpartition(":")
        try:
            sock = listen(host, int(port), backlog=settings.listen_backlog)
        except OSError as exc:
            raise StartupError(f"cannot listen for gRPC on {settings.grpc_listen}: {exc}") from None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        limit = settings.max_payload_bytes + 64 * 1024
        keepalive = (settings.grpc_keepalive_seconds, settings.grpc_keepalive_timeout_seconds)
        serve = native_grpc.handler(_NativeBackend(self), limit, keepalive)
        connections = self.node.connections

        async def handle(stream: trio.SocketStream) -> None:
            # as for HTTP: the kernel gives up on a peer that acknowledges nothing for the
            # write timeout, and a stopping server can sever what is left
            connections.accepted(stream)
            await serve(stream)

        task_status.started(f"{host}:{sock.getsockname()[1]}")
        await trio.serve_listeners(handle, [listener])

    # -- asyncio side ----------------------------------------------------------------------------

    async def _aio_channel(self, address: str) -> Any:
        # the server enforces the limits: the channel passes whatever it is given
        return grpc.aio.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )

    async def _aio_start(self, listen_on: str) -> str:
        settings = self.node.settings
        options = [
            # Any payload up to the limit, plus its envelope; bigger is RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", settings.max_payload_bytes + 64 * 1024),
            # Find dead peers: ping idle connections, drop those that do not answer.
            ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.grpc_keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Let clients keep their connections alive with pings every 10 s or more.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        server = grpc.aio.server(options=options)
        handlers = {
            "Publish": grpc.unary_unary_rpc_method_handler(
                self._publish,
                request_deserializer=pb2.PublishRequest.FromString,
                response_serializer=pb2.PublishResponse.SerializeToString,
            ),
            "PublishStream": grpc.stream_unary_rpc_method_handler(
                self._publish_stream,
                request_deserializer=pb2.PublishRequest.FromString,
                response_serializer=pb2.PublishStreamResponse.SerializeToString,
            ),
            # Deliveries are written as bytes, encoded by broker.wire.pb: no serializer.
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self._subscribe, request_deserializer=pb2.SubscribeRequest.FromString
            ),
            "Session": grpc.stream_stream_rpc_method_handler(
                self._session, request_deserializer=pb2.SessionRequest.FromString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        host, _, port = listen_on.rpartition(":")
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # newer grpcio raise where older ones return 0
            raise StartupError(f"cannot listen for gRPC on {listen_on}: {exc}") from None
        if not bound:
            raise StartupError(f"cannot listen for gRPC on {listen_on}")
        await server.start()
        self._server = server
        address = f"{host}:{bound}"
        logger.info("serving grpc", extra={"address": address})
        return address

    async def _aio_health(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self._health.set(name, status)

    async def _aio_stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            await self._server.stop(grace=1.0)

    async def _call(self, context: Any, fn: Any, *args: Any) -> Any:
        """Run ``fn`` in trio; its `RequestError` or `Unavailable` becomes the call's status."""
        try:
            return await trio_asyncio.trio_as_aio(fn)(*args)
        except (RequestError, Unavailable) as error:
            code, message = status_of(error)
            await context.abort(code, message)
        except CallEnded as ended:
            await context.abort(ended.code, ended.message)

    async def _publish(self, request: Any, context: Any) -> Any:
        return await self._call(context, self._trio_publish, request)

    async def _subscribe(self, request: Any, context: Any) -> None:
        await self._call(context, self._trio_subscribe, request, context)

    async def _session(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._call(context, self._trio_session, context)

    async def _publish_stream(self, requests: AsyncIterator[Any], context: Any) -> Any:
        """Read on this side, store on the trio side: each append takes everything that arrived
        while the previous one was in flight (one crossing per batch, not per message)."""
        pending: list[Any] = []
        arrived = asyncio.Event()

        async def read() -> None:
            # context.read(), not ``async for`` over ``requests``: that is a Cython async
            # generator, which trio-asyncio's async-generator hooks cannot handle.
            try:
                while (request := await context.read()) is not grpc.aio.EOF:
                    pending.append(request)
                    arrived.set()
            finally:
                arrived.set()

        acks: list[AppendResult] = []
        reader = asyncio.ensure_future(read())
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                batch, pending[:] = list(pending), []
                if batch:
                    acks.extend(await self._call(context, self._trio_append, batch, acks))
                if reader.done() and not pending:
                    break
            reader.result()
        finally:
            reader.cancel()
        return pb2.PublishStreamResponse(
            acks=[pb2.PublishResponse(seq=a.seq, duplicate=a.duplicate) for a in acks]
        )

    # -- trio side -------------------------------------------------------------------------------

    async def _trio_publish(self, request: Any) -> Any:
        (result,) = await self.node.publish([append_request(self.node, request)], TRANSPORT)
        return pb2.PublishResponse(seq=result.seq, duplicate=result.duplicate)

    async def _trio_append(
        self, batch: Sequence[Any], acked: Sequence[AppendResult]
    ) -> list[AppendResult]:
        """Store ``batch`` (``acked`` came before it); a bad message ends the call, after the
        ones before it are stored, and the status says so."""
        node = self.node
        requests: list[AppendRequest] = []
        before = len(acked)
        for i, request in enumerate(batch):
            try:
                requests.append(append_request(node, request))
            except RequestError as error:
                stored = [*acked, *(await node.publish(requests, TRANSPORT) if requests else [])]
                last = f" (seqs up to {max(r.seq for r in stored)})" if stored else ""
                raise RequestError(
                    error.problem,
                    f"message {before + i + 1}: {error.detail}; the {before + i} before it were "
                    f"stored{last}",
                ) from None
        return await node.publish(requests, TRANSPORT)

    async def _trio_subscribe(self, request: Any, context: Any) -> None:
        await self.serve_subscribe(request, GrpcSink(context, self._loop))

    async def serve_subscribe(self, request: Any, sink: Any) -> None:
        """One ``Subscribe`` on ``sink`` until it ends (grpc.aio's call or the native stream)."""
        node = self.node
        sub, greeting = open_subscription(node, request)
        framing = node.framings.grpc
        with node.outlet(sink, framing, TRANSPORT, heartbeat=pb.HEARTBEAT) as outlet:
            hello = pb.encode_subscribed(sub.id, node.log.epoch, f"{node.log.epoch}:{sub.position}")
            outlet.attach(sub, greeting=[hello + b"".join(framing.render(sub, greeting))])
            reason = await self._deliver(outlet)
        _raise_for(reason)

    async def _deliver(self, outlet: Any) -> CloseReason:
        """Run the outlet's writer; a write stuck past the node's limit ends the call."""
        with trio.CancelScope() as scope:
            outlet.connections = _EndCall(scope)  # what `Outlet.cut` severs: this call
            return await outlet.run()  # type: ignore[no-any-return]
        raise CallEnded(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "write-timeout: the client read nothing for too long; resume from its last position",
        )

    async def _trio_session(self, context: Any) -> None:
        node = self.node
        sink = GrpcSink(context, self._loop)
        read = trio_asyncio.aio_as_trio(context.read, loop=self._loop)
        framing = node.framings.grpc
        with node.outlet(sink, framing, TRANSPORT, heartbeat=pb.HEARTBEAT) as outlet:
            session = _Session(node, outlet, sink)
            async with trio.open_nursery() as nursery:
                reason: list[CloseReason] = []

                async def deliver() -> None:
                    reason.append(await self._deliver(outlet))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(deliver)
                while True:
                    request = await read()
                    if request is grpc.aio.EOF:
                        break  # the client sends no more; what it subscribed to still flows
                    await session.handle(request)
                if not outlet.subscriptions:
                    nursery.cancel_scope.cancel()
        if reason:
            _raise_for(reason[0])


class _NativeBackend:
    """What the native listener (`native_grpc`) cannot do itself: ``Subscribe``'s work in the
    node, and every other call, passed on to the grpc.aio server over a loopback channel."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server

    async def subscribe(self, request: bytes, sink: Any) -> tuple[int, str]:
        try:
            message = pb2.SubscribeRequest.FromString(request)
        except DecodeError:
            return grpc.StatusCode.INVALID_ARGUMENT.value[0], "bad-message: not a SubscribeRequest"
        try:
            await self._server.serve_subscribe(message, sink)
        except (RequestError, Unavailable) as error:
            code, text = status_of(error)
            return code.value[0], text
        except CallEnded as ended:
            return ended.code.value[0], ended.message
        return grpc.StatusCode.OK.value[0], ""

    async def open(
        self, method: str, metadata: native_grpc.Metadata, time_limit: float | None
    ) -> _ProxiedCall:
        server = self._server
        loop = server._loop

        async def aio_open() -> Any:
            method_call = server._channel.stream_stream(
                method, request_serializer=None, response_deserializer=None
            )
            return method_call(metadata=tuple(metadata), timeout=time_limit)

        return _ProxiedCall(await trio_asyncio.aio_as_trio(aio_open, loop=loop)(), loop)


class _ProxiedCall:
    """A call on the grpc.aio server, as `native_grpc.BackendCall` (bytes in, bytes out)."""

    def __init__(self, call: Any, loop: Any) -> None:
        self._call = call
        self._loop = loop

    def _aio(self, fn: Any) -> Any:
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)

    async def write(self, message: bytes) -> None:
        # a call the server has ended takes no more: its status says why
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._aio(self._call.write)(message)

    async def done_writing(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._aio(self._call.done_writing)()

    async def read(self) -> bytes | None:
        try:
            message = await self._aio(self._call.read)()
        except grpc.aio.AioRpcError:
            return None
        return None if message is grpc.aio.EOF else message

    async def initial_metadata(self) -> native_grpc.Metadata:
        return tuple(await self._aio(self._call.initial_metadata)())

    async def status(self) -> tuple[int, str, native_grpc.Metadata]:
        code = await self._aio(self._call.code)()
        details = await self._aio(self._call.details)()
        trailers = await self._aio(self._call.trailing_metadata)()
        return code.value[0], details or "", tuple(trailers or ())

    async def cancel(self) -> None:
        async def aio_cancel() -> None:
            self._call.cancel()

        await self._aio(aio_cancel)()


def _raise_for(reason: CloseReason) -> None:
    if reason is CloseReason.DRAINING:
        raise Unavailable("this node is draining; resume on another node")
    if reason is CloseReason.SLOW_CONSUMER:
        raise CallEnded(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "slow-consumer: the subscription's buffer overflowed (overflow policy disconnect)",
        )


class _Session:
    """One ``Session`` call's requests: subscribe, unsubscribe, publish. A bad request gets an
    ``error`` (with its id) and the stream goes on."""

    def __init__(self, node: Node, outlet: Any, sink: GrpcSink) -> None:
        self.node = node
        self.outlet = outlet
        self.sink = sink
        self._ids = 0

    async def handle(self, request: Any) -> None:
        op = request.WhichOneof("op")
        sub_id = request.subscribe.sub if op == "subscribe" else request.unsubscribe.sub
        try:
            if op == "subscribe":
                await self._subscribe(request.id, request.subscribe)
            elif op == "unsubscribe":
                self._unsubscribe(request.unsubscribe.sub)
                await self.sink.write(pb.encode_ack(request.id, 0))
            elif op == "publish":
                (result,) = await self.node.publish(
                    [append_request(self.node, request.publish)], TRANSPORT
                )
                await self.sink.write(pb.encode_ack(request.id, result.seq, result.duplicate))
            else:
                raise RequestError(Problem.BAD_MESSAGE, "a SessionRequest needs an op")
        except (RequestError, Unavailable) as error:
            if isinstance(error, Unavailable):
                error = RequestError(Problem.UNAVAILABLE, str(error))
            problem = pb.encode_error(request.id, sub_id, error.problem.slug, error.detail)
            await self.sink.write(problem)

    async def _subscribe(self, request_id: str, request: Any) -> None:
        node, outlet = self.node, self.outlet
        if request.sub and request.sub in outlet.subscriptions:
            raise RequestError(
                Problem.DUPLICATE_SUBSCRIPTION, f"subscription id {request.sub!r} is in use"
            )
        limit = node.settings.max_ws_subscriptions
        if len(outlet.subscriptions) >= limit:
            raise RequestError(
                Problem.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions per session"
            )
        sub, greeting = open_subscription(node, request, request.sub or self._next_id())
        epoch = node.log.epoch
        await self.sink.write(
            pb.encode_subscribed(sub.id, epoch, f"{epoch}:{sub.position}")
            + pb.encode_ack(request_id, 0)
        )
        outlet.attach(sub, greeting=outlet.framing.render(sub, greeting))

    def _unsubscribe(self, sub_id: str) -> None:
        if sub_id not in self.outlet.subscriptions:
            raise RequestError(Problem.UNKNOWN_SUBSCRIPTION, f"no subscription {sub_id!r}")
        self.node.metrics.absorb(self.outlet.subscriptions[sub_id])
        self.outlet.detach(sub_id)

    def _next_id(self) -> str:
        while True:
            self._ids += 1
            if f"s{self._ids}" not in self.outlet.subscriptions:
                return f"s{self._ids}"
