"""Integration fixtures: a real broker under hypercorn on 127.0.0.1 port 0, in the test nursery."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from broker.config import Settings
from broker.server import Running, Server

StartBroker = Callable[..., Awaitable[Running]]


# Subscriber streams and publish requests have two paths (transports/native.py and
# native_publish.py: the raw socket; hypercorn: the ASGI app), and so does gRPC
# (native_grpc.py: the broker's own HTTP/2 listener; grpc.aio alone). The tests of these
# modules run against both; the others use the default (native).
BOTH_STREAM_PATHS = {
    "test_transports", "test_websocket", "test_slow_reader", "test_errors", "test_churn",
    "test_client", "test_operations", "test_cors", "test_publish", "test_grpc",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    markers = metafunc.definition.iter_markers("parametrize")
    chosen = any("stream_path" in str(marker.args[0]) for marker in markers)  # one path only
    if module in BOTH_STREAM_PATHS and "stream_path" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("stream_path", ["native", "hypercorn"], indirect=True)


@pytest.fixture
def stream_path(request: pytest.FixtureRequest) -> str:
    path: str = getattr(request, "param", "native")
    return path


@pytest.fixture
async def start_broker(nursery: trio.Nursery, stream_path: str) -> AsyncIterator[StartBroker]:
    """Start a broker with settings overrides; every one started is stopped at teardown."""
    servers: list[Server] = []

    async def start(**overrides: Any) -> Running:
        # gRPC only where a test asks for it (grpc_listen="127.0.0.1:0"): it costs a loop
        settings = Settings(
            **{"port": 0, "grpc_listen": "off", "native_streams": stream_path == "native",
               "native_publish": stream_path == "native", "native_grpc": stream_path == "native",
               **overrides}
        )
        server = Server(settings)
        servers.append(server)
        running: Running = await nursery.start(server.run)
        return running

    yield start
    for server in servers:
        server.stop()
    with trio.fail_after(15):
        for server in servers:
            await server.stopped()


@pytest.fixture
async def broker(start_broker: StartBroker) -> Running:
    return await start_broker(heartbeat_seconds=5.0)


@pytest.fixture
async def http(broker: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
        yield client
