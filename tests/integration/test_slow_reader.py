"""A subscriber that stops reading costs at most its buffer, and loses nothing."""

from __future__ import annotations

import gc
import json
import socket
from collections.abc import Iterator
from typing import ClassVar

import h11
import httpx
import psutil
import pytest
import trio

from broker.subscription import State
from broker.wire.ndjson import LineSplitter
from tests.integration.clients import wait_for
from tests.integration.conftest import StartBroker


@pytest.fixture(autouse=True)
def close_raw_streams() -> Iterator[None]:
    yield
    while RawStream.opened:
        RawStream.opened.pop().close()


MESSAGES = 50_000
PAYLOAD_BYTES = 1024
BATCH = 1000


class RawStream:
    """An HTTP/1.1 GET over a socket whose receive buffer we keep small, read only on demand."""

    opened: ClassVar[list[trio.socket.SocketType]] = []  # closed after each test, even a failed one

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)
        self.splitter = LineSplitter(max_line_bytes=1 << 20)

    @classmethod
    async def open(cls, port: int, target: str, *, small_buffer: bool = True) -> RawStream:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        cls.opened.append(sock)
        if small_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        await sock.connect(("127.0.0.1", port))
        stream = cls(sock)
        request = h11.Request(method="GET", target=target, headers=[("Host", "broker")])
        await sock.send(stream.conn.send(request) + stream.conn.send(h11.EndOfMessage()))
        while True:
            event = await stream._next_event()
            if isinstance(event, h11.Response):
                assert event.status_code == 200
                return stream

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[no-any-return]
            self.conn.receive_data(await self.sock.recv(256 * 1024))

    async def lines(self) -> list[bytes]:
        """The next complete lines from the body (waits for at least one chunk)."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                return self.splitter.feed(bytes(event.data))
            assert not isinstance(event, h11.EndOfMessage), "the stream ended"


@pytest.mark.timeout(90)
async def test_a_reader_that_stops_costs_its_buffer_and_then_gets_everything(
    start_broker: StartBroker,
) -> None:
    running = await start_broker(buffer_bytes=256 * 1024, buffer_events=100_000)
    port = int(running.url.rsplit(":", 1)[1])
    node = running.node
    stream = await RawStream.open(port, "/v1/topics/slow/ndjson")
    await wait_for(lambda: len(node.hub) == 1)
    (sub,) = list(node.hub)
    # a healthy subscriber beside it, reading all the time, must not be held back by it
    healthy = await RawStream.open(port, "/v1/topics/slow/ndjson", small_buffer=False)
    await wait_for(lambda: len(node.hub) == 2)
    healthy_seqs: list[int] = []

    async def read_healthy() -> None:
        while len(healthy_seqs) < MESSAGES:
            for line in await healthy.lines():
                seq = json.loads(line).get("seq")
                if seq is not None:
                    healthy_seqs.append(seq)

    payload = "x" * (PAYLOAD_BYTES - 8)
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    sent: list[int] = []
    peak_pending_bytes = 0
    async with (
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(read_healthy)
        for start in range(0, MESSAGES, BATCH):
            body = "\n".join(
                json.dumps({"topic": "slow", "data": f"{i:07d} {payload}"})
                for i in range(start, start + BATCH)
            )
            response = await http.post(
                "/v1/publish", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
            sent.extend(response.json()["seqs"])
            await trio.testing.wait_all_tasks_blocked(0.01)  # let the router and writer run
            stats = sub.statistics()
            peak_pending_bytes = max(peak_pending_bytes, stats.pending_bytes)
            # bounded whatever the publisher does: the buffer, or one run (here one batch of
            # 1,000 shared events) alone in it
            assert stats.pending_bytes <= 256 * 1024 or stats.pending_events <= BATCH

        await wait_for(lambda: len(healthy_seqs) == MESSAGES, 30)
    # the healthy one got every message, in order, while the other was stalled
    assert healthy_seqs == sent
    healthy.sock.close()
    stats = sub.statistics()
    gc.collect()
    rss_growth = process.memory_info().rss - rss_before
    retained = node.log.statistics().retained_bytes
    print(
        f"\nslow reader: published {len(sent)} x {PAYLOAD_BYTES} B; buffer peak "
        f"{peak_pending_bytes} B of {stats.buffer_bytes_limit}; catch-ups {stats.catchups}; "
        f"state {stats.state.value}; delivered so far {stats.delivered_events}; "
        f"RSS growth {rss_growth / 2**20:.1f} MiB, of which the log retains {retained / 2**20:.1f}"
    )
    # The log keeps every message by design (that is what makes catch-up lossless); beyond it
    # the stalled subscriber may cost its buffer and socket, not a copy of the stream.
    assert rss_growth < retained + 48 * 2**20
    assert stats.catchups >= 1  # it did fall behind, and released its buffer
    assert stats.delivered_events < MESSAGES  # and it really had stopped reading

    received: list[int] = []
    with trio.fail_after(60):
        while len(received) < MESSAGES:
            for line in await stream.lines():
                obj = json.loads(line)
                if "seq" in obj:
                    assert obj["data"].startswith(f"{len(received):07d} ")
                    received.append(obj["seq"])
    assert received == sent
    await wait_for(lambda: sub.state is State.LIVE)  # caught up, back on the live stream
    stream.sock.close()


async def _stall(port: int, http: httpx.AsyncClient, topic: str) -> RawStream:
    """A subscriber that never reads again, with the server's socket send buffer full."""
    stream = await RawStream.open(port, f"/v1/topics/{topic}/ndjson")
    body = "\n".join(json.dumps({"topic": topic, "data": "x" * 4000}) for _ in range(2000))
    for _ in range(5):  # 40 MB: far more than any socket buffer
        await http.post(
            "/v1/publish", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
    return stream


async def test_a_write_stuck_past_the_write_timeout_cuts_the_connection(
    start_broker: StartBroker,
) -> None:
    running = await start_broker(write_timeout_seconds=1.0)
    port = int(running.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
        stream = await _stall(port, http, "stuck")
        await wait_for(lambda: any(o.blocked_since is not None for o in running.node.outlets))
        # hypercorn shields its socket writes from cancellation; only the cut frees the task
        await wait_for(lambda: not running.node.outlets and len(running.node.hub) == 0, 10)
        assert running.node.metrics.stalled_cuts == 1
        metrics = (await http.get("/metrics")).text
        assert "broker_stalled_connections_cut_total 1" in metrics
    stream.sock.close()


async def test_shutdown_is_not_held_up_by_a_stalled_client(start_broker: StartBroker) -> None:
    running = await start_broker(drain_seconds=1.0)
    port = int(running.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
        stream = await _stall(port, http, "stuck")
    await wait_for(lambda: any(o.blocked_since is not None for o in running.node.outlets))
    server = running.server
    started = trio.current_time()
    server.stop()
    with trio.fail_after(8):
        await server.stopped()
    print(f"\nstopped {trio.current_time() - started:.2f} s after stop() with a stalled client")
    stream.sock.close()
