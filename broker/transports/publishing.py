"""What an HTTP publish request means, apart from the server that read it.

Two servers read publish requests: the quart-trio app (transports/http.py, the complete path:
chunked bodies, ``Expect: 100-continue``, CORS) and the native listener (native.py, plain
``Content-Length`` requests on keep-alive connections, a quarter of the time). Both validate
and store through these functions, so a request gets the same status and body whichever
served it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from werkzeug.http import parse_options_header

from broker.backplane.base import AppendResult
from broker.errors import Problem, RequestError
from broker.model import (
    AppendRequest,
    validate_event_name,
    validate_idempotency_key,
    validate_topic,
)
from broker.wire import ndjson

if TYPE_CHECKING:  # the node imports the listener, which imports the native path, which imports us
    from broker.node import Node

BATCH_MEDIA_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines"}


def answer(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def check_length(announced: int | None, limit: int, what: str) -> None:
    """A body announced longer than ``limit`` is refused before it is read."""
    if announced is not None and announced > limit:
        raise RequestError(
            Problem.PAYLOAD_TOO_LARGE, f"the {what} is {announced} bytes; the limit is {limit}"
        )


def check_read(body: bytes, limit: int, what: str) -> None:
    if len(body) > limit:
        raise RequestError(
            Problem.PAYLOAD_TOO_LARGE, f"the {what} is over the limit of {limit} bytes"
        )


def single(
    node: Node, topic: str, *, event: str | None, key: str | None, content_type: str | None
) -> AppendRequest:
    """``POST /v1/topics/{topic}`` checked, before its body is read: an `AppendRequest` whose
    payload is still empty."""
    node.check_writable()
    validate_topic(topic)
    if event is not None:
        validate_event_name(event)
    if key is not None:
        validate_idempotency_key(key)
    if content_type is None:
        content_type = ndjson.BINARY_CONTENT_TYPE
    else:
        try:
            ndjson.validate_content_type(content_type)  # the rule a batch line's override has
        except ValueError:
            raise RequestError(
                Problem.BAD_PARAMETER, "invalid Content-Type", name="Content-Type"
            ) from None
    return AppendRequest(topic, b"", content_type, event, key)


async def publish_single(node: Node, request: AppendRequest, payload: bytes) -> bytes:
    check_read(payload, node.settings.max_payload_bytes, "payload")
    (result,) = await node.publish([dataclasses.replace(request, payload=payload)], "http")
    return answer(_published(result))


def check_batch(node: Node, content_type: str | None) -> None:
    """``POST /v1/publish`` checked, before its body is read."""
    node.check_writable()
    media_type = parse_options_header(content_type)[0].lower() if content_type else ""
    if media_type not in BATCH_MEDIA_TYPES:
        raise RequestError(
            Problem.UNSUPPORTED_MEDIA_TYPE,
            f"a batch is NDJSON: send Content-Type: application/x-ndjson, not {media_type!r}",
        )


async def publish_batch(node: Node, body: bytes) -> bytes:
    settings = node.settings
    check_read(body, settings.max_batch_bytes, "batch")
    lines = ndjson.parse_publish_batch(
        body, max_payload_bytes=settings.max_payload_bytes, max_lines=settings.max_batch_lines
    )
    results = await node.publish(lines, "http-batch")
    out: dict[str, Any] = {"seqs": [r.seq for r in results]}
    duplicates = [i for i, r in enumerate(results) if r.duplicate]
    if duplicates:
        out["duplicates"] = duplicates
    return answer(out)


def _published(result: AppendResult) -> dict[str, Any]:
    body: dict[str, Any] = {"seq": result.seq}
    if result.duplicate:
        body["duplicate"] = True
    return body
