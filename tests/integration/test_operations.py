"""What operators rely on: streaming headers, heartbeats, health, metrics, drain, the process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio

from broker.server import Running
from broker.wire.sse import SSEParser
from tests.integration.clients import RawWebSocket, subscribe, wait_for
from tests.integration.conftest import StartBroker


async def test_streams_are_marked_uncacheable_and_unbuffered(
    broker: Running, http: httpx.AsyncClient
) -> None:
    for path, content_type in (
        ("/v1/topics/h/sse", "text/event-stream; charset=utf-8"),
        ("/v1/ndjson?topic=h", "application/x-ndjson"),
    ):
        async with http.stream("GET", path) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == content_type
            assert response.headers["cache-control"] == "no-cache, no-transform"
            assert response.headers["x-accel-buffering"] == "no"


async def test_heartbeats_keep_quiet_streams_alive(start_broker: StartBroker) -> None:
    running = await start_broker(heartbeat_seconds=0.2)
    async with httpx.AsyncClient(base_url=running.url) as http:
        async with http.stream("GET", "/v1/topics/quiet/sse") as response:
            seen = b""
            with trio.fail_after(5):
                async for chunk in response.aiter_raw():
                    seen += chunk
                    if seen.count(b": keepalive\n\n") >= 2:
                        break
            assert seen.startswith(b"retry: 2000\n\n")
        async with http.stream("GET", "/v1/ndjson?topic=quiet") as response:
            seen = b""
            with trio.fail_after(5):
                async for chunk in response.aiter_raw():
                    seen += chunk
                    if seen.endswith(b"}\n\n\n"):  # the hello line, then two empty lines
                        break


async def test_health_readiness_and_metrics(broker: Running, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = (await http.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["epoch"] == broker.node.log.epoch
    async with subscribe(broker.url, "sse", ["m"]) as feed:
        await wait_for(lambda: len(broker.node.hub) == 1)
        await http.post("/v1/topics/m", content=b"1")
        await http.post("/v1/topics/m", content=b"1", headers={"Idempotency-Key": "k"})
        await http.post("/v1/topics/m", content=b"1", headers={"Idempotency-Key": "k"})
        await feed.take(2)
        metrics = (await http.get("/metrics")).text
    for line in (
        'broker_connections{transport="sse"} 1',
        'broker_events_published_total{transport="http"} 2',
        "broker_publish_duplicates_total 1",
        'broker_events_delivered_total{transport="sse"} 2',
        'broker_subscriptions{state="live"} 1',
        "broker_log_last_seq 2",
        'broker_subscription_buffer_fill_ratio_bucket{le="+Inf"} 1',
        "broker_publish_seconds_count 3",
    ):
        assert line in metrics.splitlines(), line


async def test_drain_tells_every_client_to_go_and_refuses_new_work(
    broker: Running, http: httpx.AsyncClient
) -> None:
    node = broker.node
    async with (
        http.stream("GET", "/v1/topics/d/sse") as sse,
        RawWebSocket.open(broker.url, ["broker.v1.json"]) as ws,
    ):
        await ws.send(json.dumps({"op": "subscribe", "topics": ["d"]}))
        await ws.event()  # subscribed
        await wait_for(lambda: len(node.outlets) == 2)
        node.drain()
        body = b""
        with trio.fail_after(5):
            async for chunk in sse.aiter_raw():
                body += chunk
        start = f"id: {node.log.epoch}:0\n\n".encode()
        assert body == b"retry: 2000\n\n" + start + b"retry: 500\n\n"  # come back soon
        assert await ws.close_code() == 1012
    readyz = await http.get("/readyz")
    assert readyz.status_code == 503
    published = await http.post("/v1/topics/d", content=b"x")
    assert published.status_code == 503
    assert published.json()["type"] == "urn:broker:problem:unavailable"
    refused = await http.get("/v1/topics/d/sse")
    assert refused.status_code == 503


async def test_the_process_serves_and_stops_on_sigterm(tmp_path: object) -> None:
    env = {**os.environ, "BROKER_PORT": "0", "BROKER_LOG_FORMAT": "json"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1"],
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    logs = b""
    try:
        with trio.fail_after(20):
            while b'"message": "serving"' not in logs:
                logs += await process.stderr.receive_some(4096)
            url = next(
                json.loads(line)["url"]
                for line in logs.splitlines()
                if b'"message": "serving"' in line
            )
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.post("/v1/topics/p", content=b"x")).json() == {"seq": 1}
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some(4096):
                logs += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
    messages = [json.loads(line)["message"] for line in logs.splitlines() if line.startswith(b"{")]
    assert messages[-3:] == ["draining", "drained", "stopped"]


@pytest.mark.parametrize("taken", ["port", "grpc-listen"])
async def test_a_port_in_use_stops_the_process_with_one_line(taken: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    argv = [sys.executable, "-m", "broker", "serve", "--port", "0", "--grpc-listen",
            "127.0.0.1:0", "--log-level", "warning"]
    argv[argv.index(f"--{taken}") + 1] = str(port) if taken == "port" else f"127.0.0.1:{port}"
    try:
        with trio.fail_after(30):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                          check=False)
    finally:
        holder.close()
    assert done.returncode == 1
    what = "" if taken == "port" else " for gRPC"
    assert done.stderr.decode().splitlines() == [
        f"broker: cannot listen{what} on 127.0.0.1:{port}: [Errno 98] Address already in use"
    ]


async def test_a_long_poll_in_flight_is_answered_when_the_node_drains(
    broker: Running, http: httpx.AsyncClient
) -> None:
    answer: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:

        async def poll() -> None:
            answer.append(await http.get("/v1/poll", params={"topic": "d", "timeout": "30"}))

        nursery.start_soon(poll)
        await wait_for(lambda: len(broker.node.hub) == 1)
        broker.node.drain()
        with trio.fail_after(5):
            await wait_for(lambda: bool(answer))
    assert answer[0].status_code == 200
    assert answer[0].json() == {"events": [], "position": f"{broker.node.log.epoch}:0"}


async def test_sse_tells_a_latest_subscriber_where_it_started(
    broker: Running, http: httpx.AsyncClient
) -> None:
    """A client that drops before its first event resumes from its start, losing nothing."""
    await http.post("/v1/topics/s", content=b"before")
    async with http.stream("GET", "/v1/topics/s/sse") as response:
        parser = SSEParser()
        with trio.fail_after(5):
            async for chunk in response.aiter_raw():
                parser.feed(chunk)
                if parser.last_event_id:
                    break
    start = parser.last_event_id
    assert start == f"{broker.node.log.epoch}:1"
    missed = (await http.post("/v1/topics/s", content=b"while away")).json()["seq"]
    async with subscribe(broker.url, "sse", ["s"], last_event_id=start) as feed:
        item = await feed.next()
    assert (item.seq, item.data) == (missed, b"while away")
