"""The gRPC transport's server messages (``broker.v1.Delivery``), encoded by hand.

Pure: no grpc, no generated code. Each event is serialized once (as its ``events`` entry of a
``Delivery``), cached per run, and a write is the concatenation of what is pending: protobuf
concatenates repeated fields, so N pre-encoded entries joined *are* one ``Delivery`` with N
events. ``tests/unit/test_wire_pb.py`` checks every encoder against the generated classes.

Field numbers are those of ``protos/broker/v1/broker.proto``.
"""

from __future__ import annotations

from broker.model import Event

# Delivery's fields
_EVENTS, _GAPS, _RESET, _SUBSCRIBED, _HEARTBEAT, _ACK, _ERROR = 1, 2, 3, 4, 5, 6, 7


def _varint(n: int) -> bytes:
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


def encode_event(event: Event) -> bytes:
    """The event as one ``events`` entry of a ``Delivery``."""
    body = (
        _int_field(1, event.seq)
        + _str_field(2, event.topic)
        + _int_field(3, max(0, round(event.time * 1000)))
        + (_bytes_field(4, event.payload) if event.payload else b"")
        + _str_field(5, event.content_type)
        + _str_field(6, event.event)
    )
    return _bytes_field(_EVENTS, body)


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
