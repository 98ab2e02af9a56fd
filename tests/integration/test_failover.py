"""Failover: a 3-node NATS cluster (stream R3) and 3 broker nodes, as separate processes. While
20,000 numbered messages are published, one broker node and one NATS server are SIGKILLed.
Every subscriber must end with all 20,000, in order, with no duplicate and no gap."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import trio

from broker.client import GapNotice, Message, ResetNotice, subscribe
from broker.cluster import LocalCluster

MESSAGES = 20_000
BATCH = 200
TRANSPORTS = ["sse", "ndjson", "ws"]
FAILOVER_DEADLINE_SECONDS = 150  # runs take 7-23 s here


@pytest.mark.timeout(300)
async def test_killing_a_broker_node_and_a_nats_server_loses_nothing() -> None:
    cluster = LocalCluster(brokers=3, nats=3)
    await trio.to_thread.run_sync(cluster.start)  # stops what it started if it fails
    try:
        await _run_failover(cluster)
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def _run_failover(cluster: LocalCluster) -> None:
    urls = [node.url for node in cluster.broker_nodes]
    received: dict[str, list[int]] = {}
    anomalies: dict[str, list[object]] = {}
    reconnects: dict[str, int] = {}
    acknowledged = 0
    log: list[str] = []

    async def subscriber(name: str, first: int, transport: str) -> None:
        nodes = urls[first:] + urls[:first]  # starts on node `first`, fails over to the others
        got = received[name] = []
        odd = anomalies[name] = []
        async with subscribe(
            nodes,
            "failover",
            transport=transport,
            from_seq=0,  # type: ignore[arg-type]
            backoff_max_seconds=0.5,
        ) as sub:
            async for item in sub:
                if isinstance(item, Message):
                    got.append(int(item.text))
                    if len(got) == MESSAGES:
                        break
                elif isinstance(item, GapNotice | ResetNotice):
                    odd.append(item)
            reconnects[name] = sub.reconnects

    async def publisher() -> None:
        nonlocal acknowledged
        node = 0
        async with httpx.AsyncClient(timeout=10) as http:
            while acknowledged < MESSAGES:
                lines = "\n".join(
                    json.dumps({"topic": "failover", "data": str(i), "id": f"m{i}"})
                    for i in range(acknowledged, acknowledged + BATCH)
                )
                try:
                    response = await http.post(
                        f"{urls[node]}/v1/publish",
                        content=lines,
                        headers={"Content-Type": "application/x-ndjson"},
                    )
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:  # the node is gone or NATS is failing over: retry (deduplicated)
                    node = (node + 1) % len(urls)
                    await trio.sleep(0.1)
                    continue
                acknowledged += BATCH
                await chaos()

    killed_broker = killed_nats = False

    async def chaos() -> None:
        nonlocal killed_broker, killed_nats
        if acknowledged >= 5_000 and not killed_broker:
            killed_broker = True
            process = cluster.broker_nodes[0].process
            assert process is not None
            process.send_signal(signal.SIGKILL)
            log.append(f"SIGKILL broker node {urls[0]} after {acknowledged} acknowledged")
        if acknowledged >= 10_000 and not killed_nats:
            killed_nats = True
            nats = cluster.nats_nodes[1]
            assert nats.process is not None
            nats.process.send_signal(signal.SIGKILL)
            log.append(f"SIGKILL nats-server {nats.name} ({nats.url}) after {acknowledged}")

    async def progress() -> None:
        while True:
            await trio.sleep(5)
            counts = {name: len(got) for name, got in sorted(received.items())}
            print(f"  [{trio.current_time():.0f}] acknowledged {acknowledged}; received {counts}")

    with trio.fail_after(FAILOVER_DEADLINE_SECONDS):
        async with trio.open_nursery() as outer:
            outer.start_soon(progress)
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    name = f"{TRANSPORTS[i % 3]}@node{i % 3 + 1}#{i}"
                    nursery.start_soon(subscriber, name, i % 3, TRANSPORTS[i % 3])
                nursery.start_soon(publisher)
            outer.cancel_scope.cancel()  # every subscriber has everything

    print("\nfailover:", *log, sep="\n  ")
    for name in sorted(received):
        got = received[name]
        print(
            f"  {name}: {len(got)} messages, first {got[:1]}, last {got[-1:]}, "
            f"reconnects {reconnects.get(name)}, gaps/resets {anomalies[name]}"
        )
    assert killed_broker and killed_nats
    for name, got in received.items():
        assert got == list(range(MESSAGES)), name  # all, in order, no duplicate
        assert anomalies[name] == [], name  # and nothing reported lost
    # the subscribers that started on the killed node did move to another
    assert all(reconnects[name] >= 1 for name in received if name.endswith(("#0", "#3")))
