"""`MemoryLog`: the embedded mode's log. One process, no dependencies, bounded retention.

Events live in one list in seq order; seq is contiguous across the whole log (one global
counter), so the event with seq ``s`` sits at index ``s - self._base_seq``. Trimming advances a
head index and compacts the list now and then, so both append and trim are amortised O(1).

To tell a resuming client *precisely* whether it lost something, the log remembers, per topic,
the highest seq it has trimmed (a watermark). A quiet topic is therefore not reported as having
a gap just because a busy topic rolled the window. The watermarks are bounded: past
``max_watermark_topics`` the oldest are folded into one conservative floor.

Retention by messages per topic (as JetStream's ``max_msgs_per_subject``) deletes a topic's
oldest event from inside the retained range: it is replaced by a tombstone that no filter
matches, and reads report that topic's loss with a per-topic gap.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import trio

from broker.backplane.base import (
    MAX_SCAN_PER_READ,
    TOMBSTONE_TOPIC,
    AppendResult,
    EventsHandler,
    LogStatistics,
    ReadResult,
    ResetHandler,
    TopicLimit,
    scan_matching,
    tombstone,
)
from broker.model import AppendRequest, Event, Filter, Gap, event_size


def new_epoch() -> str:
    """A fresh, short, URL-safe incarnation token."""
    return secrets.token_hex(4)


class MemoryLog:
    def __init__(
        self,
        *,
        retention_messages: int = 1_000_000,
        retention_bytes: int = 256 * 1024 * 1024,
        retention_seconds: float = 3600.0,
        retention_messages_per_topic: int = 0,  # 0: no limit
        dedupe_window_seconds: float = 120.0,
        max_watermark_topics: int = 100_000,
        max_dedupe_keys: int = 1_000_000,  # a memory bound: ~150 MB of keys at most
        clock: Callable[[], float] = time.time,
        epoch: str | None = None,
    ) -> None:
        self._retention_messages = retention_messages
        self._retention_bytes = retention_bytes
        self._retention_seconds = retention_seconds
        self._dedupe_window_seconds = dedupe_window_seconds
        self._max_watermark_topics = max_watermark_topics
        self._max_dedupe_keys = max_dedupe_keys
        self._clock = clock
        self._epoch = epoch or new_epoch()
        self._events: list[Event] = []
        self._head = 0  # index of the oldest retained event in _events
        self._base_seq = 1  # seq of _events[0]
        self._next_seq = 1
        self._bytes = 0
        self._watermarks: OrderedDict[str, int] = OrderedDict()  # topic -> highest trimmed seq
        self._watermark_floor = 0  # every trimmed seq <= floor may belong to any topic
        self._dedupe: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (seq, time)
        self._handlers: list[EventsHandler] = []
        self._trimmed = 0
        self._duplicates = 0
        self._per_topic = TopicLimit(retention_messages_per_topic)
        self._tombstones = 0  # in the retained range

    # -- the Log interface -------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def available(self) -> bool:
        return True

    @property
    def first_seq(self) -> int:
        return self._base_seq + self._head

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        return self.append_nowait(requests)

    def append_nowait(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        now = self._clock()
        self._expire_dedupe(now)
        results: list[AppendResult] = []
        stored: list[Event] = []
        batch_keys: dict[str, int] = {}
        per_topic_limit = self._per_topic.limit  # 0 (the default): no per-event work
        for request in requests:
            key = request.key
            if key is not None:
                seen = batch_keys.get(key)
                if seen is None and key in self._dedupe:
                    seen = self._dedupe[key][0]
                if seen is not None:
                    self._duplicates += 1
                    results.append(AppendResult(seen, duplicate=True))
                    continue
            event = Event(
                seq=self._next_seq,
                topic=request.topic,
                payload=request.payload,
                content_type=request.content_type,
                time=now,
                event=request.event,
                id=key,
                json_line=request.json_line,
            )
            self._next_seq += 1
            self._events.append(event)
            self._bytes += event_size(event)
            stored.append(event)
            if per_topic_limit:
                victim = self._per_topic.added(event)
                if victim is not None:
                    self._delete(victim)
            if key is not None:
                batch_keys[key] = event.seq
                self._dedupe[key] = (event.seq, now)
            results.append(AppendResult(event.seq))
        self._trim(now)
        if stored:
            for handler in self._handlers:
                handler(stored)
        return results

    async def read(self, filter: Filter, after_seq: int, limit: int) -> ReadResult:
        return self.read_nowait(filter, after_seq, limit)

    def read_nowait(self, filter: Filter, after_seq: int, limit: int) -> ReadResult:
        self._trim(self._clock())
        gap = None
        # Below first_seq everything is gone: one gap, up to the last the filter lost there.
        if after_seq + 1 < self.first_seq:
            lost_to = min(self._lost_up_to(filter), self.first_seq - 1)
            if lost_to > after_seq:
                gap = Gap(after_seq + 1, lost_to)
                after_seq = lost_to
        # Inside the retained range only the limit per topic deletes: per-topic gaps.
        topic_gaps = self._per_topic.gaps(filter, after_seq, self.first_seq)
        start = max(after_seq + 1, self.first_seq) - self._base_seq
        stop = min(len(self._events), start + MAX_SCAN_PER_READ)
        if start >= stop:
            return ReadResult((), max(after_seq, self.last_seq), gap, topic_gaps)
        out, end = scan_matching(self._events, start, stop, filter, limit)
        return ReadResult(out, self._base_seq + end - 1, gap, topic_gaps)

    def on_events(self, handler: EventsHandler) -> None:
        self._handlers.append(handler)

    def on_reset(self, handler: ResetHandler) -> None:
        """Never called: this log is created with the process and lives as long."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Trim by age once a second, so an idle broker still frees expired events."""
        task_status.started()
        while True:
            await trio.sleep(1.0)
            now = self._clock()
            self._trim(now)
            self._expire_dedupe(now)
            self._per_topic.forget_below(self.first_seq)

    def statistics(self) -> LogStatistics:
        return LogStatistics(
            epoch=self._epoch,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            retained_events=len(self._events) - self._head - self._tombstones,
            retained_bytes=self._bytes,
            trimmed_events=self._trimmed,
            duplicates=self._duplicates,
        )

    # -- retention ---------------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        events = self._events
        oldest_allowed = now - self._retention_seconds
        head = self._head
        trimmed = 0
        while head < len(events) and (
            len(events) - head - self._tombstones > self._retention_messages
            or self._bytes > self._retention_bytes
            or events[head].time < oldest_allowed
            or events[head].topic == TOMBSTONE_TOPIC  # the first retained event is a real one
        ):
            event = events[head]
            self._bytes -= event_size(event)
            if event.topic == TOMBSTONE_TOPIC:
                self._tombstones -= 1
            else:
                self._note_trimmed(event)
                self._per_topic.trimmed(event)
                trimmed += 1
            head += 1
        self._trimmed += trimmed
        self._head = head
        if head > 1024 and head * 2 > len(events):
            del events[:head]
            self._base_seq += head
            self._head = 0

    def _delete(self, seq: int) -> None:
        """Delete one event from inside the retained range (the limit per topic)."""
        index = seq - self._base_seq
        event = self._events[index]
        dead = self._events[index] = tombstone(event)
        self._bytes -= event_size(event) - event_size(dead)
        self._tombstones += 1
        self._trimmed += 1
        self._note_trimmed(event)

    def _note_trimmed(self, event: Event) -> None:
        watermarks = self._watermarks
        watermarks[event.topic] = event.seq
        watermarks.move_to_end(event.topic)
        if len(watermarks) > self._max_watermark_topics:
            _, seq = watermarks.popitem(last=False)
            self._watermark_floor = max(self._watermark_floor, seq)

    def _lost_up_to(self, filter: Filter) -> int:
        """The highest trimmed seq that could have matched ``filter`` (0 if none)."""
        lost = self._watermark_floor
        if filter.wildcards:
            for topic, seq in self._watermarks.items():
                if seq > lost and filter.matches(topic):
                    lost = seq
        else:
            for topic in filter.literals:
                lost = max(lost, self._watermarks.get(topic, 0))
        return lost

    def _expire_dedupe(self, now: float) -> None:
        dedupe = self._dedupe
        oldest_allowed = now - self._dedupe_window_seconds
        while dedupe:
            key, (_, stamp) = next(iter(dedupe.items()))
            if stamp >= oldest_allowed and len(dedupe) <= self._max_dedupe_keys:
                break
            del dedupe[key]
