"""The gRPC transport's server messages (``broker.v1.Delivery``), encoded by hand.

Pure: no grpc, no generated code. Each event is serialized once (as its ``events`` entry of a
``Delivery``), cached per run, and a write is the concatenation of what is pending: protobuf
concatenates repeated fields, so N pre-encoded entries joined *are* one ``Delivery`` with N
events. ``tests/unit/test_wire_pb.py`` checks every encoder against the generated classes.

Field numbers are those of ``protos/broker/v1/broker.proto``.
"""

from __future__ import annotations

from typing import Any

from broker.model import Event

# Delivery's fields
_EVENTS, _GAPS, _RESET, _SUBSCRIBED, _HEARTBEAT, _ACK, _ERROR = 1, 2, 3, 4, 5, 6, 7


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:  # lengths, and seqs below 16 k
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x200000:  # seqs below 2 M
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _int_field(number: int, n: int) -> bytes:
    return _varint(number << 3) + _varint(n) if n else b""  # proto3 leaves defaults out


def _str_field(number: int, text: str | None) -> bytes:
    return _bytes_field(number, text.encode()) if text else b""


# An event's topic, content type and name fields, encoded once per distinct string (a
# broker sees few of each); cleared when one grows past this many.
_MAX_CACHED = 10_000
_topic_fields: dict[str, bytes] = {}
_type_fields: dict[str | None, bytes] = {}
_name_fields: dict[str | None, bytes] = {}


def _cached_str_field(cache: dict[Any, bytes], number: int, text: str | None) -> bytes:
    field = cache.get(text)
    if field is None:
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        field = cache[text] = _str_field(number, text)
    return field


# The last publish time's field: events published together share their millisecond, and a
# time's varint is six bytes (~0.6 us to make).
_last_time: list[Any] = [None, b""]


def encode_event(event: Event) -> bytes:
    """The event as one ``events`` entry of a ``Delivery`` (fields 1-6 of ``Event``, by hand:
    this runs once per event and transport, ~1.3 us)."""
    seq, payload = event.seq, event.payload
    millis = max(0, round(event.time * 1000))
    if millis == _last_time[0]:
        time = _last_time[1]
    else:
        time = b"\x18" + _varint(millis) if millis else b""
        _last_time[:] = millis, time
    topic = _topic_fields.get(event.topic)
    if topic is None:
        topic = _cached_str_field(_topic_fields, 2, event.topic)
    content_type = _type_fields.get(event.content_type)
    if content_type is None:
        content_type = _cached_str_field(_type_fields, 5, event.content_type)
    name = _name_fields.get(event.event)
    if name is None:
        name = _cached_str_field(_name_fields, 6, event.event)
    body = b"%b%b%b%b%b%b" % (
        b"\x08" + _varint(seq) if seq else b"",
        topic,
        time,
        b"\x22" + _varint(len(payload)) + payload if payload else b"",
        content_type,
        name,
    )
    return b"\x0a%b%b" % (_varint(len(body)), body)


def encode_gap(from_seq: int, to_seq: int, topic: str | None = None, sub: str = "") -> bytes:
    body = (
        _int_field(1, from_seq) + _int_field(2, to_seq) + _str_field(3, topic) + _str_field(4, sub)
    )
    return _bytes_field(_GAPS, body)


def encode_reset(epoch: str, sub: str = "") -> bytes:
    return _bytes_field(_RESET, _str_field(1, epoch) + _str_field(2, sub))


def encode_subscribed(sub: str, epoch: str, position: str) -> bytes:
    body = _str_field(1, sub) + _str_field(2, epoch) + _str_field(3, position)
    return _bytes_field(_SUBSCRIBED, body)


HEARTBEAT = _bytes_field(_HEARTBEAT, b"")


def encode_ack(id: str, seq: int, duplicate: bool = False) -> bytes:
    body = _str_field(1, id) + _int_field(2, seq) + _int_field(3, int(duplicate))
    return _bytes_field(_ACK, body)


def encode_error(id: str, sub: str, problem: str, detail: str) -> bytes:
    body = _str_field(1, id) + _str_field(2, sub) + _str_field(3, problem) + _str_field(4, detail)
    return _bytes_field(_ERROR, body)
