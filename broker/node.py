"""A broker node: the state every transport shares (log, hub, router, formats, open outlets),
and the two operations they all need: open a subscription at a position, and publish."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from broker.backplane.base import AppendResult, Log
from broker.config import Settings
from broker.delivery import Framing, Heartbeats, Outlet, Router, Sink
from broker.encoding import Format
from broker.errors import Problem, RequestError, Unavailable
from broker.hub import Hub
from broker.metrics import Metrics
from broker.model import AppendRequest, Event, Filter, Gap, Position, Reset
from broker.subscription import Subscription
from broker.transports.listener import ConnectionRegistry
from broker.wire import ndjson, pb, sse, ws

logger = logging.getLogger("broker.node")
FILTER_CACHE = 4096  # parsed filters kept for sharing (the whole cache is dropped when full)


class Framings:
    """The per-transport encoders of one log epoch: each event is encoded once per transport."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.sse = Framing(
            Format("sse", sse.event_encoder(epoch)),
            gap=lambda sub, g: sse.encode_gap(g.from_seq, g.to_seq, epoch, g.topic),
            reset=lambda sub, r: sse.encode_reset(r.epoch),
            joined=True,
        )
        self.ndjson = Framing(
            Format("ndjson", ndjson.encode_event),
            gap=_ndjson_gap,
            reset=lambda sub, r: ndjson.encode_control("reset", epoch=r.epoch),
            joined=True,
        )
        self.grpc = Framing(
            Format("grpc", pb.encode_event),
            gap=lambda sub, g: pb.encode_gap(g.from_seq, g.to_seq, g.topic, sub.id),
            reset=lambda sub, r: pb.encode_reset(r.epoch, sub.id),
            joined=True,  # one Delivery message per write, of at most ~1 MiB
            max_joined_bytes=1024 * 1024,
        )
        self.ws = {
            codec: Framing(
                Format(codec.value, _ws_event_encoder(codec)),
                gap=partial(_ws_gap, codec),
                reset=partial(_ws_reset, codec),
                joined=False,
            )
            for codec in ws.Codec
        }
        # The native path writes whole WebSocket frames: each event's frame, head included, is
        # encoded once and a run's frames are joined once, like an SSE run (decisions #20).
        self.ws_wire = {
            codec: Framing(
                Format(codec.value + "+wire", _ws_wire_event_encoder(codec)),
                gap=_wired(codec, partial(_ws_gap, codec)),
                reset=_wired(codec, partial(_ws_reset, codec)),
                joined=True,
            )
            for codec in ws.Codec
        }

    def like(self, framing: Framing) -> Framing:
        """This epoch's framing for the transport ``framing`` (of an older epoch) serves."""
        framings = (self.sse, self.ndjson, self.grpc, *self.ws.values(), *self.ws_wire.values())
        for candidate in framings:
            if candidate.fmt.name == framing.fmt.name:
                return candidate
        raise ValueError(f"no framing like {framing.fmt.name!r}")


def _ws_event_encoder(codec: ws.Codec) -> Callable[[Event], bytes]:
    if codec is ws.Codec.JSON:
        return ws.encode_event_json
    return ws.encode_event_msgpack


def _ws_wire_event_encoder(codec: ws.Codec) -> Callable[[Event], bytes]:
    if codec is ws.Codec.JSON:
        return ws.wire_event_json
    return _wired(codec, ws.encode_event_msgpack)


def _wired(codec: ws.Codec, encode: Callable[..., bytes]) -> Callable[..., bytes]:
    """``encode``, with its result made a whole WebSocket frame."""
    return lambda *args: ws.wire_frame(codec, encode(*args))


def _gap_fields(gap: Gap) -> dict[str, object]:
    fields: dict[str, object] = {"from_seq": gap.from_seq, "to_seq": gap.to_seq}
    if gap.topic is not None:
        fields["topic"] = gap.topic
    return fields


def _ndjson_gap(sub: Subscription, gap: Gap) -> bytes:
    return ndjson.encode_control("gap", **_gap_fields(gap))


def _ws_gap(codec: ws.Codec, sub: Subscription, gap: Gap) -> bytes:
    return ws.frame_bytes(
        ws.encode_frame(codec, {"type": "gap", "sub": sub.id, **_gap_fields(gap)})
    )


def _ws_reset(codec: ws.Codec, sub: Subscription, reset: Reset) -> bytes:
    return ws.frame_bytes(
        ws.encode_frame(codec, {"type": "reset", "sub": sub.id, "epoch": reset.epoch})
    )


class _Registered:
    __slots__ = ("_node", "_outlet")

    def __init__(self, node: Node, outlet: Outlet) -> None:
        self._node = node
        self._outlet = outlet

    def __enter__(self) -> Outlet:
        return self._outlet

    def __exit__(self, *exc_info: object) -> None:
        self._node._release(self._outlet)


class Node:
    def __init__(self, settings: Settings, log: Log) -> None:
        self.settings = settings
        self.log = log
        self.hub = Hub(routed_seq=log.last_seq)
        self.router = Router(self.hub)
        self.heartbeats = Heartbeats(settings.heartbeat_seconds)
        log.on_events(self.router.enqueue)
        log.on_reset(self._on_reset)
        self.metrics = Metrics()
        self.outlets: set[Outlet] = set()
        self.blocked_outlets: set[Outlet] = set()  # each in a write that would block
        self.draining = False
        self._framings = Framings(log.epoch)
        self._filters: dict[tuple[str, ...], Filter] = {}
        self._ids = itertools.count(1)
        self._outlets_changed = trio.lowlevel.ParkingLot()
        # The kernel's TCP_USER_TIMEOUT is the backstop (it also bounds zero-window probing on
        # Linux); our watchdog, which logs and counts, acts first at write_timeout_seconds.
        self.connections = ConnectionRegistry(
            user_timeout_seconds=2 * settings.write_timeout_seconds
        )

    @property
    def framings(self) -> Framings:
        if self._framings.epoch != self.log.epoch:
            self._framings = Framings(self.log.epoch)
        return self._framings

    def _on_reset(self, epoch: str) -> None:
        """The log was replaced under the running node (a JetStream stream deleted and created
        anew): nothing of the old one may be routed on, and every subscriber starts over."""
        logger.warning("the log was replaced; every subscription is reset", extra={"epoch": epoch})
        self.router.reset()
        self.hub.routed_seq = self.log.last_seq
        framings = self.framings
        for outlet in self.outlets:
            outlet.reset(framings.like(outlet.framing), epoch)

    @property
    def ready(self) -> bool:
        return not self.draining and self.log.available

    def check_available(self) -> None:
        """For new subscriptions: refused only while draining (a subscriber is served from what
        the node holds, and keeps its connection while the backplane is away)."""
        if self.draining:
            raise Unavailable("this node is draining; retry on another node")

    def check_writable(self) -> None:
        """For publishes: nothing is acknowledged unless the log can store it now."""
        self.check_available()
        if not self.log.available:
            raise Unavailable("the backplane is unreachable; nothing was stored, retry")

    # -- subscribe -----------------------------------------------------------------------------

    def parse_filter(self, subjects: Sequence[str]) -> Filter:
        """Filters are immutable: subscribers of the same topics share one (~400 bytes each)."""
        key = tuple(subjects)
        cached = self._filters.get(key)
        if cached is None:
            cached = Filter.parse(subjects, max_topics=self.settings.max_topics_per_subscription)
            if len(self._filters) >= FILTER_CACHE:
                self._filters.clear()
            self._filters[key] = cached
        return cached

    def open_subscription(
        self,
        filter: Filter,
        *,
        position: Position | None,
        start: str | None,
        transport: str,
        sub_id: str | None = None,
        buffer_events: int | None = None,
    ) -> tuple[Subscription, list[Reset]]:
        """A new subscription positioned as the client asked (not yet attached to the hub).

        Returns the subscription and the control events that must precede its first event.
        """
        self.check_available()
        log = self.log
        greeting: list[Reset] = []
        if position is not None:
            if position.epoch is not None and position.epoch != log.epoch:
                greeting.append(Reset(log.epoch))
                seq = 0
            elif position.seq > log.last_seq:
                raise RequestError(
                    Problem.POSITION_AHEAD,
                    f"position {position} is beyond the log's last seq {log.last_seq}",
                    last_seq=log.last_seq,
                )
            else:
                seq = position.seq
        elif start == "earliest":
            seq = log.first_seq - 1
        else:  # "latest" or nothing (the parsers have refused anything else)
            seq = log.last_seq
        settings = self.settings
        sub = Subscription(
            sub_id or f"s{next(self._ids)}",
            filter,
            position=seq,
            live=seq >= self.hub.routed_seq,
            buffer_events=buffer_events or settings.buffer_events,
            buffer_bytes=settings.buffer_bytes,
            policy=settings.overflow_policy,
            transport=transport,
        )
        return sub, greeting

    def outlet(
        self,
        sink: Sink,
        framing: Framing,
        transport: str,
        *,
        page_events: int | None = None,
        client: tuple[Any, ...] | None = None,
        heartbeat: bytes | None = None,
    ) -> _Registered:
        """An outlet registered for metrics and drain, as a context manager that always
        releases it on exit (a class, not a generator: it lives as long as the connection).

        ``heartbeat`` is written by `Heartbeats` after ``heartbeat_seconds`` (to 1.25 x that)
        of silence (None: never);
        ``client`` is the peer's address (ASGI ``scope["client"]``), by which a write that
        stays stuck is cut.
        """
        settings = self.settings
        outlet = Outlet(
            hub=self.hub,
            log=self.log,
            sink=sink,
            framing=framing,
            transport=transport,
            heartbeat=heartbeat,
            page_events=page_events or settings.catchup_page_events,
            on_delivered=self.metrics.count_delivered,
        )
        if client is not None:
            outlet.client, outlet.connections = client, self.connections
        outlet.blocked_outlets = self.blocked_outlets
        self.outlets.add(outlet)
        if heartbeat is not None:
            self.heartbeats.outlets.add(outlet)
        self.metrics.count_connection(transport)
        return _Registered(self, outlet)

    def _release(self, outlet: Outlet) -> None:
        self.heartbeats.outlets.discard(outlet)
        for sub in outlet.subscriptions.values():
            self.metrics.absorb(sub)
        outlet.close()
        self.outlets.discard(outlet)
        self._outlets_changed.unpark_all()

    # -- publish -------------------------------------------------------------------------------

    async def publish(
        self, requests: Sequence[AppendRequest], transport: str
    ) -> list[AppendResult]:
        self.check_writable()
        started = time.perf_counter()
        results = await self.log.append(requests)
        self.metrics.count_published(transport, results, time.perf_counter() - started)
        return results

    async def cut_stalled_writes(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Once a second, sever connections whose write has been blocked too long."""
        task_status.started()
        timeout = self.settings.write_timeout_seconds
        while True:
            await trio.sleep(min(1.0, timeout / 2))
            now = trio.current_time()
            for outlet in list(self.blocked_outlets):
                since = outlet.blocked_since
                if since is not None and now - since > timeout and outlet.cut():
                    self.metrics.stalled_cuts += 1
                    logger.warning(
                        "cut a stalled connection",
                        extra={"transport": outlet.transport, "blocked_seconds": now - since},
                    )

    async def wait_no_outlets(self) -> None:
        """Return once every client connection has gone."""
        while self.outlets:
            await self._outlets_changed.park()

    def drain(self) -> None:
        """Stop taking work and ask every connection to leave (they resume elsewhere)."""
        self.draining = True
        for outlet in list(self.outlets):
            outlet.drain()
