"""One subscription: a filter, a position, a bounded buffer, and what to do when it is full. Pure.

The hub pushes `Run`s in synchronously (`push` never blocks and never grows past the bounds);
the subscription's writer drains everything pending with `take` and writes it in one go.

States::

    LIVE ──(buffer full, policy catchup)──> CATCHUP ──(read the log up to the live edge)──> LIVE
      │                                        │
      └──────────(close / policy disconnect)───┴──> CLOSED

In CATCHUP the buffer is empty and the hub's pushes are ignored: the writer reads the log after
`position` page by page (`advance`), and re-joins live (`try_go_live`) at the moment its read
reached everything the hub has routed, so nothing is missed; anything routed twice is dropped
by seq.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.encoding import Run
from broker.model import Filter, Gap, Reset

Item = Run | Gap | Reset


class OverflowPolicy(enum.Enum):
    CATCHUP = "catchup"  # release the buffer, replay from the log, lose nothing the log holds
    DROP = "drop"  # skip what did not fit and say so with a gap
    DISCONNECT = "disconnect"  # close the connection (WS close 4001); the client resumes later


class State(enum.Enum):
    LIVE = "live"
    CATCHUP = "catchup"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    UNSUBSCRIBED = "unsubscribed"
    SLOW_CONSUMER = "slow-consumer"
    DRAINING = "draining"
    GONE = "gone"  # the client went away


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    id: str
    transport: str
    filter: str
    state: State
    position: int
    pending_events: int
    pending_bytes: int
    buffer_events_limit: int
    buffer_bytes_limit: int
    delivered_events: int
    catchups: int
    gaps: int


def _nothing() -> None:
    pass


class Subscription:
    def __init__(
        self,
        id: str,
        filter: Filter,
        *,
        position: int,
        live: bool,
        buffer_events: int,
        buffer_bytes: int,
        policy: OverflowPolicy,
        transport: str = "",
    ) -> None:
        self.id = id
        self.filter = filter
        self.transport = transport
        # Every matching event with seq <= position has been handed to the writer (or is
        # covered by a gap it was handed): this is the client's resume point.
        self.position = position
        self.state = State.LIVE if live else State.CATCHUP
        self.close_reason: CloseReason | None = None
        self.buffer_events = buffer_events
        self.buffer_bytes = buffer_bytes
        self.policy = policy
        self.wake: Callable[[], None] = _nothing  # set by the writer: called when there is work
        # Set by a writer that can write a run from the router's task, when nothing is queued:
        # True when it wrote the run (and counted it), False when it did nothing.
        self.direct: Callable[[Subscription, Run], bool] | None = None
        self._items: list[Item] = []  # a deque costs 624 bytes even when empty
        self._tail = position  # the highest seq queued (dedupes what is routed twice)
        self.pending_events = 0
        self.pending_bytes = 0
        self.delivered_events = 0
        self.catchups = 0
        self.gaps = 0
        self._topic_gaps_to: dict[str | None, int] = {}  # per-topic gaps handed out, while ahead

    # -- the hub's side: synchronous, bounded --------------------------------------------------

    def push(self, run: Run) -> None:
        if self.state is not State.LIVE or run.last_seq <= self._tail:
            return
        if run.first_seq <= self._tail:
            run = run.after(self._tail)
        if self.direct is not None and not self._items and self.direct(self, run):
            self.position = self._tail = run.last_seq  # as `take` would, with nothing left
            return
        count = len(run.events)
        # An empty buffer always takes one run: runs are shared by every subscriber (this costs
        # no memory of its own), and a batch bigger than the buffer must not overflow a reader
        # that is keeping up. The bound is therefore the buffer or one run, whichever is larger.
        if self._items and (
            self.pending_events + count > self.buffer_events
            or self.pending_bytes + run.nbytes > self.buffer_bytes
        ):
            self._overflow(run)
        else:
            self._items.append(run)
            self.pending_events += count
            self.pending_bytes += run.nbytes
            self._tail = run.last_seq
        self.wake()

    def fall_behind(self) -> None:
        """Go back through the log from `position`: the live stream lost events (the log's
        read then reports exactly what is gone, as a gap)."""
        if self.state is State.LIVE:
            self._to_catchup()
            self.wake()

    def _to_catchup(self) -> None:
        self._items.clear()
        self.pending_events = self.pending_bytes = 0
        self.state = State.CATCHUP
        self._tail = self.position
        self.catchups += 1

    def _overflow(self, run: Run) -> None:
        if self.policy is OverflowPolicy.CATCHUP:
            self._to_catchup()
            return
        self._items.clear()
        self.pending_events = self.pending_bytes = 0
        if self.policy is OverflowPolicy.DROP:
            self._items.append(Gap(self.position + 1, run.last_seq))
            self._tail = run.last_seq
            self.gaps += 1
        else:
            assert self.policy is OverflowPolicy.DISCONNECT, self.policy
            self.close(CloseReason.SLOW_CONSUMER)

    # -- the writer's side ---------------------------------------------------------------------

    def take(self) -> list[Item]:
        """Everything pending, oldest first; the position moves past it."""
        if not self._items:
            return []
        items, self._items = self._items, []
        self.pending_events = self.pending_bytes = 0
        last = items[-1]
        if isinstance(last, Run):
            self.position = max(self.position, last.last_seq)
        elif isinstance(last, Gap):
            self.position = max(self.position, last.to_seq)
        return items

    @property
    def has_pending(self) -> bool:
        return bool(self._items)

    def new_topic_gaps(self, gaps: Sequence[Gap]) -> list[Gap]:
        """The part of a catch-up page's per-topic gaps not handed out yet: each page reports
        what a topic lost after the page's start, so the next pages repeat it."""
        fresh = []
        for gap in gaps:
            told = self._topic_gaps_to.get(gap.topic, 0)
            if gap.to_seq > told:
                self._topic_gaps_to[gap.topic] = gap.to_seq
                fresh.append(Gap(max(gap.from_seq, told + 1), gap.to_seq, gap.topic))
        return fresh

    def advance(self, scanned_to: int, gaps: int = 0) -> None:
        """A catch-up page up to ``scanned_to`` was written, with ``gaps`` gaps in it."""
        self.gaps += gaps
        self.position = max(self.position, scanned_to)
        if self._topic_gaps_to:
            told = self._topic_gaps_to
            for topic in [t for t, to_seq in told.items() if to_seq <= self.position]:
                del told[topic]

    def try_go_live(self, live_edge: int) -> bool:
        """Re-join the live stream if the catch-up reached ``live_edge`` (the hub's routed seq)."""
        if self.state is State.CATCHUP and self.position >= live_edge:
            self.state = State.LIVE
            self._tail = self.position
            return True
        return self.state is State.LIVE

    def reset(self, epoch: str) -> None:
        """The log was replaced under us: drop what is pending, say ``reset``, and start over
        at the new log's beginning (its events are routed from seq 1)."""
        if self.state is State.CLOSED:
            return
        self._items.clear()
        self.pending_events = self.pending_bytes = 0
        self._items.append(Reset(epoch))
        self.position = self._tail = 0
        self._topic_gaps_to.clear()
        self.state = State.LIVE
        self.wake()

    def close(self, reason: CloseReason) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        self._items.clear()
        self.pending_events = self.pending_bytes = 0
        self.wake()

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            id=self.id,
            transport=self.transport,
            filter=str(self.filter),
            state=self.state,
            position=self.position,
            pending_events=self.pending_events,
            pending_bytes=self.pending_bytes,
            buffer_events_limit=self.buffer_events,
            buffer_bytes_limit=self.buffer_bytes,
            delivered_events=self.delivered_events,
            catchups=self.catchups,
            gaps=self.gaps,
        )

    def __repr__(self) -> str:
        return f"Subscription({self.id!r}, {self.filter}, {self.state.value}, at {self.position})"
