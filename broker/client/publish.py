"""Publishing over HTTP: one event (``POST /v1/topics/{topic}``) or a batch (``POST /v1/publish``).

Each call takes an optional ``httpx.AsyncClient`` so that a busy publisher reuses its
connections; without one, a client is opened and closed around the call.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx

from broker.client.errors import PublishError, describe, problem_from_body
from broker.errors import BrokenError, ProtocolError
from broker.wire.ndjson import BINARY_CONTENT_TYPE, TEXT_CONTENT_TYPE, dumps_compact, loads_strict

# A publish is answered once the log has stored the event: seconds, not minutes.
PUBLISH_TIMEOUT_SECONDS = 30.0


@asynccontextmanager
async def _client_for(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient(timeout=PUBLISH_TIMEOUT_SECONDS) as own:
        yield own


async def _post(
    client: httpx.AsyncClient | None,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST and return the JSON answer; PublishError on a refusal, BrokenError on no answer."""
    try:
        async with _client_for(client) as http:
            response = await http.post(url, content=content, headers=headers, params=params)
    except httpx.TransportError as exc:
        raise BrokenError(f"publish to {url} failed: {describe(exc)}") from exc
    if response.status_code != 200:
        problem = problem_from_body(response.status_code, response.reason_phrase, response.content)
        raise PublishError(response.status_code, problem)
    try:
        body = loads_strict(response.content)
    except ValueError as exc:
        raise ProtocolError(f"publish answer is not JSON: {response.content[:80]!r}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"publish answer is not a JSON object: {response.content[:80]!r}")
    return body


def _seq(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"publish answer has no integer seq: {value!r}")
    return value


async def publish(
    base_url: str,
    topic: str,
    data: bytes | str,
    *,
    content_type: str | None = None,
    event: str | None = None,
    key: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> int:
    """Publish one event and return its seq once the broker has stored it.

    ``data`` that is ``str`` is sent as UTF-8 with ``text/plain; charset=utf-8`` unless
    ``content_type`` says otherwise; bytes default to ``application/octet-stream``. ``event`` is
    the SSE event name, ``key`` the idempotency key (a repeat within the broker's dedupe window
    returns the first publish's seq).

    Raises `PublishError` (with the server's problem document) when the broker refuses the event
    (4xx) or is draining (503), `BrokenError` when it cannot be reached.
    """
    if isinstance(data, str):
        payload = data.encode("utf-8")
        default_type = TEXT_CONTENT_TYPE
    else:
        payload = bytes(data)
        default_type = BINARY_CONTENT_TYPE
    headers = {"Content-Type": content_type or default_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    # safe="": a "/" or "?" in a bad topic must reach the server as part of the topic, where it
    # is refused with bad-topic, not change the route.
    url = f"{base_url.rstrip('/')}/v1/topics/{quote(topic, safe='')}"
    params = {"event": event} if event is not None else None
    body = await _post(client, url, content=payload, headers=headers, params=params)
    return _seq(body.get("seq"))


def _batch_line(message: Mapping[str, Any]) -> bytes:
    line = dict(message)
    data = line.get("data")
    if isinstance(data, bytes | bytearray):  # JSON has no bytes: send them as data_b64
        del line["data"]
        line["data_b64"] = base64.b64encode(data).decode("ascii")
    try:
        return dumps_compact(line)
    except ValueError as exc:
        raise ValueError(f"batch message has no JSON form: {exc}") from None


async def publish_batch(
    base_url: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    client: httpx.AsyncClient | None = None,
) -> list[int]:
    """Publish several events in one request; return their seqs in order.

    Each message is a batch line as docs/protocol.md describes (``topic``, ``data`` or
    ``data_b64``, optional ``content_type``, ``event``, ``id``); ``data`` given as bytes is sent
    as ``data_b64``. The broker validates the batch whole: one bad line raises `PublishError`
    (``bad-batch-line``, the problem's ``line`` names it) and nothing is published.
    """
    if not messages:
        return []
    body = b"".join(_batch_line(message) + b"\n" for message in messages)
    url = f"{base_url.rstrip('/')}/v1/publish"
    answer = await _post(
        client, url, content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    seqs = answer.get("seqs")
    if not isinstance(seqs, list) or len(seqs) != len(messages):
        raise ProtocolError(f"batch answer has no seqs for {len(messages)} lines: {answer!r}")
    return [_seq(seq) for seq in seqs]
