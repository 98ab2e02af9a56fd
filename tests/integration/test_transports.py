"""Every subscribe transport, against a real broker: complete in-order delivery, exact resume,
gaps past retention, resets across epochs."""

from __future__ import annotations

import json

import httpx
import pytest

from broker.server import Running
from tests.integration.clients import TRANSPORTS, Item, subscribe, wait_for
from tests.integration.conftest import StartBroker


async def publish_one(http: httpx.AsyncClient, topic: str, text: str) -> int:
    response = await http.post(
        f"/v1/topics/{topic}", content=text.encode(), headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 200, response.text
    seq: int = response.json()["seq"]
    return seq


async def publish_batch(http: httpx.AsyncClient, topic: str, texts: list[str]) -> list[int]:
    body = "\n".join(json.dumps({"topic": topic, "data": t}) for t in texts)
    response = await http.post(
        "/v1/publish", content=body.encode(), headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 200, response.text
    seqs: list[int] = response.json()["seqs"]
    assert len(seqs) == len(texts)
    return seqs


async def publish_mixed(
    http: httpx.AsyncClient, topics: list[str], count: int
) -> list[tuple[int, bytes]]:
    """``count`` numbered messages: half one POST each, half in batches of 100, topics rotating."""
    sent: list[tuple[int, bytes]] = []
    n = 0
    while n < count:
        topic = topics[(n // 100) % len(topics)]
        if (n // 100) % 2 == 0:
            texts = [f"m{i}" for i in range(n, min(n + 100, count))]
            for text in texts:
                sent.append((await publish_one(http, topic, text), text.encode()))
        else:
            texts = [f"m{i}" for i in range(n, min(n + 100, count))]
            seqs = await publish_batch(http, topic, texts)
            sent.extend(zip(seqs, (t.encode() for t in texts), strict=True))
        n += len(texts)
    return sent


def events(items: list[Item]) -> list[tuple[int, bytes]]:
    return [(i.seq, i.data) for i in items if i.kind == "event"]


async def epoch_of(http: httpx.AsyncClient) -> str:
    epoch: str = (await http.get("/readyz")).json()["epoch"]
    return epoch


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_message_arrives_complete_and_in_order(
    transport: str, broker: Running, http: httpx.AsyncClient
) -> None:
    async with subscribe(broker.url, transport, ["orders.*"]) as feed:
        await wait_for(lambda: len(broker.node.hub) == 1)
        sent = await publish_mixed(http, ["orders.eu", "orders.us"], 1000)
        await feed.wait_count(1000)
    assert [seq for seq, _ in sent] == sorted(seq for seq, _ in sent)
    assert events(feed.received) == sent


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_after_disconnect_delivers_the_rest_exactly_once(
    transport: str, broker: Running, http: httpx.AsyncClient
) -> None:
    k, total = 400, 1000
    async with subscribe(broker.url, transport, ["resume.t"]) as feed:
        await wait_for(lambda: len(broker.node.hub) == 1)
        sent = await publish_mixed(http, ["resume.t"], total)
        await feed.wait_count(k)
    assert events(feed.received)[:k] == sent[:k]
    last_seq = sent[k - 1][0]
    epoch = await epoch_of(http)
    # SSE resumes the way EventSource does (Last-Event-ID); the others with from_seq, in both forms
    resume = (
        {"last_event_id": f"{epoch}:{last_seq}"}
        if transport == "sse"
        else (
            {"from_seq": f"{epoch}:{last_seq}"}
            if transport.startswith("ws")
            else {"from_seq": last_seq}
        )
    )
    async with subscribe(broker.url, transport, ["resume.t"], **resume) as feed:  # type: ignore[arg-type]
        rest = await feed.take(total - k)
        assert events(rest) == sent[k:]
        sentinel = await publish_one(http, "resume.t", "sentinel")
        assert await feed.next() == Item("event", sentinel, b"sentinel", rest[0].topic)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_older_than_retention_gets_a_gap_then_the_rest(
    transport: str, start_broker: StartBroker
) -> None:
    running = await start_broker(retention_messages=100)
    async with httpx.AsyncClient(base_url=running.url) as http:
        sent = await publish_batch(http, "ret.t", [f"r{i}" for i in range(300)])
        assert sent == list(range(1, 301))
        epoch = await epoch_of(http)
        resume = {"last_event_id": f"{epoch}:10"} if transport == "sse" else {"from_seq": 10}
        async with subscribe(running.url, transport, ["ret.t"], **resume) as feed:  # type: ignore[arg-type]
            assert await feed.next() == Item("gap", 11, to_seq=200)
            rest = await feed.take(100)
            assert events(rest) == [(seq, f"r{seq - 1}".encode()) for seq in range(201, 301)]
            live = await publish_one(http, "ret.t", "live")
            assert (await feed.next()).seq == live


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_quiet_topic_has_no_gap_when_a_busy_one_rolls_the_window(
    transport: str, start_broker: StartBroker
) -> None:
    running = await start_broker(retention_messages=100)
    async with httpx.AsyncClient(base_url=running.url) as http:
        quiet = await publish_one(http, "quiet", "q")
        await publish_batch(http, "busy", ["b"] * 99)
        # the window still holds `quiet`: resuming from before it is exact, no gap
        async with subscribe(running.url, transport, ["quiet"], from_seq=0) as feed:
            assert await feed.next() == Item(
                "event", quiet, b"q", "quiet" if transport != "sse" else ""
            )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_position_from_another_epoch_gets_a_reset(
    transport: str, broker: Running, http: httpx.AsyncClient
) -> None:
    sent = await publish_batch(http, "epoch.t", ["a", "b"])
    resume = {"last_event_id": "0ld3p0ch:1"} if transport == "sse" else {"from_seq": "0ld3p0ch:1"}
    async with subscribe(broker.url, transport, ["epoch.t"], **resume) as feed:  # type: ignore[arg-type]
        first = await feed.next()
        assert first.kind == "reset" and first.epoch == await epoch_of(http)
        assert events(await feed.take(2)) == [(sent[0], b"a"), (sent[1], b"b")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_from_earliest_and_latest(
    transport: str, broker: Running, http: httpx.AsyncClient
) -> None:
    old = await publish_batch(http, "start.t", ["x", "y"])
    async with subscribe(broker.url, transport, ["start.t"], start="earliest") as feed:
        assert events(await feed.take(2)) == [(old[0], b"x"), (old[1], b"y")]
    await wait_for(lambda: len(broker.node.hub) == 0)  # the client left: released at once
    async with subscribe(broker.url, transport, ["start.t"], start="latest") as feed:
        await wait_for(lambda: len(broker.node.hub) == 1)
        new = await publish_one(http, "start.t", "z")
        await feed.wait_count(1)
    assert events(feed.received) == [(new, b"z")]
