"""What only the native stream path (transports/native.py) has to get right on the wire."""

from __future__ import annotations

import gc

import h11
import pytest
import trio

from broker.server import Running


async def exchange(broker: Running, request: bytes, until: bytes) -> bytes:
    port = int(broker.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        got = b""
        with trio.fail_after(10):
            while until not in got:
                data = await stream.receive_some(65536)
                if not data:
                    break
                got += data
        return got


async def test_an_http_1_0_stream_is_not_chunked(broker: Running) -> None:
    got = await exchange(broker, b"GET /v1/sse?topic=a HTTP/1.0\r\n\r\n", b"id: ")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert body.startswith(b"retry: ")


PUBLISH = b"POST /v1/topics/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"


@pytest.mark.parametrize(
    ("second", "until", "by_hypercorn"),
    [
        (b"GET /v1/sse?topic=a&from=earliest HTTP/1.1\r\nHost: x\r\n\r\n", b"data: hi\n\n",
         False),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b'{"status":"ok"}', True),
    ],
    ids=["stream", "health"],
)
async def test_what_follows_a_native_publish_on_its_connection(
    broker: Running, second: bytes, until: bytes, by_hypercorn: bool
) -> None:
    """A plain publish is answered natively; a stream asked for next on the same connection is
    served natively too, anything else by hypercorn (whose answers carry ``server:
    hypercorn``), with the bytes already read."""
    got = await exchange(broker, PUBLISH + second, until)
    published, answer = got.split(b"HTTP/1.1 200", 2)[1:]
    assert b'{"seq":1}' in published and b"server: hypercorn" not in published
    assert until in answer and (b"server: hypercorn" in answer) == by_hypercorn


async def test_a_chunked_publish_is_served_by_hypercorn(broker: Running) -> None:
    got = await exchange(
        broker,
        b"POST /v1/topics/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n",
        b'{"seq":1}',
    )
    assert got.startswith(b"HTTP/1.1 200") and b"server: hypercorn" in got


async def test_an_open_native_stream_keeps_no_parser(broker: Running) -> None:
    """What an idle stream keeps is memory per subscriber (decisions #22): the h11 parser that
    read its head (and the publishes before it) is let go once the stream is served."""
    port = int(broker.url.rsplit(":", 1)[1])
    requests = [
        b"GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/topics/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    streams = []
    try:
        for request in requests:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            await stream.send_all(request)
            got = b""
            with trio.fail_after(10):
                while b"retry: " not in got:
                    got += await stream.receive_some(65536)
        with trio.fail_after(10):
            while len(broker.node.hub) < 2:
                await trio.sleep(0.01)
        gc.collect()
        assert [o for o in gc.get_objects() if isinstance(o, h11.Connection)] == []
    finally:
        for stream in streams:
            await stream.aclose()
