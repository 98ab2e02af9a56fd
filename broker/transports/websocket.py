"""The WebSocket transport (``/v1/ws``): many subscriptions, publish and ping on one socket.

Two tasks per socket: the reader parses client operations and answers them; the outlet's writer
delivers events. Both write through one sink (hypercorn's, or the native path's socket), which
serialises sends. A bad operation gets an ``error`` frame and the socket stays open; only
protocol-level faults close it.
"""

from __future__ import annotations

import trio

from broker.delivery import Outlet, Sink
from broker.errors import CloseCode, Problem, RequestError, Unavailable, problem_document
from broker.model import AppendRequest
from broker.node import Node
from broker.subscription import CloseReason
from broker.transports.asgi import AsgiWebSocketSink, Receive, Scope, Send
from broker.wire import ws

CLOSE_CODES = {
    CloseReason.DRAINING: CloseCode.SERVICE_RESTART,
    CloseReason.SLOW_CONSUMER: CloseCode.SLOW_CONSUMER,
}


async def _refuse(scope: Scope, send: Send, error: RequestError | Unavailable) -> None:
    """Refuse the handshake with a problem document when the server can send one."""
    if "websocket.http.response" in scope.get("extensions", {}):
        status, body = problem_document(error, scope["path"])
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/problem+json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": CloseCode.PROTOCOL_ERROR})


async def serve(node: Node, scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    offered = list(scope.get("subprotocols", ()))
    codec = ws.choose_codec(offered)
    if node.draining:
        return await _refuse(scope, send, Unavailable("this node is draining"))
    if codec is None:
        error = RequestError(
            Problem.BAD_PARAMETER,
            f"none of the offered subprotocols {offered} is supported; offer "
            f"{ws.JSON_SUBPROTOCOL} or {ws.MSGPACK_SUBPROTOCOL}",
            name="Sec-WebSocket-Protocol",
        )
        return await _refuse(scope, send, error)
    await send({"type": "websocket.accept", "subprotocol": codec.value if offered else None})
    # An application frame, not a protocol ping: browsers never see pings, so only this lets
    # a client notice a dead connection (and hypercorn's ping task outlives closed sockets).
    heartbeat = ws.frame_bytes(ws.encode_frame(codec, {"type": "heartbeat"}))
    native = scope.get("extensions", {}).get("broker.native")
    sink: Sink
    if native is not None:
        # Replies are framed by the socket's sink; events arrive as whole frames, shared.
        sink, delivery = native, native.preframed()
        framing = node.framings.ws_wire[codec]
        heartbeat = ws.wire_frame(codec, heartbeat)
    else:
        sink = delivery = AsgiWebSocketSink(send, text=codec is ws.Codec.JSON)
        framing = node.framings.ws[codec]
    client = scope.get("client")
    with node.outlet(delivery, framing, "ws", client=client, heartbeat=heartbeat) as outlet:
        session = _Session(node, outlet, sink, codec)
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                reason = await outlet.run()
                code = CLOSE_CODES.get(reason, CloseCode.NORMAL)
                await send({"type": "websocket.close", "code": code, "reason": reason.value})
                nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message["type"] != "websocket.receive":
                    continue
                close = await session.handle(message.get("text"), message.get("bytes"))
                if close is not None:
                    await send({"type": "websocket.close", "code": close})
                    break
            nursery.cancel_scope.cancel()


class _Session:
    def __init__(self, node: Node, outlet: Outlet, sink: Sink, codec: ws.Codec):
        self.node = node
        self.outlet = outlet
        self.sink = sink
        self.codec = codec

    async def reply(self, frame: dict[str, object]) -> None:
        await self.sink.write(ws.frame_bytes(ws.encode_frame(self.codec, frame)))

    async def handle(self, text: str | None, data: bytes | None) -> CloseCode | None:
        """Answer one client message; return a close code if the socket must close."""
        expects_text = self.codec is ws.Codec.JSON
        message = text if expects_text else data
        if message is None:
            return CloseCode.UNSUPPORTED_DATA
        ref: object = None
        try:
            op = ws.parse_op(
                message, self.codec, max_payload_bytes=self.node.settings.max_payload_bytes
            )
            ref = op.ref
            await self._dispatch(op)
        except RequestError as error:
            await self._error(error, error.extra.get("ref", ref))
        except Unavailable as exc:
            await self._error(RequestError(Problem.UNAVAILABLE, str(exc)), ref)
        return None

    async def _error(self, error: RequestError, ref: object) -> None:
        await self.sink.write(ws.frame_bytes(ws.error_frame(self.codec, error, ref)))

    async def _dispatch(self, op: ws.Op) -> None:
        node, outlet = self.node, self.outlet
        if isinstance(op, ws.Ping):
            await self.reply(_with_ref({"type": "pong"}, op.ref))
        elif isinstance(op, ws.Subscribe):
            if op.id is not None and op.id in outlet.subscriptions:
                raise RequestError(
                    Problem.DUPLICATE_SUBSCRIPTION, f"subscription id {op.id!r} is in use"
                )
            limit = node.settings.max_ws_subscriptions
            if len(outlet.subscriptions) >= limit:
                raise RequestError(
                    Problem.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions per socket"
                )
            sub, greeting = node.open_subscription(
                node.parse_filter(op.topics),
                position=op.from_seq,
                start=op.start,
                transport="ws",
                sub_id=op.id or self._next_id(),
            )
            position = f"{node.log.epoch}:{sub.position}"
            await self.reply(
                _with_ref({"type": "subscribed", "id": sub.id, "position": position}, op.ref)
            )
            outlet.attach(sub, greeting=outlet.framing.render(sub, greeting))
        elif isinstance(op, ws.Unsubscribe):
            if op.id not in outlet.subscriptions:
                raise RequestError(Problem.UNKNOWN_SUBSCRIPTION, f"no subscription {op.id!r}")
            node.metrics.absorb(outlet.subscriptions[op.id])
            outlet.detach(op.id)
            await self.reply(_with_ref({"type": "unsubscribed", "id": op.id}, op.ref))
        else:
            request = AppendRequest(
                op.topic, op.payload, op.content_type, op.event, op.key, op.json_line
            )
            (result,) = await node.publish([request], "ws")
            frame: dict[str, object] = {"type": "published", "seq": result.seq}
            if result.duplicate:
                frame["duplicate"] = True
            await self.reply(_with_ref(frame, op.ref))

    def _next_id(self) -> str:
        n = len(self.outlet.subscriptions) + 1
        while f"s{n}" in self.outlet.subscriptions:
            n += 1
        return f"s{n}"


def _with_ref(frame: dict[str, object], ref: object) -> dict[str, object]:
    if ref is not None:
        frame["ref"] = ref
    return frame
