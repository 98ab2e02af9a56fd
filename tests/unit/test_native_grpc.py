"""The pure parts of the native gRPC listener (transports/native_grpc.py)."""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio

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


# --- flow-control credit: a real h2 client on the other end of a socket pair checks the windows


class Peer:
    """A gRPC client's HTTP/2 side (h2, as the reference) and our server `Connection` on a socket
    pair; ``streams`` Subscribe calls are open, each with its `StreamSink`. The client's h2
    raises if the server ever sends more than a window allows."""

    def __init__(self, settings: dict[int, int], connection_window: int, streams: int) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._theirs.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._ours))
        self.server = native_grpc.Connection(stream, None, 1 << 20, (60, 20))  # type: ignore[arg-type]
        self.server.h2.initiate_connection()
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.client.update_settings(settings)
        if connection_window > 65_535:
            self.client.increment_flow_control_window(connection_window - 65_535)
        self.sinks = []
        for n in range(streams):
            stream_id = 1 + 2 * n
            self.client.send_headers(stream_id, [(":method", "POST"), (":path", "/x"),
                                                 (":scheme", "http"), (":authority", "a")])
            self.to_server()
            call = native_grpc.Call(self.server, stream_id, {})
            self.server.calls[stream_id] = call
            call._send_headers(())
            call.sink = native_grpc.StreamSink(self.server, stream_id)
            self.sinks.append(call.sink)
        self.received = {1 + 2 * n: 0 for n in range(streams)}
        self.data = {1 + 2 * n: bytearray() for n in range(streams)}
        self.to_client()

    def to_server(self) -> None:
        for event in self.server.h2.receive_data(self.client.data_to_send()):
            if not isinstance(event, h2.events.RequestReceived):
                self.server._handle(event)
        self.server.flush_h2()

    def to_client(self) -> None:
        """What the server wrote, through the client's h2 (which checks every window)."""
        while True:
            try:
                data = self._theirs.recv(1 << 20)
            except BlockingIOError:
                break
            for event in self.client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.received[event.stream_id] += event.flow_controlled_length
                    self.data[event.stream_id] += event.data
        self.to_server()

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


WINDOW = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
FRAME = h2.settings.SettingCodes.MAX_FRAME_SIZE


async def test_credit_never_outruns_small_windows_and_every_stream_gets_its_share() -> None:
    peer = Peer({WINDOW: 1000}, 65_535, streams=3)
    try:
        sent = dict.fromkeys(peer.received, 0)
        for _ in range(50):  # each stream's 1,000-byte window, then nothing until it is opened
            for stream_id, sink in zip(peer.received, peer.sinks, strict=True):
                if sink.write_nowait(b"x" * 95):
                    sent[stream_id] += 100
        peer.to_client()
        assert sent == peer.received == dict.fromkeys(peer.received, 1000)
        for stream_id in peer.received:
            peer.client.increment_flow_control_window(1000, stream_id)
        peer.to_server()
        for _ in range(50):  # the windows were given back: as much again
            for stream_id, sink in zip(peer.received, peer.sinks, strict=True):
                if sink.write_nowait(b"x" * 95):
                    sent[stream_id] += 100
        peer.to_client()
        assert sent == peer.received == dict.fromkeys(peer.received, 2000)
    finally:
        peer.close()


async def test_credit_is_given_back_when_a_stream_ends_or_the_window_shrinks() -> None:
    peer = Peer({WINDOW: 2**31 - 1, FRAME: 2**24 - 1}, 2**31 - 1, streams=2)
    try:
        first, second = peer.sinks
        h2c = peer.server.h2
        window = h2c.outbound_flow_control_window
        assert first.write_nowait(b"x" * 95)
        peer.to_client()
        assert h2c.outbound_flow_control_window < window - 100  # credit taken ahead
        # The client resets the first stream: its unused credit returns to the connection.
        peer.client.reset_stream(1)
        peer.to_server()
        assert first.closed and not first.write_nowait(b"x")
        assert h2c.outbound_flow_control_window == window - 100
        # The second stream holds credit; then the client shrinks every stream's window to
        # 1,000 bytes. Writing on from the old credit would overrun it (the client's h2 would
        # raise FlowControlError): the credit is given back, and 900 bytes more go, not 1,000.
        assert second.write_nowait(b"x" * 95)
        peer.client.update_settings({WINDOW: 1000})
        peer.to_server()
        peer.to_client()
        written = 1 + sum(second.write_nowait(b"x" * 95) for _ in range(20))
        peer.to_client()
        assert written == 10
        assert peer.received == {1: 100, 3: 1000}
    finally:
        peer.close()


async def test_a_write_the_socket_takes_in_part_is_finished_by_the_writer_intact() -> None:
    peer = Peer({WINDOW: 2**31 - 1, FRAME: 2**24 - 1}, 2**31 - 1, streams=1)
    try:
        (sink,) = peer.sinks
        peer._ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = peer.server.writer
        accepted = 0
        for n in range(10_000):  # until the socket takes a frame in part: the writer has the rest
            if not sink.write_nowait(b"%07d" % n + b"x" * 993):
                break
            accepted += 1
        # blocked from the first frame the socket took in part (not later, when the credit ran
        # out): nothing may be written around the rest while the writer holds it
        assert writer.blocked and 0 < accepted * 1005 < 256 * 1024
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            with trio.fail_after(5):
                while peer.received[1] < accepted * 1005:
                    peer.to_client()
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert not writer.blocked
        data = bytes(peer.data[1])
        assert len(data) == accepted * 1005
        for n in range(accepted):  # every message whole, in order
            message = data[n * 1005 : (n + 1) * 1005]
            assert message[:5] == b"\x00\x00\x00\x03\xe8" and message[5:12] == b"%07d" % n
    finally:
        peer.close()
