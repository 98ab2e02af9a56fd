"""One subscription's bounded buffer, position and overflow policies (broker/subscription.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.encoding import Run, split_runs
from broker.model import Event, Filter, Gap, Reset, event_size
from broker.subscription import (
    CloseReason,
    OverflowPolicy,
    State,
    Subscription,
    SubscriptionStatistics,
)


def event(seq: int, topic: str = "a", payload: bytes = b"x") -> Event:
    return Event(seq=seq, topic=topic, payload=payload, content_type="t", time=0.0)


def run(first: int, last: int, topic: str = "a") -> Run:
    return Run(topic, [event(s, topic) for s in range(first, last + 1)])


def seqs(items: Sequence[object]) -> list[int]:
    """The event seqs of taken items, all of which must be runs."""
    out: list[int] = []
    for item in items:
        assert isinstance(item, Run), item
        out.extend(e.seq for e in item.events)
    return out


def make_sub(
    *,
    position: int = 0,
    live: bool = True,
    buffer_events: int = 100,
    buffer_bytes: int = 1 << 20,
    policy: OverflowPolicy = OverflowPolicy.CATCHUP,
    subjects: Sequence[str] = ("a",),
) -> Subscription:
    return Subscription(
        "s1",
        Filter.parse(subjects),
        position=position,
        live=live,
        buffer_events=buffer_events,
        buffer_bytes=buffer_bytes,
        policy=policy,
        transport="sse",
    )


class Wakes:
    def __init__(self, sub: Subscription) -> None:
        self.count = 0
        sub.wake = self

    def __call__(self) -> None:
        self.count += 1


# -- push / take -----------------------------------------------------------------------------


def test_take_drains_everything_pending_in_one_go() -> None:
    sub = make_sub()
    wakes = Wakes(sub)
    runs = [run(1, 3), run(5, 5), run(8, 9)]
    for r in runs:
        sub.push(r)
    assert wakes.count == 3
    assert sub.has_pending
    assert (sub.pending_events, sub.pending_bytes) == (6, sum(r.nbytes for r in runs))
    taken = sub.take()
    assert taken == runs  # the same shared Run objects, oldest first
    assert not sub.has_pending
    assert (sub.pending_events, sub.pending_bytes) == (0, 0)
    assert sub.take() == []


def test_position_moves_when_taken_not_when_pushed() -> None:
    sub = make_sub(position=4)
    sub.push(run(5, 7))
    assert sub.position == 4  # pushed is not delivered: a resume must start at 4
    sub.take()
    assert sub.position == 7
    assert sub.take() == []
    assert sub.position == 7


def test_runs_already_behind_the_tail_are_dropped_and_do_not_wake() -> None:
    sub = make_sub(position=10)
    wakes = Wakes(sub)
    sub.push(run(3, 10))
    assert not sub.has_pending
    assert wakes.count == 0
    sub.push(run(8, 12))  # overlapping: only 11 and 12 are new
    sub.push(run(11, 12))  # routed twice
    assert wakes.count == 1
    assert seqs(sub.take()) == [11, 12]
    assert sub.position == 12


def test_a_subscription_that_does_not_start_live_starts_in_catchup() -> None:
    sub = make_sub(position=3, live=False)
    assert sub.state is State.CATCHUP
    sub.push(run(4, 5))
    assert not sub.has_pending


# -- bounded buffer --------------------------------------------------------------------------


def test_buffer_bounded_by_events() -> None:
    sub = make_sub(buffer_events=5)
    sub.push(run(1, 2))
    sub.push(run(3, 5))  # exactly full is fine
    assert (sub.state, sub.pending_events) == (State.LIVE, 5)
    sub.push(run(6, 6))
    assert sub.state is State.CATCHUP
    assert sub.pending_events == 0


def test_buffer_bounded_by_bytes() -> None:
    size = event_size(event(1))
    sub = make_sub(buffer_events=1000, buffer_bytes=3 * size)
    sub.push(run(1, 3))
    assert (sub.state, sub.pending_bytes) == (State.LIVE, 3 * size)
    sub.push(run(4, 4))
    assert sub.state is State.CATCHUP
    assert sub.pending_bytes == 0


def test_an_empty_buffer_takes_one_run_bigger_than_itself_and_no_more() -> None:
    # Runs are shared by every subscriber, so holding one costs nothing of its own; refusing it
    # would overflow a reader that keeps up whenever a batch is bigger than its buffer.
    sub = make_sub(buffer_events=3)
    sub.push(run(1, 4))
    assert (sub.state, sub.pending_events) == (State.LIVE, 4)
    sub.push(run(5, 5))
    assert sub.state is State.CATCHUP


# -- policy catchup --------------------------------------------------------------------------


def test_catchup_releases_the_buffer_and_ignores_pushes() -> None:
    sub = make_sub(buffer_events=4)
    wakes = Wakes(sub)
    sub.push(run(1, 2))
    assert seqs(sub.take()) == [1, 2]
    sub.push(run(3, 5))
    sub.push(run(6, 7))  # 5 > 4: overflow
    assert sub.state is State.CATCHUP
    assert sub.catchups == 1
    assert wakes.count == 3  # the writer must hear about the switch
    assert not sub.has_pending
    assert (sub.pending_events, sub.pending_bytes) == (0, 0)
    assert sub.take() == []
    assert sub.position == 2  # 3..7 were never delivered: the catch-up reads them
    sub.push(run(8, 9))
    assert (sub.state, sub.has_pending, wakes.count) == (State.CATCHUP, False, 3)


def test_go_live_only_once_the_catchup_reached_the_live_edge() -> None:
    sub = make_sub(position=0, live=False)
    sub.advance(50)
    assert sub.position == 50
    assert sub.try_go_live(60) is False
    assert sub.state is State.CATCHUP
    sub.advance(40)  # a position never moves backwards
    assert sub.position == 50
    sub.advance(60)
    assert sub.try_go_live(60) is True
    assert sub.state is State.LIVE
    assert sub.try_go_live(1000) is True  # already live: stays live


def test_go_live_ahead_of_the_hub_drops_what_the_hub_routes_late() -> None:
    # The catch-up read reached seq 10 while the hub had routed only up to 7.
    sub = make_sub(position=0, live=False)
    sub.advance(10)
    assert sub.try_go_live(7) is True
    sub.push(run(8, 10))  # already delivered by the catch-up read
    assert not sub.has_pending
    sub.push(run(9, 12))
    assert seqs(sub.take()) == [11, 12]
    assert sub.position == 12


def test_after_a_catchup_live_delivery_resumes_without_duplicates() -> None:
    sub = make_sub(buffer_events=2)
    sub.push(run(1, 2))
    sub.push(run(3, 3))  # overflow
    assert sub.state is State.CATCHUP
    sub.advance(3)
    assert sub.try_go_live(3)
    sub.push(run(2, 4))
    assert seqs(sub.take()) == [4]
    assert sub.catchups == 1


def test_catchup_gap_is_counted_and_covers_the_position() -> None:
    sub = make_sub(position=0, live=False)
    sub.advance(30, 1)
    assert (sub.position, sub.gaps) == (30, 1)


def test_a_topic_gap_repeated_by_later_pages_is_handed_out_once() -> None:
    sub = make_sub(position=0, live=False)
    first = sub.new_topic_gaps([Gap(1, 50, "a"), Gap(1, 20, "b")])
    assert first == [Gap(1, 50, "a"), Gap(1, 20, "b")]
    sub.advance(30, len(first))
    # The next page starts at 31 and still sees "a" lost up to 50, and now up to 60.
    assert sub.new_topic_gaps([Gap(31, 50, "a")]) == []
    assert sub.new_topic_gaps([Gap(31, 60, "a")]) == [Gap(51, 60, "a")]
    sub.advance(70)
    # Past the position a topic's record is dropped; a new loss is reported again.
    assert sub.new_topic_gaps([Gap(71, 80, "a"), Gap(71, 75, "b")]) == [
        Gap(71, 80, "a"),
        Gap(71, 75, "b"),
    ]
    assert sub.gaps == 2


def test_closed_subscription_never_goes_live() -> None:
    sub = make_sub(position=0, live=False)
    sub.close(CloseReason.GONE)
    sub.advance(5)
    assert sub.try_go_live(0) is False
    assert sub.state is State.CLOSED


# -- policy drop -----------------------------------------------------------------------------


def test_drop_replaces_what_did_not_fit_by_a_gap_then_goes_on() -> None:
    sub = make_sub(buffer_events=3, policy=OverflowPolicy.DROP)
    sub.push(run(1, 2))
    assert seqs(sub.take()) == [1, 2]
    sub.push(run(3, 4))
    sub.push(run(5, 9))  # does not fit: 3..9 are dropped, including the buffered 3..4
    assert sub.state is State.LIVE
    assert sub.gaps == 1
    assert sub.pending_events == 0
    sub.push(run(10, 11))
    sub.push(run(7, 9))  # behind the gap: not delivered twice
    taken = sub.take()
    assert taken[0] == Gap(3, 9)
    assert seqs(taken[1:]) == [10, 11]
    assert sub.position == 11


def test_drop_position_reaches_the_end_of_a_gap_taken_alone() -> None:
    sub = make_sub(position=5, buffer_events=1, policy=OverflowPolicy.DROP)
    sub.push(run(6, 6))
    sub.push(run(7, 8))  # overflow: 6..8 are dropped
    assert sub.take() == [Gap(6, 8)]
    assert sub.position == 8
    sub.push(run(9, 9))
    assert seqs(sub.take()) == [9]


def test_drop_twice_before_a_take_gives_one_gap_covering_both() -> None:
    sub = make_sub(buffer_events=2, policy=OverflowPolicy.DROP)
    sub.push(run(1, 2))
    sub.push(run(3, 4))  # overflow: a gap 1..4 waits in the buffer
    sub.push(run(5, 7))  # overflow again, with the gap still untaken
    assert sub.take() == [Gap(1, 7)]
    assert sub.gaps == 2


# -- policy disconnect -----------------------------------------------------------------------


def test_disconnect_closes_as_slow_consumer() -> None:
    sub = make_sub(buffer_events=2, policy=OverflowPolicy.DISCONNECT)
    wakes = Wakes(sub)
    sub.push(run(1, 2))
    before = wakes.count
    sub.push(run(3, 3))
    assert sub.state is State.CLOSED
    assert sub.close_reason is CloseReason.SLOW_CONSUMER
    assert wakes.count > before  # the writer must notice and close the connection
    assert not sub.has_pending
    assert (sub.pending_events, sub.pending_bytes) == (0, 0)
    sub.push(run(4, 4))
    assert not sub.has_pending
    assert sub.position == 0


# -- close, statistics -----------------------------------------------------------------------


def test_close_is_idempotent_and_keeps_the_first_reason() -> None:
    sub = make_sub()
    wakes = Wakes(sub)
    sub.push(run(1, 2))
    sub.close(CloseReason.UNSUBSCRIBED)
    assert (sub.state, sub.close_reason, sub.has_pending) == (
        State.CLOSED,
        CloseReason.UNSUBSCRIBED,
        False,
    )
    assert wakes.count == 2
    sub.close(CloseReason.GONE)
    assert sub.close_reason is CloseReason.UNSUBSCRIBED
    assert wakes.count == 2


def test_statistics() -> None:
    sub = make_sub(position=3, buffer_events=4, buffer_bytes=10_000, subjects=("a", "b.*"))
    sub.push(run(4, 5))
    sub.delivered_events = 7
    stats = sub.statistics()
    assert stats == SubscriptionStatistics(
        id="s1",
        transport="sse",
        filter="a,b.*",
        state=State.LIVE,
        position=3,
        pending_events=2,
        pending_bytes=run(4, 5).nbytes,
        buffer_events_limit=4,
        buffer_bytes_limit=10_000,
        delivered_events=7,
        catchups=0,
        gaps=0,
    )
    sub.push(run(6, 10))
    stats = sub.statistics()
    assert (stats.state, stats.catchups, stats.pending_events) == (State.CATCHUP, 1, 0)
    with pytest.raises(AttributeError):
        stats.position = 1  # type: ignore[misc]


def test_repr() -> None:
    assert repr(make_sub(position=4)) == "Subscription('s1', a, live, at 4)"


# -- property: catch-up loses nothing and duplicates nothing ---------------------------------

TOPICS = ["a", "b.x", "b.y", "c"]
SUBJECTS = ("a", "b.*")


class CatchupMachine(RuleBasedStateMachine):
    """A hub pushing seq-increasing runs, a writer taking them, and a catch-up reading a log.

    The log is a list holding every event ever published. Routing may lag behind the log (as the
    router lags behind appends), and the catch-up reads whatever the log holds.
    """

    @initialize(
        prefill=st.lists(st.sampled_from(TOPICS), max_size=20),
        start=st.integers(min_value=0, max_value=20),
        buffer_events=st.integers(min_value=1, max_value=6),
        buffer_bytes=st.sampled_from([125, 300, 500, 10_000]),
    )
    def start(self, prefill: list[str], start: int, buffer_events: int, buffer_bytes: int) -> None:
        self.filter = Filter.parse(SUBJECTS)
        self.log: list[Event] = []
        self.routed = 0  # how many of the log's events the hub has routed
        self.publish(prefill)
        self.routed = len(self.log)
        position = min(start, self.routed_seq)
        self.sub = make_sub(
            position=position,
            live=position >= self.routed_seq,
            buffer_events=buffer_events,
            buffer_bytes=buffer_bytes,
            subjects=SUBJECTS,
        )
        self.start_position = position
        self.delivered: list[int] = []

    @property
    def routed_seq(self) -> int:
        return self.log[self.routed - 1].seq if self.routed else 0

    def expected(self, up_to: int) -> list[int]:
        return [
            e.seq
            for e in self.log
            if self.start_position < e.seq <= up_to and self.filter.matches(e.topic)
        ]

    @rule(topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=8))
    def publish(self, topics: list[str]) -> None:
        first = len(self.log) + 1
        self.log.extend(
            event(first + i, topic, payload=b"y" * (i % 3)) for i, topic in enumerate(topics)
        )

    @precondition(lambda self: self.routed < len(self.log))
    @rule(data=st.data())
    def route(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(min_value=1, max_value=len(self.log) - self.routed))
        batch = self.log[self.routed : self.routed + count]
        self.routed += count
        for r in split_runs(batch):
            if self.filter.matches(r.topic):
                self.sub.push(r)

    @rule()
    def take(self) -> None:
        for item in self.sub.take():
            assert isinstance(item, Run), f"policy catchup never emits {item!r}"
            self.delivered.extend(e.seq for e in item.events)

    @precondition(lambda self: self.sub.state is State.CATCHUP)
    @rule(limit=st.integers(min_value=1, max_value=5))
    def catch_up_page(self, limit: int) -> None:
        after = self.sub.position
        page: list[Event] = []
        scanned_to = self.log[-1].seq if self.log else 0
        for e in self.log:
            if e.seq > after and self.filter.matches(e.topic):
                page.append(e)
                if len(page) == limit:
                    scanned_to = e.seq
                    break
        self.delivered.extend(e.seq for e in page)
        self.sub.advance(max(after, scanned_to))
        self.sub.try_go_live(self.routed_seq)

    @invariant()
    def buffer_is_bounded(self) -> None:
        sub = self.sub
        # the bound is the buffer, or one run alone in an otherwise empty buffer
        if sub.pending_events > sub.buffer_events or sub.pending_bytes > sub.buffer_bytes:
            assert len(sub._items) == 1
        if sub.state is State.CATCHUP:
            assert not sub.has_pending

    @invariant()
    def delivered_is_exactly_everything_up_to_the_position(self) -> None:
        # The position is the resume point: everything matching up to it, in order, once.
        assert self.delivered == self.expected(self.sub.position)

    def teardown(self) -> None:
        if not hasattr(self, "sub"):
            return
        self.route_all()
        for _ in range(2 * len(self.log) + 2):
            if self.sub.state is State.CATCHUP:
                self.catch_up_page(5)
            elif self.sub.has_pending:
                self.take()
            else:
                break
        assert self.sub.state is State.LIVE
        assert not self.sub.has_pending
        assert self.delivered == self.expected(self.log[-1].seq if self.log else 0)

    def route_all(self) -> None:
        batch = self.log[self.routed :]
        self.routed = len(self.log)
        for r in split_runs(batch):
            if self.filter.matches(r.topic):
                self.sub.push(r)


CatchupMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestCatchupLosesNothing = CatchupMachine.TestCase


def test_reset_drops_what_is_pending_and_starts_over_live() -> None:
    sub = make_sub(position=0)
    sub.push(run(1, 3))
    sub.reset("new")
    assert sub.take() == [Reset("new")]
    assert (sub.position, sub.state) == (0, State.LIVE)
    sub.push(run(1, 2))  # the new log's seqs start over and are not taken for duplicates
    assert seqs(sub.take()) == [1, 2]
