"""Cluster mode: broker nodes on a real nats-server share one JetStream stream."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import nats
import pytest
import trio
import trio_asyncio

from broker.backplane.nats import JetStreamLog
from broker.errors import Unavailable
from broker.server import Running
from tests.integration.clients import TRANSPORTS, Item, subscribe, wait_for
from tests.integration.conftest import StartBroker
from tests.integration.test_transports import events, publish_mixed
from tests.natsserver import NatsServer, start_nats_server

_streams = itertools.count(1)


def cluster_settings(server: NatsServer, name: str = "cluster", **overrides: Any) -> dict[str, Any]:
    """Settings for nodes of one new stream (and subject prefix) of their own on ``server``."""
    n = next(_streams)
    return {
        "nats_urls": server.url,
        "nats_stream": f"{name.upper()}{n}",
        "nats_subject_prefix": f"{name}{n}",
        **overrides,
    }


async def start_cluster(
    start_broker: StartBroker, server: NatsServer, nodes: int
) -> tuple[list[Running], str]:
    """``nodes`` brokers on one stream of their own; returns them and the subject prefix."""
    settings = cluster_settings(server)
    return [await start_broker(**settings) for _ in range(nodes)], settings["nats_subject_prefix"]


async def publish_over_nats(url: str, subject: str, payloads: list[bytes]) -> None:
    """A plain NATS client (core publish, no JetStream API), as any service would."""

    async def publish() -> None:
        client = await nats.connect(url)
        for payload in payloads:
            await client.publish(subject, payload)
        await client.flush()
        await client.close()

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(publish)()


async def delete_stream(url: str, stream: str) -> None:
    async def delete() -> None:
        client = await nats.connect(url)
        await client.jetstream().delete_stream(stream)
        await client.close()

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(delete)()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_node_delivers_every_message_with_the_same_seqs(
    transport: str, start_broker: StartBroker, nats_server: NatsServer
) -> None:
    (a, b), prefix = await start_cluster(start_broker, nats_server, 2)
    assert a.node.log.epoch == b.node.log.epoch  # one stream, one incarnation
    async with (
        subscribe(b.url, transport, ["orders.*"]) as on_b,
        subscribe(a.url, transport, ["orders.*"]) as on_a,
    ):
        await wait_for(lambda: len(a.node.hub) == 1 and len(b.node.hub) == 1)
        async with httpx.AsyncClient(base_url=a.url) as http:
            sent = await publish_mixed(http, ["orders.eu", "orders.us"], 200)
        direct = [f"direct {i}".encode() for i in range(50)]
        await publish_over_nats(nats_server.url, f"{prefix}.orders.eu", direct)
        await on_b.wait_count(250)
        await on_a.wait_count(250)
    got_b, got_a = events(on_b.received), events(on_a.received)
    assert got_b[:200] == sent  # published on A over HTTP: same seqs, same order, on B
    assert [data for _, data in got_b[200:]] == direct  # straight onto the bus
    assert [seq for seq, _ in got_b] == sorted(seq for seq, _ in got_b)
    assert got_a == got_b


async def test_resume_on_another_node(start_broker: StartBroker, nats_server: NatsServer) -> None:
    (a, b), _ = await start_cluster(start_broker, nats_server, 2)
    async with httpx.AsyncClient(base_url=a.url) as http:
        sent = await publish_mixed(http, ["r"], 100)
    epoch = a.node.log.epoch
    # a client that saw up to message 40 on node A resumes on node B
    async with subscribe(b.url, "sse", ["r"], last_event_id=f"{epoch}:{sent[39][0]}") as feed:
        assert events(await feed.take(60)) == sent[40:]


async def test_the_nodes_share_the_idempotency_window(
    start_broker: StartBroker, nats_server: NatsServer
) -> None:
    (a, b), _ = await start_cluster(start_broker, nats_server, 2)
    headers = {"Idempotency-Key": "order-17"}
    async with httpx.AsyncClient() as http:
        first = (await http.post(f"{a.url}/v1/topics/o", content=b"x", headers=headers)).json()
        again = (await http.post(f"{b.url}/v1/topics/o", content=b"x", headers=headers)).json()
    assert again == {"seq": first["seq"], "duplicate": True}
    with trio.fail_after(5):
        while b.node.log.last_seq < first["seq"]:
            await trio.sleep(0.01)
    assert b.node.log.last_seq == first["seq"]  # stored once


async def test_a_nats_outage_loses_nothing_that_was_acknowledged(
    start_broker: StartBroker,
) -> None:
    server = start_nats_server()
    try:
        (node,), _ = await start_cluster(start_broker, server, 1)
        async with (
            subscribe(node.url, "ndjson", ["o"]) as feed,
            httpx.AsyncClient(base_url=node.url) as http,
        ):
            await wait_for(lambda: len(node.node.hub) == 1)
            acked = [
                (await http.post("/v1/topics/o", content=f"before {i}".encode())).json()["seq"]
                for i in range(10)
            ]
            server.stop(keep_store=True)
            await wait_for(lambda: not node.node.ready)
            assert (await http.get("/readyz")).json() == {"status": "backplane-unavailable"}
            refused = [(await http.post("/v1/topics/o", content=b"lost?")) for _ in range(5)]
            assert [r.status_code for r in refused] == [503] * 5  # failed fast, none acknowledged
            server = start_nats_server(port=server.port, store_dir=server.store_dir)
            await wait_for(lambda: node.node.ready, 20)
            for i in range(10):
                response = await http.post("/v1/topics/o", content=f"after {i}".encode())
                acked.append(response.json()["seq"])
            await feed.wait_count(20)
        # the subscriber stayed connected and got every acknowledged message, once, in order
        assert [item.seq for item in feed.received] == acked
        print(f"\noutage: {len(acked)} acknowledged and delivered, 5 refused with 503")
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_resume_older_than_the_streams_retention_gets_a_gap(
    transport: str, start_broker: StartBroker, nats_server: NatsServer
) -> None:
    running = await start_broker(**cluster_settings(nats_server, "retain", retention_messages=50))
    async with httpx.AsyncClient(base_url=running.url) as http:
        body = "\n".join(f'{{"topic":"r","data":"m{i}"}}' for i in range(1, 101))
        response = await http.post(
            "/v1/publish", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        assert response.json()["seqs"] == list(range(1, 101))
    await wait_for(lambda: running.node.log.first_seq == 51)  # the stream kept the last 50
    epoch = running.node.log.epoch
    resume = {"last_event_id": f"{epoch}:10"} if transport == "sse" else {"from_seq": 10}
    async with subscribe(running.url, transport, ["r"], **resume) as feed:  # type: ignore[arg-type]
        assert await feed.next() == Item("gap", 11, to_seq=50)
        rest = await feed.take(50)
    assert events(rest) == [(seq, f"m{seq}".encode()) for seq in range(51, 101)]


@pytest.mark.parametrize("transport", ["sse", "ndjson", "ws"])
async def test_a_live_subscriber_is_told_what_the_stream_deleted_before_the_node_saw_it(
    transport: str, start_broker: StartBroker, nats_server: NatsServer
) -> None:
    # A node that falls behind the stream (here: its follower is paused, as a slow or cut-off
    # node would be) while the stream's limits delete what it has not seen: the hub finds the
    # hole when it follows again and sends live subscribers through the log, which says "gap".
    settings = cluster_settings(nats_server, "hole", retention_messages=10)
    node = await start_broker(**settings)
    log = node.node.log
    assert isinstance(log, JetStreamLog)
    subject = f"{settings['nats_subject_prefix']}.h"
    async with subscribe(node.url, transport, ["h"]) as feed:
        await wait_for(lambda: len(node.node.hub) == 1)
        await publish_over_nats(nats_server.url, subject, [b"live %d" % i for i in range(1, 6)])
        await feed.wait_count(5)
        await log._aio(log._follower.unsubscribe)()  # the node stops following (test hook)
        await publish_over_nats(nats_server.url, subject, [b"m %d" % i for i in range(6, 106)])
        await log._aio(log._aio_follow)()  # and follows again: 6..95 are gone
        await feed.wait_count(5 + 1 + 10)
    got = feed.received
    assert events(got[:5]) == [(seq, b"live %d" % seq) for seq in range(1, 6)]
    assert got[5] == Item("gap", 6, to_seq=95)
    assert events(got[6:]) == [(seq, b"m %d" % seq) for seq in range(96, 106)]
    assert node.node.hub.holes == 1


async def test_a_seq_missing_inside_a_followed_batch_is_found_too(
    start_broker: StartBroker, nats_server: NatsServer
) -> None:
    # The limit per topic deletes from the middle of the stream: the follower's batch then skips
    # a seq in its middle. The node must notice that too, and tell which topic lost it.
    settings = cluster_settings(nats_server, "inner", retention_messages_per_topic=2)
    node = await start_broker(**settings)
    log = node.node.log
    assert isinstance(log, JetStreamLog)
    prefix = settings["nats_subject_prefix"]
    async with subscribe(node.url, "ndjson", ["h", "k"]) as feed:
        await wait_for(lambda: len(node.node.hub) == 1)
        for i in range(1, 6):  # one at a time: the node follows each before the next
            await publish_over_nats(nats_server.url, f"{prefix}.h", [b"h%d" % i])
            await feed.wait_count(i)
        await log._aio(log._follower.unsubscribe)()  # the node stops following (test hook)
        await publish_over_nats(nats_server.url, f"{prefix}.k", [b"k6"])
        await publish_over_nats(nats_server.url, f"{prefix}.h", [b"h7", b"h8", b"h9"])
        await wait_for(lambda: log.first_seq == 6)  # "h" keeps 8 and 9: 4, 5 and 7 are gone
        await log._aio(log._aio_follow)()  # the follower gets 6, 8, 9
        await feed.wait_count(5 + 4)
    got = feed.received
    assert events(got[:5]) == [(seq, b"h%d" % seq) for seq in range(1, 6)]
    assert got[5] == Item("gap", 6, topic="h", to_seq=7)
    assert events(got[6:]) == [(6, b"k6"), (8, b"h8"), (9, b"h9")]
    assert node.node.hub.holes == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["embedded", "cluster"])
async def test_retention_per_topic_tells_which_topic_lost_what(
    mode: str, transport: str, start_broker: StartBroker, nats_server: NatsServer
) -> None:
    # Cluster: the subscriber's node starts after the deletions, so it reads the stream itself.
    settings: dict[str, Any] = {"retention_messages_per_topic": 2}
    if mode == "cluster":
        settings = cluster_settings(nats_server, "pertopic", **settings)
    publisher = await start_broker(**settings)
    async with httpx.AsyncClient(base_url=publisher.url) as http:
        # a: 1 3 4 6, b: 2 5; the limit of 2 per topic deletes "a"'s 1 and 3
        body = "\n".join(f'{{"topic":"{t}","data":"m{i}"}}' for i, t in enumerate("abaaba", 1))
        response = await http.post(
            "/v1/publish", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        assert response.json()["seqs"] == [1, 2, 3, 4, 5, 6]
    await wait_for(lambda: publisher.node.log.first_seq == 2)
    node = publisher if mode == "embedded" else await start_broker(**settings)
    resume = (
        {"last_event_id": f"{node.node.log.epoch}:0"} if transport == "sse" else {"from_seq": 0}
    )
    async with subscribe(node.url, transport, ["a", "b"], **resume) as feed:  # type: ignore[arg-type]
        got = [await feed.next() for _ in range(6)]
    assert got[:2] == [Item("gap", 1, to_seq=1), Item("gap", 2, topic="a", to_seq=3)]
    assert events(got[2:]) == [(2, b"m2"), (4, b"m4"), (5, b"m5"), (6, b"m6")]


async def test_a_resume_against_a_recreated_stream_gets_a_reset(
    start_broker: StartBroker, nats_server: NatsServer
) -> None:
    settings = cluster_settings(nats_server, "reborn")
    first = await start_broker(**settings)
    async with httpx.AsyncClient(base_url=first.url) as http:
        for i in range(5):
            await http.post("/v1/topics/r", content=f"old {i}".encode())
    old_epoch = first.node.log.epoch
    first.server.stop()
    await first.server.stopped()

    await delete_stream(nats_server.url, settings["nats_stream"])
    second = await start_broker(**settings)  # creates the stream anew: a new incarnation
    assert second.node.log.epoch != old_epoch
    async with httpx.AsyncClient(base_url=second.url) as http:
        new = (await http.post("/v1/topics/r", content=b"new")).json()["seq"]
    assert new == 1  # seqs start over: "1" of the old stream means something else now
    async with subscribe(second.url, "sse", ["r"], last_event_id=f"{old_epoch}:3") as feed:
        reset = await feed.next()
        assert (reset.kind, reset.epoch) == ("reset", second.node.log.epoch)
        assert (await feed.next()).data == b"new"  # then the new stream from its start


@pytest.mark.parametrize("transport", ["sse", "ndjson", "ws"])
async def test_a_stream_recreated_under_running_nodes_resets_their_subscribers(
    transport: str, start_broker: StartBroker, nats_server: NatsServer
) -> None:
    settings = cluster_settings(nats_server, "underfoot")
    a, b = await start_broker(**settings), await start_broker(**settings)
    old_epoch = a.node.log.epoch
    async with (
        subscribe(b.url, transport, ["r"]) as feed,
        httpx.AsyncClient(base_url=a.url) as http,
    ):
        await wait_for(lambda: len(b.node.hub) == 1)
        for i in range(3):
            await http.post("/v1/topics/r", content=f"old {i}".encode())
        await feed.wait_count(3)
        await delete_stream(nats_server.url, settings["nats_stream"])
        # The nodes create it anew (it is their configuration) and follow the new incarnation.
        await wait_for(lambda: a.node.log.epoch != old_epoch and b.node.log.epoch != old_epoch)
        assert a.node.log.epoch == b.node.log.epoch
        seqs = [
            (await http.post("/v1/topics/r", content=b"new %d" % i)).json()["seq"] for i in (1, 2)
        ]
        assert seqs == [1, 2]
        await feed.wait_count(3 + 1 + 2)
    got = feed.received
    assert events(got[:3]) == [(1, b"old 0"), (2, b"old 1"), (3, b"old 2")]
    assert (got[3].kind, got[3].epoch) == ("reset", b.node.log.epoch)
    assert events(got[4:]) == [(1, b"new 1"), (2, b"new 2")]
    # The stream's positions now carry the new epoch: resuming from one gets no second reset.
    position = f"{b.node.log.epoch}:1"
    resume = {"last_event_id": position} if transport == "sse" else {"from_seq": position}
    async with subscribe(a.url, transport, ["r"], **resume) as again:  # type: ignore[arg-type]
        assert events([await again.next()]) == [(2, b"new 2")]


async def test_retention_by_age_on_the_servers_clock(
    start_broker: StartBroker, nats_server: NatsServer
) -> None:
    # The conformance suite's age tests move a fake clock; JetStream ages by the server's own,
    # so this one waits (under a deadline) for a 1 s max_age to expire three events.
    running = await start_broker(**cluster_settings(nats_server, "age", retention_seconds=1.0))
    async with httpx.AsyncClient(base_url=running.url) as http:
        for i in range(3):
            await http.post("/v1/topics/a", content=f"old {i}".encode())
        await wait_for(lambda: running.node.log.first_seq == 4, 15)  # all three expired
        fresh = (await http.post("/v1/topics/a", content=b"fresh")).json()["seq"]
    assert fresh == 4
    async with subscribe(running.url, "ndjson", ["a"], from_seq=0) as feed:
        assert await feed.next() == Item("gap", 1, to_seq=3)
        assert (await feed.next()).data == b"fresh"


async def test_a_stream_whose_subjects_another_stream_holds_is_refused_with_the_reason(
    start_broker: StartBroker, nats_server: NatsServer
) -> None:
    """JetStream answers such a stream's creation "subjects overlap" (400), and its update "not
    found" (404), which is also what a stream half made by a racing node gets: the node waits
    a few seconds for that, then fails with the first answer's reason."""
    settings = cluster_settings(nats_server, "squatted")

    async def squat() -> None:
        client = await nats.connect(nats_server.url)
        await client.jetstream().add_stream(
            name=f"SQUATTER{settings['nats_stream']}",
            subjects=[f"{settings['nats_subject_prefix']}.>"],
        )
        await client.close()

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(squat)()
    with trio.fail_after(30), pytest.raises(BaseException) as caught:
        await start_broker(**settings)
    assert caught.group_contains(Unavailable, match="JetStream refused the stream: .*overlap")
