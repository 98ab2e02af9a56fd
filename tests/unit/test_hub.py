"""Topic matching and routing (broker/hub.py)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import broker.hub
from broker.encoding import Run
from broker.hub import Hub, HubStatistics, TopicIndex
from broker.model import Event, Filter, parse_pattern
from broker.subscription import OverflowPolicy, State, Subscription


def make_sub(*subjects: str, sub_id: str = "s", position: int = 0) -> Subscription:
    return Subscription(
        sub_id,
        Filter.parse(subjects),
        position=position,
        live=True,
        buffer_events=1_000_000,
        buffer_bytes=1 << 30,
        policy=OverflowPolicy.CATCHUP,
    )


def index_of(*subs: Subscription) -> TopicIndex:
    index = TopicIndex()
    for sub in subs:
        for pattern in sub.filter.patterns:
            index.add(pattern, sub)
    return index


def unindex(index: TopicIndex, *subs: Subscription) -> None:
    for sub in subs:
        for pattern in sub.filter.patterns:
            index.remove(pattern, sub)


def events(*topics: str, first_seq: int = 1) -> list[Event]:
    return [
        Event(seq=first_seq + i, topic=t, payload=b"", content_type="t", time=0.0)
        for i, t in enumerate(topics)
    ]


def taken_seqs(sub: Subscription) -> list[int]:
    out: list[int] = []
    for item in sub.take():
        assert isinstance(item, Run)
        out.extend(e.seq for e in item.events)
    return out


# -- TopicIndex ------------------------------------------------------------------------------


def test_literal_matches_only_itself() -> None:
    sub = make_sub("orders.eu")
    index = index_of(sub)
    assert index.match("orders.eu") == (sub,)
    for topic in ["orders", "orders.eu.x", "orders.us", "x.orders.eu"]:
        assert index.match(topic) == (), topic


def test_star_matches_exactly_one_token() -> None:
    sub = make_sub("orders.*.created")
    index = index_of(sub)
    assert index.match("orders.eu.created") == (sub,)
    assert index.match("orders.us.created") == (sub,)
    for topic in ["orders.created", "orders.eu.x.created", "orders.eu.deleted", "orders.eu"]:
        assert index.match(topic) == (), topic


def test_trailing_star() -> None:
    sub = make_sub("a.*")
    index = index_of(sub)
    assert index.match("a.b") == (sub,)
    assert index.match("a") == ()
    assert index.match("a.b.c") == ()


def test_gt_matches_one_or_more_tokens() -> None:
    sub = make_sub("orders.>")
    index = index_of(sub)
    assert index.match("orders.eu") == (sub,)
    assert index.match("orders.eu.created.late") == (sub,)
    assert index.match("orders") == ()  # ">" needs at least one token
    assert index.match("other.eu") == ()


def test_lone_gt_and_star_match_everything_of_their_depth() -> None:
    everything, one_token = make_sub(">", sub_id="all"), make_sub("*", sub_id="one")
    index = index_of(everything, one_token)
    assert set(index.match("a")) == {everything, one_token}
    assert index.match("a.b.c") == (everything,)


def test_several_patterns_of_one_subscription_yield_it_once() -> None:
    sub = make_sub("chat.lobby", "chat.*", "chat.>", "*.lobby", ">")
    other = make_sub("chat.*", sub_id="other")
    index = index_of(sub, other)
    found = index.match("chat.lobby")
    assert sorted(s.id for s in found) == ["other", "s"]
    assert len(found) == 2


def test_literal_and_wildcard_subscribers_together() -> None:
    exact, star, rest = (
        make_sub("a.b", sub_id="x"),
        make_sub("a.*", sub_id="y"),
        make_sub("a.>", sub_id="z"),
    )
    index = index_of(exact, star, rest)
    assert set(index.match("a.b")) == {exact, star, rest}
    assert set(index.match("a.c")) == {star, rest}
    assert set(index.match("a.b.c")) == {rest}


def test_removing_everything_leaves_nothing_behind() -> None:
    subs = [
        make_sub("a", "a.b", sub_id="1"),
        make_sub("a.*", "a.*.c", "*.b.>", sub_id="2"),
        make_sub(">", "a.>", "a.b.>", sub_id="3"),
        make_sub("a.*", "x.y.z", sub_id="4"),
    ]
    index = index_of(*subs)
    assert index.match("a.b") != ()
    unindex(index, *subs)
    for topic in ["a", "a.b", "a.b.c", "x.y.z", "q.b.r"]:
        assert index.match(topic) == (), topic
    assert index._root.children == {}
    assert not index._root.subs
    assert not index._root.rest


def test_removal_prunes_only_the_dead_branch() -> None:
    keep, drop = make_sub("a.*.c", sub_id="keep"), make_sub("a.*", "a.b.>", sub_id="drop")
    index = index_of(keep, drop)
    unindex(index, drop)
    assert index.match("a.x.c") == (keep,)
    assert index.match("a.x") == ()
    assert index.match("a.b.c") == (keep,)
    assert list(index._root.children) == ["a"]
    assert list(index._root.children["a"].children) == ["*"]


def test_removing_a_pattern_not_there_is_harmless() -> None:
    other = make_sub("a.*", sub_id="other")
    index = index_of(other)
    sub = make_sub("a.b.c", "x", "q.*", "r.s.>")
    unindex(index, sub)  # never added: no error, nothing to prune
    assert index.match("a.b.c") == ()
    assert index.match("q.z") == ()
    assert index.match("a.z") == (other,)
    assert list(index._root.children) == ["a"]


def test_removing_a_pattern_one_subscription_never_had_keeps_the_others() -> None:
    # remove() tolerates literals that are not there; wildcards must be tolerated the same
    # way without forgetting the subscriptions that are there.
    present, absent = make_sub("a.*", sub_id="present"), make_sub("a.*", sub_id="absent")
    index = index_of(present)
    unindex(index, absent)
    assert index.match("a.b") == (present,)


def test_match_cache_is_invalidated_by_add_and_remove() -> None:
    first, second = make_sub("a.*", sub_id="1"), make_sub("a.b", sub_id="2")
    index = index_of(first)
    assert index.match("a.b") == (first,)
    assert index.match("a.b") == (first,)  # cached
    assert index.match("z") == ()  # an empty answer is cached too
    index.add(parse_pattern("a.b"), second)
    assert set(index.match("a.b")) == {first, second}
    index.add(parse_pattern("z"), second)
    assert index.match("z") == (second,)
    index.remove(parse_pattern("a.*"), first)
    assert index.match("a.b") == (second,)
    index.remove(parse_pattern("a.b"), second)
    assert index.match("a.b") == ()


def test_match_cache_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker.hub, "MATCH_CACHE_TOPICS", 3)
    sub = make_sub("t.*")
    index = index_of(sub)
    for i in range(10):
        assert index.match(f"t.{i}") == (sub,)
        assert len(index._cache) <= 3


# Small alphabets make collisions (and so every branch of the trie) likely.
TOKENS = ["a", "b", "c"]
topic_st = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)
pattern_st = st.builds(
    lambda tokens, gt: ".".join([*tokens, ">"] if gt else tokens) if tokens or gt else "a",
    st.lists(st.sampled_from([*TOKENS, "*"]), min_size=0, max_size=3),
    st.booleans(),
)


class IndexMachine(RuleBasedStateMachine):
    """TopicIndex.match(topic) is the brute-force answer, through any adds and removes."""

    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.index = TopicIndex()
        self.live: list[Subscription] = []
        self.ids = 0

    @rule(target=subs, patterns=st.lists(pattern_st, min_size=1, max_size=3))
    def add(self, patterns: list[str]) -> Subscription:
        self.ids += 1
        sub = make_sub(*patterns, sub_id=str(self.ids))
        for pattern in sub.filter.patterns:
            self.index.add(pattern, sub)
        self.live.append(sub)
        return sub

    @rule(sub=consumes(subs))
    def remove(self, sub: Subscription) -> None:
        for pattern in sub.filter.patterns:
            self.index.remove(pattern, sub)
        self.live.remove(sub)

    @rule(topic=topic_st)
    def match(self, topic: str) -> None:
        found = self.index.match(topic)
        assert len(found) == len(set(found))
        assert set(found) == {s for s in self.live if s.filter.matches(topic)}

    @invariant()
    def empty_index_has_an_empty_trie(self) -> None:
        if not self.live:
            assert self.index._root.children == {}
            assert not self.index._root.rest


IndexMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestTopicIndexMatchesBruteForce = IndexMachine.TestCase


# -- Hub -------------------------------------------------------------------------------------


def test_route_pushes_runs_in_order_and_advances_routed_seq() -> None:
    hub = Hub(routed_seq=10)
    sub = make_sub("a", position=10)
    hub.add(sub)
    batch = events("a", "a", "b", "a", first_seq=11)
    hub.route(batch)
    assert hub.routed_seq == 14
    taken = sub.take()
    assert [[e.seq for e in r.events] for r in taken if isinstance(r, Run)] == [[11, 12], [14]]
    assert hub.statistics() == HubStatistics(
        subscriptions=1, routed_seq=14, routed_events=4, routed_runs=3, pushes=2
    )


def test_route_of_nothing_changes_nothing() -> None:
    hub = Hub(routed_seq=5)
    hub.route([])
    assert hub.statistics() == HubStatistics(
        subscriptions=0, routed_seq=5, routed_events=0, routed_runs=0, pushes=0
    )


def test_a_subscription_of_two_topics_gets_global_seq_order() -> None:
    hub = Hub()
    both = make_sub("x", "y.*", sub_id="both")
    only_x = make_sub("x", sub_id="only-x")
    hub.add(both)
    hub.add(only_x)
    topics = ["x", "y.1", "y.2", "x", "z", "x", "y.1", "z", "y.2"]
    hub.route(events(*topics[:4]))
    hub.route(events(*topics[4:], first_seq=5))
    assert taken_seqs(both) == [1, 2, 3, 4, 6, 7, 9]
    assert taken_seqs(only_x) == [1, 4, 6]
    assert hub.routed_seq == 9


def test_every_subscriber_of_a_topic_gets_the_same_run() -> None:
    hub = Hub()
    subs = [make_sub("a", sub_id=str(i)) for i in range(3)]
    for sub in subs:
        hub.add(sub)
    hub.route(events("a", "a"))
    (first,), (second,), (third,) = (sub.take() for sub in subs)
    assert first is second is third  # encode once: one shared object


def test_discarded_subscription_gets_nothing_and_discard_is_idempotent() -> None:
    hub = Hub()
    gone, stays = make_sub("a", "b.*", sub_id="gone"), make_sub("b.*", sub_id="stays")
    hub.add(gone)
    hub.add(stays)
    assert len(hub) == 2
    hub.discard(gone)
    hub.discard(gone)
    assert list(hub) == [stays]
    hub.route(events("a", "b.c"))
    assert gone.take() == []
    assert taken_seqs(stays) == [2]
    assert hub.statistics().subscriptions == 1


def test_route_never_waits_for_a_full_subscriber() -> None:
    hub = Hub()
    slow = Subscription(
        "slow",
        Filter.parse(["a"]),
        position=0,
        live=True,
        buffer_events=2,
        buffer_bytes=1 << 20,
        policy=OverflowPolicy.CATCHUP,
    )
    fast = make_sub("a", sub_id="fast")
    hub.add(slow)
    hub.add(fast)
    for seq in range(1, 6):
        hub.route(events("a", first_seq=seq))
    assert slow.state is State.CATCHUP
    assert taken_seqs(fast) == [1, 2, 3, 4, 5]


def test_a_hole_in_the_routed_seqs_sends_every_live_subscription_back_through_the_log() -> None:
    # JetStream can delete events before a node follows them; nobody may skip them silently.
    hub = Hub(routed_seq=0)
    a = Subscription(
        "a",
        Filter.parse(["a"]),
        position=0,
        live=True,
        buffer_events=10,
        buffer_bytes=1 << 20,
        policy=OverflowPolicy.CATCHUP,
    )
    other = Subscription(
        "o",
        Filter.parse(["other"]),
        position=0,
        live=True,
        buffer_events=10,
        buffer_bytes=1 << 20,
        policy=OverflowPolicy.DROP,
    )
    hub.add(a)
    hub.add(other)
    hub.route([Event(1, "a", b"", "t", 0.0)])
    assert (a.state, other.state, hub.holes) == (State.LIVE, State.LIVE, 0)
    hub.route([Event(5, "a", b"", "t", 0.0)])  # 2..4 never came
    assert (a.state, other.state, hub.holes) == (State.CATCHUP, State.CATCHUP, 1)
    assert not a.has_pending  # its catch-up re-reads from its position, 0
    assert (a.position, a.catchups) == (0, 1)


def test_a_hole_inside_a_batch_is_a_hole_too() -> None:
    # The follower's batch can skip a seq in its middle (the stream deleted it per topic).
    hub = Hub(routed_seq=0)
    sub = Subscription(
        "a",
        Filter.parse([">"]),
        position=0,
        live=True,
        buffer_events=10,
        buffer_bytes=1 << 20,
        policy=OverflowPolicy.CATCHUP,
    )
    hub.add(sub)
    hub.route([Event(seq, "a", b"", "t", 0.0) for seq in (1, 2, 3)])
    assert (sub.state, hub.holes) == (State.LIVE, 0)
    hub.route([Event(seq, "a", b"", "t", 0.0) for seq in (4, 6, 7)])  # 5 never came
    assert (sub.state, hub.holes, hub.routed_seq) == (State.CATCHUP, 1, 7)
