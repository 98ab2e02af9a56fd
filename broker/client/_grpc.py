"""The client's gRPC transport, from trio: grpcio's blocking API in worker threads.

A target is written ``grpc://HOST:PORT``. Status messages start with the problem's slug
(``bad-topic: ...``), which becomes the `ProblemError`'s slug; UNAVAILABLE is retried like a
dropped connection.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import trio

from broker._pb import broker_pb2 as pb2
from broker._pb import broker_pb2_grpc as pb2_grpc
from broker.client.errors import PublishError, SubscribeError
from broker.client.events import GapNotice, Message, ResetNotice
from broker.errors import PROBLEM_TYPE_PREFIX, BrokenError, Unavailable

if TYPE_CHECKING:
    from broker.client.subscribe import Subscriber

SCHEME = "grpc://"
# What HTTP status a refusal would have had (ProblemError keeps one).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
}


def target_of(url: str) -> str:
    if not url.startswith(SCHEME):
        raise ValueError(f"a gRPC target is written grpc://HOST:PORT, got {url!r}")
    return url.removeprefix(SCHEME).rstrip("/")


def _error(exc: grpc.RpcError, kind: type[PublishError] | type[SubscribeError]) -> Exception:
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(message)
    status = _HTTP_STATUS.get(code)
    if status is None:
        return BrokenError(f"gRPC {code.name}: {message}")
    slug, _, detail = message.partition(": ")
    return kind(status, {"type": PROBLEM_TYPE_PREFIX + slug, "status": status, "detail": detail})


async def publish(
    url: str,
    topic: str,
    payload: bytes,
    *,
    content_type: str | None = None,
    event: str | None = None,
    key: str | None = None,
) -> int:
    """Publish one event over gRPC; its seq once the broker has stored it."""
    request = pb2.PublishRequest(
        topic=topic,
        payload=payload,
        content_type=content_type or "",
        event=event or "",
        idempotency_key=key or "",
    )

    def call() -> int:
        with grpc.insecure_channel(target_of(url)) as channel:
            response = pb2_grpc.BrokerStub(channel).Publish(request, timeout=30)
            return int(response.seq)

    try:
        return await trio.to_thread.run_sync(call)
    except grpc.RpcError as exc:
        raise _error(exc, PublishError) from None


async def run_grpc(sub: Subscriber, opened: Callable[[], None]) -> None:
    """One ``Subscribe`` call, until it ends or fails; items go to ``sub._deliver``."""
    position = sub._position()
    request = pb2.SubscribeRequest(
        topics=list(sub.topics),
        position=position or "",
        start=pb2.START_EARLIEST
        if position is None and sub.start == "earliest"
        else pb2.START_LATEST,
    )
    channel = grpc.insecure_channel(target_of(sub.base_url))
    call: Any = pb2_grpc.BrokerStub(channel).Subscribe(request)
    send, receive = trio.open_memory_channel[Any](1)

    def pump() -> None:  # a worker thread: the blocking iterator, one Delivery at a time
        try:
            for delivery in call:
                trio.from_thread.run(send.send, delivery)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                trio.from_thread.run(send.send, exc)
        except trio.RunFinishedError:
            pass
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(send.close)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(trio.to_thread.run_sync, pump, abandon_on_cancel=True)
            )
            epoch: str | None = None
            try:
                async for delivery in receive:
                    if isinstance(delivery, grpc.RpcError):
                        raise _error(delivery, SubscribeError)
                    epoch = await _handle(sub, delivery, epoch, opened)
            finally:
                call.cancel()
    finally:
        channel.close()


async def _handle(
    sub: Subscriber, delivery: Any, epoch: str | None, opened: Callable[[], None]
) -> str | None:
    if delivery.HasField("subscribed"):
        epoch = delivery.subscribed.epoch
        opened()
        await sub._adopt(delivery.subscribed.position)
    if delivery.HasField("reset"):
        epoch = delivery.reset.epoch
        await sub._deliver(ResetNotice(epoch), epoch)
    items: list[tuple[int, Any]] = [(g.from_seq, g) for g in delivery.gaps]
    items += [(e.seq, e) for e in delivery.events]
    if delivery.gaps:  # a gap sits where its range says
        items.sort(key=lambda pair: pair[0])
    for _, item in items:
        if isinstance(item, pb2.Gap):
            await sub._deliver(GapNotice(item.from_seq, item.to_seq, item.topic or None), epoch)
        else:
            message = Message(
                seq=item.seq,
                topic=item.topic,
                data=item.payload,
                time_ms=item.time_ms or None,
                event=item.event or None,
                content_type=item.content_type or None,
            )
            await sub._deliver(message, epoch)
    return epoch
