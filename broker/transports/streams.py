"""SSE and NDJSON subscriptions as raw ASGI responses.

The response is one long body. The writer (`Outlet.run`) and a watcher of ``receive`` run side
by side: when the client goes away hypercorn says ``http.disconnect``, the watcher cancels the
writer, and the subscription is released in ``finally`` at once. On the native path there is no
watcher task: `native.Hangups` notices the client leaving and ends the writer.
"""

from __future__ import annotations

import trio

from broker.delivery import Sink
from broker.errors import RequestError, Unavailable
from broker.node import Node
from broker.subscription import CloseReason
from broker.transports.asgi import (
    STREAM_HEADERS,
    AsgiBodySink,
    Receive,
    Scope,
    Send,
    header,
    parse_subscribe,
    query_of,
    send_problem,
)
from broker.wire import ndjson, sse

CONTENT_TYPES = {
    "sse": b"text/event-stream; charset=utf-8",
    "ndjson": b"application/x-ndjson",
}
DRAIN_RETRY_MS = 500  # on drain, ask EventSource to come back quickly (to another node)


async def serve(
    node: Node,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    transport: str,
    path_topic: str | None,
) -> None:
    try:
        request = parse_subscribe(
            node,
            query_of(scope),
            path_topic=path_topic,
            last_event_id=header(scope, b"last-event-id") if transport == "sse" else None,
        )
        sub, greeting = node.open_subscription(
            request.filter, position=request.position, start=request.start, transport=transport
        )
    except (RequestError, Unavailable) as error:
        return await send_problem(send, error, scope["path"])

    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", CONTENT_TYPES[transport]), *STREAM_HEADERS],
        }
    )
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    framing = node.framings.sse if transport == "sse" else node.framings.ndjson
    sink: Sink = scope.get("extensions", {}).get("broker.native") or AsgiBodySink(send)
    gone = False
    heartbeat = sse.HEARTBEAT if transport == "sse" else ndjson.HEARTBEAT
    client = scope.get("client")
    with node.outlet(sink, framing, transport, client=client, heartbeat=heartbeat) as outlet:
        position = f"{node.log.epoch}:{sub.position}"
        if transport == "sse":
            # The id with no data sets EventSource's last event id without firing an event, so
            # a client that drops before its first event still resumes from where it started.
            preamble = sse.retry_hint(node.settings.sse_retry_ms) + b"id: %s\n\n" % (
                position.encode()
            )
        else:
            preamble = ndjson.encode_control("hello", epoch=node.log.epoch, position=position)
        await sink.write(preamble)
        outlet.attach(sub, greeting=framing.render(sub, greeting))
        del request, greeting, position, preamble  # this frame lives as long as the stream
        reason = CloseReason.GONE
        if getattr(sink, "watched", False):
            # The native path notices the client leaving by itself, and ends the writer.
            sink.notify_hangup(outlet.hang_up)  # type: ignore[attr-defined]
            reason = await outlet.run()
            gone = reason is CloseReason.GONE
        else:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                reason = await outlet.run()
                nursery.cancel_scope.cancel()
    if gone:
        return
    final = b""
    if reason is CloseReason.DRAINING and transport == "sse":
        final = sse.retry_hint(DRAIN_RETRY_MS)
    await send({"type": "http.response.body", "body": final, "more_body": False})
