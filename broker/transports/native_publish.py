"""Publish requests answered on the native listener, on keep-alive connections.

``POST /v1/publish`` and ``POST /v1/topics/{topic}`` with a ``Content-Length`` body are read with
the h11 parser that read their head (native.py), checked and stored by the same functions as the
quart routes (publishing.py), and answered here. Why: through hypercorn and quart-trio a
one-line batch took 691 us back to back and 1,825 us sent every 5 ms on the bench machine (one
request in flight), most of the publish -> delivery p50; here 153 and 730 us (decisions #25).

Only the plain case is served here; a request that is anything else is handed to hypercorn like
every other connection, with the bytes already read: a chunked body or ``Expect:
100-continue`` (hypercorn implements both), an ``Origin`` header (CORS is applied by the ASGI
app), HTTP/1.0, a path that is not plain ASCII, a body announced over the limit (the quart route
refuses it before it is sent). So the answers are the same on both paths, and the integration
tests run against both.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote
from wsgiref.handlers import format_date_time

import h11
import trio

from broker.errors import RequestError, Unavailable, problem_document
from broker.transports import publishing

if TYPE_CHECKING:  # the node imports the listener, which imports us
    from broker.node import Node

logger = logging.getLogger("broker.native")

BODY_TIMEOUT_SECONDS = 10.0  # a client silent this long in the middle of its body is let go
_SINGLE = re.compile(rb"/v1/topics/([^/]+)\Z")
_HANDED_OVER = {b"origin", b"expect", b"transfer-encoding"}


@dataclass(frozen=True, slots=True)
class Route:
    """A publish request served here: one message to ``topic``, or a batch (topic None)."""

    topic: str | None
    path: str
    headers: dict[bytes, bytes]  # the first of repeated headers, as werkzeug's get()


def route(request: h11.Request, node: Node) -> Route | None:
    """The route when the request is served here, None when it is handed to hypercorn."""
    if request.method != b"POST" or request.http_version != b"1.1":
        return None
    raw_path = request.target.partition(b"?")[0]
    if not raw_path.isascii():
        return None
    settings = node.settings
    if raw_path == b"/v1/publish":
        topic, limit = None, settings.max_batch_bytes
    elif (match := _SINGLE.match(raw_path)) is not None:
        topic, limit = unquote(match[1].decode("ascii")), settings.max_payload_bytes
    else:
        return None
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers:
        if name in _HANDED_OVER:
            return None
        headers.setdefault(name, value)
    length = headers.get(b"content-length")
    if length is None or int(length) > limit:  # (h11 has checked that it is a number)
        return None
    return Route(topic, unquote(raw_path.decode("ascii")), headers)


async def serve(
    stream: trio.SocketStream, parser: h11.Connection, request: h11.Request, route: Route,
    node: Node,
) -> bytes | None:
    """Read the body, publish, answer. What the client sent after this request (the start of
    its next one), or None when the connection is to be closed."""
    body = await _read_body(stream, parser)
    if body is None:
        return None
    headers = route.headers
    extra = b""
    try:
        if route.topic is None:
            publishing.check_batch(node, _text(headers.get(b"content-type")))
            answer = await publishing.publish_batch(node, body)
        else:
            query = request.target.partition(b"?")[2].decode("latin-1")
            event = next((v for k, v in parse_qsl(query, keep_blank_values=True)
                          if k == "event"), None)
            append = publishing.single(
                node,
                route.topic,
                event=event,
                key=_text(headers.get(b"idempotency-key")),
                content_type=_text(headers.get(b"content-type")),
            )
            answer = await publishing.publish_single(node, append, body)
        status, content_type = 200, b"application/json"
    except (RequestError, Unavailable) as error:
        status, answer = problem_document(error, route.path)
        content_type = b"application/problem+json"
        if status == 503:
            extra = b"retry-after: 1\r\n"
    except Exception:  # a bug: the client gets a 500 (as from quart), the others go on
        logger.exception("native publish failed")
        status, answer, content_type = 500, b"Internal Server Error", b"text/plain"
    connection = headers.get(b"connection", b"").lower()
    close = status == 500 or node.draining or b"close" in connection
    if close:
        extra += b"connection: close\r\n"
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ndate: %s\r\n%s\r\n" % (
        status, HTTPStatus(status).phrase.encode(), content_type, len(answer), _date(), extra,
    )
    await stream.send_all(head + answer)
    return None if close else parser.trailing_data[0]


async def _read_body(stream: trio.SocketStream, parser: h11.Connection) -> bytes | None:
    parts: list[bytes] = []
    while True:
        event = parser.next_event()
        if isinstance(event, h11.Data):
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:  # NEED_DATA
            data = b""
            with trio.move_on_after(BODY_TIMEOUT_SECONDS):
                data = await stream.receive_some(65536)
            if not data:  # the client left, or stalled, before its body was complete
                return None
            parser.receive_data(data)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The ``Date`` header's value (RFC 9110 wants one from a server with a clock), made once a
    second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, format_date_time(now).encode())
    return _date_cache[1]
