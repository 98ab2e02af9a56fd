"""Getting events onto a sink: Router -> Hub -> Subscription -> Outlet (broker/delivery.py).

A real `MemoryLog`, `Hub` and `Router` run in the test's nursery; the sink is a fake that
records every write (and can be made to block). Each event is framed as ``b"<seq>\\n"`` so the
bytes on the "wire" read back as the seqs a client received.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from broker.backplane.memory import MemoryLog
from broker.delivery import Framing, Heartbeats, Outlet, Router
from broker.encoding import Format, Run
from broker.hub import Hub
from broker.model import AppendRequest, Event, Filter, Gap
from broker.node import Framings
from broker.subscription import CloseReason, OverflowPolicy, State, Subscription

DEADLINE_SECONDS = 10
HEARTBEAT = b"hb\n"

FRAMING = Framing(
    Format("t", lambda e: b"%d\n" % e.seq),
    gap=lambda s, g: b"gap %d %d\n" % (g.from_seq, g.to_seq),
    reset=lambda s, r: b"reset\n",
    joined=True,
)


class FakeSink:
    """Records writes. ``write_nowait`` always says "would block", so ``write`` is used; while
    ``gate`` is not set, ``write`` blocks (a client that stopped reading)."""

    def __init__(self, gate: trio.Event | None = None) -> None:
        self.writes: list[bytes] = []
        self.gate = gate
        self.blocked = False
        self._changed = trio.Event()

    def write_nowait(self, data: bytes) -> bool:
        return False

    async def write(self, data: bytes) -> None:
        if self.gate is not None and not self.gate.is_set():
            self.blocked = True
            await self.gate.wait()
            self.blocked = False
        else:
            await trio.lowlevel.checkpoint()
        self.writes.append(data)
        self._changed.set()
        self._changed = trio.Event()

    def frames(self) -> list[object]:
        """What the client read: seqs as ints, ``("gap", a, b)``, ``"reset"``, ``"hb"``."""
        out: list[object] = []
        for line in b"".join(self.writes).splitlines():
            if line.startswith(b"gap "):
                _, a, b = line.split()
                out.append(("gap", int(a), int(b)))
            elif line in (b"reset", b"hb"):
                out.append(line.decode())
            else:
                out.append(int(line))
        return out

    def seqs(self) -> list[int]:
        return [f for f in self.frames() if isinstance(f, int)]

    async def wait_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(DEADLINE_SECONDS):
            while not done():
                await self._changed.wait()

    async def wait_for_seq(self, seq: int) -> None:
        await self.wait_until(lambda: bool(self.seqs()) and self.seqs()[-1] >= seq)


@dataclass
class Broker:
    log: MemoryLog
    hub: Hub
    heartbeats: Heartbeats  # every 15 s of silence, as the node's default

    async def publish(self, topics: Sequence[str]) -> list[int]:
        results = await self.log.append([AppendRequest(t, b"") for t in topics])
        return [r.seq for r in results]

    def subscribe(
        self,
        subjects: Sequence[str] = ("a",),
        *,
        position: int | None = None,
        buffer_events: int = 10_000,
        policy: OverflowPolicy = OverflowPolicy.CATCHUP,
    ) -> Subscription:
        """As the node opens one: at ``position`` (default: latest), live if nothing to replay."""
        seq = self.log.last_seq if position is None else position
        return Subscription(
            "s1",
            Filter.parse(subjects),
            position=seq,
            live=seq >= self.hub.routed_seq,
            buffer_events=buffer_events,
            buffer_bytes=1 << 30,
            policy=policy,
            transport="test",
        )

    def outlet(
        self,
        sink: FakeSink,
        *,
        heartbeat: bytes | None = None,
        page_events: int = 1000,
        framing: Framing = FRAMING,
    ) -> Outlet:
        outlet = Outlet(
            hub=self.hub,
            log=self.log,
            sink=sink,
            framing=framing,
            transport="test",
            heartbeat=heartbeat,
            page_events=page_events,
        )
        if heartbeat is not None:
            self.heartbeats.outlets.add(outlet)
        return outlet


OpenBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def open_broker(nursery: trio.Nursery) -> OpenBroker:
    """Wire a log, a hub and a router as a node does, the router running in the nursery."""

    async def open_broker(*, retention_messages: int = 1_000_000) -> Broker:
        log = MemoryLog(retention_messages=retention_messages)
        hub = Hub(routed_seq=log.last_seq)
        router = Router(hub)
        log.on_events(router.enqueue)
        await nursery.start(router.run)
        heartbeats = Heartbeats(15.0)
        await nursery.start(heartbeats.run)
        return Broker(log, hub, heartbeats)

    return open_broker


class Running:
    """An outlet's writer running in the nursery; ``reason`` is what ``run()`` returned."""

    def __init__(self, nursery: trio.Nursery, outlet: Outlet) -> None:
        self.reason: CloseReason | None = None
        self.done = trio.Event()
        nursery.start_soon(self._run, outlet)

    async def _run(self, outlet: Outlet) -> None:
        self.reason = await outlet.run()
        self.done.set()

    async def wait(self) -> CloseReason | None:
        with trio.fail_after(DEADLINE_SECONDS):
            await self.done.wait()
        return self.reason


async def prefill(broker: Broker, count: int, *, batch: int = 500, topic: str = "a") -> None:
    for start in range(0, count, batch):
        await broker.publish([topic] * min(batch, count - start))
    await trio.testing.wait_all_tasks_blocked()
    assert broker.hub.routed_seq == broker.log.last_seq


# -- live ------------------------------------------------------------------------------------


async def test_a_batch_published_together_is_one_write(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink)
    sub = broker.subscribe(["a", "b"])
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()

    await broker.publish(["a"] * 60 + ["b"] * 10 + ["a"] * 30)  # three runs, one routing turn
    await sink.wait_for_seq(100)
    assert sink.writes == [b"".join(b"%d\n" % seq for seq in range(1, 101))]

    await broker.publish(["a"])  # low load: one event, one write, at once
    await sink.wait_for_seq(101)
    assert sink.writes[1:] == [b"101\n"]
    assert sub.position == 101
    assert sub.delivered_events == 101


async def test_only_matching_events_are_written(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink)
    outlet.attach(broker.subscribe(["a.*"]))
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a.x", "b", "a", "a.y.z", "a.y"])
    await sink.wait_for_seq(5)
    assert sink.frames() == [1, 5]


async def test_greeting_goes_out_first(open_broker: OpenBroker, nursery: trio.Nursery) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink)
    outlet.attach(broker.subscribe(), greeting=[b"reset\n"])
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"])
    await sink.wait_for_seq(1)
    assert sink.frames() == ["reset", 1]


async def test_a_detached_subscription_gets_nothing_more(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink)
    sub = broker.subscribe(["a"])
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"])
    await sink.wait_for_seq(1)
    outlet.detach(sub.id)
    assert (sub.state, sub.close_reason) == (State.CLOSED, CloseReason.UNSUBSCRIBED)
    assert len(broker.hub) == 0
    await broker.publish(["a", "a"])
    await trio.testing.wait_all_tasks_blocked()
    assert sink.frames() == [1]


class NonBlockingSink(FakeSink):
    """A sink whose fast path always succeeds (a socket with room in its send buffer)."""

    def write_nowait(self, data: bytes) -> bool:
        self.writes.append(data)
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def write(self, data: bytes) -> None:
        raise AssertionError("the awaitable path is for when write_nowait would block")


async def test_message_framing_writes_one_frame_per_event_through_the_fast_path(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = NonBlockingSink()
    framing = Framing(
        FRAMING.fmt, gap=lambda s, g: b"gap\n", reset=lambda s, r: b"reset\n", joined=False
    )
    outlet = broker.outlet(sink, framing=framing)
    outlet.attach(broker.subscribe(["a", "b"]))
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a", "a", "b"])
    await sink.wait_for_seq(3)
    assert sink.writes == [b"1\n", b"2\n", b"3\n"]  # a message transport: one frame each


class RawSocketSink(FakeSink):
    """A `DirectSink`, as a raw socket's: written from the router's task (``write_run``) when
    the socket has room. ``full``: it has none (nothing written; the writer's awaited ``write``
    waits for ``gate``). ``room``: the next write takes only that many bytes, the rest is
    ``pending`` until the writer calls ``flush``."""

    def __init__(self, gate: trio.Event | None = None) -> None:
        super().__init__(gate)
        self.full = False
        self.room: int | None = None
        self.unsent = b""
        self.from_router = 0  # runs written by `write_run`

    def _record(self, data: bytes) -> None:
        self.writes.append(data)
        self._changed.set()
        self._changed = trio.Event()

    def write_nowait(self, data: bytes) -> bool:
        if self.full or self.unsent:
            return False
        if self.room is not None:
            data, self.unsent, self.room = data[: self.room], data[self.room :], None
        self._record(data)
        return True

    def write_nowait_many(self, frames: Sequence[bytes]) -> bool:
        """Every frame, or nothing (recorded apart: they are messages to a gRPC client)."""
        if self.full or self.unsent or self.room is not None:
            return False
        for frame in frames:
            self._record(frame)
        return True

    def write_run(self, run: Run, fmt: Format) -> bool:
        written = self.write_nowait(run.joined(fmt))
        self.from_router += written
        return written

    @property
    def pending(self) -> bool:
        return bool(self.unsent)

    async def flush(self) -> None:
        await self.write(b"")  # waits for ``gate`` as the awaited write does
        self.writes.pop()
        unsent, self.unsent = self.unsent, b""
        self._record(unsent)


async def serve(broker: Broker, nursery: trio.Nursery, sink: FakeSink,
                framing: Framing = FRAMING) -> Subscription:
    """One subscription to "a" on an outlet writing to ``sink``, its writer parked."""
    outlet = broker.outlet(sink, framing=framing)
    sub = broker.subscribe(["a"])
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    return sub


async def test_a_raw_sockets_only_subscription_is_written_by_the_router(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = RawSocketSink()
    delivered: list[int] = []
    outlet = Outlet(
        hub=broker.hub, log=broker.log, sink=sink, framing=FRAMING, transport="test",
        heartbeat=None, page_events=100, on_delivered=lambda transport, n: delivered.append(n),
    )
    sub = broker.subscribe(["a"])
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()

    for batch in (["a"] * 3, ["b", "a"], ["a"]):
        await broker.publish(batch)
        await trio.testing.wait_all_tasks_blocked()
    assert sink.writes == [b"1\n2\n3\n", b"5\n", b"6\n"]
    assert sink.from_router == 3  # each one write, from the router's task
    assert (sub.position, sub.delivered_events, sub.has_pending) == (6, 5, False)
    assert delivered == [3, 1, 1]


async def test_a_full_socket_leaves_the_run_to_the_writer_in_order(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    gate = trio.Event()
    sink = RawSocketSink(gate)
    sub = await serve(broker, nursery, sink)

    sink.full = True
    for _ in range(3):
        await broker.publish(["a", "a"])
        await trio.testing.wait_all_tasks_blocked()
    assert sink.blocked and sink.writes == []  # the writer waits in the awaited write
    assert sink.from_router == 0

    sink.full = False
    gate.set()
    await sink.wait_for_seq(6)
    assert sink.seqs() == [1, 2, 3, 4, 5, 6]
    assert (sub.position, sub.delivered_events) == (6, 6)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"])  # the writer parked again: the router writes
    await sink.wait_for_seq(7)
    assert sink.from_router == 1


async def test_a_partial_write_is_finished_before_anything_else(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    gate = trio.Event()
    sink = RawSocketSink(gate)
    sub = await serve(broker, nursery, sink)

    sink.room = 3
    await broker.publish(["a"] * 3)
    await trio.testing.wait_all_tasks_blocked()
    assert sink.writes == [b"1\n2"] and sink.blocked  # the writer flushes "\n3\n", slowly
    assert sub.position == 3  # the sink has the rest: the run is the writer's no more
    await broker.publish(["a"])  # routed while that is pending: it waits its turn
    await trio.testing.wait_all_tasks_blocked()
    assert sink.writes == [b"1\n2"] and sub.has_pending

    gate.set()
    await sink.wait_for_seq(4)
    assert sink.writes == [b"1\n2", b"\n3\n", b"4\n"]
    assert sink.from_router == 1


async def test_only_an_outlets_single_subscription_is_written_by_the_router(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    sink = RawSocketSink()
    outlet = broker.outlet(sink)
    first, second = broker.subscribe(["a"]), broker.subscribe(["b"])
    second.id = "s2"
    outlet.attach(first)
    assert first.direct is not None
    outlet.attach(second)  # two subscriptions share the socket: each run goes through a buffer
    assert first.direct is None and second.direct is None
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a", "b"])
    await sink.wait_for_seq(2)
    assert sink.from_router == 0

    outlet.detach("s2")
    assert first.direct is not None and second.direct is None
    await broker.publish(["a"])
    await sink.wait_for_seq(3)
    assert sink.seqs() == [1, 2, 3] and sink.from_router == 1


@pytest.mark.parametrize("subscriptions", [1, 2])
async def test_a_run_over_the_framings_limit_is_cut_into_writes_that_fit(
    open_broker: OpenBroker, nursery: trio.Nursery, subscriptions: int
) -> None:
    """gRPC's limit: a `Delivery` must fit the client's receive limit, however many events
    the router routed at once (one subscription: written by the router; two: by `_write_now`)."""
    broker = await open_broker()
    sink = RawSocketSink()
    framing = Framing(FRAMING.fmt, gap=FRAMING._gap, reset=FRAMING._reset, joined=True,
                      max_joined_bytes=4)
    outlet = broker.outlet(sink, framing=framing)
    outlet.attach(broker.subscribe(["a"]))
    if subscriptions == 2:
        second = broker.subscribe(["b"])
        second.id = "s2"
        outlet.attach(second)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()

    await broker.publish(["a"] * 5)
    await sink.wait_for_seq(5)
    assert sink.writes == [b"1\n2\n", b"3\n4\n", b"5\n"]  # three messages, one write
    await broker.publish(["a"] * 2)  # this run fits: one message
    await sink.wait_for_seq(7)
    assert sink.writes[-1] == b"6\n7\n"


async def test_close_releases_every_subscription(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    outlet = broker.outlet(FakeSink())
    first, second = broker.subscribe(["a"]), broker.subscribe(["b"])
    second.id = "s2"
    outlet.attach(first)
    outlet.attach(second)
    assert len(broker.hub) == 2
    outlet.detach("no-such-id")  # unknown: nothing happens
    outlet.close()
    outlet.close()
    assert len(broker.hub) == 0
    assert outlet.subscriptions == {}
    assert [s.close_reason for s in (first, second)] == [CloseReason.GONE] * 2


# -- heartbeats ------------------------------------------------------------------------------


async def test_heartbeat_after_a_silence_and_not_before(
    open_broker: OpenBroker, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink, heartbeat=HEARTBEAT)
    outlet.attach(broker.subscribe())
    start = trio.current_time()
    Running(nursery, outlet)

    # Heartbeats look every 15 / 4 s for outlets silent for 15 s: one comes after 15 to 18.75 s.
    await trio.sleep_until(start + 14.9)
    assert sink.writes == []
    await trio.sleep_until(start + 15.1)
    assert sink.frames() == ["hb"]

    await trio.sleep_until(start + 20)
    await broker.publish(["a"])
    await sink.wait_for_seq(1)
    # The silence starts again at the event: none by 34.9 (nor at 30, 15 s after the first
    # heartbeat), one by 20 + 18.75, then the next 15 s after that one.
    await trio.sleep_until(start + 34.9)
    assert sink.frames() == ["hb", 1]
    await trio.sleep_until(start + 38.8)
    assert sink.frames() == ["hb", 1, "hb"]
    await trio.sleep_until(start + 52.4)
    assert sink.frames() == ["hb", 1, "hb"]
    await trio.sleep_until(start + 52.6)
    assert sink.frames() == ["hb", 1, "hb", "hb"]


async def test_no_heartbeat_configured_means_silence(
    open_broker: OpenBroker, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink, heartbeat=None)
    outlet.attach(broker.subscribe())
    Running(nursery, outlet)
    await trio.sleep(3600)
    assert sink.writes == []


# -- catch-up --------------------------------------------------------------------------------


async def test_catch_up_from_zero_then_live_exactly_once(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    await prefill(broker, 5000)

    sink = FakeSink()
    outlet = broker.outlet(sink, page_events=700)
    sub = broker.subscribe(position=0)
    assert sub.state is State.CATCHUP
    outlet.attach(sub)
    Running(nursery, outlet)
    # Publish while the catch-up is under way: the join with the live stream must neither
    # lose nor repeat these.
    states = []
    for i in range(40):
        last = (await broker.publish(["b", "a"] if i % 2 else ["a"]))[-1]
        await trio.lowlevel.checkpoint()
        states.append(sub.state)
    assert states[0] is State.CATCHUP and states[-1] is State.LIVE  # it joined meanwhile
    await sink.wait_for_seq(last)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.state is State.LIVE
    last = (await broker.publish(["a", "b", "a"]))[-1]
    await sink.wait_for_seq(last)
    await trio.testing.wait_all_tasks_blocked()

    want = [e.seq for e in (await broker.log.read(Filter.parse(["a"]), 0, 100_000)).events]
    assert want[:5000] == list(range(1, 5001))
    assert sink.frames() == want  # in order, exactly once, no gap
    assert sub.position == want[-1]
    assert sub.delivered_events == len(want)


async def test_catch_up_of_a_quiet_topic_in_a_busy_log_writes_nothing_and_goes_live(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    await prefill(broker, 3000, topic="busy")
    sink = FakeSink()
    outlet = broker.outlet(sink, page_events=10)
    sub = broker.subscribe(["quiet"], position=0)
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    assert (sub.state, sub.position, sink.writes) == (State.LIVE, 3000, [])
    (seq,) = await broker.publish(["quiet"])
    await sink.wait_for_seq(seq)
    assert sink.frames() == [3001]


async def test_a_catch_up_that_overtakes_the_router_does_not_repeat_what_is_routed_late(
    nursery: trio.Nursery,
) -> None:
    # The router lags behind the log; here the test is the router, so the lag is certain.
    log = MemoryLog()
    hub = Hub()
    unrouted: list[Event] = []
    log.on_events(unrouted.extend)

    def route() -> None:
        hub.route(unrouted)
        unrouted.clear()

    broker = Broker(log, hub, Heartbeats(15.0))  # not running: no heartbeat is asked for
    await broker.publish(["a"] * 2000)
    route()
    await broker.publish(["a"] * 100)  # 2001..2100: in the log, not yet routed
    sink = FakeSink()
    outlet = broker.outlet(sink, page_events=1500)  # the 2nd page reads to 2100, past the hub
    sub = broker.subscribe(position=0)
    outlet.attach(sub)
    Running(nursery, outlet)
    await sink.wait_for_seq(2100)
    await trio.testing.wait_all_tasks_blocked()
    assert (sub.state, hub.routed_seq) == (State.LIVE, 2000)  # live ahead of the hub
    route()
    await broker.publish(["a"] * 5)
    route()
    await sink.wait_for_seq(2105)
    await trio.testing.wait_all_tasks_blocked()
    assert sink.frames() == list(range(1, 2106))


async def test_catch_up_past_retention_starts_with_a_gap(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker(retention_messages=1000)
    await prefill(broker, 1500)  # the log keeps the last 1000
    sink = FakeSink()
    outlet = broker.outlet(sink, page_events=300)
    outlet.attach(broker.subscribe(position=0))
    Running(nursery, outlet)
    await sink.wait_for_seq(1500)
    assert sink.frames() == [("gap", 1, 500), *range(501, 1501)]


async def test_a_blocked_writer_costs_its_buffer_then_catches_up_losing_nothing(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()

    gate = trio.Event()
    sink = FakeSink(gate)
    outlet = broker.outlet(sink, page_events=1000)
    sub = broker.subscribe(buffer_events=100)
    outlet.attach(sub)
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()

    await broker.publish(["a"])
    await trio.testing.wait_all_tasks_blocked()
    assert sink.blocked  # the writer is stuck writing seq 1

    worst = 0
    for _ in range(1000):
        await broker.publish(["a"] * 10)
        await trio.testing.wait_all_tasks_blocked()
        worst = max(worst, sub.pending_events)
        assert sub.pending_events <= 100
        assert sub.statistics().pending_events <= 100
    assert worst == 100  # it did buffer up to its bound...
    assert sub.state is State.CATCHUP  # ...then let go and fell back to the log
    assert sub.catchups == 1
    assert broker.log.last_seq == 10_001

    gate.set()
    await sink.wait_for_seq(10_001)
    await trio.testing.wait_all_tasks_blocked()
    assert sink.frames() == list(range(1, 10_002))
    assert sub.state is State.LIVE
    await broker.publish(["a"])
    await sink.wait_for_seq(10_002)
    assert sink.frames()[-2:] == [10_001, 10_002]


async def test_policy_drop_writes_a_gap(open_broker: OpenBroker, nursery: trio.Nursery) -> None:
    broker = await open_broker()
    gate = trio.Event()
    sink = FakeSink(gate)
    outlet = broker.outlet(sink)
    outlet.attach(broker.subscribe(buffer_events=5, policy=OverflowPolicy.DROP))
    Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"])  # 1: the write that blocks
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(3):
        await broker.publish(["a"] * 3)  # 2..4 fit, 5..7 do not: 2..7 dropped; 8..10 fit
        await trio.testing.wait_all_tasks_blocked()
    gate.set()
    await broker.publish(["a"])  # 11
    await sink.wait_for_seq(11)
    assert sink.frames() == [1, ("gap", 2, 7), 8, 9, 10, 11]


async def test_policy_disconnect_ends_the_writer(
    open_broker: OpenBroker, nursery: trio.Nursery
) -> None:
    broker = await open_broker()
    gate = trio.Event()
    sink = FakeSink(gate)
    outlet = broker.outlet(sink)
    sub = broker.subscribe(buffer_events=5, policy=OverflowPolicy.DISCONNECT)
    outlet.attach(sub)
    running = Running(nursery, outlet)
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"])
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"] * 3)  # buffered while the first write blocks
    await trio.testing.wait_all_tasks_blocked()
    await broker.publish(["a"] * 3)  # 6 > 5: overflow
    gate.set()
    assert await running.wait() is CloseReason.SLOW_CONSUMER
    assert sink.frames() == [1]
    assert sub.close_reason is CloseReason.SLOW_CONSUMER


# -- drain -----------------------------------------------------------------------------------


async def test_drain_makes_run_return_draining(
    open_broker: OpenBroker, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    broker = await open_broker()
    sink = FakeSink()
    outlet = broker.outlet(sink, heartbeat=HEARTBEAT)
    outlet.attach(broker.subscribe())
    running = Running(nursery, outlet)
    await trio.sleep(5)
    start = trio.current_time()
    outlet.drain()
    assert await running.wait() is CloseReason.DRAINING
    assert trio.current_time() == start  # at once, not at the next heartbeat
    assert sink.writes == []


def test_the_memory_log_keeps_the_json_line_mark() -> None:
    log = MemoryLog()
    log.append_nowait([AppendRequest("t", b"{}", "application/json", json_line=True),
                       AppendRequest("t", b"{}", "application/json")])
    marks = [event.json_line for event in log.read_nowait(Filter.parse(["t"]), 0, 10).events]
    assert marks == [True, False]


@pytest.mark.parametrize("transport", ["sse", "ndjson", "grpc", "ws"])
def test_a_replayed_page_renders_as_render_would(transport: str) -> None:
    framings = Framings("e1")
    framing = {"sse": framings.sse, "ndjson": framings.ndjson, "grpc": framings.grpc,
               "ws": next(iter(framings.ws_wire.values()))}[transport]
    sub = Subscription("s1", Filter.parse(["a"]), position=0, live=False, buffer_events=10,
                       buffer_bytes=1 << 20, policy=OverflowPolicy.CATCHUP, transport="test")
    events = [Event(seq, "a", b'{"n":%d}' % seq, "application/json", 0.0, json_line=seq % 2 == 0)
              for seq in range(3, 9)]
    gap = Gap(1, 2)
    for head in ([], [gap]):
        expected = framing.render(sub, [*head, *events])
        assert framing.render_replay(sub, head, events) == expected
    assert framing.render_replay(sub, [gap], []) == framing.render(sub, [gap])
