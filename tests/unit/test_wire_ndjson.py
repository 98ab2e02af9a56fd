"""NDJSON: byte-exact event and control lines, the line splitter, batch-publish parsing."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from broker.errors import Problem, ProtocolError, RequestError
from broker.model import AppendRequest, Event
from broker.wire import ndjson, ws
from broker.wire.ndjson import LineSplitter, parse_publish_batch, parse_publish_line

MiB = 1_048_576
HEAD = b'{"seq":7,"topic":"chat.lobby","time":1763730523123'


def make_event(payload: bytes, content_type: str = "text/plain", event: str | None = None) -> Event:
    return Event(7, "chat.lobby", payload, content_type, 1763730523.123, event)


@pytest.mark.parametrize(
    ("payload", "content_type", "event", "line"),
    [
        # The example of docs/protocol.md.
        (b"hello", "text/plain", None, HEAD + b',"data":"hello"}'),
        # JSON without line breaks is spliced as-is, spaces and all.
        (b'{"text": "hi"}', "application/json", None, HEAD + b',"data":{"text": "hi"}}'),
        (b"[1,2]", "Application/JSON; charset=utf-8", None, HEAD + b',"data":[1,2]}'),
        (b'{"a":1}', "application/problem+json", None, HEAD + b',"data":{"a":1}}'),
        (b" 42 ", "application/json", None, HEAD + b',"data": 42 }'),
        (b'"s"', "application/json", None, HEAD + b',"data":"s"}'),
        # JSON with line breaks: raw CR/LF can only be whitespace in JSON, so they become
        # spaces and the value is kept exactly (numbers are not rewritten), UTF-8 as is.
        (
            '{\r\n  "a": [1.0e2, 2],\n  "b": "é"\n}\n'.encode(),
            "application/json",
            None,
            HEAD + ',"data":{    "a": [1.0e2, 2],   "b": "é" } }'.encode(),
        ),
        (b"[1e400,\n2]", "application/json", None, HEAD + b',"data":[1e400, 2]}'),
        (b'["\\ud800",\r\n1]', "application/json", None, HEAD + b',"data":["\\ud800",  1]}'),
        # Labelled JSON but not JSON: a string.
        (b"{nope", "application/json", None, HEAD + b',"data":"{nope"}'),
        (b"NaN", "application/json", None, HEAD + b',"data":"NaN"}'),
        (b"[Infinity]", "application/json", None, HEAD + b',"data":"[Infinity]"}'),
        (b"", "application/json", None, HEAD + b',"data":""}'),
        ("\ufeff{}".encode(), "application/json", None, HEAD + ',"data":"\ufeff{}"}'.encode()),
        # JSON not labelled JSON: a string.
        (b'{"a":1}', "text/plain", None, HEAD + b',"data":"{\\"a\\":1}"}'),
        (b'{"a":1}', "application/jsonx", None, HEAD + b',"data":"{\\"a\\":1}"}'),
        # UTF-16 JSON is not UTF-8, so not ours to splice: base64.
        ("{}".encode("utf-16"), "application/json", None, HEAD + b',"data_b64":"//57AH0A"}'),
        # Binary: base64.
        (b"\xff\x00\x01", "application/octet-stream", None, HEAD + b',"data_b64":"/wAB"}'),
        # The event name comes before the data.
        (b"hi", "text/plain", "note", HEAD + b',"event":"note","data":"hi"}'),
        (b"\x80", "text/plain", "a.b:c", HEAD + b',"event":"a.b:c","data_b64":"gA=="}'),
        # Non-ASCII is UTF-8, not \\u escapes; control characters are escaped.
        ("héllo ☃".encode(), "text/plain", None, HEAD + ',"data":"héllo ☃"}'.encode()),
        (b'a\nb\r"\\\t\x00', "text/plain", None, HEAD + b',"data":"a\\nb\\r\\"\\\\\\t\\u0000"}'),
        ("\u2028".encode(), "text/plain", None, HEAD + ',"data":"\u2028"}'.encode()),
    ],
)
def test_event_json(payload: bytes, content_type: str, event: str | None, line: bytes) -> None:
    encoded = ndjson.event_json(make_event(payload, content_type, event))
    assert encoded == line
    assert ndjson.encode_event(make_event(payload, content_type, event)) == line + b"\n"
    json.loads(encoded)  # always valid JSON


def test_event_json_time_is_integer_milliseconds() -> None:
    event = Event(1, "t", b"", "text/plain", 1.5)
    assert ndjson.event_json(event) == b'{"seq":1,"topic":"t","time":1500,"data":""}'


def test_event_json_deeply_nested_json_is_a_string_not_a_crash() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    decoded = json.loads(ndjson.event_json(make_event(payload, "application/json")))
    assert decoded["data"] == payload.decode()


def test_control_lines() -> None:
    assert ndjson.encode_control("gap", from_seq=5, to_seq=20) == (
        b'{"type":"gap","from_seq":5,"to_seq":20}\n'
    )
    assert ndjson.encode_control("reset", epoch="E2") == b'{"type":"reset","epoch":"E2"}\n'
    assert ndjson.encode_control("hello", epoch="E1", position="E1:6") == (
        b'{"type":"hello","epoch":"E1","position":"E1:6"}\n'
    )
    assert ndjson.encode_control("x", text="é") == '{"type":"x","text":"é"}\n'.encode()
    assert ndjson.HEARTBEAT == b"\n"


# --- properties of event lines ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_payloads(draw: st.DrawFn) -> bytes:
    value = draw(json_values)
    indent = draw(st.none() | st.integers(0, 2))
    return json.dumps(value, indent=indent, ensure_ascii=draw(st.booleans())).encode()


content_types = st.sampled_from(
    ["application/json", "text/plain", "application/octet-stream", "application/x+json; a=b"]
)


@given(st.binary() | st.text().map(str.encode) | json_payloads(), content_types, st.booleans())
def test_event_json_is_one_line_of_valid_json_that_keeps_the_payload(
    payload: bytes, content_type: str, named: bool
) -> None:
    event = make_event(payload, content_type, "note" if named else None)
    line = ndjson.event_json(event)
    assert b"\n" not in line and b"\r" not in line
    decoded = json.loads(line)
    keys = ["seq", "topic", "time", *(["event"] if named else [])]
    assert list(decoded)[: len(keys)] == keys
    assert len(decoded) == len(keys) + 1
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    try:
        value = ndjson.loads_strict(payload.decode("utf-8"))
        is_json = ndjson.is_json_content_type(content_type)
    except ValueError:
        is_json = False
    if is_json:
        assert decoded["data"] == value
    elif text is not None:
        assert decoded["data"] == text
    else:
        assert base64.b64decode(decoded["data_b64"], validate=True) == payload


# --- LineSplitter ---


def test_line_splitter() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    assert splitter.feed(b"a\nb\r\nc") == [b"a", b"b"]
    assert splitter.feed(b"d") == []
    assert splitter.feed(b"\n\n\r\ne\r\r\n") == [b"cd", b"", b"", b"e\r"]
    assert splitter.feed(b"") == []


def test_line_splitter_byte_by_byte() -> None:
    data = b'{"a":1}\r\n{"b":2}\n\nrest'
    splitter = LineSplitter(max_line_bytes=100)
    lines = [line for i in range(len(data)) for line in splitter.feed(data[i : i + 1])]
    assert lines == [b'{"a":1}', b'{"b":2}', b""]


def test_line_splitter_limit() -> None:
    LineSplitter(max_line_bytes=3).feed(b"abc\n")
    with pytest.raises(ProtocolError):
        LineSplitter(max_line_bytes=3).feed(b"abcd\n")
    with pytest.raises(ProtocolError):
        LineSplitter(max_line_bytes=3).feed(b"abcd")  # the pending tail counts too
    splitter = LineSplitter(max_line_bytes=3)
    assert splitter.feed(b"ab") == []
    with pytest.raises(ProtocolError):
        splitter.feed(b"cd")
    # A CR waiting for its LF does not count.
    splitter = LineSplitter(max_line_bytes=3)
    assert splitter.feed(b"abc\r") == []
    assert splitter.feed(b"\n") == [b"abc"]
    with pytest.raises(ProtocolError):
        LineSplitter(max_line_bytes=3).feed(b"abc\r\r")


@given(
    st.binary() | st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n"])).map(b"".join), st.data()
)
def test_line_splitter_any_split(data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=10), label="cuts"))
    splitter = LineSplitter(max_line_bytes=len(data) + 1)
    lines = [
        line
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)
        for line in splitter.feed(data[a:b])
    ]
    expected = [line.removesuffix(b"\r") for line in data.split(b"\n")[:-1]]
    assert lines == expected


@given(st.lists(st.binary()), st.integers(0, 16))
def test_line_splitter_raises_only_protocol_error(chunks: list[bytes], max_line_bytes: int) -> None:
    splitter = LineSplitter(max_line_bytes=max_line_bytes)
    try:
        for chunk in chunks:
            for line in splitter.feed(chunk):
                assert len(line) <= max_line_bytes
                assert b"\n" not in line
    except ProtocolError:
        pass


# --- batch publish ---

PROTOCOL_BATCH = (
    b'{"topic": "chat.lobby", "data": {"text": "hi"}}\n'
    b'{"topic": "chat.lobby", "data": "plain text", "event": "note", "id": "key-17"}\n'
    b'{"topic": "chat.lobby", "data_b64": "AAEC", "content_type": "application/octet-stream"}\n'
)
PROTOCOL_REQUESTS = [
    AppendRequest("chat.lobby", b'{"text":"hi"}', "application/json"),
    AppendRequest("chat.lobby", b"plain text", "text/plain; charset=utf-8", "note", "key-17"),
    AppendRequest("chat.lobby", b"\x00\x01\x02", "application/octet-stream"),
]


def test_protocol_batch_example() -> None:
    assert parse_publish_batch(PROTOCOL_BATCH, max_payload_bytes=MiB) == PROTOCOL_REQUESTS
    crlf_and_blanks = b"\r\n\n" + PROTOCOL_BATCH.replace(b"\n", b"\r\n\r\n  \t\n")
    assert parse_publish_batch(crlf_and_blanks, max_payload_bytes=MiB) == PROTOCOL_REQUESTS
    # No final newline.
    assert parse_publish_batch(PROTOCOL_BATCH[:-1], max_payload_bytes=MiB) == PROTOCOL_REQUESTS


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"topic":"t","data":7}', AppendRequest("t", b"7", "application/json")),
        ('{"topic":"t","data":null}', AppendRequest("t", b"null", "application/json")),
        (
            '{"topic":"t","data":[true, 1.5]}',
            AppendRequest("t", b"[true,1.5]", "application/json"),
        ),
        (
            '{"topic":"t","data":{"é": "☃"}}',
            AppendRequest("t", '{"é":"☃"}'.encode(), "application/json"),
        ),
        ('{"topic":"t","data":""}', AppendRequest("t", b"", "text/plain; charset=utf-8")),
        (
            '{"topic":"t","data":"\\u00e9"}',
            AppendRequest("t", "é".encode(), "text/plain; charset=utf-8"),
        ),
        ('{"topic":"t","data_b64":""}', AppendRequest("t", b"", "application/octet-stream")),
        (
            '{"topic":"t","data":"x","content_type":"text/markdown; charset=utf-8"}',
            AppendRequest("t", b"x", "text/markdown; charset=utf-8"),
        ),
        (
            '{"topic":"t","data":"x","event":null,"id":null,"content_type":null}',
            AppendRequest("t", b"x", "text/plain; charset=utf-8"),
        ),
    ],
)
def test_parse_publish_line(line: str, expected: AppendRequest) -> None:
    assert parse_publish_line(line.encode(), max_payload_bytes=MiB) == expected


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (b'{"topic":"t","data":"\xff"}', "UTF-8"),
        (b"", "JSON"),
        (b'{"topic":"t","data":"x"', "JSON"),
        (b'{"topic":"t","data":NaN}', "JSON"),
        (b'{"topic":"t","data":[-Infinity]}', "JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "JSON"),
        (b'["t","x"]', "object"),
        (b'"t"', "object"),
        (b'{"topic":"t","data":"x","extra":1}', "extra"),
        (b'{"data":"x"}', "topic"),
        (b'{"topic":7,"data":"x"}', "topic"),
        (b'{"topic":"a..b","data":"x"}', "invalid topic"),
        (b'{"topic":"a.*","data":"x"}', "invalid topic"),
        (b'{"topic":"","data":"x"}', "invalid topic"),
        (b'{"topic":"\\ud800","data":"x"}', "invalid topic"),
        (b'{"topic":"t"}', "exactly one"),
        (b'{"topic":"t","data":"x","data_b64":"AA=="}', "exactly one"),
        (b'{"topic":"t","data_b64":7}', "data_b64"),
        (b'{"topic":"t","data_b64":null}', "data_b64"),
        (b'{"topic":"t","data_b64":"AAE"}', "base64"),
        (b'{"topic":"t","data_b64":"AA E="}', "base64"),
        (b'{"topic":"t","data_b64":"\xc3\xa9AAA"}', "base64"),
        (b'{"topic":"t","data":"\\ud800"}', "data"),
        (b'{"topic":"t","data":["\\udfff"]}', "data"),
        (b'{"topic":"t","data":1e400}', "data"),
        (b'{"topic":"t","data":"x","content_type":""}', "content_type"),
        (b'{"topic":"t","data":"x","content_type":7}', "content_type"),
        (b'{"topic":"t","data":"x","content_type":"a\\nb"}', "content_type"),
        (b'{"topic":"t","data":"x","content_type":"' + b"a" * 256 + b'"}', "content_type"),
        (b'{"topic":"t","data":"x","event":"gap"}', "reserved"),
        (b'{"topic":"t","data":"x","event":"a b"}', "event name"),
        (b'{"topic":"t","data":"x","event":7}', "event"),
        (b'{"topic":"t","data":"x","id":"a b"}', "Idempotency-Key"),
        (b'{"topic":"t","data":"x","id":""}', "Idempotency-Key"),
        (b'{"topic":"t","data":"x","id":["k"]}', "id"),
    ],
)
def test_parse_publish_line_refuses(line: bytes, detail: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_publish_line(line, max_payload_bytes=MiB)
    assert info.value.problem is Problem.BAD_BATCH_LINE
    assert detail in info.value.detail


@pytest.mark.parametrize(
    "data",
    ['"xxxxx"', "[1,2]", '"\\u00e9\\u00e9\\u00e9"'],
)
def test_parse_publish_line_payload_limit(data: str) -> None:
    line = f'{{"topic":"t","data":{data}}}'.encode()
    limit = len(parse_publish_line(line, max_payload_bytes=MiB).payload)
    assert parse_publish_line(line, max_payload_bytes=limit).payload
    with pytest.raises(RequestError) as info:
        parse_publish_line(line, max_payload_bytes=limit - 1)
    assert info.value.problem is Problem.PAYLOAD_TOO_LARGE


def test_parse_publish_line_base64_payload_limit() -> None:
    line = b'{"topic":"t","data_b64":"AAECAw=="}'
    assert parse_publish_line(line, max_payload_bytes=4).payload == b"\x00\x01\x02\x03"
    with pytest.raises(RequestError) as info:
        parse_publish_line(line, max_payload_bytes=3)
    assert info.value.problem is Problem.PAYLOAD_TOO_LARGE


def test_batch_error_names_the_line() -> None:
    body = PROTOCOL_BATCH + b"\n" + b'{"topic":"a..b","data":1}\n'
    with pytest.raises(RequestError) as info:
        parse_publish_batch(body, max_payload_bytes=MiB)
    assert info.value.problem is Problem.BAD_BATCH_LINE
    assert info.value.extra == {"line": 5}  # blank lines count: numbers match the client's file
    assert info.value.detail.startswith("line 5: invalid topic")
    assert info.value.as_problem()["line"] == 5


def test_batch_payload_too_large_keeps_its_problem() -> None:
    body = b'{"topic":"t","data":"ok"}\n{"topic":"t","data":"too long"}\n'
    with pytest.raises(RequestError) as info:
        parse_publish_batch(body, max_payload_bytes=4)
    assert info.value.problem is Problem.PAYLOAD_TOO_LARGE
    assert info.value.extra == {"line": 2}


@pytest.mark.parametrize("body", [b"", b"\n", b"\r\n \t\n\n"])
def test_empty_batch(body: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_publish_batch(body, max_payload_bytes=MiB)
    assert info.value.problem is Problem.BAD_BATCH_LINE
    assert info.value.extra == {"line": 1}


def test_batch_line_limit() -> None:
    line = b'{"topic":"t","data":1}\n'
    assert len(parse_publish_batch(line * 3, max_payload_bytes=MiB, max_lines=3)) == 3
    with pytest.raises(RequestError) as info:
        parse_publish_batch(line + b"\n" + line * 3, max_payload_bytes=MiB, max_lines=3)
    assert info.value.problem is Problem.BAD_BATCH_LINE
    assert info.value.extra == {"line": 5}
    # The limit is checked before the over-limit line is parsed: it may be garbage.
    with pytest.raises(RequestError) as info:
        parse_publish_batch(line * 3 + b"garbage", max_payload_bytes=MiB, max_lines=3)
    assert info.value.extra == {"line": 4}
    assert "at most 3" in info.value.detail


# --- fuzz: any input yields requests or a RequestError, never another exception ---

LINE_PROBLEMS = {Problem.BAD_BATCH_LINE, Problem.PAYLOAD_TOO_LARGE}
batch_keys = st.sampled_from(["topic", "data", "data_b64", "content_type", "event", "id", "x"])
scalars = st.sampled_from(["t", "a.b", "a..b", "AAEC", "note", "gap", "k", "", "\ud800", "%"])
line_objects = st.dictionaries(batch_keys, scalars | json_values, max_size=6)


def assert_parses_or_refuses(line: bytes) -> None:
    try:
        request = parse_publish_line(line, max_payload_bytes=64)
    except RequestError as exc:
        assert exc.problem in LINE_PROBLEMS
    else:
        assert len(request.payload) <= 64


@given(st.binary())
def test_parse_publish_line_fuzz_bytes(line: bytes) -> None:
    assert_parses_or_refuses(line)


@given(st.text())
def test_parse_publish_line_fuzz_text(line: str) -> None:
    assert_parses_or_refuses(line.encode())


@given(json_values | line_objects)
def test_parse_publish_line_fuzz_json(value: Any) -> None:
    assert_parses_or_refuses(json.dumps(value).encode())
    assert_parses_or_refuses(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@given(st.lists(st.binary() | line_objects.map(lambda v: json.dumps(v).encode()), max_size=8))
def test_parse_publish_batch_fuzz(lines: list[bytes]) -> None:
    body = b"\n".join(lines)
    try:
        requests = parse_publish_batch(body, max_payload_bytes=64, max_lines=5)
    except RequestError as exc:
        assert exc.problem in LINE_PROBLEMS
        assert isinstance(exc.extra["line"], int)
        assert 1 <= exc.extra["line"] <= max(1, body.count(b"\n") + 1)
    else:
        assert 1 <= len(requests) <= 5


# --- json_line: a payload the broker serialised is spliced without being parsed again ---

@given(json_values, st.sampled_from([None, "text/plain", "application/x+json"]))
def test_a_batch_line_marks_its_payload_json_only_when_it_serialised_a_value(
    value: object, override: str | None
) -> None:
    line: dict[str, object] = {"topic": "t", "data": value}
    if override is not None:
        line["content_type"] = override
    try:
        text = json.dumps(line, allow_nan=False)
    except ValueError:  # an infinity: not JSON, and refused as such elsewhere
        assume(False)
    request = parse_publish_line(text.encode(), max_payload_bytes=MiB)
    assert request.json_line == (not isinstance(value, str))
    event = make_event(request.payload, request.content_type, None)
    marked = Event(event.seq, event.topic, event.payload, event.content_type, event.time,
                   json_line=request.json_line)
    # splicing unparsed gives exactly what validating gives
    assert ndjson.event_json(marked) == ndjson.event_json(event)
    assert ndjson.encode_event(marked) == ndjson.encode_event(event)
    assert ws.encode_event_json(marked) == ws.encode_event_json(event)


def test_base64_and_text_payloads_are_not_marked_json() -> None:
    b64 = parse_publish_line(b'{"topic":"t","data_b64":"AAE="}', max_payload_bytes=MiB)
    text = parse_publish_line(b'{"topic":"t","data":"{}"}', max_payload_bytes=MiB)
    assert not b64.json_line and not text.json_line
