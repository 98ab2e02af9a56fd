"""The WebSocket session: several subscriptions, unsubscribe, publish, ping, and error frames
that leave the socket open."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgpack
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from broker.server import Running
from tests.integration.clients import RawWebSocket, wait_for
from tests.integration.conftest import StartBroker


def ws_url(running: Running) -> str:
    return running.url.replace("http://", "ws://") + "/v1/ws"


async def call(ws: WebSocketConnection, op: dict[str, Any]) -> dict[str, Any]:
    await ws.send_message(json.dumps(op))
    return await receive(ws)


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        message = await ws.get_message()
    assert isinstance(message, str)
    frame: dict[str, Any] = json.loads(message)
    return frame


async def test_two_subscriptions_unsubscribe_and_publish_on_one_socket(broker: Running) -> None:
    async with open_websocket_url(ws_url(broker), subprotocols=["broker.v1.json"]) as ws:
        assert ws.subprotocol == "broker.v1.json"
        a = await call(ws, {"op": "subscribe", "topics": ["room.a"], "ref": 1})
        assert a == {"type": "subscribed", "id": "s1", "position": a["position"], "ref": 1}
        b = await call(ws, {"op": "subscribe", "id": "mine", "topics": ["room.b"]})
        assert b["type"] == "subscribed" and b["id"] == "mine"

        published = await call(ws, {"op": "publish", "topic": "room.a", "data": {"n": 1}, "ref": 2})
        assert published == {"type": "published", "seq": 1, "ref": 2}
        event = await receive(ws)
        assert event["type"] == "event" and event["seq"] == 1 and event["data"] == {"n": 1}

        assert (await call(ws, {"op": "publish", "topic": "room.b", "data": "hi"}))["seq"] == 2
        event = await receive(ws)
        assert (event["topic"], event["data"]) == ("room.b", "hi")

        assert await call(ws, {"op": "unsubscribe", "id": "mine"}) == {
            "type": "unsubscribed",
            "id": "mine",
        }
        await wait_for(lambda: len(broker.node.hub) == 1)
        assert (await call(ws, {"op": "publish", "topic": "room.b", "data": "unheard"}))["seq"] == 3
        assert (await call(ws, {"op": "publish", "topic": "room.a", "data": "heard"}))["seq"] == 4
        event = await receive(ws)
        assert (event["seq"], event["data"]) == (4, "heard")  # seq 3 never came
        assert await call(ws, {"op": "ping", "ref": "p"}) == {"type": "pong", "ref": "p"}


async def test_msgpack_carries_binary_payloads_both_ways(broker: Running) -> None:
    async with open_websocket_url(ws_url(broker), subprotocols=["broker.v1.msgpack"]) as ws:
        assert ws.subprotocol == "broker.v1.msgpack"
        await ws.send_message(msgpack.packb({"op": "subscribe", "topics": ["bin"]}))
        assert msgpack.unpackb(await ws.get_message())["type"] == "subscribed"
        blob = bytes(range(256))
        await ws.send_message(msgpack.packb({"op": "publish", "topic": "bin", "data": blob}))
        assert msgpack.unpackb(await ws.get_message()) == {"type": "published", "seq": 1}
        event = msgpack.unpackb(await ws.get_message())
        assert event["data"] == blob and event["content_type"] == "application/octet-stream"


ERROR_OPS = [
    ("not JSON", "{nope", "bad-message"),
    ("not an object", "[1]", "bad-message"),
    ("unknown op", json.dumps({"op": "dance", "ref": 9}), "bad-message"),
    ("bad pattern", json.dumps({"op": "subscribe", "topics": ["a.>.b"], "ref": 9}), "bad-pattern"),
    ("no topics", json.dumps({"op": "subscribe", "topics": [], "ref": 9}), "missing-topic"),
    (
        "bad position",
        json.dumps({"op": "subscribe", "topics": ["a"], "from_seq": "x"}),
        "bad-position",
    ),
    (
        "position ahead",
        json.dumps({"op": "subscribe", "topics": ["a"], "from_seq": 99}),
        "position-ahead",
    ),
    ("unknown subscription", json.dumps({"op": "unsubscribe", "id": "zz"}), "unknown-subscription"),
    (
        "publish bad topic",
        json.dumps({"op": "publish", "topic": "a..b", "data": 1, "ref": 9}),
        "bad-topic",
    ),
    (
        "publish bad event",
        json.dumps({"op": "publish", "topic": "a", "data": 1, "event": "gap"}),
        "bad-event-name",
    ),
]


@pytest.mark.parametrize(("name", "message", "code"), ERROR_OPS, ids=[e[0] for e in ERROR_OPS])
async def test_a_bad_operation_gets_an_error_frame_and_the_socket_stays_open(
    name: str, message: str, code: str, broker: Running
) -> None:
    async with open_websocket_url(ws_url(broker), subprotocols=["broker.v1.json"]) as ws:
        await ws.send_message(message)
        frame = await receive(ws)
        assert frame["type"] == "error" and frame["code"] == code and frame["message"]
        if '"ref": 9' in message:
            assert frame["ref"] == 9
        assert await call(ws, {"op": "ping"}) == {"type": "pong"}


async def test_duplicate_subscription_ids_are_refused(broker: Running) -> None:
    async with open_websocket_url(ws_url(broker), subprotocols=["broker.v1.json"]) as ws:
        assert (await call(ws, {"op": "subscribe", "id": "x", "topics": ["a"]}))["id"] == "x"
        frame = await call(ws, {"op": "subscribe", "id": "x", "topics": ["b"]})
        assert frame["code"] == "duplicate-subscription"


async def test_a_binary_frame_on_the_json_subprotocol_closes_with_1003(broker: Running) -> None:
    async with RawWebSocket.open(broker.url, ["broker.v1.json"]) as ws:
        await ws.send(b"\x00\x01")
        assert await ws.close_code() == 1003


async def test_an_oversize_publish_gets_an_error_frame(broker: Running) -> None:
    big = "x" * (broker.node.settings.max_payload_bytes + 1)
    async with open_websocket_url(ws_url(broker), subprotocols=["broker.v1.json"]) as ws:
        frame = await call(ws, {"op": "publish", "topic": "a", "data": big})
        assert frame["code"] == "payload-too-large"
        assert await call(ws, {"op": "ping"}) == {"type": "pong"}


async def _stall_and_publish(running: Running, ws: RawWebSocket) -> list[int]:
    """Subscribe, stop reading, and publish 8 MB: far more than the socket buffers hold."""
    await ws.send(json.dumps({"op": "subscribe", "topics": ["p"]}))
    assert json.loads(await ws.message() or "")["type"] == "subscribed"
    sent: list[int] = []
    body = "\n".join(json.dumps({"topic": "p", "data": "x" * 4000}) for _ in range(500))
    async with httpx.AsyncClient(base_url=running.url) as http:
        for _ in range(4):
            response = await http.post(
                "/v1/publish", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
            sent.extend(response.json()["seqs"])
    return sent


async def test_overflow_policy_drop_says_exactly_what_was_skipped(
    start_broker: StartBroker,
) -> None:
    running = await start_broker(overflow_policy="drop", buffer_events=10)
    async with RawWebSocket.open(
        running.url, ["broker.v1.json"], receive_buffer_bytes=32 * 1024
    ) as ws:
        sent = await _stall_and_publish(running, ws)
        received: list[int] = []
        gaps: list[tuple[int, int]] = []

        def covered(seq: int) -> bool:
            return seq in received or any(a <= seq <= b for a, b in gaps)

        while not covered(sent[-1]):
            message = await ws.message()
            assert message is not None, f"closed with {ws.close_code_seen}"
            frame = json.loads(message)
            if frame["type"] == "event":
                received.append(frame["seq"])
            elif frame["type"] == "gap":
                gaps.append((frame["from_seq"], frame["to_seq"]))
    assert gaps, "the subscriber fell behind, so something was skipped"
    assert received == sorted(received)
    # nothing lost silently: every seq was delivered or lies inside a gap it was told about
    assert all(covered(seq) for seq in sent)
    print(
        f"\ndrop: {len(received)} delivered, {len(gaps)} gaps covering the other "
        f"{len(sent) - len(received)}"
    )


async def test_overflow_policy_disconnect_closes_with_4001(start_broker: StartBroker) -> None:
    running = await start_broker(overflow_policy="disconnect", buffer_events=10)
    async with RawWebSocket.open(
        running.url, ["broker.v1.json"], receive_buffer_bytes=32 * 1024
    ) as ws:
        await _stall_and_publish(running, ws)
        while await ws.message() is not None:
            pass
        assert ws.close_code_seen == 4001
    await wait_for(lambda: len(running.node.hub) == 0)


@pytest.mark.parametrize("codec", ["broker.v1.json", "broker.v1.msgpack"])
async def test_frames_of_every_length_encoding_arrive_whole_and_in_order(
    broker: Running, codec: str
) -> None:
    """Payloads around the 7-bit, 16-bit and 64-bit length forms of a frame's head (RFC 6455
    5.2), published in one batch so that they are delivered as one run (one write)."""
    sizes = [1, 100, 125, 126, 65_000, 65_536, 70_000]
    async with open_websocket_url(ws_url(broker), subprotocols=[codec]) as ws:
        pack = (lambda op: json.dumps(op)) if codec.endswith("json") else msgpack.packb
        unpack = json.loads if codec.endswith("json") else msgpack.unpackb
        await ws.send_message(pack({"op": "subscribe", "topics": ["sizes"]}))
        assert unpack(await ws.get_message())["type"] == "subscribed"
        lines = "".join(json.dumps({"topic": "sizes", "data": "x" * n}) + "\n" for n in sizes)
        async with httpx.AsyncClient(base_url=broker.url) as http:
            answer = await http.post(
                "/v1/publish", content=lines, headers={"content-type": "application/x-ndjson"}
            )
        assert answer.json() == {"seqs": [1, 2, 3, 4, 5, 6, 7]}
        for seq, n in enumerate(sizes, 1):
            with trio.fail_after(10):
                event = unpack(await ws.get_message())
            data = event["data"] if isinstance(event["data"], str) else event["data"].decode()
            assert (event["type"], event["seq"], data) == ("event", seq, "x" * n)
