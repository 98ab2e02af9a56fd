"""NDJSON: event and control lines out, a line splitter, and batch-publish lines in.

`event_json` is also the body of WebSocket JSON event frames and of long-poll events, so it is
written once per event and shared: it splices bytes instead of building a dict for json.dumps.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring  # the C escaper json.dumps uses for ensure_ascii=False
from typing import Any

from broker.errors import Problem, ProtocolError, RequestError
from broker.model import (
    AppendRequest,
    Event,
    validate_event_name,
    validate_idempotency_key,
    validate_topic,
)

# An empty line: parsers skip it, and it keeps proxies from timing the stream out.
HEARTBEAT: bytes = b"\n"

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
# RFC 6838 caps type and subtype at 127 characters each; 255 leaves room for parameters.
MAX_CONTENT_TYPE_CHARS = 255
MAX_BATCH_LINES = 10_000  # a batch is validated whole before anything is stored, so bound its work

# Printable ASCII: a stored content type is sent back as an HTTP header value, which must be.
_CONTENT_TYPE = re.compile(rf"[\x20-\x7e]{{1,{MAX_CONTENT_TYPE_CHARS}}}\Z")
_BATCH_KEYS = frozenset({"topic", "data", "data_b64", "content_type", "event", "id"})


def _reject_constant(name: str) -> object:
    # NaN and Infinity are Python extensions, not JSON: another parser would choke on them.
    raise ValueError(f"{name} is not valid JSON")


# One decoder and one encoder for every call: json.loads and json.dumps build a new one each
# time they are given options (~1 us, a tenth of parsing a 100-byte line).
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# allow_nan=False: a number that overflowed to inf while parsing must not come out as "Infinity".
# check_circular=False: the check costs ~0.4 us of the ~2 us a 100-byte value takes, and the
# broker encodes what it parsed from JSON (a tree). A circular value (a client program's own
# object) still fails: as RecursionError, which `dumps_compact` reports as ValueError.
_COMPACT_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


def loads_strict(text: str | bytes) -> object:
    """Parse standard JSON only; raise ValueError (never anything else) on anything else."""
    try:
        if isinstance(text, str):
            return _STRICT_DECODER.decode(text)
        return json.loads(text, parse_constant=_reject_constant)  # it detects the encoding
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps_compact(value: object) -> bytes:
    """Compact UTF-8 JSON; ValueError if the value has no standard JSON form."""
    try:
        return _COMPACT_ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("JSON contains a lone surrogate, which UTF-8 cannot encode") from None
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"no JSON form: {exc}") from None


def is_json_content_type(content_type: str) -> bool:
    """``application/json`` or any ``+json`` type; parameters and case are ignored."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == JSON_CONTENT_TYPE or media_type.endswith("+json")


def validate_content_type(value: object) -> str:
    """Return ``value`` if it may be stored as a content type; else raise ValueError."""
    if not isinstance(value, str) or not _CONTENT_TYPE.match(value):
        raise ValueError(
            f"content_type must be a string of 1-{MAX_CONTENT_TYPE_CHARS} printable ASCII "
            "characters"
        )
    return value


def _json_data(event: Event) -> bytes | None:
    """The payload as a JSON value on one line, or None if it is not JSON."""
    payload = event.payload
    try:
        # Decode first: json.loads(bytes) would also accept UTF-16 and UTF-32, not ours to splice.
        loads_strict(payload.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return None
    if b"\n" not in payload and b"\r" not in payload:
        return payload
    # Valid JSON cannot hold a raw CR or LF inside a string, so these are insignificant
    # whitespace: blanking them keeps the value exactly (re-serialising would rewrite numbers).
    return payload.replace(b"\r", b" ").replace(b"\n", b" ")


# Topics as JSON strings, escaped once per distinct topic (cleared when it grows past this many).
_MAX_CACHED_TOPICS = 10_000
_topic_strings: dict[str, bytes] = {}


def topic_json(topic: str) -> bytes:
    """``topic`` as a JSON string."""
    string = _topic_strings.get(topic)
    if string is None:
        if len(_topic_strings) >= _MAX_CACHED_TOPICS:
            _topic_strings.clear()
        string = _topic_strings[topic] = encode_basestring(topic).encode()
    return string


def splice_usual(template: bytes, event: Event) -> bytes | None:
    """``template`` filled with the event's seq, topic, time and data if it is the usual event
    (a JSON value the broker serialised, no event name: spliced in one formatting step, 0.76 ->
    0.43 us for a line); None for any other, which takes the step-by-step way."""
    if event.json_line and event.event is None and event.content_type == JSON_CONTENT_TYPE:
        return template % (
            event.seq,
            topic_json(event.topic),
            round(event.time * 1000),  # int() would truncate 1.005 s to 1004 ms
            event.payload,
        )
    return None


_EVENT_JSON = b'{"seq":%d,"topic":%b,"time":%d,"data":%b}'
_EVENT_LINE = _EVENT_JSON + b"\n"


def event_json(event: Event) -> bytes:
    """The event's NDJSON object, compact, without the newline (keys as docs/protocol.md)."""
    return splice_usual(_EVENT_JSON, event) or event_json_steps(event)


def event_json_steps(event: Event) -> bytes:
    """`event_json` step by step: for any event (the encoders try `splice_usual` first)."""
    head = b'{"seq":%d,"topic":%s,"time":%d' % (
        event.seq,
        topic_json(event.topic),
        round(event.time * 1000),  # int() would truncate 1.005 s to 1004 ms
    )
    if event.event is not None:
        head += b',"event":' + encode_basestring(event.event).encode()
    if is_json_content_type(event.content_type):
        spliced = event.payload if event.json_line else _json_data(event)
        if spliced is not None:
            return head + b',"data":' + spliced + b"}"
    try:
        text = event.payload.decode("utf-8")
    except UnicodeDecodeError:
        return head + b',"data_b64":"' + base64.b64encode(event.payload) + b'"}'
    return head + b',"data":' + encode_basestring(text).encode() + b"}"


def encode_event(event: Event) -> bytes:
    # the newline in the same step as the rest: no second copy
    return splice_usual(_EVENT_LINE, event) or event_json_steps(event) + b"\n"


def encode_control(type: str, **fields: object) -> bytes:
    """A control line: ``{"type":...}`` then ``fields`` in the order given."""
    return dumps_compact({"type": type, **fields}) + b"\n"


class LineSplitter:
    """Split a byte stream into LF-terminated lines (a CR before the LF is dropped too).

    ``feed()`` raises `ProtocolError` once a line, finished or not, is over ``max_line_bytes``.
    """

    def __init__(self, *, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._pending += data
            self._check_pending()
            return []
        lines = data.split(b"\n")
        if self._pending:
            self._pending += lines[0]
            lines[0] = bytes(self._pending)
        self._pending = bytearray(lines.pop())
        for i, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = lines[i] = line[:-1]
            if len(line) > self.max_line_bytes:
                raise ProtocolError(f"line longer than {self.max_line_bytes} bytes")
        self._check_pending()
        return lines

    def _check_pending(self) -> None:
        over_by = len(self._pending) - self.max_line_bytes
        # One byte over is still fine if it is the CR of a CRLF whose LF has not arrived yet.
        if over_by > 1 or (over_by == 1 and not self._pending.endswith(b"\r")):
            raise ProtocolError(f"line longer than {self.max_line_bytes} bytes")


def _bad_line(detail: str) -> RequestError:
    return RequestError(Problem.BAD_BATCH_LINE, detail)


def checked_publish(
    fields: Mapping[Any, Any],
    payload: bytes,
    content_type: str,
    *,
    key_field: str,
    max_payload_bytes: int,
    malformed: Callable[[str], RequestError],
    json_line: bool = False,
) -> AppendRequest:
    """The fields every publish carries, whatever the wire (batch line, WebSocket op): topic,
    size, content type override, event name, idempotency key (under ``key_field``).

    Raises `RequestError`: the field's own problem (bad-topic, payload-too-large,
    bad-event-name, bad-idempotency-key) or ``malformed(detail)`` for a mistyped field.
    """
    topic = fields.get("topic")
    if not isinstance(topic, str):
        raise malformed('"topic" must be a string')
    validate_topic(topic)
    if len(payload) > max_payload_bytes:
        raise RequestError(
            Problem.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes, the limit is {max_payload_bytes}",
        )
    if fields.get("content_type") is not None:
        try:
            content_type = validate_content_type(fields["content_type"])
        except ValueError as exc:
            raise malformed(str(exc)) from None
    event = fields.get("event")
    if event is not None and not isinstance(event, str):
        raise malformed('"event" must be a string')
    key = fields.get(key_field)
    if key is not None and not isinstance(key, str):
        raise malformed(f'"{key_field}" must be a string')
    if event is not None:
        validate_event_name(event)
    if key is not None:
        validate_idempotency_key(key)
    return AppendRequest(topic, payload, content_type, event, key, json_line)


def _line_payload(obj: dict[str, object]) -> tuple[bytes, str]:
    if ("data" in obj) == ("data_b64" in obj):
        raise _bad_line('exactly one of "data" and "data_b64" must be present')
    if "data_b64" in obj:
        encoded = obj["data_b64"]
        if not isinstance(encoded, str):
            raise _bad_line('"data_b64" must be a string')
        try:
            return base64.b64decode(encoded, validate=True), BINARY_CONTENT_TYPE
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
            raise _bad_line('"data_b64" is not standard base64') from None
    data = obj["data"]
    try:
        if isinstance(data, str):
            return data.encode("utf-8"), TEXT_CONTENT_TYPE
        return dumps_compact(data), JSON_CONTENT_TYPE
    except (UnicodeEncodeError, ValueError) as exc:
        raise _bad_line(f'"data" cannot be stored: {exc}') from None


def parse_publish_line(line: bytes, *, max_payload_bytes: int) -> AppendRequest:
    """Parse one line of a batch publish (docs/protocol.md, "POST /v1/publish").

    Raises `RequestError`: bad-batch-line for anything malformed, payload-too-large for a payload
    over ``max_payload_bytes``. Nothing else, whatever the input.
    """
    try:
        obj = loads_strict(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad_line("the line is not valid UTF-8") from None
    except ValueError as exc:
        raise _bad_line(f"the line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad_line("the line must be a JSON object")
    unknown = obj.keys() - _BATCH_KEYS
    if unknown:
        raise _bad_line(f"unknown keys: {', '.join(sorted(repr(k[:40]) for k in unknown))}")

    payload, content_type = _line_payload(obj)
    try:
        return checked_publish(
            obj,
            payload,
            content_type,
            key_field="id",
            max_payload_bytes=max_payload_bytes,
            malformed=_bad_line,
            json_line=content_type == JSON_CONTENT_TYPE,  # `dumps_compact` made the payload
        )
    except RequestError as exc:
        if exc.problem in (Problem.PAYLOAD_TOO_LARGE, Problem.BAD_BATCH_LINE):
            raise
        # one problem type per batch line; the field's own problem goes into the detail
        raise _bad_line(f"{exc.problem.title.lower()}: {exc.detail}") from None


def parse_publish_batch(
    body: bytes, *, max_payload_bytes: int, max_lines: int = MAX_BATCH_LINES
) -> list[AppendRequest]:
    """Parse a whole batch; an error names its 1-based line (``extra["line"]``).

    Blank lines are skipped but still counted in line numbers, so numbers match the client's
    file. Raises only `RequestError`.
    """
    requests: list[AppendRequest] = []
    for number, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip(b" \t\r"):
            continue
        if len(requests) == max_lines:
            raise RequestError(
                Problem.BAD_BATCH_LINE,
                f"line {number}: a batch holds at most {max_lines} lines",
                line=number,
            )
        line = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            requests.append(parse_publish_line(line, max_payload_bytes=max_payload_bytes))
        except RequestError as exc:
            raise RequestError(exc.problem, f"line {number}: {exc.detail}", line=number) from None
    if not requests:
        raise RequestError(Problem.BAD_BATCH_LINE, "the batch has no lines", line=1)
    return requests
