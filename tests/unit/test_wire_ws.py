"""WebSocket subprotocols: frames out (byte-exact), operations in (both codecs)."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from broker.errors import Problem, ProtocolError, RequestError
from broker.model import Event, Position
from broker.wire import ws
from broker.wire.ws import Codec, Ping, Publish, Subscribe, Unsubscribe, parse_op

MiB = 1_048_576
EVENT = Event(7, "chat.lobby", b"hello", "text/plain", 1763730523.123)


def pack(value: object) -> bytes:
    result: bytes = msgpack.packb(value, use_bin_type=True)
    return result


def encode_op(codec: Codec, op: dict[str, Any]) -> str | bytes:
    return json.dumps(op) if codec is Codec.JSON else pack(op)


def refused(message: str | bytes, codec: Codec, max_payload_bytes: int = MiB) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_op(message, codec, max_payload_bytes=max_payload_bytes)
    return info.value


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([], Codec.JSON),
        (["broker.v1.json"], Codec.JSON),
        (["broker.v1.msgpack"], Codec.MSGPACK),
        (["other", "broker.v1.msgpack", "broker.v1.json"], Codec.MSGPACK),
        (["broker.v1.json", "broker.v1.msgpack"], Codec.JSON),
        (["other"], None),
        (["BROKER.V1.JSON"], None),  # subprotocol names are case-sensitive (RFC 6455)
    ],
)
def test_choose_codec(offered: list[str], expected: Codec | None) -> None:
    assert ws.choose_codec(offered) is expected


def test_subprotocol_names() -> None:
    assert ws.JSON_SUBPROTOCOL == Codec.JSON.value == "broker.v1.json"
    assert ws.MSGPACK_SUBPROTOCOL == Codec.MSGPACK.value == "broker.v1.msgpack"


# --- server frames ---


@pytest.mark.parametrize(
    ("event", "frame"),
    [
        (
            EVENT,
            '{"type":"event","seq":7,"topic":"chat.lobby","time":1763730523123,"data":"hello"}',
        ),
        (
            Event(8, "a", b'{"x": 1}', "application/json", 0.001, "note"),
            '{"type":"event","seq":8,"topic":"a","time":1,"event":"note","data":{"x": 1}}',
        ),
        (
            Event(9, "a", b"\xff", "application/octet-stream", 0.0),
            '{"type":"event","seq":9,"topic":"a","time":0,"data_b64":"/w=="}',
        ),
        (
            Event(10, "a", "☃".encode(), "text/plain", 0.0),
            '{"type":"event","seq":10,"topic":"a","time":0,"data":"☃"}',
        ),
    ],
)
def test_encode_event_json(event: Event, frame: str) -> None:
    assert ws.encode_event_json(event).decode() == frame
    assert ws.decode_frame(Codec.JSON, frame)["type"] == "event"


def test_encode_event_msgpack() -> None:
    frame = ws.encode_event_msgpack(EVENT)
    assert frame == (
        b"\x86\xa4type\xa5event\xa3seq\x07\xa5topic\xaachat.lobby\xa4time"
        b"\xcf\x00\x00\x01\x9a\xa6\x88\x03\xf3\xa4data\xc4\x05hello\xaccontent_type\xaatext/plain"
    )
    assert ws.decode_frame(Codec.MSGPACK, frame) == {
        "type": "event",
        "seq": 7,
        "topic": "chat.lobby",
        "time": 1763730523123,
        "data": b"hello",
        "content_type": "text/plain",
    }


def test_encode_event_msgpack_with_event_name_keeps_key_order() -> None:
    event = Event(8, "a", b"\xff\x00", "application/octet-stream", 2.0, "note")
    pairs = msgpack.unpackb(ws.encode_event_msgpack(event), object_pairs_hook=list)
    assert pairs == [
        ("type", "event"),
        ("seq", 8),
        ("topic", "a"),
        ("time", 2000),
        ("event", "note"),
        ("data", b"\xff\x00"),  # bin, not str: raw bytes always
        ("content_type", "application/octet-stream"),
    ]


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (
            {"type": "subscribed", "id": "s1", "position": "E1:6"},
            '{"type":"subscribed","id":"s1","position":"E1:6"}',
        ),
        (
            {"type": "gap", "sub": "s1", "from_seq": 5, "to_seq": 20},
            '{"type":"gap","sub":"s1","from_seq":5,"to_seq":20}',
        ),
        ({"type": "reset", "sub": "s1", "epoch": "E2"}, '{"type":"reset","sub":"s1","epoch":"E2"}'),
        ({"type": "published", "seq": 43}, '{"type":"published","seq":43}'),
        ({"type": "pong", "ref": "é"}, '{"type":"pong","ref":"é"}'),
    ],
)
def test_encode_frame(frame: dict[str, object], text: str) -> None:
    assert ws.encode_frame(Codec.JSON, frame) == text
    packed = ws.encode_frame(Codec.MSGPACK, frame)
    assert isinstance(packed, bytes)
    assert msgpack.unpackb(packed, raw=False) == frame
    assert ws.decode_frame(Codec.MSGPACK, packed) == frame
    assert ws.decode_frame(Codec.JSON, text) == frame


def test_error_frame() -> None:
    error = RequestError(Problem.BAD_TOPIC, "topic 'a..b' is invalid")
    assert ws.error_frame(Codec.JSON, error, 7) == (
        '{"type":"error","code":"bad-topic","message":"topic \'a..b\' is invalid","ref":7}'
    )
    assert ws.error_frame(Codec.JSON, error) == (
        '{"type":"error","code":"bad-topic","message":"topic \'a..b\' is invalid"}'
    )
    assert msgpack.unpackb(ws.error_frame(Codec.MSGPACK, error, "r1")) == {
        "type": "error",
        "code": "bad-topic",
        "message": "topic 'a..b' is invalid",
        "ref": "r1",
    }


@pytest.mark.parametrize(
    ("codec", "message"),
    [
        (Codec.JSON, "[1]"),
        (Codec.JSON, "not json"),
        (Codec.JSON, '{"a":NaN}'),
        (Codec.MSGPACK, b"\x91\x01"),
        (Codec.MSGPACK, b"\xc1"),
        (Codec.MSGPACK, b"\x81"),  # truncated
        (Codec.MSGPACK, "text"),
    ],
)
def test_decode_frame_refuses(codec: Codec, message: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        ws.decode_frame(codec, message)


# --- client operations ---

CODECS = [Codec.JSON, Codec.MSGPACK]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ({"op": "subscribe", "topics": ["a.*"]}, Subscribe(("a.*",), None, None, None, None)),
        (
            {"op": "subscribe", "topics": ["a", "b.>"], "id": "feed:1", "from_seq": 41, "ref": 1},
            Subscribe(("a", "b.>"), "feed:1", Position(41), None, 1),
        ),
        (
            {"op": "subscribe", "topics": ["a"], "from_seq": "E1:6", "from": "earliest"},
            Subscribe(("a",), None, Position(6, "E1"), "earliest", None),
        ),
        (
            {"op": "subscribe", "topics": ["a"], "from": "latest", "id": None, "ref": "r"},
            Subscribe(("a",), None, None, "latest", "r"),
        ),
        # Patterns are the server's to check (Filter.parse), so a bad one passes here.
        ({"op": "subscribe", "topics": ["a..b"]}, Subscribe(("a..b",), None, None, None, None)),
        ({"op": "unsubscribe", "id": "s1", "ref": 2.5}, Unsubscribe("s1", 2.5)),
        ({"op": "ping"}, Ping(None)),
        ({"op": "ping", "ref": True}, Ping(True)),
        (
            {"op": "publish", "topic": "chat.lobby", "data": "hi", "ref": 9},
            Publish("chat.lobby", b"hi", "text/plain; charset=utf-8", None, None, 9),
        ),
        (
            {"op": "publish", "topic": "t", "data": {"é": [1, None]}},
            Publish("t", '{"é":[1,null]}'.encode(), "application/json", None, None, None),
        ),
        (
            {"op": "publish", "topic": "t", "data": None, "event": "note", "key": "k-1"},
            Publish("t", b"null", "application/json", "note", "k-1", None),
        ),
        (
            {"op": "publish", "topic": "t", "data": "# hi", "content_type": "text/markdown"},
            Publish("t", b"# hi", "text/markdown", None, None, None),
        ),
    ],
)
def test_parse_op(codec: Codec, op: dict[str, Any], expected: ws.Op) -> None:
    assert parse_op(encode_op(codec, op), codec, max_payload_bytes=MiB) == expected


def test_parse_op_msgpack_bytes_are_binary_data() -> None:
    message = pack({"op": "publish", "topic": "t", "data": b"\xff\x00"})
    assert parse_op(message, Codec.MSGPACK, max_payload_bytes=MiB) == Publish(
        "t", b"\xff\x00", "application/octet-stream", None, None, None
    )
    message = pack({"op": "publish", "topic": "t", "data": [1, 2], "ref": ""})
    assert parse_op(message, Codec.MSGPACK, max_payload_bytes=MiB) == Publish(
        "t", b"[1,2]", "application/json", None, None, ""
    )


def test_wrong_frame_type_for_the_codec() -> None:
    assert refused(b'{"op":"ping"}', Codec.JSON).problem is Problem.BAD_MESSAGE
    assert refused('{"op":"ping"}', Codec.MSGPACK).problem is Problem.BAD_MESSAGE


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("op", "problem"),
    [
        ({"ref": 1}, Problem.BAD_MESSAGE),
        ({"op": 7, "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "dance", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "ping", "ref": 1, "extra": 0}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "ref": 1}, Problem.MISSING_TOPIC),
        ({"op": "subscribe", "topics": [], "ref": 1}, Problem.MISSING_TOPIC),
        ({"op": "subscribe", "topics": "a", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a", 1], "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a"], "id": "", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a"], "id": "a b", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a"], "id": "x" * 65, "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a"], "id": 1, "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "subscribe", "topics": ["a"], "from_seq": -1, "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from_seq": 2**63, "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from_seq": True, "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from_seq": 1.0, "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from_seq": "E 1:2", "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from_seq": [1], "ref": 1}, Problem.BAD_POSITION),
        ({"op": "subscribe", "topics": ["a"], "from": "start", "ref": 1}, Problem.BAD_PARAMETER),
        ({"op": "subscribe", "topics": ["a"], "from": ["x"], "ref": 1}, Problem.BAD_PARAMETER),
        ({"op": "subscribe", "topics": ["a"], "form": "earliest", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "unsubscribe", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "unsubscribe", "id": 3, "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "publish", "data": "x", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "publish", "topic": 1, "data": "x", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "publish", "topic": "a..b", "data": "x", "ref": 1}, Problem.BAD_TOPIC),
        ({"op": "publish", "topic": "a.*", "data": "x", "ref": 1}, Problem.BAD_TOPIC),
        ({"op": "publish", "topic": "t", "ref": 1}, Problem.BAD_MESSAGE),
        (
            {"op": "publish", "topic": "t", "data": "x", "content_type": "", "ref": 1},
            Problem.BAD_MESSAGE,
        ),
        (
            {"op": "publish", "topic": "t", "data": "x", "content_type": 5, "ref": 1},
            Problem.BAD_MESSAGE,
        ),
        (
            {"op": "publish", "topic": "t", "data": "x", "event": "reset", "ref": 1},
            Problem.BAD_EVENT_NAME,
        ),
        ({"op": "publish", "topic": "t", "data": "x", "event": 5, "ref": 1}, Problem.BAD_MESSAGE),
        (
            {"op": "publish", "topic": "t", "data": "x", "key": "a b", "ref": 1},
            Problem.BAD_IDEMPOTENCY_KEY,
        ),
        ({"op": "publish", "topic": "t", "data": "x", "id": "k", "ref": 1}, Problem.BAD_MESSAGE),
        ({"op": "publish", "topic": "t", "data": "x" * 11, "ref": 1}, Problem.PAYLOAD_TOO_LARGE),
        ({"op": "publish", "topic": "t", "data": ["x" * 9], "ref": 1}, Problem.PAYLOAD_TOO_LARGE),
    ],
)
def test_parse_op_refuses_and_echoes_ref(
    codec: Codec, op: dict[str, Any], problem: Problem
) -> None:
    error = refused(encode_op(codec, op), codec, max_payload_bytes=10)
    assert error.problem is problem
    assert error.extra["ref"] == 1
    if problem is Problem.BAD_PARAMETER:
        assert error.extra["name"] == "from"


def test_payload_limit_is_inclusive() -> None:
    op = {"op": "publish", "topic": "t", "data": "x" * 10}
    for codec in CODECS:
        assert parse_op(encode_op(codec, op), codec, max_payload_bytes=10)
    assert parse_op(pack({**op, "data": b"x" * 10}), Codec.MSGPACK, max_payload_bytes=10)
    error = refused(pack({**op, "data": b"x" * 11}), Codec.MSGPACK, max_payload_bytes=10)
    assert error.problem is Problem.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(
    ("message", "codec"),
    [
        ("not json", Codec.JSON),
        ("[1]", Codec.JSON),
        ('"ping"', Codec.JSON),
        ('{"op":"ping","ref":NaN}', Codec.JSON),
        ('{"op":"ping","ref":[1]}', Codec.JSON),
        ('{"op":"ping","ref":{"a":1}}', Codec.JSON),
        ('{"op":"ping","ref":1e400}', Codec.JSON),
        ('{"op":"ping","ref":"\\ud800"}', Codec.JSON),
        (b"\xc1", Codec.MSGPACK),
        (b"\x81\xa2op", Codec.MSGPACK),
        (pack({"op": "ping", "ref": math.nan}), Codec.MSGPACK),
        (pack({"op": "ping", "ref": b"bytes"}), Codec.MSGPACK),
        (pack({"op": "ping"}) + b"\x00", Codec.MSGPACK),  # trailing data
        (pack(["ping"]), Codec.MSGPACK),
    ],
)
def test_unreadable_messages_have_no_ref(message: str | bytes, codec: Codec) -> None:
    error = refused(message, codec)
    assert error.problem is Problem.BAD_MESSAGE
    assert "ref" not in error.extra


@pytest.mark.parametrize(
    "message",
    [
        '{"op":"publish","topic":"t","data":"\\ud800","ref":3}',
        '{"op":"publish","topic":"t","data":{"k":"\\udfff"},"ref":3}',
        '{"op":"publish","topic":"t","data":[1e400],"ref":3}',
        '{"op":"publish","topic":"t","data":-Infinity,"ref":3}',
    ],
)
def test_json_data_without_a_utf8_json_form(message: str) -> None:
    error = refused(message, Codec.JSON)
    assert error.problem is Problem.BAD_MESSAGE


@pytest.mark.parametrize(
    "data",
    [[b"nested bytes"], math.inf, {"t": msgpack.ExtType(5, b"x")}, msgpack.Timestamp(1, 0)],
)
def test_msgpack_data_without_a_json_form(data: object) -> None:
    message = pack({"op": "publish", "topic": "t", "data": data, "ref": 3})
    error = refused(message, Codec.MSGPACK)
    assert error.problem is Problem.BAD_MESSAGE
    assert error.extra["ref"] == 3


def test_error_carries_ref_none_when_absent() -> None:
    error = refused('{"op":"dance"}', Codec.JSON)
    assert error.extra == {"ref": None}
    assert ws.error_frame(Codec.JSON, error, error.extra["ref"]) == (
        '{"type":"error","code":"bad-message","message":' + json.dumps(error.detail) + "}"
    )


# --- fuzz: any input yields an Op or a RequestError, never another exception ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)
op_names = st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "pong"])
field_names = st.sampled_from(
    ["topics", "id", "from_seq", "from", "topic", "data", "content_type", "event", "key", "x"]
)
field_values = st.sampled_from(
    ["a", "a.*", "a..b", "E1:5", "5", "earliest", "note", "gap", "k", "", "\ud800", -1, 2**64]
)


@st.composite
def op_like(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"op": draw(op_names)}
    op.update(draw(st.dictionaries(field_names, field_values | values, max_size=5)))
    if draw(st.booleans()):
        op["ref"] = draw(values)
    return op


def readable_ref(ref: object) -> bool:
    """Whether parse_op must echo this ref: a scalar that could be sent back as it came."""
    if isinstance(ref, float):
        return math.isfinite(ref)
    if isinstance(ref, str):
        return ref.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == ref
    return ref is None or isinstance(ref, int)


def assert_parses_or_refuses(message: str | bytes, codec: Codec, op: object = None) -> None:
    try:
        result = parse_op(message, codec, max_payload_bytes=32)
    except RequestError as exc:
        if isinstance(op, dict) and readable_ref(op.get("ref")):
            assert exc.extra["ref"] == op.get("ref")
    else:
        assert isinstance(result, Subscribe | Unsubscribe | Publish | Ping)
        if isinstance(result, Publish):
            assert len(result.payload) <= 32


def try_pack(value: object) -> bytes:
    try:
        return pack(value)
    except (UnicodeEncodeError, OverflowError):  # a lone surrogate, or an int over 64 bits
        assume(False)
        raise


@given(st.text())
def test_parse_op_fuzz_text(message: str) -> None:
    assert_parses_or_refuses(message, Codec.JSON)
    assert_parses_or_refuses(message, Codec.MSGPACK)


@given(st.binary())
def test_parse_op_fuzz_bytes(message: bytes) -> None:
    assert_parses_or_refuses(message, Codec.MSGPACK)
    assert_parses_or_refuses(message, Codec.JSON)


@given(json_values | op_like(json_values))
def test_parse_op_fuzz_json(value: Any) -> None:
    try:
        strict = json.dumps(value, allow_nan=False)
    except ValueError:  # NaN or infinity: Python writes them, but that is not JSON
        assert_parses_or_refuses(json.dumps(value), Codec.JSON)
    else:
        assert_parses_or_refuses(strict, Codec.JSON, value)
        assert_parses_or_refuses(json.dumps(value, ensure_ascii=False), Codec.JSON, value)


@given(msgpack_values | op_like(msgpack_values))
def test_parse_op_fuzz_msgpack(value: Any) -> None:
    assert_parses_or_refuses(try_pack(value), Codec.MSGPACK, value)


@given(st.text() | st.binary() | json_values.map(json.dumps) | msgpack_values.map(pack))
def test_decode_frame_fuzz(message: str | bytes) -> None:
    for codec in CODECS:
        with contextlib.suppress(ProtocolError):
            assert isinstance(ws.decode_frame(codec, message), dict)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("codec", list(Codec))
def test_a_wire_frame_is_byte_for_byte_what_wsproto_sends(codec: Codec, size: int) -> None:
    """The native path writes frames it built itself; wsproto (the reference) agrees."""
    payload = b"x" * size
    reference = FrameProtocol(client=False, extensions=[])
    data: str | bytes = payload.decode() if codec is Codec.JSON else payload
    assert ws.wire_frame(codec, payload) == bytes(reference.send_data(data, fin=True))


@pytest.mark.parametrize("size", [0, 60, 100, 126, 65_400, 65_536, 70_000])
@pytest.mark.parametrize("name", [None, "note"])
def test_a_json_event_wire_frame_is_its_frame_as_wsproto_sends_it(
    size: int, name: str | None
) -> None:
    """`wire_event_json` (one format for the usual case) against the frame built in steps."""
    payload = json.dumps("x" * size).encode()
    for marked in (True, False):
        event = Event(2**40 + 3, "a.b", payload, "application/json", 1.5, name, json_line=marked)
        frame = ws.encode_event_json(event)
        assert frame == ws.encode_event_json(Event(2**40 + 3, "a.b", payload, "application/json",
                                                   1.5, name))
        reference = FrameProtocol(client=False, extensions=[])
        assert ws.wire_event_json(event) == bytes(reference.send_data(frame.decode(), fin=True))


@pytest.mark.parametrize("codec", list(Codec))
def test_a_published_json_value_is_marked_for_splicing_and_text_is_not(codec: Codec) -> None:
    def publish(data: object) -> Publish:
        op = parse_op(encode_op(codec, {"op": "publish", "topic": "t", "data": data}), codec,
                      max_payload_bytes=MiB)
        assert isinstance(op, Publish)
        return op

    assert publish({"a": [1, 2.5]}).json_line
    assert not publish("{}").json_line
