"""Every exception the broker raises, and the error codes it puts on the wire.

The tree::

    BrokerError
    ├── RequestError          the client sent something we refuse; carries a `Problem`
    ├── Unavailable           we cannot serve right now (draining, backplane down); retry later
    ├── ClosedError           *we* closed the thing being used (subscription, log, connection)
    └── BrokenError           the *peer or network* broke it (client went away, socket reset)
        └── ProtocolError     the peer spoke the wire protocol wrongly (garbled stream)

"Closed" means we closed it, "Broken" means the peer or network did (trio's vocabulary). Foreign
exceptions are translated where they enter, with ``raise ... from exc``.

On the wire a `RequestError` becomes an RFC 9457 problem document over HTTP, an ``error`` frame
over WebSocket (the connection stays open), and a status code over gRPC. The `Problem` members
below are the complete, documented list (docs/protocol.md has the same table).
"""

from __future__ import annotations

import enum
import json
from typing import Any

PROBLEM_TYPE_PREFIX = "urn:broker:problem:"


class Problem(enum.Enum):
    """A stable error type: slug (part of the problem ``type`` URI), HTTP status, title."""

    BAD_TOPIC = ("bad-topic", 400, "Invalid topic")
    BAD_PATTERN = ("bad-pattern", 400, "Invalid topic pattern")
    MISSING_TOPIC = ("missing-topic", 400, "No topic given")
    TOO_MANY_TOPICS = ("too-many-topics", 400, "Too many topics in one subscription")
    TOO_MANY_SUBSCRIPTIONS = ("too-many-subscriptions", 400, "Too many subscriptions on one socket")
    BAD_POSITION = ("bad-position", 400, "Invalid resume position")
    POSITION_AHEAD = ("position-ahead", 400, "Resume position is ahead of the log")
    BAD_PARAMETER = ("bad-parameter", 400, "Invalid parameter")
    BAD_EVENT_NAME = ("bad-event-name", 400, "Invalid event name")
    BAD_IDEMPOTENCY_KEY = ("bad-idempotency-key", 400, "Invalid Idempotency-Key")
    BAD_BATCH_LINE = ("bad-batch-line", 400, "Invalid line in publish batch")
    BAD_MESSAGE = ("bad-message", 400, "Invalid WebSocket message")
    UNKNOWN_SUBSCRIPTION = ("unknown-subscription", 400, "No such subscription")
    DUPLICATE_SUBSCRIPTION = ("duplicate-subscription", 400, "Subscription id already in use")
    PAYLOAD_TOO_LARGE = ("payload-too-large", 413, "Payload too large")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported-media-type", 415, "Unsupported media type")
    NOT_FOUND = ("not-found", 404, "Not found")
    METHOD_NOT_ALLOWED = ("method-not-allowed", 405, "Method not allowed")
    UNAVAILABLE = ("unavailable", 503, "Service unavailable")

    def __init__(self, slug: str, status: int, title: str) -> None:
        self.slug = slug
        self.status = status
        self.title = title

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker sends (RFC 6455 section 7.4, 4000-4999 are ours)."""

    NORMAL = 1000
    PROTOCOL_ERROR = 1002  # no supported subprotocol offered
    UNSUPPORTED_DATA = 1003  # binary frame on broker.v1.json, or text on broker.v1.msgpack
    MESSAGE_TOO_BIG = 1009  # a client frame over max_payload_bytes (plus envelope)
    SERVICE_RESTART = 1012  # the node is draining: reconnect (to any node) and resume
    SLOW_CONSUMER = 4001  # buffer overflowed under overflow policy "disconnect"


class BrokerError(Exception):
    """Base of every exception raised by the broker."""


class RequestError(BrokerError):
    """The client sent something we refuse. ``extra`` lands in the problem document."""

    def __init__(self, problem: Problem, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.extra = extra

    def as_problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        doc: dict[str, Any] = {
            "type": self.problem.type_uri,
            "title": self.problem.title,
            "status": self.problem.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc


class Unavailable(BrokerError):
    """We cannot serve this right now (draining, backplane unreachable); retrying later may work."""


def problem_document(error: RequestError | Unavailable, instance: str) -> tuple[int, bytes]:
    """The HTTP status and ``application/problem+json`` body for ``error`` at ``instance`` (the
    request's path). A 503 goes out with ``Retry-After: 1``."""
    if isinstance(error, Unavailable):
        error = RequestError(Problem.UNAVAILABLE, str(error))
    document = json.dumps(error.as_problem(instance), separators=(",", ":"), ensure_ascii=False)
    return error.problem.status, document.encode()


class StartupError(BrokerError):
    """The server cannot start (a port it must listen on is taken, say): ``broker serve`` says so
    in one line and exits 1."""


class ClosedError(BrokerError):
    """The resource was closed by us (a closed subscription, log or connection)."""


class BrokenError(BrokerError):
    """The peer or the network broke the resource (client vanished, connection reset)."""


class ProtocolError(BrokenError):
    """The peer broke the wire protocol (a garbled stream, an over-long line)."""
