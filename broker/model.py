"""The core vocabulary: events, positions, topics, patterns and filters. Pure: no I/O.

A topic is ``[A-Za-z0-9_-]`` tokens joined by ``.``, at most 16 tokens and 255 bytes, so that it
maps one to one onto a NATS subject. A subscription names topics or NATS-style patterns: ``*``
matches exactly one token, ``>`` (last token only) matches one or more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.errors import Problem, RequestError

MAX_TOPIC_TOKENS = 16  # NATS subjects have no limit; 16 keeps the match trie shallow
MAX_TOPIC_BYTES = 255  # a NATS subject is conventionally kept under 256 bytes
MAX_EVENT_NAME_BYTES = 64
MAX_IDEMPOTENCY_KEY_BYTES = 200
MAX_SEQ = 2**63 - 1  # JetStream sequences are uint64; we stay within a signed 64-bit integer

_TOKEN = re.compile(r"[A-Za-z0-9_-]+\Z")
# A whole valid topic in one match (the usual case, once per published event); what fails it
# is checked token by token for the precise error.
_TOPIC = re.compile(rf"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){{0,{MAX_TOPIC_TOKENS - 1}}}\Z")
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}\Z")
_DIGITS = re.compile(r"[0-9]{1,19}\Z")

# Event names the broker itself uses for control events on SSE; a publisher may not borrow them.
RESERVED_EVENT_NAMES = frozenset({"gap", "reset"})


@dataclass(frozen=True, slots=True)
class Event:
    """One published message. Immutable; shared by every subscriber and every transport."""

    seq: int
    topic: str
    payload: bytes
    content_type: str
    time: float  # publish time, seconds since the Unix epoch
    event: str | None = None  # the SSE event name, if the publisher set one
    id: str | None = None  # the publisher's idempotency key, if any
    # The payload is known to be valid JSON on one line (the broker serialised it from a JSON
    # value): NDJSON and WebSocket splice it without parsing it again (~2.4 us per event).
    json_line: bool = field(default=False, compare=False, repr=False)


# What an event costs in memory beyond its payload and topic: the object, its fields, the float.
# Used for buffer and retention accounting so that empty payloads are not free.
EVENT_OVERHEAD_BYTES = 120


def event_size(event: Event) -> int:
    """Bytes an event is charged in buffers and in the log's retention."""
    return len(event.payload) + len(event.topic) + EVENT_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Gap:
    """Control event: events with seq in [from_seq, to_seq] may be missing for this client.

    With a ``topic``, only that topic's events in the range may be missing (retention by
    messages per topic deletes inside the retained range); other topics' events in the range
    still follow, so the client's position does not move past the range.
    """

    from_seq: int
    to_seq: int
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    """Control event: the log was replaced (new epoch); the client's position means nothing now."""

    epoch: str


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in the log: the log's incarnation (epoch) and the last seq it has seen.

    Written ``<epoch>:<seq>`` (the SSE ``id``). A bare ``<seq>`` has no epoch and is trusted to
    belong to the current log.
    """

    seq: int
    epoch: str | None = None

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}" if self.epoch is not None else str(self.seq)


def parse_position(text: str) -> Position:
    """Parse ``<seq>`` or ``<epoch>:<seq>``; raise `RequestError` (bad-position) otherwise."""
    epoch: str | None
    text = text.strip()
    if ":" in text:
        epoch, _, digits = text.rpartition(":")
        if not _EPOCH.match(epoch):
            raise RequestError(Problem.BAD_POSITION, f"invalid epoch in position {text[:80]!r}")
    else:
        epoch, digits = None, text
    if not _DIGITS.match(digits) or int(digits) > MAX_SEQ:
        raise RequestError(
            Problem.BAD_POSITION,
            f"position must be a sequence number 0..{MAX_SEQ}, "
            f"optionally prefixed by '<epoch>:', got {text[:80]!r}",
        )
    return Position(int(digits), epoch)


def _check_length(text: str, problem: Problem, what: str) -> list[str]:
    if not text:
        raise RequestError(problem, f"{what} is empty")
    # surrogatepass: a lone surrogate (JSON "\ud800" decodes to one) must reach the token check
    # and be refused with a RequestError, not crash the encoder with UnicodeEncodeError.
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise RequestError(problem, f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    tokens = text.split(".")
    if len(tokens) > MAX_TOPIC_TOKENS:
        raise RequestError(problem, f"{what} has more than {MAX_TOPIC_TOKENS} tokens")
    return tokens


def validate_topic(text: str) -> str:
    """Return ``text`` if it is a valid topic, else raise `RequestError` (bad-topic)."""
    if len(text) <= MAX_TOPIC_BYTES and _TOPIC.match(text):  # ASCII: characters are bytes
        return text
    for token in _check_length(text, Problem.BAD_TOPIC, "topic"):
        if not _TOKEN.match(token):
            raise RequestError(
                Problem.BAD_TOPIC,
                f"topic {text[:80]!r}: each '.'-separated token must be 1 or more of "
                "[A-Za-z0-9_-] (wildcards are for subscriptions only)",
            )
    return text


@dataclass(frozen=True, slots=True)
class Pattern:
    """A topic or a wildcard pattern. ``*`` is one token; a final ``>`` is one or more."""

    text: str
    tokens: tuple[str, ...] = field(compare=False)

    @property
    def is_literal(self) -> bool:
        return "*" not in self.tokens and ">" not in self.tokens

    def matches(self, topic: str) -> bool:
        parts = topic.split(".")
        for i, token in enumerate(self.tokens):
            if token == ">":
                return len(parts) > i
            if i >= len(parts) or (token != "*" and token != parts[i]):
                return False
        return len(parts) == len(self.tokens)


def parse_pattern(text: str) -> Pattern:
    """Parse a subscription subject; raise `RequestError` (bad-pattern) if invalid."""
    tokens = _check_length(text, Problem.BAD_PATTERN, "pattern")
    for i, token in enumerate(tokens):
        if token == "*" or (token == ">" and i == len(tokens) - 1):
            continue
        if not _TOKEN.match(token):
            raise RequestError(
                Problem.BAD_PATTERN,
                f"pattern {text[:80]!r}: tokens are [A-Za-z0-9_-]+, '*' for one token, "
                "or '>' as the last token for one or more",
            )
    return Pattern(text, tuple(tokens))


@dataclass(frozen=True, slots=True)
class Filter:
    """What a subscription receives: the union of some topics and patterns."""

    patterns: tuple[Pattern, ...]
    literals: frozenset[str] = field(init=False, compare=False)
    wildcards: tuple[Pattern, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "literals", frozenset(p.text for p in self.patterns if p.is_literal)
        )
        object.__setattr__(self, "wildcards", tuple(p for p in self.patterns if not p.is_literal))

    @classmethod
    def parse(cls, subjects: Iterable[str], *, max_topics: int = 64) -> Filter:
        unique = list(dict.fromkeys(subjects))
        if not unique:
            raise RequestError(Problem.MISSING_TOPIC, "name at least one topic or pattern")
        if len(unique) > max_topics:  # before parsing: a huge list costs nothing to refuse
            raise RequestError(
                Problem.TOO_MANY_TOPICS,
                f"{len(unique)} topics or patterns given, at most {max_topics} are allowed",
            )
        return cls(tuple(parse_pattern(subject) for subject in unique))

    def matches(self, topic: str) -> bool:
        return topic in self.literals or any(p.matches(topic) for p in self.wildcards)

    def __str__(self) -> str:
        return ",".join(p.text for p in self.patterns)


def validate_event_name(name: str) -> str:
    if not _EVENT_NAME.match(name):
        raise RequestError(
            Problem.BAD_EVENT_NAME,
            f"event name must be 1-{MAX_EVENT_NAME_BYTES} of [A-Za-z0-9_.:-], got {name[:80]!r}",
        )
    if name in RESERVED_EVENT_NAMES:
        raise RequestError(
            Problem.BAD_EVENT_NAME, f"event name {name!r} is reserved for control events"
        )
    return name


def validate_idempotency_key(key: str) -> str:
    if not _IDEMPOTENCY_KEY.match(key):
        raise RequestError(
            Problem.BAD_IDEMPOTENCY_KEY,
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII characters "
            "without spaces",
        )
    return key


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One message to store. Validated by the caller (topic, event name, key, size)."""

    topic: str
    payload: bytes
    content_type: str = "application/octet-stream"
    event: str | None = None
    key: str | None = None  # idempotency key
    json_line: bool = field(default=False, compare=False, repr=False)  # see `Event.json_line`
