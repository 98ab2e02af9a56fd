"""The ASGI application: streaming subscriptions are served by our own ASGI handlers (they write
through the hub's `Sink` seam and own their disconnect detection); everything else (publish,
long-poll, health, metrics, static files) goes to the quart-trio app.

Why not stream through Quart: a Quart response body is a generator that Quart pulls, which hides
the write behind Quart's machinery, applies ``RESPONSE_TIMEOUT`` to a stream that should live for
hours, and leaves no place for a synchronous ``write_nowait``. See docs/decisions.md.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from broker.errors import Problem, RequestError, Unavailable, problem_document
from broker.model import Filter, Position, parse_position
from broker.node import Node

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # loose: hypercorn's and Quart's own types differ

STREAM_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response
]
_TOPIC_STREAM = re.compile(r"/v1/topics/([^/]+)/(sse|ndjson)\Z")


class AsgiBodySink:
    """Writes to an HTTP response body. ASGI has no non-blocking send: always the fallback."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def write_nowait(self, data: bytes) -> bool:
        return False

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


class AsgiWebSocketSink:
    """Writes one WebSocket message per call: text frames for JSON, binary for msgpack."""

    def __init__(self, send: Send, *, text: bool) -> None:
        self._send = send
        self._text = text

    def write_nowait(self, data: bytes) -> bool:
        return False

    async def write(self, data: bytes) -> None:
        if self._text:
            await self._send({"type": "websocket.send", "text": data.decode()})
        else:
            await self._send({"type": "websocket.send", "bytes": data})


async def send_problem(send: Send, error: RequestError | Unavailable, instance: str) -> None:
    status, body = problem_document(error, instance)
    headers = [(b"content-type", b"application/problem+json")]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    filter: Filter
    position: Position | None
    start: str | None


def parse_subscribe(
    node: Node,
    query: Sequence[tuple[str, str]],
    *,
    path_topic: str | None = None,
    last_event_id: str | None = None,
) -> SubscribeRequest:
    """Topics, and where to start, from a subscribe request (one meaning on every transport)."""
    subjects = [path_topic] if path_topic is not None else []
    subjects += [value for key, value in query if key == "topic"]
    params = {key: value for key, value in query if key != "topic"}
    position = None
    if last_event_id:  # EventSource sends the last id it saw; it wins over the query
        position = parse_position(last_event_id)
    elif "from_seq" in params:
        position = parse_position(params["from_seq"])
    start = params.get("from")
    if start is not None and start not in ("earliest", "latest"):
        raise RequestError(
            Problem.BAD_PARAMETER,
            f"from must be 'earliest' or 'latest', got {start[:40]!r}",
            name="from",
        )
    return SubscribeRequest(node.parse_filter(subjects), position, start)


def query_of(scope: Scope) -> list[tuple[str, str]]:
    return parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def create_app(node: Node, quart_app: ASGIApp) -> ASGIApp:
    """The one ASGI app hypercorn serves."""
    from broker.transports import streams, websocket

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # One frame between the server and a stream's handler: a stream's frames live as long
        # as the connection, so each one is memory per subscriber.
        path = scope.get("path", "")
        if scope["type"] == "http":
            if path in ("/v1/sse", "/v1/ndjson"):
                transport, topic = path.rsplit("/", 1)[1], None
            elif (match := _TOPIC_STREAM.match(path)) is not None:
                transport, topic = match[2], match[1]
            else:
                return await quart_app(scope, receive, send)
            if scope["method"] not in ("GET", "HEAD"):
                error = RequestError(
                    Problem.METHOD_NOT_ALLOWED, f"{scope['method']} is not allowed here; use GET"
                )
                return await send_problem(send, error, path)
            return await streams.serve(
                node, scope, receive, send, transport=transport, path_topic=topic
            )
        if scope["type"] == "websocket" and path == "/v1/ws":
            return await websocket.serve(node, scope, receive, send)
        await quart_app(scope, receive, send)

    return app
