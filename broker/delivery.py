"""Getting events onto sockets: the router task, the `Sink` seam, and each connection's writer.

- `Router` moves new events from the log into the hub a tick at a time: everything that arrived
  while it was away is routed as one batch (so runs are long and encodes are shared), at most
  ``max_events_per_turn`` per turn, with a checkpoint between turns so that a saturated broker
  still accepts connections.
- `Sink` is where bytes go. ``write_nowait`` is the fast path (a non-blocking socket write,
  returning False when it would block); ``write`` is the awaitable fallback. The ASGI sinks
  here only have the fallback.
- `Outlet` is one connection's delivery end: its subscriptions, its sink, and the writer loop
  that drains everything pending into one write and replays the log for subscriptions in
  catch-up. When the sink is a raw socket (``direct``) and the writer is parked with nothing
  queued, new events are written from the router's task as they are routed (one non-blocking
  write, no task switch); the writer takes over whenever that cannot be done whole.
- `Heartbeats` is one task that writes a heartbeat to every outlet silent for too long.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from broker.backplane.base import Log
from broker.encoding import Format, Run
from broker.hub import Hub
from broker.model import Event, Gap, Reset
from broker.subscription import CloseReason, Item, State, Subscription


class Sink(Protocol):
    def write_nowait(self, data: bytes) -> bool:
        """Write all of ``data`` now if that cannot block; False (nothing written) otherwise."""
        ...

    async def write(self, data: bytes) -> None: ...


@runtime_checkable
class DirectSink(Sink, Protocol):
    """A sink on a raw socket, written from whichever task has the bytes."""

    def write_nowait_many(self, frames: Sequence[bytes]) -> bool:
        """Write every frame now, or nothing (False). What the socket did not take of a write
        is ``pending`` (later writes decline) until `flush` sends it."""
        ...

    def write_run(self, run: Run, fmt: Format) -> bool:
        """``run.joined(fmt)`` as one write now, or nothing (False); as `write_nowait`, but the
        sink may frame it once for every connection that frames it alike."""
        ...

    @property
    def pending(self) -> bool: ...

    async def flush(self) -> None: ...


class Cutter(Protocol):
    def cut(self, addr: tuple[object, ...] | None) -> bool: ...


class Framing:
    """How a transport turns subscription items into writes.

    Byte streams (SSE, NDJSON) join everything into one write; message transports (WebSocket)
    produce one write per frame.
    """

    def __init__(
        self,
        fmt: Format,
        *,
        gap: Callable[[Subscription, Gap], bytes],
        reset: Callable[[Subscription, Reset], bytes],
        joined: bool,
        max_joined_bytes: int | None = None,
    ) -> None:
        self.fmt = fmt
        self._gap = gap
        self._reset = reset
        self.joined = joined
        # Joined writes are cut at about this size (gRPC: a message must fit the client's
        # receive limit); one frame bigger than that is still one write.
        self.max_joined_bytes = max_joined_bytes

    def fits(self, run: Run) -> bool:
        """Whether ``run``'s joined bytes may go out as one write (else `render` cuts them)."""
        limit = self.max_joined_bytes
        return limit is None or len(run.joined(self.fmt)) <= limit

    def render(self, sub: Subscription, items: Sequence[Item | Event]) -> list[bytes]:
        fmt = self.fmt
        frames: list[bytes] = []
        for item in items:
            if isinstance(item, Run):
                if self.joined:
                    frames.append(item.joined(fmt))
                else:
                    frames.extend(item.frames(fmt))
            elif isinstance(item, Event):  # a replayed event (catch-up)
                frames.append(fmt.encode_replayed(item))
            elif isinstance(item, Gap):
                frames.append(self._gap(sub, item))
            else:
                frames.append(self._reset(sub, item))
        if self.joined and self.max_joined_bytes is not None:
            return self._chunks(sub, items, frames)  # even one run may be over the limit
        if self.joined and len(frames) > 1:
            return [b"".join(frames)]
        return frames

    def render_replay(
        self, sub: Subscription, head: Sequence[Item], events: Sequence[Event]
    ) -> list[bytes]:
        """A page of history: ``head`` (its gaps), then ``events``, each encoded through the
        format's replay cache. One loop over the events, with none of `render`'s per-item type
        tests: most of a catch-up's time is here."""
        if self.max_joined_bytes is not None:
            return self.render(sub, [*head, *events])
        frames = self.render(sub, head) if head else []
        frames.extend(map(self.fmt.encode_replayed, events))
        if self.joined and len(frames) > 1:
            return [b"".join(frames)]
        return frames

    def _chunks(
        self, sub: Subscription, items: Sequence[Item | Event], frames: list[bytes]
    ) -> list[bytes]:
        limit = self.max_joined_bytes
        assert limit is not None
        if sum(len(f) for f in frames) <= limit:
            return [b"".join(frames)]
        small: list[bytes] = []  # runs split into their events' frames
        for item in items:
            if isinstance(item, Run):
                small.extend(item.frames(self.fmt))
            else:
                small.extend(self.render(sub, [item]))
        chunks: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        for frame in small:
            if chunk and size + len(frame) > limit:
                chunks.append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(frame)
            size += len(frame)
        chunks.append(b"".join(chunk))
        return chunks


class Router:
    """Feeds the hub from the log, one batch per scheduler tick."""

    def __init__(self, hub: Hub, *, max_events_per_turn: int = 20_000) -> None:
        self._hub = hub
        self._max = max_events_per_turn
        self._pending: list[Event] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._incarnation = 0

    def reset(self) -> None:
        """The log was replaced: what is queued, or being routed, belongs to the old one."""
        self._pending = []
        self._incarnation += 1

    def enqueue(self, events: Sequence[Event]) -> None:
        """The log's handler: synchronous, never blocks."""
        self._pending.extend(events)
        if len(self._lot):
            self._lot.unpark_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._pending:
                await self._lot.park()
            batch, self._pending = self._pending, []
            incarnation = self._incarnation
            for start in range(0, len(batch), self._max):
                if incarnation != self._incarnation:
                    break
                self._hub.now = trio.current_time()
                self._hub.route(batch[start : start + self._max])
                await trio.lowlevel.checkpoint()


class Heartbeats:
    """Every outlet's heartbeat, from one task: four times per ``seconds`` it writes one to each
    outlet that has written nothing for ``seconds`` (so a heartbeat follows between ``seconds``
    and ``1.25 * seconds`` of silence). A timer per connection instead cost ~100 us of trio's
    cancellation machinery per heartbeat: 6.5 % of a core for 10,000 idle connections at 15 s
    (measured; decisions #21)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = seconds / 4
        self.outlets: set[Outlet] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_tick = trio.current_time()
        while True:
            next_tick += self.tick
            await trio.sleep_until(next_tick)
            silent_since = trio.current_time() - self.seconds
            for outlet in self.outlets:  # no await in here: the set cannot change under us
                if outlet.last_write <= silent_since:
                    outlet.beat()


class Outlet:
    """One client connection's writer: several subscriptions (WebSocket) or one (SSE, NDJSON)."""

    def __init__(
        self,
        *,
        hub: Hub,
        log: Log,
        sink: Sink,
        framing: Framing,
        transport: str,
        heartbeat: bytes | None,
        page_events: int,
        on_delivered: Callable[[str, int], None] = lambda transport, n: None,
    ) -> None:
        self.hub = hub
        self.log = log
        self.sink = sink
        self.framing = framing
        self.transport = transport
        self.heartbeat = heartbeat  # written by `Heartbeats` after a silence (None: never)
        self._page_events = page_events
        self._on_delivered = on_delivered
        self.subscriptions: dict[str, Subscription] = {}
        self.draining = False
        self.gone = False
        # When the current write started blocking (trio clock), for the stalled-write watchdog.
        self.blocked_since: float | None = None
        # Where an outlet blocked in a write is listed, for the watchdog (set by the node).
        self.blocked_outlets: set[Outlet] = set()
        # By which `cut` severs the connection when a write is stuck (set by the node, or by
        # the gRPC transport for a call).
        self.client: tuple[object, ...] | None = None
        self.connections: Cutter | None = None
        self._greetings: list[bytes] = []  # frames to write before anything else
        self._direct = sink if isinstance(sink, DirectSink) else None
        # The writer's task while it is parked with nothing to do (woken by `_wake`); no
        # ParkingLot: one costs ~1 KB and only this one task ever waits here.
        self._parked: trio.lowlevel.Task | None = None
        self.last_write = trio.current_time()  # or the last heartbeat queued

    # -- subscriptions ---------------------------------------------------------------------

    def attach(self, sub: Subscription, *, greeting: Sequence[bytes] = ()) -> None:
        """Start delivering ``sub``; ``greeting`` (e.g. a reset frame) goes out first."""
        self.subscriptions[sub.id] = sub
        sub.wake = self._wake if self._direct is None else self._wake_direct
        self._route_directly()
        self._greetings.extend(greeting)
        self.hub.add(sub)
        self._wake()

    def detach(self, sub_id: str, reason: CloseReason = CloseReason.UNSUBSCRIBED) -> None:
        sub = self.subscriptions.pop(sub_id, None)
        if sub is not None:
            self.hub.discard(sub)
            sub.direct = None
            sub.close(reason)
            self._route_directly()

    def _route_directly(self) -> None:
        """A raw socket's only subscription takes runs straight from the router (`_push_run`)."""
        only = self._direct is not None and self.framing.joined and len(self.subscriptions) == 1
        for sub in self.subscriptions.values():
            sub.direct = self._push_run if only else None

    def close(self, reason: CloseReason = CloseReason.GONE) -> None:
        """Release every subscription (always safe; called from ``finally``)."""
        for sub_id in list(self.subscriptions):
            self.detach(sub_id, reason)

    def reset(self, framing: Framing, epoch: str) -> None:
        """The log was replaced: frame for the new epoch; every subscription says ``reset``."""
        self.framing = framing
        for sub in self.subscriptions.values():
            sub.reset(epoch)

    def cut(self) -> bool:
        """Sever this connection (a write is stuck); False if it cannot be found."""
        if self.connections is None:
            return False
        return self.connections.cut(self.client)

    def drain(self) -> None:
        self.draining = True
        self._wake()

    def hang_up(self) -> None:
        """The client has gone (the native path saw its socket close): the writer ends."""
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        parked, self._parked = self._parked, None
        if parked is not None:
            trio.lowlevel.reschedule(parked)

    def _push_run(self, sub: Subscription, run: Run) -> bool:
        """The router's case, for the outlet's only subscription (live, nothing queued): write
        ``run`` now if the writer is parked with nothing queued and the socket takes it whole
        (or the sink finishes a partial write); False, with nothing done, otherwise (the run
        then goes through the subscription's buffer and `_wake_direct`). The fewest Python
        calls per subscriber: at 1,000 subscribers they were a third of a pass."""
        sink = self._direct
        framing = self.framing
        if (
            self._parked is None
            or self._greetings
            or self.draining
            or sink is None
            or not framing.fits(run)
            or not sink.write_run(run, framing.fmt)
        ):
            return False
        if sink.pending:
            self._wake()  # the writer sends the rest
        self.last_write = self.hub.now  # a run is pushed by the router, inside `route`
        self._count(sub, len(run.events))
        return True

    def _wake_direct(self) -> None:
        """A subscription has work that `_push_run` did not write (the outlet has several
        subscriptions, or it is a gap or a reset, or the socket was full). If the writer is
        parked with nothing queued and every subscription is live, write what is pending now,
        from the caller's task (the router's); else wake the writer."""
        sink = self._direct
        if sink is None or self._parked is None or self._greetings or self.draining:
            return self._wake()
        subs = self.subscriptions.values()
        if any(sub.state is not State.LIVE for sub in subs):
            return self._wake()
        for sub in list(subs):
            if sub.has_pending and not self._write_now(sink, sub):
                return self._wake()  # the socket is full: the writer takes it from here
        return None

    def _write_now(self, sink: DirectSink, sub: Subscription) -> bool:
        """Take what ``sub`` has pending and write it whole without blocking; False when the
        socket would not take it (the frames are then queued for the writer, first)."""
        items = sub.take()
        first = items[0]
        framing = self.framing
        if len(items) == 1 and type(first) is Run and framing.joined and framing.fits(first):
            data = first.joined(framing.fmt)  # the common case: one run, one buffer
            delivered = len(first.events)
            written = sink.write_nowait(data)
            if not written:
                self._greetings.append(data)
            self.last_write = self.hub.now  # a run is pushed by the router, inside `route`
        else:
            frames = framing.render(sub, items)
            delivered = sum(len(i.events) for i in items if isinstance(i, Run))
            written = sink.write_nowait_many(frames)
            if not written:
                self._greetings.extend(frames)
            self.last_write = trio.current_time()
        if written and sink.pending:
            self._wake()  # the writer sends the rest
        self._count(sub, delivered)
        return written

    def beat(self) -> None:
        """`Heartbeats` found this connection silent: write the heartbeat now if the writer is
        parked and the socket takes it, else queue it for the writer. Not while a write is
        blocked (the stalled-write watchdog deals with that connection)."""
        heartbeat = self.heartbeat
        if heartbeat is None or self.blocked_since is not None:
            return
        self.last_write = trio.current_time()
        sink = self._direct
        idle = self._parked is not None and not self._greetings and not self.draining
        if sink is not None and idle and sink.write_nowait(heartbeat):
            if sink.pending:
                self._wake()
            return
        self._greetings.append(heartbeat)
        self._wake()

    # -- the writer --------------------------------------------------------------------------

    async def run(self) -> CloseReason:
        """Deliver until a subscription is closed for the whole connection or we drain.

        Cancellation can land only at the top of the loop or while parked or reading, never
        between a write and the position update that goes with it: a long-poll relies on it.
        """
        progressed = False
        while True:
            if progressed:
                await trio.lowlevel.checkpoint()  # fairness: a busy writer still yields
            if self.gone:
                return CloseReason.GONE
            if self.draining:
                return CloseReason.DRAINING
            if self._greetings:
                greetings, self._greetings = self._greetings, []
                await self._write(greetings)
                progressed = True
                continue
            progressed = False
            for sub in list(self.subscriptions.values()):
                if sub.state is State.CLOSED:
                    if sub.close_reason is CloseReason.SLOW_CONSUMER:
                        return CloseReason.SLOW_CONSUMER
                elif sub.state is State.CATCHUP:
                    await self._catch_up(sub)
                    progressed = True
                elif sub.has_pending:
                    items = sub.take()
                    delivered = sum(len(i.events) for i in items if isinstance(i, Run))
                    await self._write(self.framing.render(sub, items))
                    self._count(sub, delivered)
                    progressed = True
            if not progressed and self._direct is not None and self._direct.pending:
                await self._blocking(self._direct.flush())  # what the socket did not take
                progressed = True
            if not progressed:
                # No await since the checks above, so no wake-up can have been missed.
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_park)

    def _abort_park(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _catch_up(self, sub: Subscription) -> None:
        """Write one page of history; re-join live when it reaches the hub's routed edge."""
        result = await self.log.read(sub.filter, sub.position, self._page_events)
        if sub.state is not State.CATCHUP:  # closed while we read
            return
        items: list[Item] = []
        if result.gap is not None:
            items.append(result.gap)
        if result.topic_gaps:
            items.extend(sub.new_topic_gaps(result.topic_gaps))
        gaps = len(items)
        if items or result.events:
            await self._write(self.framing.render_replay(sub, items, result.events))
        sub.advance(result.scanned_to, gaps)
        self._count(sub, len(result.events))
        sub.try_go_live(self.hub.routed_seq)

    async def _write(self, frames: Sequence[bytes]) -> None:
        sink = self.sink
        self.last_write = trio.current_time()
        if self._direct is not None and len(frames) > 1 and self._direct.write_nowait_many(frames):
            return
        for frame in frames:
            if not sink.write_nowait(frame):
                await self._blocking(sink.write(frame))

    async def _blocking(self, write: Awaitable[None]) -> None:
        """A write that may block, watched by the stalled-write watchdog while it does."""
        self.blocked_since = trio.current_time()
        self.blocked_outlets.add(self)
        try:
            await write
        finally:
            self.blocked_since = None
            self.blocked_outlets.discard(self)

    def _count(self, sub: Subscription, delivered: int) -> None:
        if delivered:
            sub.delivered_events += delivered
            self._on_delivered(self.transport, delivered)
