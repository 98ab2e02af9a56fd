"""What only the native stream path (transports/native.py) has to get right on the wire."""

from __future__ import annotations

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


async def test_a_stream_after_a_request_on_the_same_connection_goes_through_hypercorn(
    broker: Running,
) -> None:
    """Only a connection's first request is looked at: a keep-alive connection that served a
    publish and then asks for a stream gets it from the slow path, correctly."""
    got = await exchange(
        broker,
        b"POST /v1/topics/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /v1/sse?topic=a&from=earliest HTTP/1.1\r\nHost: x\r\n\r\n",
        b"data: hi\n\n",
    )
    assert b'{"seq":1}' in got
    second = got.split(b"HTTP/1.1 200", 2)[2]
    assert b"server: hypercorn" in second and b"data: hi" in second
