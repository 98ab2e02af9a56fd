"""What a subscriber receives: messages and the broker's two control notices, and how they are
read from the JSON and msgpack objects the transports carry. Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, TypeAlias

from broker.errors import ProtocolError, RequestError
from broker.model import Position, parse_position
from broker.wire.ndjson import dumps_compact, loads_strict


@dataclass(frozen=True, slots=True)
class Message:
    """One published event as a subscriber sees it.

    Fields a transport does not carry are None: SSE has no ``time_ms`` and no ``content_type``
    (and no topic, see `broker.client.subscribe.Subscriber`); the JSON transports (NDJSON,
    ``ws``, long-poll) carry no ``content_type``; only ``ws-msgpack`` carries everything.
    """

    seq: int
    topic: str
    data: bytes
    time_ms: int | None = None  # publish time, milliseconds since the Unix epoch
    event: str | None = None  # the SSE event name, when the publisher set one
    content_type: str | None = None

    @property
    def text(self) -> str:
        """The payload as UTF-8 text; `UnicodeDecodeError` if it is not."""
        return self.data.decode("utf-8")

    def json(self) -> object:
        """The payload parsed as JSON; `ValueError` if it is not JSON."""
        return json.loads(self.data)


@dataclass(frozen=True, slots=True)
class GapNotice:
    """Events with seq in [from_seq, to_seq] may be missing: retention trimmed them. With a
    ``topic``, only that topic's events (its limit per topic deleted them); other topics'
    events in the range still come."""

    from_seq: int
    to_seq: int
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class ResetNotice:
    """The broker's log was replaced (new ``epoch``): seqs start again from the new log's first."""

    epoch: str


Received: TypeAlias = Message | GapNotice | ResetNotice


def _payload(obj: dict[str, Any]) -> bytes:
    """A JSON or msgpack event's payload: ``data_b64`` decoded, bytes as they are, a string
    as its UTF-8, any other JSON value as compact JSON."""
    if "data_b64" in obj:
        encoded = obj["data_b64"]
        if not isinstance(encoded, str):
            raise ProtocolError(f"data_b64 is not a string: {encoded!r:.80}")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"data_b64 is not standard base64: {encoded!r:.80}") from exc
    if "data" not in obj:
        raise ProtocolError(f"event has neither data nor data_b64: {obj!r:.120}")
    data = obj["data"]
    if isinstance(data, bytes):  # msgpack: always the raw payload
        return data
    try:
        if isinstance(data, str):
            return data.encode("utf-8")
        return dumps_compact(data)
    except (UnicodeEncodeError, ValueError) as exc:
        raise ProtocolError(f"event data cannot be turned into bytes: {exc}") from exc


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name!r} is not an integer in {obj!r:.120}")
    return value


def _str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{name!r} is not a string in {obj!r:.120}")
    return value


def from_object(obj: dict[str, Any]) -> Received | None:
    """The item a NDJSON line, long-poll event or WebSocket frame carries; None for other
    frames (``hello``, ``subscribed``, ``pong``...). `ProtocolError` if it is malformed."""
    kind = obj.get("type", "event")  # NDJSON and long-poll event objects have no type
    if kind == "event":
        return Message(
            seq=_int(obj, "seq"),
            topic=_str(obj, "topic"),
            data=_payload(obj),
            time_ms=_int(obj, "time") if obj.get("time") is not None else None,
            event=_str(obj, "event") if obj.get("event") is not None else None,
            content_type=_str(obj, "content_type") if obj.get("content_type") is not None else None,
        )
    if kind == "gap":
        topic = _str(obj, "topic") if obj.get("topic") is not None else None
        return GapNotice(_int(obj, "from_seq"), _int(obj, "to_seq"), topic)
    if kind == "reset":
        return ResetNotice(_str(obj, "epoch"))
    return None


def parse_from_seq(value: int | str) -> Position:
    """A ``from_seq`` argument as a `Position`; ValueError if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"from_seq must be a seq or '<epoch>:<seq>', got {value!r}")
    try:
        return parse_position(str(value))
    except RequestError as exc:
        raise ValueError(exc.detail) from None


def server_position(text: str) -> Position:
    """A position the server sent; `ProtocolError` if it is not one."""
    try:
        return parse_position(text)
    except RequestError as exc:
        raise ProtocolError(f"server sent a bad position: {exc.detail}") from exc


def json_object(text: str | bytes) -> dict[str, Any]:
    """A JSON object the server sent (a line, an SSE data, a poll answer); else `ProtocolError`."""
    try:
        obj = loads_strict(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {text[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"not a JSON object: {obj!r:.80}")
    return obj
