"""WebSocket subprotocols ``broker.v1.json`` and ``broker.v1.msgpack``: frames out, operations in.

Event frames are encoded once per event and sent to every WebSocket subscriber, so they carry no
subscription id. Client operations are parsed here into `Op` values; everything wrong with one
becomes a `RequestError` carrying the op's ``ref`` (when readable), which the server echoes in an
``error`` frame while the socket stays open.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack

from broker.errors import Problem, ProtocolError, RequestError
from broker.model import (
    MAX_SEQ,
    Event,
    Position,
    parse_position,
)
from broker.wire.ndjson import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    checked_publish,
    dumps_compact,
    event_json_steps,
    loads_strict,
    splice_usual,
)

JSON_SUBPROTOCOL = "broker.v1.json"
MSGPACK_SUBPROTOCOL = "broker.v1.msgpack"

_SUBSCRIPTION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_STARTS = ("earliest", "latest")
# msgpack's own exceptions do not all derive from ValueError (OutOfData does not).
_MSGPACK_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)


class Codec(enum.Enum):
    """A subprotocol: JSON in text frames, or msgpack in binary frames."""

    JSON = JSON_SUBPROTOCOL
    MSGPACK = MSGPACK_SUBPROTOCOL


def choose_codec(offered: Sequence[str]) -> Codec | None:
    """The first supported subprotocol the client offered; JSON if it offered none."""
    if not offered:
        return Codec.JSON
    for name in offered:
        for codec in Codec:
            if codec.value == name:
                return codec
    return None


_EVENT_JSON = b'{"type":"event","seq":%d,"topic":%b,"time":%d,"data":%b}'


def encode_event_json(event: Event) -> bytes:
    # The NDJSON object with "type" first: one set of data rules for every transport.
    return splice_usual(_EVENT_JSON, event) or b'{"type":"event",' + event_json_steps(event)[1:]


def encode_event_msgpack(event: Event) -> bytes:
    frame: dict[str, object] = {
        "type": "event",
        "seq": event.seq,
        "topic": event.topic,
        "time": round(event.time * 1000),
    }
    if event.event is not None:
        frame["event"] = event.event
    # msgpack carries bytes, so the payload goes raw and the content type says how to read it.
    frame["data"] = event.payload
    frame["content_type"] = event.content_type
    result: bytes = msgpack.packb(frame, use_bin_type=True)
    return result


def encode_frame(codec: Codec, frame: dict[str, object]) -> str | bytes:
    """A control or reply frame (``subscribed``, ``gap``, ``error``...) in the codec's form."""
    if codec is Codec.JSON:
        return dumps_compact(frame).decode("utf-8")
    result: bytes = msgpack.packb(frame, use_bin_type=True)
    return result


def frame_bytes(frame: str | bytes) -> bytes:
    """A JSON text frame as UTF-8, or a msgpack frame as is (what the sinks write)."""
    return frame.encode() if isinstance(frame, str) else frame


def frame_header(codec: Codec, size: int) -> bytes:
    """The head of an unmasked, final server frame of ``size`` payload bytes (RFC 6455 5.2):
    text for JSON, binary for msgpack."""
    first = 0x81 if codec is Codec.JSON else 0x82
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big")
    return bytes((first, 127)) + size.to_bytes(8, "big")


def wire_frame(codec: Codec, payload: bytes) -> bytes:
    """A whole frame as it goes on the socket: what the native path shares among subscribers."""
    return frame_header(codec, len(payload)) + payload


def wire_event_json(event: Event) -> bytes:
    """`encode_event_json` as a whole text frame: what the native path shares among subscribers
    (one format instead of a head and a join: 1.05 -> 0.6 us)."""
    payload = encode_event_json(event)
    size = len(payload)
    if size < 126:
        return b"\x81%c%b" % (size, payload)
    if size < 65536:
        return b"\x81\x7e%c%c%b" % (size >> 8, size & 0xFF, payload)
    return frame_header(Codec.JSON, size) + payload


def error_frame(codec: Codec, error: RequestError, ref: object = None) -> str | bytes:
    frame: dict[str, object] = {
        "type": "error",
        "code": error.problem.slug,
        "message": error.detail,
    }
    if ref is not None:
        frame["ref"] = ref
    return encode_frame(codec, frame)


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]  # topics or patterns, validated by the server (Filter.parse)
    id: str | None  # None: the server numbers it s1, s2...
    from_seq: Position | None
    start: str | None  # the "from" field: "earliest" or "latest"
    ref: object


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: str
    ref: object


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    content_type: str
    event: str | None
    key: str | None  # the idempotency key
    ref: object
    json_line: bool = field(default=False, compare=False, repr=False)  # see `Event.json_line`


@dataclass(frozen=True, slots=True)
class Ping:
    ref: object


Op: TypeAlias = Subscribe | Unsubscribe | Publish | Ping


def _bad(detail: str) -> RequestError:
    return RequestError(Problem.BAD_MESSAGE, detail)


def _decode_op(message: str | bytes, codec: Codec) -> dict[Any, Any]:
    if codec is Codec.JSON:
        if not isinstance(message, str):
            raise _bad(f"binary frame on {JSON_SUBPROTOCOL}: send JSON in text frames")
        try:
            obj = loads_strict(message)
        except ValueError as exc:
            raise _bad(f"not JSON: {exc}") from None
    else:
        if not isinstance(message, bytes | bytearray):
            raise _bad(f"text frame on {MSGPACK_SUBPROTOCOL}: send msgpack in binary frames")
        try:
            obj = msgpack.unpackb(message, raw=False)
        except _MSGPACK_ERRORS as exc:
            raise _bad(f"not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad('an op must be a map with an "op" field')
    return obj


def _read_ref(obj: dict[Any, Any]) -> object:
    ref = obj.get("ref")
    if ref is None or isinstance(ref, bool | int):
        return ref
    if isinstance(ref, float) and ref - ref == 0:  # finite: inf or NaN would not survive JSON
        return ref
    if isinstance(ref, str):
        try:
            ref.encode("utf-8")  # a lone surrogate could not be echoed in a text frame
        except UnicodeEncodeError:
            pass
        else:
            return ref
    raise _bad('"ref" must be a string, a finite number, a boolean or null')


def _check_fields(obj: dict[Any, Any], allowed: frozenset[str]) -> None:
    # A misspelt optional field ("form" for "from") must not be silently ignored.
    unknown = [key for key in obj if key not in allowed]
    if unknown:
        names = ", ".join(repr(key)[:40] for key in unknown[:5])
        raise _bad(f"unknown fields for op {obj['op']!r}: {names}")


def _optional_str(obj: dict[Any, Any], field: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise _bad(f'"{field}" must be a string')
    return value


def _parse_from_seq(value: object) -> Position | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_position(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ:
        return Position(value)
    raise RequestError(
        Problem.BAD_POSITION, f'"from_seq" must be a seq 0..{MAX_SEQ} or "<epoch>:<seq>"'
    )


def _subscribe(obj: dict[Any, Any], ref: object, max_payload_bytes: int) -> Subscribe:
    _check_fields(obj, frozenset({"op", "ref", "topics", "id", "from_seq", "from"}))
    topics = obj.get("topics")
    if topics is None or topics == []:
        raise RequestError(Problem.MISSING_TOPIC, 'subscribe needs "topics": a non-empty list')
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise _bad('"topics" must be a list of strings')
    sub_id = _optional_str(obj, "id")
    if sub_id is not None and not _SUBSCRIPTION_ID.match(sub_id):
        raise _bad('"id" must be 1-64 of [A-Za-z0-9_.:-]')
    start = obj.get("from")
    if start is not None and not (isinstance(start, str) and start in _STARTS):
        raise RequestError(
            Problem.BAD_PARAMETER, '"from" must be "earliest" or "latest"', name="from"
        )
    return Subscribe(tuple(topics), sub_id, _parse_from_seq(obj.get("from_seq")), start, ref)


def _unsubscribe(obj: dict[Any, Any], ref: object, max_payload_bytes: int) -> Unsubscribe:
    _check_fields(obj, frozenset({"op", "ref", "id"}))
    sub_id = obj.get("id")
    if not isinstance(sub_id, str):
        raise _bad('unsubscribe needs "id": a string')
    return Unsubscribe(sub_id, ref)


def _publish_payload(data: object) -> tuple[bytes, str]:
    if isinstance(data, bytes):  # msgpack only: JSON has no bytes
        return data, BINARY_CONTENT_TYPE
    try:
        if isinstance(data, str):
            return data.encode("utf-8"), TEXT_CONTENT_TYPE
        return dumps_compact(data), JSON_CONTENT_TYPE
    except (UnicodeEncodeError, ValueError) as exc:
        raise _bad(f'"data" cannot be stored: {exc}') from None


def _publish(obj: dict[Any, Any], ref: object, max_payload_bytes: int) -> Publish:
    allowed = frozenset({"op", "ref", "topic", "data", "content_type", "event", "key"})
    _check_fields(obj, allowed)
    if "data" not in obj:
        raise _bad('publish needs "data"')
    payload, content_type = _publish_payload(obj["data"])
    request = checked_publish(
        obj,
        payload,
        content_type,
        key_field="key",
        max_payload_bytes=max_payload_bytes,
        malformed=_bad,
        json_line=content_type == JSON_CONTENT_TYPE,  # `dumps_compact` made the payload
    )
    return Publish(
        request.topic,
        request.payload,
        request.content_type,
        request.event,
        request.key,
        ref,
        request.json_line,
    )


def _ping(obj: dict[Any, Any], ref: object, max_payload_bytes: int) -> Ping:
    _check_fields(obj, frozenset({"op", "ref"}))
    return Ping(ref)


_OPS: dict[str, Callable[[dict[Any, Any], object, int], Op]] = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "publish": _publish,
    "ping": _ping,
}


def parse_op(message: str | bytes, codec: Codec, *, max_payload_bytes: int) -> Op:
    """Parse one client frame. Raises only `RequestError`, whatever the input.

    Once the frame is a map with a valid ``ref``, every error carries ``extra["ref"]`` (possibly
    None) so the server can echo it in the ``error`` frame.
    """
    obj = _decode_op(message, codec)
    ref = _read_ref(obj)
    try:
        op = obj.get("op")
        parse = _OPS.get(op) if isinstance(op, str) else None
        if parse is None:
            raise _bad(f'"op" must be one of {", ".join(_OPS)}; got {repr(op)[:40]}')
        return parse(obj, ref, max_payload_bytes)
    except RequestError as exc:
        exc.extra["ref"] = ref
        raise


def decode_frame(codec: Codec, message: str | bytes) -> dict[str, Any]:
    """Client side: parse a server frame; `ProtocolError` if it is not a map in the codec."""
    obj: object
    try:
        obj = loads_strict(message) if codec is Codec.JSON else msgpack.unpackb(message, raw=False)
    except _MSGPACK_ERRORS as exc:  # loads_strict raises only ValueError, which is among them
        raise ProtocolError(f"server frame is not {codec.value}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"server frame is not a map: {repr(obj)[:80]}")
    return obj
