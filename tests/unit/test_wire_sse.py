"""Server-Sent Events: byte-exact encoding (docs/protocol.md) and the EventSource parser."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ProtocolError
from broker.model import RESERVED_EVENT_NAMES, Event
from broker.wire import sse
from broker.wire.sse import SSEMessage, SSEParser


def make_event(seq: int, payload: bytes, event: str | None = None) -> Event:
    return Event(seq, "chat.lobby", payload, "text/plain", 1763730523.123, event)


def parse_chunks(chunks: Iterable[bytes], parser: SSEParser | None = None) -> list[SSEMessage]:
    parser = parser or SSEParser()
    return [message for chunk in chunks for message in parser.feed(chunk)]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# The table of docs/protocol.md, epoch E1.
PROTOCOL_TABLE = [
    (7, b"hello", None, b"id: E1:7\ndata: hello\n\n"),
    (8, b"a\nb", "note", b"id: E1:8\nevent: note\ndata: a\ndata: b\n\n"),
    (9, b"", None, b"id: E1:9\ndata:\n\n"),
    (10, b"x\r\ny\rz\n", None, b"id: E1:10\ndata: x\ndata: y\ndata: z\ndata:\n\n"),
    (11, "héllo ☃".encode(), None, "id: E1:11\ndata: héllo ☃\n\n".encode()),
]


@pytest.mark.parametrize(("seq", "payload", "name", "wire"), PROTOCOL_TABLE)
def test_encode_event_matches_protocol_table(
    seq: int, payload: bytes, name: str | None, wire: bytes
) -> None:
    assert sse.encode_event(make_event(seq, payload, name), "E1") == wire


@pytest.mark.parametrize(("seq", "payload", "name", "wire"), PROTOCOL_TABLE)
def test_parser_reads_protocol_table(
    seq: int, payload: bytes, name: str | None, wire: bytes
) -> None:
    expected_data = re.sub("\r\n|\r", "\n", payload.decode())
    expected = [SSEMessage(name or "message", expected_data, f"E1:{seq}")]
    assert parse_chunks([wire]) == expected
    assert parse_chunks(byte_by_byte(wire)) == expected


def test_encode_event_blank_lines_inside_payload() -> None:
    event = make_event(1, b"\n\na\r\n\r\nb")
    wire = b"id: E1:1\ndata:\ndata:\ndata: a\ndata:\ndata: b\n\n"
    assert sse.encode_event(event, "E1") == wire
    assert parse_chunks([wire])[0].data == "\n\na\n\nb"


def test_encode_event_keeps_leading_space_and_colons() -> None:
    # The one space after "data:" is the only one a parser strips.
    wire = sse.encode_event(make_event(2, b" x: y"), "E1")
    assert wire == b"id: E1:2\ndata:  x: y\n\n"
    assert parse_chunks([wire])[0].data == " x: y"


def test_encode_event_binary_is_one_base64_line() -> None:
    payload = b"\xff\xfe\n\x00\r"
    wire = sse.encode_event(make_event(3, payload, "blob"), "E1")
    assert wire == b"id: E1:3\nevent: blob\ndata: //4KAA0=\n\n"
    assert base64.b64decode(parse_chunks([wire])[0].data) == payload


def test_control_events() -> None:
    assert sse.encode_gap(5, 20, "E1") == (
        b'id: E1:20\nevent: gap\ndata: {"from_seq":5,"to_seq":20}\n\n'
    )
    assert sse.encode_reset("E2") == b'id: E2:0\nevent: reset\ndata: {"epoch":"E2"}\n\n'
    assert parse_chunks([sse.encode_gap(5, 20, "E1"), sse.encode_reset("E2")]) == [
        SSEMessage("gap", '{"from_seq":5,"to_seq":20}', "E1:20"),
        SSEMessage("reset", '{"epoch":"E2"}', "E2:0"),
    ]


def test_heartbeat_and_retry_hint() -> None:
    assert sse.HEARTBEAT == b": keepalive\n\n"
    assert sse.retry_hint(2000) == b"retry: 2000\n\n"
    assert sse.retry_hint(500) == b"retry: 500\n\n"
    with pytest.raises(ValueError):
        sse.retry_hint(-1)
    parser = SSEParser()
    assert parser.feed(sse.retry_hint(2000) + sse.HEARTBEAT * 3) == []
    assert parser.retry_milliseconds == 2000
    assert parser.comments == 3


# --- the parser, against the WHATWG "interpret an event stream" algorithm ---


def test_event_waits_for_the_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [SSEMessage("message", "a", "")]


def test_incomplete_event_is_not_dispatched() -> None:
    wire = sse.encode_event(make_event(7, b"hello"), "E1")
    for garbage in (b"data: trailing", b"id: x\ndata: partial\n", b"data: p\r", b"event: e\n"):
        parser = SSEParser()
        assert parser.feed(wire + garbage) == [SSEMessage("message", "hello", "E1:7")]
        assert parser.last_event_id == "E1:7"


@pytest.mark.parametrize(
    "stream",
    [
        b"data: a\r\ndata: b\r\n\r\n",
        b"data: a\rdata: b\r\r",
        b"data: a\ndata: b\n\n",
        b"data: a\rdata: b\n\r",
    ],
)
def test_line_endings(stream: bytes) -> None:
    expected = [SSEMessage("message", "a\nb", "")]
    assert parse_chunks([stream]) == expected
    assert parse_chunks(byte_by_byte(stream)) == expected


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    # Were the LF read as a second line end, "a" would be dispatched alone.
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [SSEMessage("message", "a\nb", "")]
    assert parser.feed(b"\ndata: c\n\n") == [SSEMessage("message", "c", "")]


def test_cr_inside_a_chunk_does_not_swallow_the_next_chunks_lf() -> None:
    # Only a CR that is the chunk's last byte may pair with an LF opening the next chunk.
    parser = SSEParser()
    assert parser.feed(b"data: a\r: c1\r: c2") == []
    assert parser.feed(b"\n\n") == [SSEMessage("message", "a", "")]
    assert parser.comments == 2


def test_empty_feed_keeps_a_pending_cr() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\ndata: b\n\n") == [SSEMessage("message", "a\nb", "")]


def test_cr_cr_is_two_line_ends() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEMessage("message", "a", "")]


def test_leading_bom_is_stripped_once() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n"
    assert parse_chunks([stream]) == [SSEMessage("message", "a", "")]
    assert parse_chunks(byte_by_byte(stream)) == [SSEMessage("message", "a", "")]
    assert parse_chunks([b"\xef", b"\xbb", b"\xbfdata: a\n\n"]) == [SSEMessage("message", "a", "")]
    # A second BOM is part of the field name ("\ufeffdata"), which is unknown and ignored.
    assert parse_chunks([b"\xef\xbb\xbf" * 2 + b"data: a\n\n"]) == []
    # A BOM later in the stream is not stripped either.
    assert parse_chunks([b"\n\xef\xbb\xbfdata: a\n\n"]) == []


def test_partial_bom_prefix_is_data() -> None:
    # "\xef\xbb" then a byte that is not "\xbf": no BOM, and the bytes are not lost.
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbbx\n\ndata: ok\n\n") == [SSEMessage("message", "ok", "")]


def test_comments_are_counted_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b": keepalive\n:\n: x\r\n\n") == []
    assert parser.comments == 3


@pytest.mark.parametrize(
    ("stream", "data"),
    [
        (b"data\n\n", ""),  # no colon: the whole line is the field name, the value is empty
        (b"data\ndata\n\n", "\n"),
        (b"data:\n\n", ""),
        (b"data:  two\n\n", " two"),  # only one space is stripped
        (b"data:no-space\n\n", "no-space"),
        (b"data: a:b: c\n\n", "a:b: c"),
        (b"data:\tx\n\n", "\tx"),
        (b"data: \xff\xfe\n\n", "\ufffd\ufffd"),  # invalid UTF-8 is replaced, as browsers do
        (b"data: x\nunknown: y\nDATA: z\n\n", "x"),  # unknown (case-sensitive) fields are ignored
    ],
)
def test_fields(stream: bytes, data: str) -> None:
    assert parse_chunks([stream]) == [SSEMessage("message", data, "")]
    assert parse_chunks(byte_by_byte(stream)) == [SSEMessage("message", data, "")]


def test_multibyte_character_split_across_feeds() -> None:
    snowman = "☃".encode()
    assert parse_chunks([b"data: " + snowman[:1], snowman[1:2], snowman[2:] + b"\n\n"]) == [
        SSEMessage("message", "☃", "")
    ]


def test_event_type_resets_after_each_dispatch() -> None:
    stream = b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"
    assert parse_chunks([stream]) == [
        SSEMessage("a", "1", ""),
        SSEMessage("message", "2", ""),
        SSEMessage("message", "3", ""),  # "b" had no data, so it was dropped with it
    ]


def test_event_id_persists_and_resets() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: x\ndata: 1\n\ndata: 2\n\n") == [
        SSEMessage("message", "1", "x"),
        SSEMessage("message", "2", "x"),
    ]
    assert parser.feed(b"id\ndata: 3\n\n") == [SSEMessage("message", "3", "")]
    assert parser.last_event_id == ""


def test_event_id_takes_effect_on_dispatch_even_without_data() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 5\n") == []
    assert parser.last_event_id == ""
    assert parser.feed(b"\n") == []
    assert parser.last_event_id == "5"


def test_event_id_with_nul_is_ignored() -> None:
    stream = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"
    assert parse_chunks([stream]) == [
        SSEMessage("message", "a", "1"),
        SSEMessage("message", "b", "1"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 1500", 1500),
        (b"retry:0", 0),
        (b"retry: 15x", None),
        (b"retry:", None),
        (b"retry: -1", None),
        (b"retry: 1.5", None),
        (b"retry:  15", None),
        ("retry: ١٢".encode(), None),  # Arabic-Indic digits are not ASCII digits
        (b"retry: " + b"9" * 5000, None),  # beyond int parsing: ignored, not a crash
    ],
)
def test_retry(line: bytes, expected: int | None) -> None:
    parser = SSEParser()
    assert parser.feed(line + b"\n\n") == []
    assert parser.retry_milliseconds == expected


def test_max_line_bytes() -> None:
    assert SSEParser(max_line_bytes=10).feed(b"data: 0123\n\n") == [
        SSEMessage("message", "0123", "")
    ]
    with pytest.raises(ProtocolError):
        SSEParser(max_line_bytes=10).feed(b"data: 01234\n\n")
    with pytest.raises(ProtocolError):
        SSEParser(max_line_bytes=10).feed(b"x" * 11)  # an unterminated line counts too
    parser = SSEParser(max_line_bytes=10)
    parser.feed(b"x" * 10)
    with pytest.raises(ProtocolError):
        parser.feed(b"x")


def test_default_line_limit_fits_a_max_payload() -> None:
    payload = b"x" * 1_048_576
    wire = sse.encode_event(make_event(1, payload), "E1")
    assert parse_chunks([wire]) == [SSEMessage("message", payload.decode(), "E1:1")]


# --- properties ---

payloads = st.one_of(
    st.binary(),
    st.text().map(str.encode),
    st.text(alphabet="a \r\n:é☃\x00\ufeff").map(str.encode),
)
event_names = st.none() | st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(
    lambda name: name not in RESERVED_EVENT_NAMES
)
epochs = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
events = st.builds(
    Event,
    seq=st.integers(0, 2**63 - 1),
    topic=st.just("t"),
    payload=payloads,
    content_type=st.just("text/plain"),
    time=st.just(0.0),
    event=event_names,
)


def expected_message(event: Event, epoch: str) -> SSEMessage:
    try:
        data = "\n".join(re.split("\r\n|\r|\n", event.payload.decode("utf-8")))
    except UnicodeDecodeError:
        data = base64.b64encode(event.payload).decode()
    return SSEMessage(event.event or "message", data, f"{epoch}:{event.seq}")


@given(st.lists(events, min_size=1, max_size=5), epochs)
def test_round_trip_whole_and_byte_by_byte(batch: list[Event], epoch: str) -> None:
    wire = b"".join(sse.encode_event(event, epoch) for event in batch)
    expected = [expected_message(event, epoch) for event in batch]
    assert parse_chunks([wire]) == expected
    assert parse_chunks(byte_by_byte(wire)) == expected


@given(st.lists(events, min_size=1, max_size=5), epochs, st.data())
def test_round_trip_random_splits(batch: list[Event], epoch: str, data: st.DataObject) -> None:
    wire = sse.retry_hint(2000) + b"".join(
        sse.encode_event(event, epoch) + sse.HEARTBEAT for event in batch
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts"))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    parser = SSEParser()
    assert parse_chunks(chunks, parser) == [expected_message(event, epoch) for event in batch]
    assert parser.comments == len(batch)
    assert parser.retry_milliseconds == 2000
    assert parser.last_event_id == f"{epoch}:{batch[-1].seq}"


one_line = st.binary(min_size=1).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
no_blank_line = st.lists(one_line.filter(bool), max_size=5).map(b"\n".join)


@given(events, epochs, no_blank_line)
def test_round_trip_with_trailing_garbage(event: Event, epoch: str, garbage: bytes) -> None:
    # Lines without a blank line after them: whatever they say, nothing more is dispatched.
    stream = sse.encode_event(event, epoch) + b"data: x\n" + garbage
    assert parse_chunks([stream]) == [expected_message(event, epoch)]
    assert parse_chunks(byte_by_byte(stream)) == [expected_message(event, epoch)]


def reference_parse(stream: bytes) -> tuple[list[SSEMessage], str, int | None, int]:
    """A deliberately naive, non-incremental reading of the WHATWG algorithm."""
    text = stream.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)[:-1]  # the last piece has no line end yet
    messages: list[SSEMessage] = []
    data, event_type, id_buffer, last_id = "", "", "", ""
    retry: int | None = None
    comments = 0
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data:
                messages.append(SSEMessage(event_type or "message", data[:-1], last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            comments += 1
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data += value + "\n"
        elif field == "event":
            event_type = value
        elif field == "id" and "\0" not in value:
            id_buffer = value
        elif field == "retry" and re.fullmatch("[0-9]+", value):
            retry = int(value)
    return messages, last_id, retry, comments


stream_pieces = st.sampled_from(
    [
        *(b"data", b"id", b"event", b"retry", b"gap", b":", b" ", b"7", b"x"),
        *(b"\r", b"\n", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xef", b"\xff", "é☃".encode()),
    ]
)


sse_lines = st.builds(
    lambda field, value, end: field + value + end,
    st.sampled_from([b"data", b"id", b"event", b"retry", b"", b":", b"\xef\xbb\xbfdata"]),
    st.sampled_from([b"", b":", b": ", b":  "]).flatmap(
        lambda colon: st.text("a7 \x00é:").map(lambda value: colon + value.encode())
    ),
    st.sampled_from([b"\r", b"\n", b"\r\n"]),
)
streams = (
    st.lists(sse_lines, max_size=12).map(b"".join)
    | st.lists(stream_pieces, max_size=60).map(b"".join)
    | st.binary()
)


@given(streams, st.data())
def test_matches_reference_parser_for_any_split(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = reference_parse(stream)
    for split in (chunks, byte_by_byte(stream)):
        parser = SSEParser()
        messages = parse_chunks(split, parser)
        state = (messages, parser.last_event_id, parser.retry_milliseconds, parser.comments)
        assert state == expected


@given(st.lists(st.binary() | stream_pieces, max_size=30), st.integers(1, 64))
def test_feed_raises_only_protocol_error(chunks: list[bytes], max_line_bytes: int) -> None:
    parser = SSEParser(max_line_bytes=max_line_bytes)
    try:
        for chunk in chunks:
            for message in parser.feed(chunk):
                assert "\r" not in message.data
                assert "\0" not in message.id
    except ProtocolError:
        pass


@given(st.text(st.characters(blacklist_categories=("Cs",))).map(
           lambda t: json.dumps(t, ensure_ascii=False)),
       st.integers(min_value=1, max_value=2**40))
def test_the_encoder_inlines_json_lines_and_writes_what_encode_event_writes(
    payload: str, seq: int
) -> None:
    encode = sse.event_encoder("e1")
    marked = Event(seq, "t", payload.encode(), "application/json", 0.0, json_line=True)
    plain = Event(seq, "t", payload.encode(), "application/json", 0.0)
    named = Event(seq, "t", payload.encode(), "application/json", 0.0, "note", json_line=True)
    assert encode(marked) == encode(plain) == sse.encode_event(plain, "e1")
    assert encode(named) == sse.encode_event(named, "e1")
