"""Server-Sent Events: the server's encoder and a client's parser (WHATWG HTML, section 9.2).

The encoder writes one event per call; its bytes are shared by every SSE subscriber, so it
assembles bytes directly. The parser follows the EventSource "interpret an event stream"
algorithm step by step, so our clients and tests see exactly what a browser would.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import ProtocolError
from broker.model import Event

# A comment line: EventSource ignores it, but it keeps proxies from timing the stream out.
HEARTBEAT: bytes = b": keepalive\n\n"

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def retry_hint(milliseconds: int) -> bytes:
    """The ``retry:`` field that sets EventSource's reconnection delay."""
    if milliseconds < 0:
        raise ValueError(f"retry must be >= 0 milliseconds, got {milliseconds}")
    return b"retry: %d\n\n" % milliseconds


def _data_lines(payload: bytes) -> bytes:
    """The ``data:`` lines for a payload, each ending in LF."""
    # CR and LF never occur inside a multi-byte UTF-8 sequence, so splitting the bytes is safe.
    if b"\n" not in payload and b"\r" not in payload:
        return b"data: " + payload + b"\n" if payload else b"data:\n"
    lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    # An empty line gets no space after the colon, so "data:" round-trips as "" (not " ").
    return b"".join(b"data: " + line + b"\n" if line else b"data:\n" for line in lines)


def event_encoder(epoch: str) -> Callable[[Event], bytes]:
    """`encode_event` for one epoch, with the usual case inline: a payload the broker serialised
    from a JSON value (`Event.json_line`) is one line of UTF-8 already (0.93 -> 0.17 us)."""
    prefix = epoch.encode()

    def encode(event: Event) -> bytes:
        if event.json_line and event.event is None:
            return b"id: %s:%d\ndata: %s\n\n" % (prefix, event.seq, event.payload)
        return encode_event(event, epoch)

    return encode


def encode_event(event: Event, epoch: str) -> bytes:
    """One event, ending in the blank line that makes EventSource dispatch it."""
    payload = event.payload
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            # EventSource can only carry text: binary goes as base64, which has no line breaks.
            payload = base64.b64encode(payload)
    if payload and b"\n" not in payload and b"\r" not in payload:  # the usual case, in one go
        if event.event is None:
            return b"id: %s:%d\ndata: %s\n\n" % (epoch.encode(), event.seq, payload)
        return b"id: %s:%d\nevent: %s\ndata: %s\n\n" % (
            epoch.encode(), event.seq, event.event.encode(), payload)
    if event.event is None:
        head = b"id: %s:%d\n" % (epoch.encode(), event.seq)
    else:
        head = b"id: %s:%d\nevent: %s\n" % (epoch.encode(), event.seq, event.event.encode())
    return head + _data_lines(payload) + b"\n"


def encode_gap(from_seq: int, to_seq: int, epoch: str, topic: str | None = None) -> bytes:
    """The ``gap`` control event: seqs from_seq..to_seq may be missing (trimmed by retention);
    with a ``topic``, only that topic's events in the range."""
    if topic is not None:
        # No id: other topics' events in the range still follow, the position must not move.
        return b'event: gap\ndata: {"from_seq":%d,"to_seq":%d,"topic":"%s"}\n\n' % (
            from_seq,
            to_seq,
            topic.encode(),  # a topic is [A-Za-z0-9_.-]: nothing to escape
        )
    # The id is to_seq so a client reconnecting after the gap resumes past it, not into it again.
    return b'id: %s:%d\nevent: gap\ndata: {"from_seq":%d,"to_seq":%d}\n\n' % (
        epoch.encode(),
        to_seq,
        from_seq,
        to_seq,
    )


def encode_reset(epoch: str) -> bytes:
    """The ``reset`` control event: the log was replaced; what follows is the new epoch's log."""
    data = json.dumps({"epoch": epoch}, separators=(",", ":"), ensure_ascii=False)
    return b"id: %s:0\nevent: reset\ndata: %s\n\n" % (epoch.encode(), data.encode())


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """A dispatched event, as EventSource's MessageEvent would present it."""

    event: str  # "message" when the stream named none
    data: str
    id: str  # the last event ID in force when the event was dispatched


class SSEParser:
    """Incremental EventSource parser: feed bytes, get the events they complete.

    ``feed()`` raises `ProtocolError` when a line grows past ``max_line_bytes`` (the default fits
    a 1 MiB payload plus its field name), so a garbled stream cannot grow our buffer unbounded.
    """

    def __init__(self, *, max_line_bytes: int = 1_048_576 + 4096) -> None:
        self.max_line_bytes = max_line_bytes
        self.last_event_id = ""
        self.retry_milliseconds: int | None = None
        self.comments = 0  # heartbeats are comments: counting them lets a client observe them
        self._pending = bytearray()  # the current line, not yet terminated
        self._at_stream_start = True  # a UTF-8 BOM may still be stripped
        self._after_cr = False  # the last byte fed was CR: an LF next belongs to the same line end
        self._data_lines: list[str] = []
        self._event_type = ""
        self._id_buffer = ""

    def feed(self, data: bytes) -> list[SSEMessage]:
        if self._at_stream_start:
            self._pending += data
            head = bytes(self._pending[:3])
            if len(head) < 3 and _BOM.startswith(head):
                return []  # too few bytes yet to tell whether the stream opens with a BOM
            self._at_stream_start = False
            data = bytes(self._pending[3:] if head == _BOM else self._pending)
            self._pending.clear()
        if not data:
            return []  # and a CR that ended the last chunk still waits for its LF
        if self._after_cr and data[:1] == b"\n":
            data = data[1:]
        self._after_cr = False

        messages: list[SSEMessage] = []
        start = 0
        for match in _LINE_END.finditer(data):
            if self._pending:
                self._pending += data[start : match.start()]
                line = bytes(self._pending)
                self._pending.clear()
            else:
                line = data[start : match.start()]
            if len(line) > self.max_line_bytes:
                raise ProtocolError(f"SSE line longer than {self.max_line_bytes} bytes")
            self._process_line(line, messages)
            start = match.end()
        if start == len(data) and data[-1:] == b"\r":
            self._after_cr = True
        self._pending += data[start:]
        if len(self._pending) > self.max_line_bytes:
            raise ProtocolError(f"SSE line longer than {self.max_line_bytes} bytes")
        return messages

    def _process_line(self, raw: bytes, messages: list[SSEMessage]) -> None:
        if not raw:
            self._dispatch(messages)
            return
        if raw[:1] == b":":
            self.comments += 1
            return
        # Browsers decode with replacement; ":" and " " are ASCII, so decoding first is the same.
        line = raw.decode("utf-8", errors="replace")
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        # 640 digits is the lowest int-parsing limit Python allows (sys.set_int_max_str_digits);
        # a longer retry could not be honoured by any client anyway.
        elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 640:
            self.retry_milliseconds = int(value)
        # Any other field name is ignored, as the specification requires.

    def _dispatch(self, messages: list[SSEMessage]) -> None:
        self.last_event_id = self._id_buffer
        if self._data_lines:
            messages.append(
                SSEMessage(
                    event=self._event_type or "message",
                    data="\n".join(self._data_lines),
                    id=self.last_event_id,
                )
            )
        self._data_lines = []
        self._event_type = ""
