"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.natsserver import NatsServer, start_nats_server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One real JetStream-enabled nats-server for the session; tests use their own streams."""
    server = start_nats_server()
    yield server
    server.stop()
