"""broker.client and ``broker pub`` / ``broker sub`` against a real broker on 127.0.0.1:0.

Every wait is bounded by a deadline; nothing sleeps to wait for a condition.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from broker.client import (
    GapNotice,
    Message,
    PublishError,
    Received,
    ResetNotice,
    SubscribeError,
    Subscriber,
    Transport,
    publish,
    publish_batch,
    subscribe,
)
from broker.errors import BrokenError, Unavailable
from broker.server import Running
from tests.integration.conftest import StartBroker

TRANSPORTS: list[Transport] = ["sse", "ndjson", "ws", "ws-msgpack", "poll"]
STREAMING: list[Transport] = ["sse", "ndjson", "ws", "ws-msgpack"]  # one long connection each
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def running(start_broker: StartBroker) -> Running:
    return await start_broker(heartbeat_seconds=1.0)


async def take(sub: Subscriber, n: int, *, seconds: float = 4.0) -> list[Received]:
    items: list[Received] = []
    with trio.fail_after(seconds):
        while len(items) < n:
            items.append(await sub.__anext__())
    return items


def messages(items: Sequence[Received]) -> list[tuple[int, str, bytes]]:
    assert all(isinstance(item, Message) for item in items), items
    return [(i.seq, i.topic, i.data) for i in items if isinstance(i, Message)]


async def publish_numbered(url: str, topic: str, first: int, count: int) -> list[int]:
    """Messages ``m<first>``... : the first half one POST each, the rest as one batch."""
    singles = count // 2
    async with httpx.AsyncClient() as http:  # one connection for all
        seqs = [await publish(url, topic, f"m{first + i}", client=http) for i in range(singles)]
        batch = [{"topic": topic, "data": f"m{first + i}"} for i in range(singles, count)]
        return seqs + await publish_batch(url, batch, client=http)


# -- publish -------------------------------------------------------------------------------------


async def test_publish_returns_seqs_and_honours_the_idempotency_key(running: Running) -> None:
    url = running.url
    first = await publish(url, "pub.a", b"\x00\x01", key="k-1")
    again = await publish(url, "pub.a", "something else", key="k-1")
    seqs = await publish_batch(
        url, [{"topic": "pub.a", "data": {"n": 1}}, {"topic": "pub.b", "data": b"\xff"}]
    )
    assert again == first
    assert seqs == [first + 1, first + 2]
    assert await publish_batch(url, []) == []


async def test_publish_error_carries_the_problem(running: Running) -> None:
    with pytest.raises(PublishError) as caught:
        await publish(running.url, "bad.*", "x")
    assert caught.value.status == 400
    assert caught.value.problem["type"] == "urn:broker:problem:bad-topic"
    assert caught.value.slug == "bad-topic"

    with pytest.raises(PublishError) as caught:
        await publish(running.url, "pub.a", "x", event="gap")  # reserved for control events
    assert caught.value.slug == "bad-event-name"

    lines = [{"topic": "pub.a", "data": "fine"}, {"topic": "pub.a"}]  # no data
    with pytest.raises(PublishError) as caught:
        await publish_batch(running.url, lines)
    assert caught.value.slug == "bad-batch-line"
    assert caught.value.problem["line"] == 2


async def test_a_draining_node_refuses_with_503(running: Running) -> None:
    running.node.drain()
    with pytest.raises(PublishError) as caught:
        await publish(running.url, "pub.a", "x")
    assert (caught.value.status, caught.value.slug) == (503, "unavailable")
    for transport in TRANSPORTS:  # a subscriber would retry; without reconnect it gives up
        with trio.fail_after(4), pytest.raises(Unavailable):
            async with subscribe(running.url, "pub.a", transport=transport, reconnect=False):
                pass


async def test_publish_to_nothing_listening_is_broken() -> None:
    with pytest.raises(BrokenError):
        await publish(f"http://127.0.0.1:{await free_port()}", "pub.a", "x")


# -- subscribe: delivery ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_200_messages_arrive_in_order(running: Running, transport: Transport) -> None:
    # SSE does not carry the topic: with one literal topic the client fills it in.
    topics = ["order.eu"] if transport == "sse" else ["order.*"]
    second_topic = "order.eu" if transport == "sse" else "order.us"
    async with subscribe(running.url, topics, transport=transport) as sub:
        states = [sub.state]
        seqs = await publish_numbered(running.url, "order.eu", 0, 100)
        seqs += await publish_numbered(running.url, second_topic, 100, 100)
        items = await take(sub, 200)
    states.append(sub.state)
    expected_topics = ["order.eu"] * 100 + [second_topic] * 100
    assert messages(items) == [
        (seq, topic, f"m{i}".encode())
        for i, (seq, topic) in enumerate(zip(seqs, expected_topics, strict=True))
    ]
    assert sub.position is not None and sub.position.endswith(f":{seqs[-1]}")
    assert states == ["open", "closed"]


# What each transport makes of a payload (docs/protocol.md): SSE carries text only (binary comes
# as its base64); the JSON transports give JSON back compact; msgpack gives the bytes.
PAYLOADS: list[tuple[bytes, str]] = [
    ("héllo ☃".encode(), "text/plain; charset=utf-8"),
    (b'{"a": [1, 2]}', "application/json"),
    (b"\x00\x01\xfe\xff", "application/octet-stream"),
]
EXPECTED = {
    "sse": ["héllo ☃".encode(), b'{"a": [1, 2]}', b"AAH+/w=="],
    "ndjson": ["héllo ☃".encode(), b'{"a":[1,2]}', b"\x00\x01\xfe\xff"],
    "ws": ["héllo ☃".encode(), b'{"a":[1,2]}', b"\x00\x01\xfe\xff"],
    "ws-msgpack": ["héllo ☃".encode(), b'{"a": [1, 2]}', b"\x00\x01\xfe\xff"],
    "poll": ["héllo ☃".encode(), b'{"a":[1,2]}', b"\x00\x01\xfe\xff"],
}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_payloads_event_names_and_metadata(running: Running, transport: Transport) -> None:
    async with subscribe(running.url, ["pay.load"], transport=transport) as sub:
        for data, content_type in PAYLOADS:
            await publish(running.url, "pay.load", data, content_type=content_type, event="note")
        items = await take(sub, len(PAYLOADS))
    assert [i.data for i in items if isinstance(i, Message)] == EXPECTED[transport]
    for item in items:
        assert isinstance(item, Message)
        assert item.topic == "pay.load"
        assert item.event == "note"
        assert (item.time_ms is None) == (transport == "sse")
    text, json_payload = items[0], items[1]
    assert isinstance(text, Message) and isinstance(json_payload, Message)
    assert text.text == "héllo ☃"
    assert json_payload.json() == {"a": [1, 2]}
    content_types = [i.content_type for i in items if isinstance(i, Message)]
    if transport == "ws-msgpack":
        assert content_types == [ct for _, ct in PAYLOADS]
    else:
        assert content_types == [None, None, None]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_start_earliest_and_resume_from_a_position(
    running: Running, transport: Transport
) -> None:
    seqs = await publish_numbered(running.url, "hist.a", 0, 6)
    async with subscribe(running.url, "hist.a", transport=transport, start="earliest") as sub:
        assert [seq for seq, _, _ in messages(await take(sub, 6))] == seqs
        position = sub.position
    assert position is not None and position.endswith(f":{seqs[-1]}")
    more = await publish_numbered(running.url, "hist.a", 6, 2)
    middle = f"{position.rpartition(':')[0]}:{seqs[3]}"
    async with subscribe(running.url, "hist.a", transport=transport, from_seq=middle) as sub:
        assert [seq for seq, _, _ in messages(await take(sub, 4))] == [*seqs[4:], *more]


# -- subscribe: reconnect ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", STREAMING)
async def test_reconnects_and_resumes_exactly_once(running: Running, transport: Transport) -> None:
    url = running.url
    async with subscribe(url, ["re.*"], transport=transport, backoff_initial_seconds=0.05) as sub:
        before = await publish_numbered(url, "re.a", 0, 10)
        assert [s for s, _, _ in messages(await take(sub, 10))] == before
        assert sub.reconnects == 0
        # Close every client connection without stopping the server (node.drain() would refuse
        # the reconnect too): SSE and NDJSON streams end, WebSockets close with 1012.
        for outlet in list(running.node.outlets):
            outlet.drain()
        after = await publish_numbered(url, "re.a", 10, 10)
        assert [s for s, _, _ in messages(await take(sub, 10))] == after
        assert sub.reconnects >= 1
        # Nothing else is queued: the next item is the next message, not a repeat.
        last = await publish(url, "re.b", "last")
        assert messages(await take(sub, 1)) == [
            (last, "" if transport == "sse" else "re.b", b"last")
        ]


@pytest.mark.parametrize("transport", ["ws", "ws-msgpack"])
async def test_an_idle_websocket_is_kept_by_pings(running: Running, transport: Transport) -> None:
    """The client cannot see the server's protocol pings, so it pings when the socket is quiet:
    a healthy idle connection outlives heartbeat_timeout_seconds."""
    seqs: list[int] = []

    async def publish_later() -> None:
        await trio.sleep(1.5)  # the point of the test: time passing with no event
        seqs.append(await publish(running.url, "idle.a", "still here"))

    async with subscribe(
        running.url, "idle.a", transport=transport, heartbeat_timeout_seconds=0.75
    ) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_later)
            items = await take(sub, 1)  # waiting, so the client is reading the socket
        assert messages(items) == [(seqs[0], "idle.a", b"still here")]
        assert sub.reconnects == 0


class ScriptedServer:
    """An HTTP server that answers its n-th connection with ``answers[n]`` (the last one
    repeats) and then hangs up, or stays silent if ``hang``: faults a real broker won't make."""

    def __init__(self, answers: list[bytes], *, hang: bool) -> None:
        self.answers = answers
        self.hang = hang
        self.requests: list[bytes] = []
        self.requested = trio.Condition()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some()
            async with self.requested:
                self.requests.append(request)
                self.requested.notify_all()
            await stream.send_all(self.answers[min(len(self.requests), len(self.answers)) - 1])
            if self.hang:
                await trio.sleep_forever()

    async def wait_requests(self, count: int) -> None:
        async with self.requested:
            while len(self.requests) < count:
                await self.requested.wait()

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


async def test_a_silent_connection_is_dropped_and_resumed_with_last_event_id(
    nursery: trio.Nursery,
) -> None:
    """A server that stops sending (no heartbeat) is left after heartbeat_timeout_seconds and
    the reconnect asks to resume after the last event seen."""
    server = ScriptedServer([SSE_HEAD + b"retry: 2000\n\nid: E1:7\ndata: seven\n\n"], hang=True)
    url = await server.start(nursery)
    with trio.fail_after(4):
        async with subscribe(
            url, "quiet.topic", heartbeat_timeout_seconds=0.3, backoff_initial_seconds=0.01
        ) as sub:
            assert await sub.__anext__() == Message(7, "quiet.topic", b"seven")
            await server.wait_requests(2)
    assert b"last-event-id" not in server.requests[0].lower()
    assert b"\r\nlast-event-id: e1:7\r\n" in server.requests[1].lower()


async def test_a_refusal_on_reconnect_ends_the_iteration(nursery: trio.Nursery) -> None:
    problem = b'{"type":"urn:broker:problem:bad-position","status":400,"detail":"no"}'
    refusal = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(problem), problem)
    )
    server = ScriptedServer([SSE_HEAD + b"id: E1:1\ndata: one\n\n", refusal], hang=False)
    url = await server.start(nursery)
    with trio.fail_after(4):
        async with subscribe(url, "a.b", backoff_initial_seconds=0.01) as sub:
            assert await sub.__anext__() == Message(1, "a.b", b"one")
            with pytest.raises(SubscribeError) as caught:
                await sub.__anext__()
    assert caught.value.slug == "bad-position"
    assert sub.reconnects == 0  # a refused connection is not a reconnection
    assert sub.position == "E1:1"


async def test_no_reconnect_raises_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{await free_port()}"
    for transport in TRANSPORTS:
        with trio.fail_after(4), pytest.raises(BrokenError):
            async with subscribe(url, "a.b", transport=transport, reconnect=False):
                pass


async def test_no_reconnect_ends_iteration_when_the_stream_ends(running: Running) -> None:
    async with subscribe(running.url, "end.a", transport="ndjson", reconnect=False) as sub:
        seq = await publish(running.url, "end.a", "one")
        assert messages(await take(sub, 1)) == [(seq, "end.a", b"one")]
        for outlet in list(running.node.outlets):
            outlet.drain()
        with trio.fail_after(4):
            assert [item async for item in sub] == []
        assert sub.state == "closed"


async def test_aclose_ends_the_iteration(running: Running) -> None:
    async with subscribe(running.url, "close.a", transport="ws") as sub:
        seq = await publish(running.url, "close.a", "one")
        assert messages(await take(sub, 1)) == [(seq, "close.a", b"one")]
        await sub.aclose()
        with trio.fail_after(4):
            assert [item async for item in sub] == []
        assert sub.state == "closed"


# -- subscribe: refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_pattern_is_a_subscribe_error_not_retried(
    running: Running, transport: Transport
) -> None:
    with trio.fail_after(4), pytest.raises(SubscribeError) as caught:
        async with subscribe(running.url, ["ok.topic", "bad.**"], transport=transport):
            pytest.fail("the subscription opened")
    assert caught.value.slug == "bad-pattern"
    assert caught.value.status == 400
    assert caught.value.problem["type"] == "urn:broker:problem:bad-pattern"
    assert str(caught.value).startswith("bad-pattern: ")


async def test_position_ahead_is_a_subscribe_error(running: Running) -> None:
    seq = await publish(running.url, "ahead.a", "x")
    with trio.fail_after(4), pytest.raises(SubscribeError) as caught:
        async with subscribe(running.url, "ahead.a", transport="ndjson", from_seq=seq + 100):
            pass
    assert caught.value.slug == "position-ahead"


async def test_a_gap_is_reported_once(start_broker: StartBroker) -> None:
    running = await start_broker(heartbeat_seconds=1.0, retention_messages=3)
    seqs = [await publish(running.url, "gap.a", f"m{i}") for i in range(6)]
    async with subscribe(running.url, "gap.a", transport="ndjson", from_seq=seqs[0]) as sub:
        items = await take(sub, 4)
    assert items[0] == GapNotice(seqs[1], seqs[2])  # retention kept the last 3
    assert [seq for seq, _, _ in messages(items[1:])] == seqs[3:]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_position_from_another_log_gets_a_reset_then_the_new_log(
    running: Running, transport: Transport
) -> None:
    seqs = await publish_numbered(running.url, "reset.a", 0, 3)
    # Seq 1000 of a log that no longer exists: the new log's seqs are lower, not duplicates.
    async with subscribe(running.url, "reset.a", transport=transport, from_seq="gone:1000") as sub:
        items = await take(sub, 4)
    assert isinstance(items[0], ResetNotice) and items[0].epoch != "gone"
    assert [seq for seq, _, _ in messages(items[1:])] == seqs
    assert sub.position == f"{items[0].epoch}:{seqs[-1]}"


# -- the command line ------------------------------------------------------------------------------


def broker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker", *args]


async def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(4):
        return await trio.run_process(
            broker_command(*args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=env,
        )


async def test_cli_pub_then_sub_count(running: Running) -> None:
    env = {**os.environ, "BROKER_URL": running.url}  # the default URL comes from BROKER_URL
    result = await run_cli("pub", "cli.a", "one", "--event", "note", env=env)
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout)["seq"]
    assert result.stdout == b'{"seq":%d}\n' % first  # compact, as the server writes it
    second = await publish(running.url, "cli.a", "two")
    result = await run_cli("pub", "cli.a", "thrée", "--url", running.url)
    assert result.returncode == 0, result.stderr
    third = json.loads(result.stdout)["seq"]
    skipped = await publish(running.url, "cli.b", "skipped")

    result = await run_cli(
        "sub", "cli.a", "--url", running.url, "--from", "earliest", "--count", "3"
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.decode().splitlines()] == [
        {"seq": first, "topic": "cli.a", "event": "note", "data": "one"},
        {"seq": second, "topic": "cli.a", "data": "two"},
        {"seq": third, "topic": "cli.a", "data": "thrée"},
    ]

    text_options = ["--format", "text", "--transport", "ws", "--count", "2"]
    result = await run_cli(
        "sub", "cli.*", "--url", running.url, "--from-seq", str(second), *text_options
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        f"{third} cli.a thrée",
        f"{skipped} cli.b skipped",
    ]


async def test_cli_pub_reads_stdin(running: Running) -> None:
    with trio.fail_after(4):
        result = await trio.run_process(
            broker_command("pub", "cli.bin", "--url", running.url),
            stdin=b"\x00\xff",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    seq = json.loads(result.stdout)["seq"]
    async with subscribe(running.url, "cli.bin", transport="ndjson", from_seq=seq - 1) as sub:
        assert messages(await take(sub, 1)) == [(seq, "cli.bin", b"\x00\xff")]


async def test_cli_errors_are_one_line(running: Running) -> None:
    result = await run_cli("sub", "bad.**", "--url", running.url)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("broker: bad-pattern: ")
    assert len(result.stderr.decode().splitlines()) == 1

    result = await run_cli("pub", "bad.*", "x", "--url", running.url)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("broker: bad-topic: ")

    result = await run_cli(
        "sub", "a.b", "--no-reconnect", "--url", f"http://127.0.0.1:{await free_port()}"
    )
    assert result.returncode == 1
    assert result.stderr.decode().startswith("broker: ")


async def test_cli_sub_exits_130_on_ctrl_c(running: Running) -> None:
    seq = await publish(running.url, "cli.int", "hello")
    command = broker_command("sub", "cli.int", "--url", running.url, "--from-seq", str(seq - 1))
    with trio.fail_after(4):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
            )
            assert process.stdout is not None
            received = b""
            while not received.endswith(b"\n"):  # connected: the first message is printed
                received += await process.stdout.receive_some()
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 130
    assert json.loads(received) == {"seq": seq, "topic": "cli.int", "data": "hello"}


async def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port
