"""CORS for pages on other origins (``cors_origins``): EventSource, fetch and publish from a
browser app that the broker does not serve.

A request from an allowed origin gets ``Access-Control-Allow-Origin: <its origin>`` (echoed, with
``Vary: Origin``, so a cache never hands one origin's answer to another); a preflight
(``OPTIONS`` with ``Access-Control-Request-Method``) is answered here with 204, allowing the
methods the API has and whatever headers were asked for (``Authorization``, ``Idempotency-Key``,
``Last-Event-ID``...). An origin that is listed by name (not through ``*``) may also send
credentials (cookies). Requests without an ``Origin``, or from other origins, pass untouched: the
browser then refuses to hand the response to the page. WebSocket is not subject to CORS.
"""

from __future__ import annotations

from broker.transports.asgi import ASGIApp, Message, Receive, Scope, Send, header

PREFLIGHT_MAX_AGE_SECONDS = 600
_MAX_REQUESTED_HEADERS = 1024  # bytes of Access-Control-Request-Headers echoed back


def with_cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    named = {origin.lower() for origin in origins if origin != "*"}
    any_origin = "*" in origins

    async def cors_app(scope: Scope, receive: Receive, send: Send) -> None:
        origin = header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or not (any_origin or origin.lower() in named):
            return await app(scope, receive, send)
        allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]
        if origin.lower() in named:
            allow.append((b"access-control-allow-credentials", b"true"))
        requested = header(scope, b"access-control-request-method")
        if scope["method"] == "OPTIONS" and requested is not None:
            asked = (header(scope, b"access-control-request-headers") or "").encode("latin-1")
            headers = [
                *allow,
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_SECONDS).encode()),
            ]
            if asked and len(asked) <= _MAX_REQUESTED_HEADERS:
                headers.append((b"access-control-allow-headers", asked))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        allow.append((b"access-control-expose-headers", b"retry-after"))

        async def send_allowed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *allow]}
            await send(message)

        return await app(scope, receive, send_allowed)

    return cors_app
