"""Clients that vanish abruptly release their subscription, connection and tasks at once."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from broker.server import Running
from tests.integration.clients import wait_for

CLIENTS = 500


def count_tasks() -> int:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", port))
    return sock


async def open_http_stream(port: int, path: str) -> trio.socket.SocketType:
    sock = await connect(port)
    await sock.send(f"GET {path} HTTP/1.1\r\nHost: broker\r\n\r\n".encode())
    return sock


async def open_websocket(port: int, topic: str) -> trio.socket.SocketType:
    sock = await connect(port)
    ws = WSConnection(ConnectionType.CLIENT)
    await sock.send(
        ws.send(Request(host="broker", target="/v1/ws", subprotocols=["broker.v1.json"]))
    )
    while True:
        ws.receive_data(await sock.recv(65536))
        if any(isinstance(event, AcceptConnection) for event in ws.events()):
            break
    op = json.dumps({"op": "subscribe", "topics": [topic]})
    await sock.send(ws.send(TextMessage(data=op)))
    return sock


def reset(sock: trio.socket.SocketType) -> None:
    """Close with RST, not FIN: the client is simply gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.timeout(60)
async def test_500_clients_that_vanish_leave_nothing_behind(broker: Running) -> None:
    port = int(broker.url.rsplit(":", 1)[1])
    node = broker.node
    await trio.testing.wait_all_tasks_blocked()
    baseline = count_tasks()

    sockets: list[trio.socket.SocketType] = []
    for i in range(CLIENTS):
        kind = i % 3
        if kind == 0:
            sockets.append(await open_http_stream(port, f"/v1/topics/churn.{i}/sse"))
        elif kind == 1:
            sockets.append(await open_http_stream(port, f"/v1/ndjson?topic=churn.*&topic=x.{i}"))
        else:
            sockets.append(await open_websocket(port, f"churn.{i}"))
    await wait_for(lambda: len(node.hub) == CLIENTS and len(node.outlets) == CLIENTS, 30)
    busy = count_tasks()
    print(f"\n{CLIENTS} clients: {busy - baseline} tasks above the baseline of {baseline}")

    for sock in sockets:
        reset(sock)
    await wait_for(lambda: len(node.hub) == 0 and not node.outlets, 20)
    await wait_for(lambda: count_tasks() <= baseline, 20)
    assert count_tasks() == baseline
    assert sum(1 for _ in node.hub) == 0
