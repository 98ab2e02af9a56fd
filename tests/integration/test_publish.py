"""HTTP publish requests as clients really send them, on both paths (the native listener's and
hypercorn's): keep-alive and pipelined requests, whatever follows a publish on the same
connection, the request forms only hypercorn serves, and clients that leave mid-request."""

from __future__ import annotations

import json

import httpx
import trio

from broker.server import Running
from tests.integration.clients import subscribe, wait_for

Response = tuple[int, dict[bytes, bytes], bytes]


async def connect(broker: Running) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))


async def responses(stream: trio.SocketStream, n: int, buffer: bytearray) -> list[Response]:
    """The next ``n`` responses (Content-Length bodies) read from ``stream``."""
    out: list[Response] = []
    with trio.fail_after(10):
        while len(out) < n:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                lines = bytes(buffer[:end]).split(b"\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0"))
                if len(buffer) >= end + 4 + length:
                    body = bytes(buffer[end + 4 : end + 4 + length])
                    del buffer[: end + 4 + length]
                    out.append((int(lines[0].split()[1]), headers, body))
                    continue
            data = await stream.receive_some(65536)
            if not data:
                raise AssertionError(f"the connection closed after {len(out)} responses")
            buffer += data
    return out


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(), len(body), head, body)


async def test_pipelined_publishes_are_answered_in_order_on_one_connection(
    broker: Running,
) -> None:
    requests = [
        post("/v1/topics/p.one", b"1"),
        post("/v1/publish", b'{"topic":"p.two","data":2}\n{"topic":"p.one","data":3}\n',
             b"Content-Type: application/x-ndjson"),
        post("/v1/topics/p.two?event=tick", b"4", b"Idempotency-Key: k-4"),
        post("/v1/topics/p.two", b"4", b"Idempotency-Key: k-4"),
        post("/v1/topics/a..b", b"5"),
        post("/v1/topics/p.one", b"6"),
    ]
    stream = await connect(broker)
    async with stream:
        # all in one write, then cut at every byte boundary of the second one
        await stream.send_all(b"".join(requests[:1]))
        for i in range(len(requests[1])):
            await stream.send_all(requests[1][i : i + 1])
        await stream.send_all(b"".join(requests[2:]))
        got = await responses(stream, len(requests), bytearray())
    assert [(status, json.loads(body)) for status, _, body in got[:4]] == [
        (200, {"seq": 1}), (200, {"seqs": [2, 3]}), (200, {"seq": 4}),
        (200, {"seq": 4, "duplicate": True}),
    ]
    status, headers, body = got[4]
    assert status == 400 and headers[b"content-type"] == b"application/problem+json"
    assert json.loads(body)["type"] == "urn:broker:problem:bad-topic"
    assert json.loads(body)["instance"] == "/v1/topics/a..b"
    assert got[5][0] == 200 and json.loads(got[5][2]) == {"seq": 5}
    async with httpx.AsyncClient(base_url=broker.url) as http:
        polled = await http.get("/v1/poll", params={"topic": "p.*", "from": "earliest"})
    events = polled.json()["events"]
    assert [(e["seq"], e["topic"], e["data"], e.get("event")) for e in events] == [
        (1, "p.one", "1", None), (2, "p.two", 2, None), (3, "p.one", 3, None),
        (4, "p.two", "4", "tick"), (5, "p.one", "6", None),
    ]


async def test_any_request_may_follow_a_publish_on_its_connection(broker: Running) -> None:
    stream = await connect(broker)
    async with stream:
        health_request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        await stream.send_all(post("/v1/topics/f", b"x") + health_request)
        buffer = bytearray()
        (published, health) = await responses(stream, 2, buffer)
        assert json.loads(published[2]) == {"seq": 1} and json.loads(health[2]) == {"status": "ok"}
        # and after that, a publish again (hypercorn has the connection now), then a stream
        await stream.send_all(post("/v1/topics/f", b"y")
                              + b"GET /v1/sse?topic=f&from=earliest HTTP/1.1\r\nHost: t\r\n\r\n")
        (again,) = await responses(stream, 1, buffer)
        assert json.loads(again[2]) == {"seq": 2}
        with trio.fail_after(10):
            while b"data: y\n" not in buffer:
                buffer += await stream.receive_some(65536)
        assert b"HTTP/1.1 200" in buffer and b"data: x\n" in buffer


async def test_a_stream_may_follow_a_publish_on_its_connection(broker: Running) -> None:
    stream = await connect(broker)
    async with stream:
        await stream.send_all(
            post("/v1/topics/s", b"hi") + post("/v1/topics/s", b"ho")
            + b"GET /v1/ndjson?topic=s&from=earliest HTTP/1.1\r\nHost: t\r\n\r\n")
        buffer = bytearray()
        first, second = await responses(stream, 2, buffer)
        assert (json.loads(first[2]), json.loads(second[2])) == ({"seq": 1}, {"seq": 2})
        with trio.fail_after(10):
            while b'"data":"ho"' not in buffer:
                buffer += await stream.receive_some(65536)
        assert buffer.startswith(b"HTTP/1.1 200") and b'"data":"hi"' in buffer


async def test_requests_only_hypercorn_serves_are_answered_the_same(broker: Running) -> None:
    """Chunked bodies, Expect: 100-continue, HTTP/1.0, a CORS Origin, a body announced over the
    limit: each answered right, on a connection that served a plain publish first."""
    chunked = (b"POST /v1/topics/h HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n")
    stream = await connect(broker)
    async with stream:
        await stream.send_all(post("/v1/topics/h", b"plain") + chunked)
        got = await responses(stream, 2, bytearray())
    assert [json.loads(body) for _, _, body in got] == [{"seq": 1}, {"seq": 2}]

    stream = await connect(broker)
    async with stream:
        await stream.send_all(b"POST /v1/topics/h HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        buffer = bytearray()
        with trio.fail_after(10):
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
        assert buffer.startswith(b"HTTP/1.1 100")
        del buffer[: buffer.index(b"\r\n\r\n") + 4]
        await stream.send_all(b"expect")
        ((status, _, body),) = await responses(stream, 1, buffer)
    assert (status, json.loads(body)) == (200, {"seq": 3})

    stream = await connect(broker)
    async with stream:
        await stream.send_all(b"POST /v1/topics/h HTTP/1.0\r\nContent-Length: 4\r\n\r\nold!")
        ((status, _, body),) = await responses(stream, 1, bytearray())
    assert (status, json.loads(body)) == (200, {"seq": 4})

    stream = await connect(broker)
    async with stream:
        await stream.send_all(post("/v1/topics/h", b"o", b"Origin: https://elsewhere.example"))
        ((status, _, body),) = await responses(stream, 1, bytearray())
    assert (status, json.loads(body)) == (200, {"seq": 5})

    stream = await connect(broker)
    async with stream:
        limit = broker.node.settings.max_payload_bytes
        await stream.send_all(
            b"POST /v1/topics/h HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
        ((status, _, body),) = await responses(stream, 1, bytearray())
    assert status == 413
    assert json.loads(body)["detail"] == f"the payload is {limit + 1} bytes; the limit is {limit}"


async def test_connection_close_is_honoured(broker: Running) -> None:
    """On both paths (hypercorn's used to leave such a connection open: see ClosingTCPServer)."""
    for request in (
        post("/v1/topics/c", b"bye", b"Connection: close"),
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ):
        stream = await connect(broker)
        async with stream:
            await stream.send_all(request)
            ((status, headers, _),) = await responses(stream, 1, bytearray())
            assert status == 200 and headers[b"connection"].lower() == b"close"
            with trio.fail_after(10):
                assert await stream.receive_some(65536) == b""


async def test_a_client_leaving_mid_request_stores_nothing_and_harms_no_one(
    broker: Running,
) -> None:
    async with (
        httpx.AsyncClient(base_url=broker.url) as http,
        subscribe(broker.url, "sse", ["m"]) as sub,
    ):
        await wait_for(lambda: len(broker.node.hub) == 1)
        for partial in (
            b"POST /v1/topics/m HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf",
            b"POST /v1/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\n"
            b'Content-Length: 50\r\n\r\n{"topic":"m","data":"lost"}\n',
            b"POST /v1/topics/m HTTP/1.1\r\nHost: t\r\nContent-Le",
        ):
            stream = await connect(broker)
            await stream.send_all(partial)
            await stream.aclose()
        published = await http.post("/v1/topics/m", content=b"whole")
        assert published.json() == {"seq": 1}
        (item,) = await sub.take(1)
        assert (item.seq, item.data) == (1, b"whole")
        assert broker.node.log.last_seq == 1
