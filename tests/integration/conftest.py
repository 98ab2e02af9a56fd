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


@pytest.fixture
async def start_broker(nursery: trio.Nursery) -> AsyncIterator[StartBroker]:
    """Start a broker with settings overrides; every one started is stopped at teardown."""
    servers: list[Server] = []

    async def start(**overrides: Any) -> Running:
        # gRPC only where a test asks for it (grpc_listen="127.0.0.1:0"): it costs a loop
        settings = Settings(**{"port": 0, "grpc_listen": "off", **overrides})
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
