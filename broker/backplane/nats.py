"""`JetStreamLog`: the cluster's log, one JetStream stream that every node follows. This is the
only module that imports nats-py (and, with it, asyncio).

nats-py runs on the asyncio loop that trio-asyncio hosts, in this thread. Crossing into it costs
~200 µs, so it happens once per *batch*: one ``aio_as_trio`` call per append request and per
deep read. New events come the other way without any crossing: the follower's asyncio callback
appends to a list and wakes a trio task with a synchronous call, and that task announces
everything that accumulated as one batch.

- ``seq`` is the JetStream stream sequence, so it is the same on every node; the ``epoch`` is
  derived from the stream's creation time, so a recreated stream is a new incarnation.
- Each node keeps a recent window of the stream in memory (`Window`), held to the stream's own
  retention limits so that every node answers the same; most resumes never ask NATS. Older
  positions are read from JetStream with an ephemeral consumer filtered by the subscription's
  subjects, starting at the requested seq.
- Gaps from JetStream are conservative: anything before the stream's first retained seq may be
  lost (JetStream keeps no record of what it deleted, per subject). With a limit of messages
  per subject, a subject at its limit whose first retained message comes after the position may
  have lost what lies between: a per-topic gap. The window applies the same limit to what it
  has followed and knows exactly what it deleted.
- A stream deleted under a running node is created anew by it (its limits are the node's
  configuration): a new incarnation. The node stops following the old one as soon as JetStream
  announces the deletion (an advisory), then takes the new epoch, tells its handlers (every
  subscriber gets ``reset``) and follows the new stream from its start.
- A seq the follower never saw (the stream deleted it before this node followed it) is a hole:
  the window then restarts after it, so reads of that range go to the stream.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import nats
import trio
import trio_asyncio
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig, StreamInfo
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from broker.backplane.base import (
    MAX_SCAN_PER_READ,
    AppendResult,
    EventsHandler,
    LogStatistics,
    ReadResult,
    ResetHandler,
    TopicLimit,
    scan_matching,
    tombstone,
)
from broker.errors import Unavailable
from broker.model import AppendRequest, Event, Filter, Gap, event_size

logger = logging.getLogger("broker.nats")

HEADER_CONTENT_TYPE = "Content-Type"
HEADER_EVENT = "Broker-Event"
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream's own dedupe header: our Idempotency-Key
DEFAULT_CONTENT_TYPE = "application/octet-stream"
PUBLISH_TIMEOUT_SECONDS = 5.0
DEEP_READ_TIMEOUT_SECONDS = 5.0
STREAM_SETUP_SECONDS = 60.0  # how long a starting node waits for JetStream to take its stream
HALF_MADE_SECONDS = 5.0  # how long it waits for a stream that exists and is not found


class Window:
    """The stream's most recent events, in seq order, held to the stream's retention limits."""

    def __init__(
        self,
        *,
        max_events: int,
        max_bytes: int,
        max_age_seconds: float,
        max_per_topic: int = 0,
    ) -> None:
        self._events: list[Event] = []
        self._seqs: list[int] = []
        self._head = 0
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_age_seconds = max_age_seconds
        self.per_topic = TopicLimit(max_per_topic)
        # Every event with seq > start that the node has followed is here.
        self.start = 0

    def reset(self, start: int) -> None:
        self._events, self._seqs, self._head, self._bytes = [], [], 0, 0
        self.per_topic.clear()
        self.start = start

    def extend(self, events: Sequence[Event]) -> None:
        per_topic_limit = self.per_topic.limit  # 0 (the default): no per-event work
        for event in events:
            self._events.append(event)
            self._seqs.append(event.seq)
            self._bytes += event_size(event)
            victim = self.per_topic.added(event) if per_topic_limit else None
            if victim is not None:
                index = bisect.bisect_left(self._seqs, victim, self._head)
                dead = tombstone(self._events[index])
                self._bytes -= event_size(self._events[index]) - event_size(dead)
                self._events[index] = dead

    def trim(self, now: float, *, below: int = 0) -> None:
        """Drop events past the window's own limits, older than the stream keeps, or with a
        seq below ``below`` (the stream's first seq: the stream deleted them)."""
        oldest = now - self._max_age_seconds
        events, head = self._events, self._head
        while head < len(events) and (
            len(events) - head > self._max_events
            or self._bytes > self._max_bytes
            or events[head].time < oldest
            or events[head].seq < below
        ):
            self._bytes -= event_size(events[head])
            self.per_topic.trimmed(events[head])
            self.start = events[head].seq
            head += 1
        self._head = head
        self.start = max(self.start, below - 1)
        if head > 1024 and head * 2 > len(events):
            del events[:head], self._seqs[:head]
            self._head = 0

    def __len__(self) -> int:
        return len(self._events) - self._head

    @property
    def bytes(self) -> int:
        return self._bytes

    def read(self, filter: Filter, after_seq: int, limit: int, last_seq: int) -> ReadResult:
        events = self._events
        start = max(bisect.bisect_right(self._seqs, after_seq), self._head)
        stop = min(len(events), start + MAX_SCAN_PER_READ)
        out, end = scan_matching(events, start, stop, filter, limit)
        # The stream's own first seq is at or below start: marks below start are forgotten.
        topic_gaps = self.per_topic.gaps(filter, after_seq, self.start + 1)
        if end < len(events):  # the limit or the scan cap stopped it
            return ReadResult(out, events[end - 1].seq, None, topic_gaps)
        return ReadResult(out, max(after_seq, last_seq), None, topic_gaps)


def _after_last_hole(events: Sequence[Event]) -> int:
    """The index of the first event after the last missing seq (0: the hole is before them)."""
    for i in range(len(events) - 1, 0, -1):
        if events[i].seq != events[i - 1].seq + 1:
            return i
    return 0


def _epoch_of(info: StreamInfo) -> str:
    """A short, stable token for this incarnation of the stream."""
    created = info.created.isoformat() if info.created is not None else ""
    return hashlib.sha256(f"{info.config.name}/{created}".encode()).hexdigest()[:8]


def _window_of(info: StreamInfo) -> tuple[int, int]:
    """(first_seq, last_seq), with first_seq = last_seq + 1 when nothing is retained (JetStream
    says 0 for an empty stream)."""
    state = info.state
    if state.messages == 0:
        return state.last_seq + 1, state.last_seq
    return state.first_seq, state.last_seq


class JetStreamLog:
    def __init__(
        self,
        servers: Sequence[str],
        *,
        stream: str = "BROKER",
        subject_prefix: str = "broker.t",
        replicas: int = 1,
        retention_messages: int = 1_000_000,
        retention_bytes: int = 256 * 1024 * 1024,
        retention_seconds: float = 3600.0,
        retention_messages_per_topic: int = 0,  # 0: no limit
        dedupe_window_seconds: float = 120.0,
        window_events: int = 100_000,
        window_bytes: int = 64 * 1024 * 1024,
        refresh_seconds: float = 0.5,
    ) -> None:
        self._servers = list(servers)
        self._stream = stream
        self._prefix = subject_prefix
        self._config = StreamConfig(
            name=stream,
            subjects=[f"{subject_prefix}.>"],
            num_replicas=replicas,
            max_msgs=retention_messages,
            max_bytes=retention_bytes,
            max_age=retention_seconds,
            max_msgs_per_subject=retention_messages_per_topic or -1,
            # JetStream refuses a duplicate window longer than the stream's max age
            duplicate_window=min(dedupe_window_seconds, retention_seconds),
        )
        if dedupe_window_seconds > retention_seconds:
            logger.warning(
                "the idempotency window is cut to the retention age",
                extra={"dedupe_window_seconds": retention_seconds},
            )
        self._per_topic_limit = retention_messages_per_topic
        self._window = Window(
            max_events=window_events,
            max_bytes=window_bytes,
            max_age_seconds=retention_seconds,
            max_per_topic=retention_messages_per_topic,
        )
        self._refresh_seconds = refresh_seconds
        self._handlers: list[EventsHandler] = []
        self._reset_handlers: list[ResetHandler] = []
        self._incoming: list[Event] = []
        self._arrived = trio.lowlevel.ParkingLot()
        self._epoch = ""
        self._first_seq = 1  # the stream's, as last learned from the server
        self._last_seq = 0  # the last event this node has followed
        self._stream_messages = 0
        self._stream_bytes = 0
        self._duplicates = 0
        self._loop: Any = None
        self._nc: Any = None
        self._js: Any = None
        self._follower: Any = None
        self._refollowing: asyncio.Task[None] | None = None
        self.connected = False

    # -- the Log interface -------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def available(self) -> bool:
        return self.connected

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def on_events(self, handler: EventsHandler) -> None:
        self._handlers.append(handler)

    def on_reset(self, handler: ResetHandler) -> None:
        self._reset_handlers.append(handler)

    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        if not requests:
            return []
        results: list[AppendResult] = await self._aio(self._aio_append)(requests)
        self._duplicates += sum(r.duplicate for r in results)
        return results

    async def read(self, filter: Filter, after_seq: int, limit: int) -> ReadResult:
        gap = None
        if after_seq + 1 < self._first_seq:  # the stream no longer holds the start of it
            gap = Gap(after_seq + 1, self._first_seq - 1)
            after_seq = self._first_seq - 1
        self._window.trim(time.time(), below=self._first_seq)
        if after_seq >= self._window.start:
            page = self._window.read(filter, after_seq, limit, self._last_seq)
            return ReadResult(page.events, page.scanned_to, gap, page.topic_gaps)
        deep: ReadResult = await self._aio(self._aio_read)(filter, after_seq, limit)
        if gap is not None:  # the deep read may have found the stream shrunk further
            to_seq = deep.gap.to_seq if deep.gap is not None else gap.to_seq
            return ReadResult(
                deep.events, deep.scanned_to, Gap(gap.from_seq, to_seq), deep.topic_gaps
            )
        return deep

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio_asyncio.open_loop() as loop:
            # Kept, so that any trio task (a request handler) can cross into this loop: the
            # loop is otherwise found through a context variable only our children inherit.
            self._loop = loop
            await self._aio(self._aio_start)()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._announce)
                    nursery.start_soon(self._refresh)
                    task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    await self._aio(self._aio_close)()

    def _aio(self, proc: Any) -> Any:
        if self._loop is None:
            raise Unavailable("the backplane is not running")
        return trio_asyncio.aio_as_trio(proc, loop=self._loop)

    def statistics(self) -> LogStatistics:
        """The stream's state as last learned (retention is the stream's, not this node's)."""
        return LogStatistics(
            epoch=self._epoch,
            first_seq=self._first_seq,
            last_seq=self._last_seq,
            retained_events=self._stream_messages,
            retained_bytes=self._stream_bytes,
            trimmed_events=self._first_seq - 1,  # the stream began at seq 1
            duplicates=self._duplicates,
        )

    # -- trio side ---------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Learn the stream's retained window: JetStream deletes by its limits without telling
        its consumers, so the first seq (and the gaps it implies) come from asking."""
        while True:
            await trio.sleep(self._refresh_seconds)
            if self.connected:
                try:
                    await self._aio(self._aio_refresh)()
                except Unavailable as exc:
                    logger.warning("cannot read the stream's state", extra={"error": str(exc)})
            self._window.per_topic.forget_below(self._first_seq)

    async def _announce(self) -> None:
        """Hand what the follower received to the handlers, one batch per wake-up."""
        while True:
            if not self._incoming:
                await self._arrived.park()
            batch, self._incoming = self._incoming, []
            if batch[0].seq <= self._last_seq:  # redelivered after the consumer was recreated
                batch = [event for event in batch if event.seq > self._last_seq]
                if not batch:
                    continue
            if batch[-1].seq - self._last_seq != len(batch):
                # The stream deleted some seqs before we followed them (a hole): the window must
                # not claim to hold them, so it restarts after the last hole and reads of the
                # range go to the stream (which reports the loss as a gap).
                after_hole = _after_last_hole(batch)
                self._window.reset(batch[after_hole].seq - 1)
                self._window.extend(batch[after_hole:])
            else:
                self._window.extend(batch)
            self._window.trim(time.time(), below=self._first_seq)
            self._last_seq = batch[-1].seq
            for handler in self._handlers:
                handler(batch)

    # -- asyncio side (runs on the trio-asyncio loop) -------------------------------------------

    async def _aio_start(self) -> None:
        async def disconnected() -> None:
            self.connected = False
            logger.warning("nats disconnected")

        async def reconnected() -> None:
            logger.info("nats reconnected", extra={"server": str(self._nc.connected_url)})
            # The ordered consumer does not survive a server restart: follow again from where
            # this node stopped, so that nothing stored while we were away is missed. While the
            # cluster elects a new stream leader this fails for a while: keep trying.
            if self._refollowing is None or self._refollowing.done():
                self._refollowing = asyncio.get_running_loop().create_task(self._aio_refollow())

        async def error(exc: Exception) -> None:
            logger.warning("nats error", extra={"error": repr(exc)})

        self._nc = await nats.connect(
            servers=self._servers,
            name="broker",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self.connected = True
        self._js = self._nc.jetstream()
        try:
            info = await self._aio_ensure_stream()
        except Unavailable:  # the node will not start: leave nothing open behind it
            await self._nc.close()
            raise
        self._epoch = _epoch_of(info)
        self._learn(info)
        self._last_seq = info.state.last_seq
        self._window.reset(self._last_seq)
        await self._nc.subscribe(
            f"$JS.EVENT.ADVISORY.STREAM.DELETED.{self._stream}", cb=self._aio_stream_deleted
        )
        await self._aio_follow()

    async def _aio_ensure_stream(self) -> StreamInfo:
        """Create the stream, or adopt it with our limits. A NATS cluster that is still electing
        its JetStream leaders refuses for a while (503): retried until `STREAM_SETUP_SECONDS`.
        A node racing us may have the stream half made, so that it exists for `add_stream` and is
        not found for `update_stream` (seen with three nodes starting together on a 3-server
        cluster): retried for `HALF_MADE_SECONDS`. After that, or for any other refusal,
        `add_stream`'s reason is final (e.g. the subjects overlap another stream's)."""
        now = asyncio.get_running_loop().time
        deadline, half_made_until = now() + STREAM_SETUP_SECONDS, now() + HALF_MADE_SECONDS
        delay = 0.1
        while True:
            error: Exception
            try:
                try:
                    info: StreamInfo = await self._js.add_stream(self._config)
                    return info
                except BadRequestError as refused:  # it exists with other limits: adopt it
                    try:
                        info = await self._js.update_stream(self._config)
                        return info
                    except NotFoundError as exc:  # half made by a node racing us, or refused
                        if now() > half_made_until:
                            raise Unavailable(
                                f"JetStream refused the stream: {refused.description}"
                            ) from exc
                        error = exc
            except ServiceUnavailableError as exc:
                error = exc
            except APIError as exc:
                raise Unavailable(f"JetStream refused the stream: {exc.description}") from exc
            except (NatsError, TimeoutError) as exc:
                error = exc
            if now() > deadline:
                raise Unavailable(f"cannot create or adopt the stream: {error!r}") from error
            logger.warning("stream not ready yet", extra={"error": repr(error)})
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _aio_refollow(self) -> None:
        delay = 0.1
        while not self._nc.is_closed:
            try:
                await self._aio_follow()
            except (NatsError, TimeoutError) as exc:
                logger.warning("cannot follow the stream yet", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
            else:
                self.connected = True
                return

    async def _aio_follow(self) -> None:
        """(Re)start the ordered consumer right after the last event this node followed."""
        if self._follower is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._follower.unsubscribe()
        seen = self._incoming[-1].seq if self._incoming else self._last_seq
        self._follower = await self._js.subscribe(
            f"{self._prefix}.>",
            stream=self._stream,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=seen + 1,
            ),
        )
        logger.info(
            "following the stream",
            extra={"stream": self._stream, "epoch": self._epoch, "from_seq": seen + 1},
        )

    async def _aio_refresh(self) -> StreamInfo:
        try:
            try:
                info: StreamInfo = await self._js.stream_info(self._stream)
            except NotFoundError:  # deleted: it is our configuration, so it exists again
                logger.warning(
                    "the stream is gone; creating it anew", extra={"stream": self._stream}
                )
                info = await self._aio_ensure_stream()
        except (TimeoutError, NatsError) as exc:
            raise Unavailable(f"the backplane is unreachable: {exc!r}") from exc
        if _epoch_of(info) != self._epoch:
            await self._aio_new_incarnation(info)
        self._learn(info)
        return info

    async def _aio_stream_deleted(self, msg: Any) -> None:
        """JetStream's advisory: stop following now, so that nothing of a stream created under
        the same name is taken for the old one; the refresh takes the new incarnation."""
        logger.warning("the stream was deleted", extra={"stream": self._stream})
        if self._follower is not None:
            follower, self._follower = self._follower, None
            with contextlib.suppress(NatsError, TimeoutError):
                await follower.unsubscribe()
        self._incoming.clear()

    async def _aio_new_incarnation(self, info: StreamInfo) -> None:
        self._epoch = _epoch_of(info)
        logger.warning("following a new incarnation of the stream", extra={"epoch": self._epoch})
        self._incoming.clear()
        self._last_seq = 0
        self._window.reset(0)
        for handler in self._reset_handlers:
            handler(self._epoch)
        await self._aio_follow()  # from seq 1

    def _learn(self, info: StreamInfo) -> None:
        self._first_seq = _window_of(info)[0]
        self._stream_messages = info.state.messages
        self._stream_bytes = info.state.bytes

    async def _aio_close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def _on_message(self, msg: Any) -> None:
        self._incoming.append(self._event_of(msg))
        if len(self._arrived):
            self._arrived.unpark_all()  # a synchronous hand-off: same thread, no crossing

    def _event_of(self, msg: Any) -> Event:
        meta = msg.metadata
        headers = msg.headers or {}
        return Event(
            seq=meta.sequence.stream,
            topic=msg.subject[len(self._prefix) + 1 :],
            payload=msg.data,
            content_type=headers.get(HEADER_CONTENT_TYPE, DEFAULT_CONTENT_TYPE),
            time=meta.timestamp.timestamp(),
            event=headers.get(HEADER_EVENT),
            id=headers.get(HEADER_MSG_ID),
        )

    async def _aio_append(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        js = self._js

        def publish(request: AppendRequest) -> Any:
            headers = {HEADER_CONTENT_TYPE: request.content_type}
            if request.event is not None:
                headers[HEADER_EVENT] = request.event
            if request.key is not None:
                headers[HEADER_MSG_ID] = request.key
            return js.publish(
                f"{self._prefix}.{request.topic}",
                request.payload,
                timeout=PUBLISH_TIMEOUT_SECONDS,
                stream=self._stream,
                headers=headers,
            )

        try:
            # Started in order, so they reach the server (and get their seqs) in order.
            acks = await asyncio.gather(*(publish(r) for r in requests))
        except (TimeoutError, NatsError) as exc:
            raise Unavailable(f"the backplane did not store the message: {exc!r}") from exc
        return [AppendResult(ack.seq, duplicate=bool(ack.duplicate)) for ack in acks]

    async def _aio_read(self, filter: Filter, after_seq: int, limit: int) -> ReadResult:
        epoch = self._epoch
        info = await self._aio_refresh()
        if self._epoch != epoch:  # ``after_seq`` was a position in the old stream
            return ReadResult((), after_seq)  # the reader was reset; this answer is not used
        first, last = _window_of(info)
        gap = None
        if after_seq + 1 < first:
            gap = Gap(after_seq + 1, first - 1)
            after_seq = first - 1
        if after_seq >= last:
            return ReadResult((), max(after_seq, self._last_seq), gap)
        subjects = [f"{self._prefix}.{p.text}" for p in filter.patterns]
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after_seq + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=DEEP_READ_TIMEOUT_SECONDS,
            mem_storage=True,
        )
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = subjects
        try:
            pull = await self._js.pull_subscribe(subjects[0], stream=self._stream, config=config)
            try:
                pending = (await pull.consumer_info()).num_pending
                messages = []
                if pending:
                    messages = await pull.fetch(
                        min(limit, pending), timeout=DEEP_READ_TIMEOUT_SECONDS
                    )
            finally:
                await pull.unsubscribe()
        except (TimeoutError, NatsError) as exc:
            raise Unavailable(f"the backplane did not answer a history read: {exc!r}") from exc
        events = [self._event_of(m) for m in messages]
        topic_gaps = await self._aio_topic_gaps(subjects, after_seq)
        if len(events) >= limit:
            return ReadResult(events, events[-1].seq, gap, topic_gaps)
        scanned = max(last, events[-1].seq if events else 0)
        return ReadResult(events, scanned, gap, topic_gaps)

    async def _aio_topic_gaps(self, subjects: Sequence[str], after_seq: int) -> list[Gap]:
        """With a limit per subject: a subject at its limit whose first retained message comes
        after ``after_seq`` may have lost messages in between (conservative: JetStream does not
        say what it deleted). Costs one stream info per pattern and one get per such subject."""
        if not self._per_topic_limit:
            return []
        try:
            full: set[str] = set()
            for subject in subjects:
                info = await self._js.stream_info(self._stream, subjects_filter=subject)
                counts = info.state.subjects or {}
                full.update(s for s, n in counts.items() if n >= self._per_topic_limit)
            ordered = sorted(full)
            firsts = await asyncio.gather(
                *(self._js.get_msg(self._stream, seq=1, subject=s, next=True) for s in ordered),
                return_exceptions=True,
            )
        except (TimeoutError, NatsError) as exc:
            raise Unavailable(f"the backplane did not answer a history read: {exc!r}") from exc
        gaps = []
        for subject, first in zip(ordered, firsts, strict=True):
            if isinstance(first, BaseException):
                if isinstance(first, NotFoundError):  # deleted since: nothing retained
                    continue
                raise Unavailable(f"the backplane did not answer a history read: {first!r}")
            if first.seq - 1 > after_seq:
                gaps.append(Gap(after_seq + 1, first.seq - 1, subject[len(self._prefix) + 1 :]))
        return gaps
