"""gRPC subscribers for the bench: ``--connections`` ``Subscribe`` streams on one channel each
(grpc.aio, one process), counting events and reading the publish time in sampled payloads.
Same control protocol as `bench.loadgen` (``reset``, ``report``, ``quit`` on stdin)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time

from bench.loadgen import Samples, emit, raise_fd_limit

_STAMP = re.compile(rb'^\{"t":(\d+\.\d+),')


async def main_async(args: argparse.Namespace) -> None:
    import grpc

    from broker._pb import broker_pb2 as pb
    from broker._pb import broker_pb2_grpc as rpc

    counts = [0] * args.connections
    latencies = Samples()
    ready = 0
    errors: list[str] = []
    subscribed = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal ready
        sampled = i % args.sample_every == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}") as channel:
            call = rpc.BrokerStub(channel).Subscribe(pb.SubscribeRequest(topics=[args.topic]))
            try:
                async for delivery in call:
                    if delivery.HasField("subscribed"):
                        ready += 1
                        if ready == args.connections:
                            subscribed.set()
                        continue
                    counts[i] += len(delivery.events)
                    if sampled:
                        now = time.monotonic()
                        for event in delivery.events:
                            match = _STAMP.match(event.payload)
                            if match:
                                latencies.add(now - float(match[1]))
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    tasks = [asyncio.create_task(one(i)) for i in range(args.connections)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(subscribed.wait(), 60)
    emit({"ready": ready, "failed": args.connections - ready, "errors": errors[:5]})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = line.strip()
        if command == "reset":
            counts[:] = [0] * args.connections
            latencies.clear()
            emit({"ok": True})
        elif command in ("report", "count"):  # count: no percentiles, cheap enough to poll
            latency = latencies.summary() if command == "report" else latencies.counts()
            emit({"received": sum(counts), "per_connection_min": min(counts),
                  "per_connection_max": max(counts), "open": ready, "closed": len(errors),
                  "latency": latency, "errors": errors[:5]})
        elif command in ("quit", ""):
            break
    for task in tasks:
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--sample-every", type=int, default=10)
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
