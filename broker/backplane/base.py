"""The `Log` interface every backplane implements, after centrifuge's ``Broker``: append, read
history after a position, the first and last positions, and a feed of new events.

Pure: this module imports nothing that does I/O. One conformance suite
(``tests/conformance/``) runs against every implementation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.model import AppendRequest, Event, Filter, Gap

EventsHandler = Callable[[Sequence[Event]], None]
ResetHandler = Callable[[str], None]

# A read examines at most this many retained events, matching or not, so that a filtered read
# of a quiet topic in a busy log cannot hold the event loop for long.
MAX_SCAN_PER_READ = 50_000


# The topic of a tombstone: an event deleted from inside the retained range (retention by
# messages per topic) is replaced by one, so that positions in a log's list stay put. No filter
# can match it: a topic is never empty.
TOMBSTONE_TOPIC = ""


def tombstone(event: Event) -> Event:
    return Event(event.seq, TOMBSTONE_TOPIC, b"", "", event.time)


class TopicLimit:
    """Retention by messages per topic (JetStream's ``max_msgs_per_subject``), for a log that
    keeps its events in one seq-ordered list: which event to delete when a topic has too many,
    and the highest seq deleted per topic (``marks``), from which reads report per-topic gaps.
    ``limit`` 0 means no limit; then it costs nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seqs: dict[str, deque[int]] = {}
        self.marks: dict[str, int] = {}

    def added(self, event: Event) -> int | None:
        """Count a new event; the seq of the topic's oldest event when it must now be deleted."""
        if not self.limit:
            return None
        seqs = self._seqs.get(event.topic)
        if seqs is None:
            seqs = self._seqs[event.topic] = deque()
        seqs.append(event.seq)
        if len(seqs) <= self.limit:
            return None
        seq = seqs.popleft()
        self.marks[event.topic] = seq
        return seq

    def trimmed(self, event: Event) -> None:
        """The log let ``event`` go by its other limits (oldest first)."""
        if not self.limit or event.topic == TOMBSTONE_TOPIC:
            return
        seqs = self._seqs.get(event.topic)
        if seqs and seqs[0] == event.seq:
            seqs.popleft()
            if not seqs:
                del self._seqs[event.topic]

    def clear(self) -> None:
        self._seqs.clear()
        self.marks.clear()

    def forget_below(self, first_seq: int) -> None:
        """Drop the marks the log's first seq has passed: it reports what lies below it as a
        whole. Called now and then, so marks stay bounded by the retained topics."""
        for topic in [t for t, seq in self.marks.items() if seq < first_seq]:
            del self.marks[topic]

    def gaps(self, filter: Filter, after_seq: int, first_seq: int) -> list[Gap]:
        """Per-topic gaps for a read of ``filter`` after ``after_seq``: the topics that lost
        events inside the retained range (at ``first_seq`` or later) after that position."""
        marks = self.marks
        if not marks:
            return []
        floor = max(after_seq, first_seq - 1)
        topics: Iterable[str]
        if filter.wildcards:
            topics = [t for t, seq in marks.items() if seq > floor and filter.matches(t)]
        else:
            topics = [t for t in filter.literals if marks.get(t, 0) > floor]
        return [Gap(after_seq + 1, marks[t], t) for t in topics]


def scan_matching(
    events: Sequence[Event], start: int, stop: int, filter: Filter, limit: int
) -> tuple[list[Event], int]:
    """The events of ``events[start:stop]`` that ``filter`` matches, at most ``limit``, and the
    index just after the last one examined (``stop`` unless the limit was reached)."""
    out: list[Event] = []
    if not filter.wildcards and len(filter.literals) == 1:  # a tombstone's "" never equals it
        (topic,) = filter.literals
        for i in range(start, stop):
            if events[i].topic == topic:
                out.append(events[i])
                if len(out) >= limit:
                    return out, i + 1
        return out, stop
    matches: dict[str, bool] = {TOMBSTONE_TOPIC: False}  # one match per topic, not per event
    for i in range(start, stop):
        event = events[i]
        hit = matches.get(event.topic)
        if hit is None:
            hit = matches[event.topic] = filter.matches(event.topic)
        if hit:
            out.append(event)
            if len(out) >= limit:
                return out, i + 1
    return out, stop


@dataclass(frozen=True, slots=True)
class AppendResult:
    seq: int
    duplicate: bool = False  # the key was seen within the dedupe window; nothing was stored


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A page of history.

    ``events`` are the matching events with ``after_seq < seq <= scanned_to``, in order. When
    the log no longer holds some of what was asked for, ``gap`` names the range that may be
    missing (it starts at ``after_seq + 1``) and every event in ``events`` comes after it. Read
    again from ``scanned_to``; when ``scanned_to`` reaches `Log.last_seq` the reader is caught up.
    """

    events: Sequence[Event]
    scanned_to: int
    gap: Gap | None = None
    # Per-topic losses inside the range read (each with its ``topic``, starting after ``gap``):
    # only that topic's events may be missing, other topics' events in the range are here.
    topic_gaps: Sequence[Gap] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class LogStatistics:
    epoch: str
    first_seq: int
    last_seq: int
    retained_events: int
    retained_bytes: int
    trimmed_events: int
    duplicates: int


class Log(Protocol):
    """An ordered, retained log of events shared by all topics, with one global seq."""

    @property
    def epoch(self) -> str:
        """The log's incarnation: it changes when the log is created afresh."""
        ...

    @property
    def available(self) -> bool:
        """Whether appends and history reads can succeed now (the backplane is reachable)."""
        ...

    @property
    def first_seq(self) -> int:
        """The seq of the oldest retained event (``last_seq + 1`` when nothing is retained)."""
        ...

    @property
    def last_seq(self) -> int:
        """The seq of the newest event this node knows of (0 before the first)."""
        ...

    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        """Store the messages in order and return their seqs once they are durable."""
        ...

    async def read(self, filter: Filter, after_seq: int, limit: int) -> ReadResult:
        """At most ``limit`` matching events with seq > ``after_seq``, oldest first."""
        ...

    def on_events(self, handler: EventsHandler) -> None:
        """Call ``handler`` (synchronously, in seq order, in batches) with every new event."""
        ...

    def on_reset(self, handler: ResetHandler) -> None:
        """Call ``handler`` with the new epoch when the log is replaced while running (its
        seqs start over; the events announced after it belong to the new log)."""
        ...

    async def run(self, *, task_status: Any = ...) -> None:
        """Background work (retention, following the backplane). Signals readiness, then
        runs until cancelled."""
        ...

    def statistics(self) -> LogStatistics: ...
