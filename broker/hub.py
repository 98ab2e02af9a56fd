"""The hub routes each batch of new events to the matching subscriptions. Pure and synchronous.

Routing never awaits a subscriber: it cuts the batch into per-topic `Run`s (encode once, shared
by everyone) and calls `Subscription.push`, which is bounded and non-blocking. Each subscriber's
writer awaits its own socket elsewhere.

Matching is NATS' sublist idea: literal topics in a dict, wildcard patterns in a token trie,
and the result per topic cached until the set of subscriptions changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from broker.encoding import split_runs
from broker.model import Event, Pattern
from broker.subscription import Subscription

# Distinct topics whose match result is cached; past this the cache starts over. 10 k covers
# the "many topics" benchmark without letting a topic scan grow memory without bound.
MATCH_CACHE_TOPICS = 10_000


class _Node:
    __slots__ = ("children", "rest", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}  # token (or "*") -> node
        self.subs: dict[Subscription, None] = {}  # patterns ending here
        self.rest: dict[Subscription, None] = {}  # patterns ending here with ">"


class TopicIndex:
    """Which subscriptions match a topic."""

    def __init__(self) -> None:
        self._literal: dict[str, dict[Subscription, None]] = {}
        self._root = _Node()
        self._wildcards = 0
        self._cache: dict[str, tuple[Subscription, ...]] = {}

    def add(self, pattern: Pattern, sub: Subscription) -> None:
        self._cache.clear()
        if pattern.is_literal:
            self._literal.setdefault(pattern.text, {})[sub] = None
            return
        node = self._root
        for token in pattern.tokens:
            if token == ">":
                node.rest[sub] = None
                break
            node = node.children.setdefault(token, _Node())
        else:
            node.subs[sub] = None
        self._wildcards += 1

    def remove(self, pattern: Pattern, sub: Subscription) -> None:
        self._cache.clear()
        if pattern.is_literal:
            subs = self._literal.get(pattern.text)
            if subs is not None:
                subs.pop(sub, None)
                if not subs:
                    del self._literal[pattern.text]
            return
        path = [self._root]
        for token in pattern.tokens:
            if token == ">":
                found = path[-1].rest.pop(sub, 0) is None
                break
            child = path[-1].children.get(token)
            if child is None:
                return
            path.append(child)
        else:
            found = path[-1].subs.pop(sub, 0) is None
        if not found:
            return
        self._wildcards -= 1
        # prune empty branches so that churn does not leave a growing trie behind
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or node.subs or node.rest:
                break
            del path[depth - 1].children[pattern.tokens[depth - 1]]

    def match(self, topic: str) -> tuple[Subscription, ...]:
        found = self._cache.get(topic)
        if found is not None:
            return found
        literal = self._literal.get(topic)
        if not self._wildcards:
            found = tuple(literal) if literal else ()
        else:
            subs: dict[Subscription, None] = dict(literal) if literal else {}
            self._walk(self._root, topic.split("."), 0, subs)
            found = tuple(subs)
        if len(self._cache) >= MATCH_CACHE_TOPICS:
            self._cache.clear()
        self._cache[topic] = found
        return found

    def _walk(self, node: _Node, tokens: list[str], i: int, out: dict[Subscription, None]) -> None:
        if i < len(tokens) and node.rest:
            out.update(node.rest)
        if i == len(tokens):
            out.update(node.subs)
            return
        child = node.children.get(tokens[i])
        if child is not None:
            self._walk(child, tokens, i + 1, out)
        star = node.children.get("*")
        if star is not None:
            self._walk(star, tokens, i + 1, out)


@dataclass(frozen=True, slots=True)
class HubStatistics:
    subscriptions: int
    routed_seq: int
    routed_events: int
    routed_runs: int
    pushes: int


class Hub:
    def __init__(self, *, routed_seq: int = 0) -> None:
        self._index = TopicIndex()
        self._subscriptions: dict[Subscription, None] = {}
        # Every event with seq <= routed_seq has been offered to the subscriptions.
        self.routed_seq = routed_seq
        # The clock (trio's) when the router began routing the current batch: the outlets that
        # write from inside `route` note it as the time of their last write.
        self.now = 0.0
        self.routed_events = 0
        self.routed_runs = 0
        self.pushes = 0
        self.holes = 0

    def add(self, sub: Subscription) -> None:
        self._subscriptions[sub] = None
        for pattern in sub.filter.patterns:
            self._index.add(pattern, sub)

    def discard(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            del self._subscriptions[sub]
            for pattern in sub.filter.patterns:
                self._index.remove(pattern, sub)

    def route(self, events: Sequence[Event]) -> None:
        """Offer ``events`` (seq-ordered, all newer than `routed_seq`) to every subscription."""
        if not events:
            return
        if events[-1].seq - self.routed_seq != len(events):  # a seq is missing (seqs increase)
            # The log deleted events before this node could follow them (JetStream's limits can;
            # the memory log cannot): nobody may skip them silently, so every live subscription
            # goes back through the log, whose read reports the loss as a gap.
            self.holes += 1
            for sub in self._subscriptions:
                sub.fall_behind()
        match = self._index.match
        for run in split_runs(events):
            subs = match(run.topic)
            for sub in subs:
                sub.push(run)
            self.pushes += len(subs)
            self.routed_runs += 1
        self.routed_events += len(events)
        self.routed_seq = events[-1].seq

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subscriptions))

    def __len__(self) -> int:
        return len(self._subscriptions)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            subscriptions=len(self._subscriptions),
            routed_seq=self.routed_seq,
            routed_events=self.routed_events,
            routed_runs=self.routed_runs,
            pushes=self.pushes,
        )
