"""Client errors: the server refused a request and said why in a problem document (RFC 9457).

Both subclass `broker.errors.BrokerError` (the tree is in broker/errors.py). They are for
answers a retry cannot fix (4xx) or, for a publish, could not store the event (503); network
faults are `broker.errors.BrokenError`, a garbled answer `broker.errors.ProtocolError`.
"""

from __future__ import annotations

import json
from typing import Any

from broker.errors import PROBLEM_TYPE_PREFIX, BrokerError, Problem


class ProblemError(BrokerError):
    """A refusal that carries the server's problem document (``problem``) and HTTP ``status``."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"{self.slug}: {self.detail}" if self.detail else self.slug)

    @property
    def type(self) -> str:
        """The problem's ``type`` URI, e.g. ``urn:broker:problem:bad-topic``."""
        value = self.problem.get("type")
        return value if isinstance(value, str) else "about:blank"

    @property
    def slug(self) -> str:
        """The ``type`` without the broker's URN prefix: ``bad-topic``."""
        return self.type.removeprefix(PROBLEM_TYPE_PREFIX)

    @property
    def detail(self) -> str:
        detail = self.problem.get("detail") or self.problem.get("title")
        return detail if isinstance(detail, str) else ""


class PublishError(ProblemError):
    """A publish was refused (4xx) or the node could not take it (503 while draining)."""


class SubscribeError(ProblemError):
    """A subscription was refused (4xx, or a WebSocket ``error`` frame): retrying cannot help."""


def problem_from_body(status: int, reason: str, body: bytes) -> dict[str, Any]:
    """The problem document in an error answer; a stand-in when the body is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        return document
    # RFC 9457, section 4.2.1: "about:blank" when the answer says nothing more than its status.
    text = body.decode("utf-8", errors="replace").strip()
    return {"type": "about:blank", "title": reason, "status": status, "detail": text[:200]}


def problem_from_ws_error(frame: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A WebSocket ``error`` frame as (status, problem): the frame's ``code`` is the slug."""
    code = str(frame.get("code", ""))
    status = next((p.status for p in Problem if p.slug == code), 400)
    problem = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": next((p.title for p in Problem if p.slug == code), code),
        "status": status,
        "detail": str(frame.get("message", "")),
    }
    return status, problem


def describe(exc: BaseException) -> str:
    """``Type: message`` for a foreign exception, from its cause when it says nothing itself."""
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
