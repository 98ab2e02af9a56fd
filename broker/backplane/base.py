"""The `Log` interface every backplane implements, after centrifuge's ``Broker``: append, read
history after a position, the first and last positions, and a feed of new events.

Pure: this module imports nothing that does I/O. One conformance suite
(``tests/conformance/``) runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.model import Event, Filter, Gap

EventsHandler = Callable[[Sequence[Event]], None]

# A read examines at most this many retained events, matching or not, so that a filtered read
# of a quiet topic in a busy log cannot hold the event loop for long.
MAX_SCAN_PER_READ = 50_000


def scan_matching(
    events: Sequence[Event], start: int, stop: int, filter: Filter, limit: int
) -> tuple[list[Event], int]:
    """The events of ``events[start:stop]`` that ``filter`` matches, at most ``limit``, and the
    index just after the last one examined (``stop`` unless the limit was reached)."""
    out: list[Event] = []
    if not filter.wildcards and len(filter.literals) == 1:
        (topic,) = filter.literals
        for i in range(start, stop):
            if events[i].topic == topic:
                out.append(events[i])
                if len(out) >= limit:
                    return out, i + 1
        return out, stop
    matches: dict[str, bool] = {}  # one pattern match per topic, not per event
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
class AppendRequest:
    """One message to store. Validated by the caller (topic, event name, key, size)."""

    topic: str
    payload: bytes
    content_type: str = "application/octet-stream"
    event: str | None = None
    key: str | None = None  # idempotency key


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

    async def run(self, *, task_status: Any = ...) -> None:
        """Background work (retention, following the backplane). Signals readiness, then
        runs until cancelled."""
        ...

    def statistics(self) -> LogStatistics: ...
