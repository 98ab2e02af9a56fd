"""The pure parts of the native gRPC listener (transports/native_grpc.py)."""

from __future__ import annotations

import pytest

from broker.transports import native_grpc
from broker.transports.native_grpc import CallError, split_messages


def message(data: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(data).to_bytes(4, "big") + data


def test_grpc_message_and_timeout_encodings() -> None:
    assert native_grpc.grpc_message("bad-topic: 'a b' 100% ☃") == (
        b"bad-topic: 'a b' 100%25 %E2%98%83"
    )
    assert native_grpc.parse_timeout(b"250m") == 0.25
    assert native_grpc.parse_timeout(b"2S") == 2.0
    assert native_grpc.parse_timeout(b"1H") == 3600.0
    assert native_grpc.parse_timeout(b"") is None
    assert native_grpc.parse_timeout(b"5x") is None
    assert native_grpc.parse_timeout(b"123456789S") is None  # at most 8 digits


def test_messages_are_taken_whole_and_the_rest_is_kept() -> None:
    stream = message(b"one") + message(b"") + message(b"three")
    for cut in range(len(stream) + 1):  # every way two reads can split them
        buffer = bytearray(stream[:cut])
        taken = split_messages(buffer, 100)
        buffer += stream[cut:]
        taken += split_messages(buffer, 100)
        assert taken == [b"one", b"", b"three"]
        assert buffer == b""


def test_a_compressed_or_oversize_message_is_refused() -> None:
    with pytest.raises(CallError) as refused:
        split_messages(bytearray(message(b"x", compressed=True)), 100)
    assert refused.value.code == native_grpc.UNIMPLEMENTED
    with pytest.raises(CallError) as refused:
        split_messages(bytearray(message(b"x" * 101)[:5]), 100)  # refused from its head alone
    assert refused.value.code == native_grpc.RESOURCE_EXHAUSTED
