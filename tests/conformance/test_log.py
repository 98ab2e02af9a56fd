"""One conformance suite for every `Log` implementation (broker/backplane/base.py).

Each implementation is a `LogFactory` in `FACTORIES`: an async context manager that takes
retention settings and yields a running log, fresh and empty. The tests use only the `Log`
protocol (append, read, first_seq, last_seq, epoch, on_events, statistics), so that the
embedded `MemoryLog` and the cluster's JetStream log are held to the same contract.

Announcements (`on_events`) may arrive after `append` returns (the JetStream log hears its own
appends back from the stream), so the tests wait for them with a deadline, never by sleeping.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.backplane.base import AppendResult, Log, ReadResult
from broker.backplane.memory import MemoryLog
from broker.backplane.nats import JetStreamLog
from broker.model import AppendRequest, Event, Filter, Gap

MiB = 1024 * 1024
DEADLINE_SECONDS = 10  # for anything a test waits on: announcements, reads


class LogFactory(Protocol):
    """Opens a fresh, empty, running log of one implementation.

    ``retention_messages`` bounds the number of events in the whole log (all topics together).
    ``clock`` (seconds since the Unix epoch) is the time the log stamps and ages events by; an
    implementation whose time comes from elsewhere (a NATS server) ignores it and says so with
    ``supports_fake_clock = False``.
    """

    name: str
    supports_fake_clock: bool
    # True: a gap names exactly what a filter lost (per topic). False: gaps are conservative,
    # from the position to the log's first retained seq (JetStream keeps no per-subject record
    # of what it deleted). Never a silent loss either way.
    precise_gaps: bool
    # True: on_events announces every event ever appended. False: an event the log deleted
    # before it could announce it (JetStream's limits under a fast publisher) is not announced;
    # the hub then sends subscribers back through the log, whose read reports the gap.
    announces_every_event: bool

    def __call__(
        self,
        *,
        retention_messages: int = ...,
        retention_bytes: int = ...,
        retention_seconds: float = ...,
        retention_messages_per_topic: int = ...,
        dedupe_window_seconds: float = ...,
        clock: Callable[[], float] | None = None,
    ) -> AbstractAsyncContextManager[Log]: ...


class MemoryLogFactory:
    name = "memory"
    supports_fake_clock = True
    precise_gaps = True
    announces_every_event = True

    @asynccontextmanager
    async def __call__(
        self,
        *,
        retention_messages: int = 1_000_000,
        retention_bytes: int = 256 * MiB,
        retention_seconds: float = 3600.0,
        retention_messages_per_topic: int = 0,
        dedupe_window_seconds: float = 120.0,
        clock: Callable[[], float] | None = None,
    ) -> AsyncIterator[Log]:
        log = MemoryLog(
            retention_messages=retention_messages,
            retention_bytes=retention_bytes,
            retention_seconds=retention_seconds,
            retention_messages_per_topic=retention_messages_per_topic,
            dedupe_window_seconds=dedupe_window_seconds,
            clock=clock or time.time,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            yield log
            nursery.cancel_scope.cancel()


class JetStreamLogFactory:
    """A fresh stream, with its own subject prefix, on the session's real nats-server."""

    name = "jetstream"
    supports_fake_clock = False
    precise_gaps = False
    announces_every_event = False
    server_url = ""  # set by the nats_server fixture
    _streams = itertools.count(1)

    @asynccontextmanager
    async def __call__(
        self,
        *,
        retention_messages: int = 1_000_000,
        retention_bytes: int = 256 * MiB,
        retention_seconds: float = 3600.0,
        retention_messages_per_topic: int = 0,
        dedupe_window_seconds: float = 120.0,
        clock: Callable[[], float] | None = None,
    ) -> AsyncIterator[Log]:
        n = next(self._streams)
        log = JetStreamLog(
            [self.server_url],
            stream=f"CONFORMANCE{n}",
            subject_prefix=f"conformance{n}",
            retention_messages=retention_messages,
            retention_bytes=retention_bytes,
            retention_seconds=retention_seconds,
            retention_messages_per_topic=retention_messages_per_topic,
            dedupe_window_seconds=dedupe_window_seconds,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            yield log
            nursery.cancel_scope.cancel()


FACTORIES: list[LogFactory] = [MemoryLogFactory(), JetStreamLogFactory()]


@pytest.fixture(params=FACTORIES, ids=lambda f: f.name)
def log_factory(request: pytest.FixtureRequest) -> LogFactory:
    factory: LogFactory = request.param
    if isinstance(factory, JetStreamLogFactory):
        factory.server_url = request.getfixturevalue("nats_server").url
    return factory


@pytest.fixture
def fake_clock_factory(log_factory: LogFactory) -> LogFactory:
    """The factory, for tests that need to move time; implementations on a real clock skip."""
    if not log_factory.supports_fake_clock:
        pytest.skip(
            f"{log_factory.name} ages events by the server's clock; covered on that clock by "
            "tests/integration/test_cluster.py::test_retention_by_age_on_the_servers_clock"
        )
    return log_factory


def test_memory_log_runs_the_fake_clock_tests() -> None:
    # The skip above must never hide the age tests from the embedded log.
    (memory,) = [f for f in FACTORIES if f.name == "memory"]
    assert memory.supports_fake_clock is True


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Feed:
    """Everything a log announces through `on_events`, batch by batch."""

    def __init__(self, log: Log) -> None:
        self.batches: list[list[Event]] = []
        self._changed = trio.Event()
        log.on_events(self._on_events)

    def _on_events(self, events: Sequence[Event]) -> None:
        self.batches.append(list(events))
        self._changed.set()
        self._changed = trio.Event()

    @property
    def seqs(self) -> list[int]:
        return [e.seq for batch in self.batches for e in batch]

    async def wait_for(self, seq: int) -> None:
        """Until the feed announced ``seq`` (or something after it)."""
        with trio.fail_after(DEADLINE_SECONDS):
            while not self.seqs or self.seqs[-1] < seq:
                await self._changed.wait()


@dataclass
class Published:
    """What a test published: the ground truth reads are checked against."""

    seq: int
    topic: str
    payload: bytes


async def publish(
    log: Log, feed: Feed, items: Sequence[tuple[str, bytes] | AppendRequest]
) -> list[AppendResult]:
    """Append one batch and wait until the log has announced it."""
    requests = [i if isinstance(i, AppendRequest) else AppendRequest(i[0], i[1]) for i in items]
    with trio.fail_after(DEADLINE_SECONDS):
        results = await log.append(requests)
    stored = [r.seq for r in results if not r.duplicate]
    if stored:
        await feed.wait_for(max(stored))
    return results


async def publish_topics(log: Log, feed: Feed, topics: Sequence[str]) -> list[Published]:
    items = [(topic, b"%s#%d" % (topic.encode(), i)) for i, topic in enumerate(topics)]
    results = await publish(log, feed, items)
    return [Published(r.seq, t, p) for r, (t, p) in zip(results, items, strict=True)]


async def settled(log: Log, first_seq: int) -> None:
    """Wait until the log says its first retained seq is ``first_seq``: the embedded log knows at
    once; the JetStream log learns what the stream deleted within its refresh interval."""
    with trio.fail_after(DEADLINE_SECONDS):
        while log.first_seq != first_seq:
            await trio.sleep(0.05)


def expected_gap(
    factory: LogFactory, precise: Gap | None, after: int, first_seq: int
) -> Gap | None:
    """``precise`` for a log that tracks losses per topic, else the conservative gap."""
    if factory.precise_gaps:
        return precise
    return Gap(after + 1, first_seq - 1) if after + 1 < first_seq else None


async def read(log: Log, subjects: Sequence[str], after: int, limit: int = 10_000) -> ReadResult:
    with trio.fail_after(DEADLINE_SECONDS):
        return await log.read(Filter.parse(subjects), after, limit)


async def read_all(
    log: Log, subjects: Sequence[str], after: int, limit: int
) -> tuple[list[Event], list[Gap]]:
    """Page through the log as a catching-up subscriber does, checking each page's contract."""
    events: list[Event] = []
    gaps: list[Gap] = []
    filter = Filter.parse(subjects)
    for _page in range(100_000):
        result = await read(log, subjects, after, limit)
        assert len(result.events) <= limit
        assert result.scanned_to >= after
        if result.gap is not None:
            assert result.gap.from_seq == after + 1
            assert result.gap.to_seq >= result.gap.from_seq
            gaps.append(result.gap)
        floor = result.gap.to_seq if result.gap is not None else after
        assert all(floor < e.seq <= result.scanned_to for e in result.events)
        for topic_gap in result.topic_gaps:
            assert topic_gap.topic is not None and filter.matches(topic_gap.topic)
            assert floor < topic_gap.from_seq <= topic_gap.to_seq
            assert not [
                e
                for e in result.events
                if e.topic == topic_gap.topic and topic_gap.from_seq <= e.seq <= topic_gap.to_seq
            ]
            # Each page repeats what a topic lost after its own start: keep the first telling.
            if all(g.topic != topic_gap.topic or g.to_seq < topic_gap.to_seq for g in gaps):
                gaps.append(topic_gap)
        assert all(filter.matches(e.topic) for e in result.events)
        events.extend(result.events)
        if result.scanned_to >= log.last_seq:
            return events, gaps
        assert result.scanned_to > after or result.events, "a page must make progress"
        after = result.scanned_to
    raise AssertionError("paging never reached last_seq")


def expected(published: Sequence[Published], subjects: Sequence[str], after: int = 0) -> list[int]:
    filter = Filter.parse(subjects)
    return [p.seq for p in published if p.seq > after and filter.matches(p.topic)]


# -- a fresh log -----------------------------------------------------------------------------


async def test_a_fresh_log_is_empty(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        assert log.last_seq == 0
        assert log.first_seq == 1  # last_seq + 1: nothing retained
        assert isinstance(log.epoch, str)
        assert log.epoch
        result = await read(log, [">"], 0)
        assert (list(result.events), result.gap) == ([], None)
        assert result.scanned_to == 0
        stats = log.statistics()
        assert (stats.epoch, stats.first_seq, stats.last_seq) == (log.epoch, 1, 0)
        assert (stats.retained_events, stats.duplicates) == (0, 0)


async def test_each_log_created_afresh_has_its_own_epoch(log_factory: LogFactory) -> None:
    async with log_factory() as first, log_factory() as second:
        assert first.epoch != second.epoch
        epoch = first.epoch
        await publish_topics(first, Feed(first), ["a", "b"])
        assert first.epoch == epoch  # appending does not change the incarnation


# -- append ----------------------------------------------------------------------------------


async def test_seqs_increase_across_topics_from_first_seq(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        first_seq = log.first_seq
        seqs: list[int] = []
        for batch in (["a"], ["b", "a.x", "b"], ["c"], ["a", "a"]):
            seqs += [p.seq for p in await publish_topics(log, feed, batch)]
        assert seqs[0] == first_seq
        assert all(x < y for x, y in itertools.pairwise(seqs))
        assert log.last_seq == seqs[-1]
        assert log.first_seq == first_seq  # nothing trimmed


async def test_append_returns_seqs_in_request_order(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        requests = [
            AppendRequest("a", b"one", content_type="text/plain"),
            AppendRequest("b.c", b"two", event="note"),
            AppendRequest("a", b"", content_type="application/json"),
            AppendRequest("d", b"\x00\xff", key="k-1"),
        ]
        before = time.time()
        results = await publish(log, Feed(log), requests)
        after = time.time()
        assert [r.duplicate for r in results] == [False] * 4
        stored = (await read(log, [">"], 0)).events
        assert [e.seq for e in stored] == [r.seq for r in results]
        for event, request in zip(stored, requests, strict=True):
            assert (event.topic, event.payload, event.content_type, event.event, event.id) == (
                request.topic,
                request.payload,
                request.content_type,
                request.event,
                request.key,
            )
            assert before - 5 <= event.time <= after + 5  # publish time, in Unix seconds


async def test_appending_nothing_stores_nothing(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        with trio.fail_after(DEADLINE_SECONDS):
            assert await log.append([]) == []
        await publish_topics(log, feed, ["a"])
        assert feed.seqs == [1] == [log.last_seq]


async def test_on_events_announces_every_event_once_in_order(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        feed, other = Feed(log), Feed(log)
        seqs: list[int] = []
        for batch in (["a", "b", "a"], ["c"], ["a"] * 50, ["b", "c", "d", "a", "b"]):
            seqs += [p.seq for p in await publish_topics(log, feed, batch)]
        await other.wait_for(seqs[-1])
        assert feed.seqs == seqs == other.seqs  # every handler gets everything, once, in order
        assert all(feed.batches)  # no empty batch
        assert len(feed.batches) <= len(seqs)
        # The announced events are the stored ones, not just their seqs.
        assert [e.topic for b in feed.batches for e in b] == [
            e.topic for e in (await read(log, [">"], 0)).events
        ]
        late = Feed(log)  # a handler added later hears only what comes later
        (last,) = await publish_topics(log, feed, ["z"])
        await late.wait_for(last.seq)
        assert late.seqs == [last.seq]


# -- read ------------------------------------------------------------------------------------

TOPICS = ["chat.lobby", "chat.dev", "chat.dev.bots", "news", "orders.eu.created", "chat.lobby"]


@pytest.mark.parametrize(
    "subjects",
    [
        ["chat.lobby"],
        ["news"],
        ["missing"],
        ["chat.lobby", "news"],
        ["chat.*"],
        ["chat.>"],
        ["*.dev.*"],
        ["orders.*.created"],
        [">"],
        ["*"],
        ["news", "chat.*", "chat.lobby"],
    ],
)
async def test_read_by_filter(log_factory: LogFactory, subjects: list[str]) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        published = await publish_topics(log, feed, TOPICS * 3)
        result = await read(log, subjects, 0)
        assert [e.seq for e in result.events] == expected(published, subjects)
        by_seq = {p.seq: p for p in published}
        assert all(
            (e.topic, e.payload) == (by_seq[e.seq].topic, by_seq[e.seq].payload)
            for e in result.events
        )
        assert result.gap is None
        assert result.scanned_to == log.last_seq


async def test_read_after_a_seq(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        published = await publish_topics(log, Feed(log), TOPICS * 2)
        for subjects in (["chat.*"], [">"], ["news"]):
            for after in range(log.last_seq + 1):
                result = await read(log, subjects, after)
                assert [e.seq for e in result.events] == expected(published, subjects, after)
                assert result.gap is None


async def test_read_after_the_last_seq_is_empty(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        await publish_topics(log, Feed(log), ["a", "b"])
        result = await read(log, [">"], log.last_seq)
        assert (list(result.events), result.gap, result.scanned_to) == ([], None, log.last_seq)
        beyond = await read(log, [">"], log.last_seq + 10)
        assert (list(beyond.events), beyond.gap) == ([], None)


async def test_read_with_limit_returns_the_oldest_and_says_where_to_go_on(
    log_factory: LogFactory,
) -> None:
    async with log_factory() as log:
        published = await publish_topics(log, Feed(log), ["a", "b", "a", "b", "b", "a", "a"])
        want = expected(published, ["a"])  # 1, 3, 6, 7
        page = await read(log, ["a"], 0, limit=2)
        assert [e.seq for e in page.events] == want[:2]
        # Everything matching up to scanned_to is in the page, and nothing after it.
        assert want[1] <= page.scanned_to < want[2]
        rest = await read(log, ["a"], page.scanned_to, limit=2)
        assert [e.seq for e in rest.events] == want[2:]
        one = await read(log, ["a"], 0, limit=1)
        assert [e.seq for e in one.events] == want[:1]


async def test_paging_through_a_busy_log_for_a_quiet_topic(log_factory: LogFactory) -> None:
    # More events than one read may scan: a page may come back empty before scanned_to reaches
    # last_seq, and the reader must go on.
    async with log_factory() as log:
        feed = Feed(log)
        quiet = await publish_topics(log, feed, ["quiet"])
        for _ in range(61):
            await publish_topics(log, feed, ["busy"] * 1000)
        quiet += await publish_topics(log, feed, ["quiet"])
        events, gaps = await read_all(log, ["quiet"], 0, limit=10)
        assert [e.seq for e in events] == [p.seq for p in quiet]
        assert gaps == []


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(
        st.lists(st.sampled_from(["a", "a.b", "a.c", "b.b", "c"]), min_size=1, max_size=12),
        max_size=8,
    ),
    subjects=st.lists(st.sampled_from(["a", "a.*", "*.b", "a.>", ">", "c", "z"]), min_size=1),
    start=st.integers(min_value=0, max_value=60),
    limit=st.integers(min_value=1, max_value=5),
)
async def test_paging_yields_exactly_the_matching_events_in_order(
    log_factory: LogFactory,
    batches: list[list[str]],
    subjects: list[str],
    start: int,
    limit: int,
) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        published: list[Published] = []
        for batch in batches:
            published += await publish_topics(log, feed, batch)
        after = min(start, log.last_seq)
        events, gaps = await read_all(log, subjects, after, limit)
        assert [e.seq for e in events] == expected(published, subjects, after)
        assert gaps == []


# -- idempotency -----------------------------------------------------------------------------


async def test_same_key_is_stored_once(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        (first,) = await publish(log, feed, [AppendRequest("a", b"original", key="k1")])
        assert first == AppendResult(first.seq, duplicate=False)
        last_seq = log.last_seq
        (again,) = await publish(log, feed, [AppendRequest("a", b"retry", key="k1")])
        assert again == AppendResult(first.seq, duplicate=True)
        # The key names the message, whatever its topic.
        (elsewhere,) = await publish(log, feed, [AppendRequest("b", b"retry", key="k1")])
        assert elsewhere == AppendResult(first.seq, duplicate=True)
        assert log.last_seq == last_seq
        (other,) = await publish(log, feed, [AppendRequest("a", b"next", key="k2")])
        assert other.seq > first.seq and not other.duplicate
        # Nothing new was stored or announced for the duplicates.
        assert feed.seqs == [first.seq, other.seq]
        stored = (await read(log, [">"], 0)).events
        assert [(e.seq, e.payload) for e in stored] == [
            (first.seq, b"original"),
            (other.seq, b"next"),
        ]
        assert log.statistics().duplicates == 2


async def test_same_key_twice_in_one_batch(log_factory: LogFactory) -> None:
    async with log_factory() as log:
        feed = Feed(log)
        results = await publish(
            log,
            feed,
            [
                AppendRequest("a", b"1", key="k"),
                AppendRequest("a", b"2"),
                AppendRequest("a", b"3", key="k"),
                AppendRequest("a", b"4", key="j"),
            ],
        )
        assert [r.duplicate for r in results] == [False, False, True, False]
        assert results[2].seq == results[0].seq
        assert feed.seqs == [results[0].seq, results[1].seq, results[3].seq]
        assert [e.payload for e in (await read(log, ["a"], 0)).events] == [b"1", b"2", b"4"]


async def test_a_retry_within_the_window_is_a_duplicate_even_after_the_original_was_trimmed(
    log_factory: LogFactory,
) -> None:
    # docs/protocol.md: a second publish with the same key within the dedupe window stores
    # nothing. Retention trimming the first copy does not make the retry new: subscribers
    # that saw the first copy would get the message twice.
    async with log_factory(retention_messages=3) as log:
        feed = Feed(log)
        (first,) = await publish(log, feed, [AppendRequest("a", b"x", key="k0")])
        for i in range(1, 6):
            await publish(log, feed, [AppendRequest("a", b"x", key=f"k{i}")])
        (retry,) = await publish(log, feed, [AppendRequest("a", b"x", key="k0")])
        assert retry == AppendResult(first.seq, duplicate=True)


# -- retention and gaps ----------------------------------------------------------------------


async def test_retention_by_count_gives_a_precise_gap_per_topic(log_factory: LogFactory) -> None:
    async with log_factory(retention_messages=4) as log:
        feed = Feed(log)
        await publish_topics(log, feed, ["a", "b"] * 5)  # a: 1 3 5 7 9, b: 2 4 6 8 10
        await settled(log, 7)
        assert (log.first_seq, log.last_seq) == (7, 10)
        stats = log.statistics()
        assert (stats.first_seq, stats.retained_events, stats.trimmed_events) == (7, 4, 6)

        def gap(precise: Gap | None, after: int) -> Gap | None:
            return expected_gap(log_factory, precise, after, 7)

        a = await read(log, ["a"], 0)
        assert a.gap == gap(Gap(1, 5), 0)  # the highest trimmed "a" is 5, not first_seq - 1
        assert [e.seq for e in a.events] == [7, 9]
        b = await read(log, ["b"], 0)
        assert (b.gap, [e.seq for e in b.events]) == (gap(Gap(1, 6), 0), [8, 10])
        both = await read(log, [">"], 2)
        assert (both.gap, [e.seq for e in both.events]) == (gap(Gap(3, 6), 2), [7, 8, 9, 10])
        assert (await read(log, ["a"], 3)).gap == gap(Gap(4, 5), 3)
        # After the last trimmed "a", nothing of "a" is missing although 6 was trimmed.
        after_5 = await read(log, ["a"], 5)
        assert (after_5.gap, [e.seq for e in after_5.events]) == (gap(None, 5), [7, 9])
        assert (await read(log, ["b"], 5)).gap == gap(Gap(6, 6), 5)
        # A pattern that matches no trimmed topic adds nothing to the gap.
        mixed = await read(log, ["a", "x.*"], 0)
        assert (mixed.gap, [e.seq for e in mixed.events]) == (gap(Gap(1, 5), 0), [7, 9])
        assert (await read(log, ["x.>"], 0)).gap == gap(None, 0)


async def test_a_gap_comes_before_a_limited_page(log_factory: LogFactory) -> None:
    async with log_factory(retention_messages=4) as log:
        await publish_topics(log, Feed(log), ["a", "b"] * 5)
        await settled(log, 7)
        lost = expected_gap(log_factory, Gap(1, 5), 0, 7)
        page = await read(log, ["a"], 0, limit=1)
        assert (page.gap, [e.seq for e in page.events]) == (lost, [7])
        events, gaps = await read_all(log, ["a"], 0, limit=1)
        assert ([e.seq for e in events], gaps) == ([7, 9], [lost])


async def test_a_quiet_topic_gets_no_gap_when_a_busy_one_rolls_the_window(
    log_factory: LogFactory,
) -> None:
    async with log_factory(retention_messages=5) as log:
        feed = Feed(log)
        await publish_topics(log, feed, ["busy"] * 3)  # 1..3
        await publish_topics(log, feed, ["quiet"])  # 4
        await publish_topics(log, feed, ["busy"] * 4)  # 5..8: 1..3 are trimmed
        await settled(log, 4)
        quiet = await read(log, ["quiet"], 0)
        quiet_gap = expected_gap(log_factory, None, 0, 4)
        assert (quiet.gap, [e.seq for e in quiet.events]) == (quiet_gap, [4])
        busy = await read(log, ["busy"], 0)
        assert (busy.gap, [e.seq for e in busy.events]) == (Gap(1, 3), [5, 6, 7, 8])
        anything = await read(log, ["*"], 0)
        assert (anything.gap, [e.seq for e in anything.events]) == (Gap(1, 3), [4, 5, 6, 7, 8])


async def test_retention_per_topic_reports_a_topic_gap_and_keeps_the_others(
    log_factory: LogFactory,
) -> None:
    async with log_factory(retention_messages_per_topic=2) as log:
        feed = Feed(log)
        # a: 1 3 4 6 (1 and 3 deleted by the limit), b: 2 5
        await publish_topics(log, feed, ["a", "b", "a", "a", "b", "a"])
        await settled(log, 2)
        assert (log.first_seq, log.last_seq) == (2, 6)
        assert log.statistics().retained_events == 4

        a = await read(log, ["a"], 0)
        assert (a.gap, a.topic_gaps, [e.seq for e in a.events]) == (
            Gap(1, 1),  # below the first retained seq: the ordinary gap
            [Gap(2, 3, "a")],  # inside the retained range: this topic only
            [4, 6],
        )
        # A wildcard reader is told what "a" lost and still gets "b"'s 2 and 5 from that range.
        anything = await read(log, [">"], 0)
        assert (anything.gap, anything.topic_gaps, [e.seq for e in anything.events]) == (
            Gap(1, 1),
            [Gap(2, 3, "a")],
            [2, 4, 5, 6],
        )
        b = await read(log, ["b"], 0)
        assert (b.gap, b.topic_gaps, [e.seq for e in b.events]) == (
            expected_gap(log_factory, None, 0, 2),
            [],
            [2, 5],
        )
        assert (await read(log, ["a"], 2)).topic_gaps == [Gap(3, 3, "a")]
        after_3 = await read(log, ["a"], 3)
        assert (after_3.gap, after_3.topic_gaps, [e.seq for e in after_3.events]) == (
            None,
            [],
            [4, 6],
        )
        events, gaps = await read_all(log, [">"], 1, limit=1)
        assert ([e.seq for e in events], gaps) == ([2, 4, 5, 6], [Gap(2, 3, "a")])


async def test_earliest_gets_no_gap(log_factory: LogFactory) -> None:
    async with log_factory(retention_messages=4) as log:
        await publish_topics(log, Feed(log), ["a", "b"] * 5)
        await settled(log, 7)
        earliest = await read(log, [">"], log.first_seq - 1)
        assert earliest.gap is None
        assert [e.seq for e in earliest.events] == [7, 8, 9, 10]


async def test_retention_keeps_working_over_many_trims(log_factory: LogFactory) -> None:
    async with log_factory(retention_messages=10) as log:
        feed = Feed(log)
        for _ in range(30):
            await publish_topics(log, feed, ["a", "b"] * 50)
        await settled(log, 2991)
        assert (log.first_seq, log.last_seq) == (2991, 3000)
        if log_factory.announces_every_event:
            assert feed.seqs == list(range(1, 3001))
        else:  # in order and once, and at least everything still retained
            assert feed.seqs == sorted(set(feed.seqs))
            assert feed.seqs[-10:] == list(range(2991, 3001))
        result = await read(log, ["b"], 0)
        assert (result.gap, [e.seq for e in result.events]) == (
            Gap(1, 2990),
            [2992, 2994, 2996, 2998, 3000],
        )
        assert [e.seq for e in (await read(log, [">"], 2995)).events] == list(range(2996, 3001))


async def test_retention_by_bytes(log_factory: LogFactory) -> None:
    payload = b"x" * 1000
    async with log_factory(retention_bytes=3500) as log:
        feed = Feed(log)
        for _ in range(10):
            await publish(log, feed, [("a", payload)])
        assert log.last_seq == 10
        with trio.fail_after(DEADLINE_SECONDS):  # the JetStream log learns it within a refresh
            while log.last_seq - log.first_seq + 1 > 3:
                await trio.sleep(0.05)
        retained = log.last_seq - log.first_seq + 1
        assert 1 <= retained <= 3  # 3500 bytes hold at most three 1000-byte payloads
        assert log.statistics().retained_events == retained
        result = await read(log, ["a"], 0)
        assert result.gap == Gap(1, log.first_seq - 1)
        assert [e.seq for e in result.events] == list(range(log.first_seq, 11))
        assert all(e.payload == payload for e in result.events)


# -- retention by age (implementations that take the test's clock) ---------------------------


async def test_retention_by_age(fake_clock_factory: LogFactory) -> None:
    clock = FakeClock()
    async with fake_clock_factory(retention_seconds=60, clock=clock) as log:
        feed = Feed(log)
        await publish_topics(log, feed, ["a", "b"])  # 1, 2 at t=0
        clock.advance(30)
        await publish_topics(log, feed, ["a"])  # 3 at t=30
        clock.advance(30)
        assert [e.seq for e in (await read(log, [">"], 0)).events] == [1, 2, 3]  # 60 s: kept
        clock.advance(1)
        a = await read(log, ["a"], 0)
        assert (a.gap, [e.seq for e in a.events]) == (Gap(1, 1), [3])
        assert log.first_seq == 3
        clock.advance(30)
        everything = await read(log, [">"], 0)
        assert (everything.gap, list(everything.events)) == (Gap(1, 3), [])
        assert (log.first_seq, log.last_seq) == (4, 3)
        (new,) = await publish_topics(log, feed, ["a"])
        assert new.seq == 4  # seqs never go back, even when everything expired
        assert log.statistics().retained_events == 1


async def test_an_idle_log_lets_old_events_go(
    fake_clock_factory: LogFactory, autojump_clock: trio.testing.MockClock
) -> None:
    # Nobody appends or reads: the log's own background work must still free expired events.
    clock = FakeClock()
    async with fake_clock_factory(retention_seconds=60, clock=clock) as log:
        await publish_topics(log, Feed(log), ["a", "b", "a"])
        assert log.statistics().retained_events == 3
        clock.advance(61)
        await trio.sleep(5)
        stats = log.statistics()
        assert (stats.retained_events, stats.first_seq, stats.last_seq) == (0, 4, 3)
        assert log.first_seq == 4


async def test_events_are_stamped_with_the_clock(fake_clock_factory: LogFactory) -> None:
    clock = FakeClock(1_234_567_890.5)
    async with fake_clock_factory(clock=clock) as log:
        await publish_topics(log, Feed(log), ["a"])
        (event,) = (await read(log, ["a"], 0)).events
        assert event.time == 1_234_567_890.5


async def test_dedupe_window_expires(fake_clock_factory: LogFactory) -> None:
    clock = FakeClock()
    async with fake_clock_factory(dedupe_window_seconds=120, clock=clock) as log:
        feed = Feed(log)
        (first,) = await publish(log, feed, [AppendRequest("a", b"1", key="k")])
        clock.advance(120)
        (retry,) = await publish(log, feed, [AppendRequest("a", b"2", key="k")])
        assert retry == AppendResult(first.seq, duplicate=True)
        clock.advance(1)
        (late,) = await publish(log, feed, [AppendRequest("a", b"3", key="k")])
        assert late.seq > first.seq and not late.duplicate
        (again,) = await publish(log, feed, [AppendRequest("a", b"4", key="k")])
        assert again == AppendResult(late.seq, duplicate=True)
