"""The quart-trio app: publish, batch publish, long-poll, health, readiness, metrics, the page.

Streaming subscriptions (SSE, NDJSON, WebSocket) are served beside it (transports/asgi.py).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from broker.errors import Problem, RequestError, Unavailable, problem_document
from broker.node import Node
from broker.transports import publishing
from broker.transports.asgi import parse_subscribe

_HTTP_PROBLEMS = {
    404: Problem.NOT_FOUND,
    405: Problem.METHOD_NOT_ALLOWED,
    413: Problem.PAYLOAD_TOO_LARGE,
}


def _json(body: dict[str, Any] | bytes, status: int = 200) -> Response:
    data = body if isinstance(body, bytes) else publishing.answer(body)
    return Response(data, status, content_type="application/json")


def _problem(error: RequestError | Unavailable) -> Response:
    status, body = problem_document(error, request.path)
    headers = {"Retry-After": "1"} if status == 503 else {}
    return Response(body, status, content_type="application/problem+json", headers=headers)


async def _body(limit: int, what: str) -> bytes:
    """The request body, refused with 413 when it is announced longer than ``limit`` (the
    publishing functions check what was read)."""
    publishing.check_length(request.content_length, limit, what)
    data = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return data.encode() if isinstance(data, str) else data


def create_quart_app(node: Node) -> QuartTrio:
    app = QuartTrio("broker")
    app.config["RESPONSE_TIMEOUT"] = None  # long-polls are bounded by their own timeout
    # /static/ (broker.js, the console's module): revalidated on every load, so an upgraded
    # broker never serves a page with yesterday's client
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 0
    # Quart's own cap bounds what any body may cost before a route sees it (chunked uploads
    # included); each route then applies its exact limit.
    settings = node.settings
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_payload_bytes, settings.max_batch_bytes)

    @app.errorhandler(RequestError)
    async def on_request_error(error: RequestError) -> Response:
        return _problem(error)

    @app.errorhandler(Unavailable)
    async def on_unavailable(error: Unavailable) -> Response:
        return _problem(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        code = error.code or 500
        problem = _HTTP_PROBLEMS.get(code)
        if problem is None:
            return Response(str(error.description), code, content_type="text/plain")
        detail = {
            404: f"no route {request.method} {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes",
        }[code]
        return _problem(RequestError(problem, detail))

    @app.post("/v1/topics/<path:topic>")
    async def publish(topic: str) -> Response:
        append = publishing.single(
            node,
            topic,
            event=request.args.get("event"),
            key=request.headers.get("Idempotency-Key"),
            content_type=request.headers.get("Content-Type"),
        )
        payload = await _body(settings.max_payload_bytes, "payload")
        return _json(await publishing.publish_single(node, append, payload))

    @app.post("/v1/publish")
    async def publish_batch() -> Response:
        publishing.check_batch(node, request.headers.get("Content-Type"))
        body = await _body(settings.max_batch_bytes, "batch")
        return _json(await publishing.publish_batch(node, body))

    @app.get("/v1/poll")
    async def poll() -> Response:
        return await _poll(node)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if node.ready:
            return _json({"status": "ready", "epoch": node.log.epoch})
        status = "draining" if node.draining else "backplane-unavailable"
        return _json({"status": status}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            node.metrics.render(node), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/")
    async def index() -> Response:
        page = resources.files("broker").joinpath("static/index.html").read_bytes()
        return Response(page, content_type="text/html; charset=utf-8")

    return app


class _CollectingSink:
    """A long-poll's sink: keeps what the writer produced and says when there is something."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.filled = trio.Event()

    def write_nowait(self, data: bytes) -> bool:
        self.chunks.append(data)
        self.filled.set()
        return True

    async def write(self, data: bytes) -> None:
        self.write_nowait(data)


def _number(name: str, raw: str | None, default: float, maximum: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:
        raise RequestError(
            Problem.BAD_PARAMETER, f"{name} must be a number from 0 to {maximum:g}", name=name
        )
    return value


async def _poll(node: Node) -> Response:
    settings = node.settings
    query = list(request.args.items(multi=True))
    subscribe = parse_subscribe(node, query)
    timeout = _number(
        "timeout",
        request.args.get("timeout"),
        settings.poll_timeout_seconds,
        settings.poll_max_timeout_seconds,
    )
    limit = int(_number("limit", request.args.get("limit"), settings.poll_limit_events, 100_000))
    limit = max(limit, 1)
    sub, greeting = node.open_subscription(
        subscribe.filter,
        position=subscribe.position,
        start=subscribe.start,
        transport="poll",
        buffer_events=limit,
    )
    sink = _CollectingSink()
    framing = node.framings.ndjson
    with node.outlet(sink, framing, "poll", page_events=limit) as outlet:
        outlet.attach(sub, greeting=framing.render(sub, greeting))
        async with trio.open_nursery() as nursery:

            async def deliver() -> None:
                await outlet.run()  # returns only when the node drains: answer now
                sink.filled.set()

            nursery.start_soon(deliver)
            with trio.move_on_after(timeout):
                await sink.filled.wait()
            nursery.cancel_scope.cancel()
        position = f"{node.log.epoch}:{sub.position}"
    lines = b"".join(sink.chunks).split(b"\n")
    body = b'{"events":[%s],"position":"%s"}' % (
        b",".join(line for line in lines if line),
        position.encode(),
    )
    return Response(body, content_type="application/json")
