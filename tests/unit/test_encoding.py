"""Runs: per-topic slices of a routed batch, encoded once per format (broker/encoding.py)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from broker.encoding import Format, Run, split_runs
from broker.model import Event, event_size


def make_events(topics: Sequence[str], *, first_seq: int = 1) -> list[Event]:
    return [
        Event(
            seq=first_seq + i,
            topic=topic,
            payload=b"p%d" % (first_seq + i),
            content_type="t",
            time=0.0,
        )
        for i, topic in enumerate(topics)
    ]


class CountingFormat(Format):
    """A format whose encoder counts how often it was called, per seq."""

    def __init__(self, name: str = "counting") -> None:
        self.calls: list[int] = []
        super().__init__(name, self._encode)

    def _encode(self, event: Event) -> bytes:
        self.calls.append(event.seq)
        return b"%s:%d\n" % (event.topic.encode(), event.seq)


# -- split_runs ------------------------------------------------------------------------------


def test_split_runs_cuts_at_every_topic_change() -> None:
    events = make_events(["a", "a", "b", "a", "a", "a", "c", "c"])
    runs = split_runs(events)
    assert [(r.topic, [e.seq for e in r.events]) for r in runs] == [
        ("a", [1, 2]),
        ("b", [3]),
        ("a", [4, 5, 6]),  # "a" again after "b": a new run, or the global order would break
        ("c", [7, 8]),
    ]
    assert [(r.first_seq, r.last_seq) for r in runs] == [(1, 2), (3, 3), (4, 6), (7, 8)]


def test_split_runs_of_nothing_is_nothing() -> None:
    assert split_runs([]) == []


def test_split_runs_accepts_a_generator() -> None:
    runs = split_runs(e for e in make_events(["a", "b"]))
    assert [r.topic for r in runs] == ["a", "b"]


@given(st.lists(st.sampled_from(["a", "b", "c.d"]), max_size=60))
def test_split_runs_keeps_global_order_and_makes_maximal_runs(topics: list[str]) -> None:
    events = make_events(topics)
    runs = split_runs(events)
    # Concatenated, the runs are exactly the batch, in order.
    assert [e for r in runs for e in r.events] == events
    for run in runs:
        assert run.events  # never an empty run
        assert {e.topic for e in run.events} == {run.topic}
    # Maximal: two neighbouring runs never share a topic.
    assert all(a.topic != b.topic for a, b in itertools.pairwise(runs))


def test_run_accounts_its_bytes() -> None:
    events = make_events(["a", "a", "a"])
    assert Run("a", events).nbytes == sum(event_size(e) for e in events)
    assert Run("a", events).nbytes > sum(len(e.payload) for e in events)  # empty is not free


# -- encode once -----------------------------------------------------------------------------


def test_frames_are_encoded_once_however_many_subscribers_ask() -> None:
    fmt = CountingFormat()
    (run,) = split_runs(make_events(["a"] * 5))
    seen = [run.frames(fmt) for _subscriber in range(1000)]
    assert fmt.calls == [1, 2, 3, 4, 5]
    assert seen[0] == [b"a:1\n", b"a:2\n", b"a:3\n", b"a:4\n", b"a:5\n"]
    assert all(frames is seen[0] for frames in seen)  # one shared list, not copies


def test_joined_is_built_once_from_the_same_single_encode() -> None:
    fmt = CountingFormat()
    (run,) = split_runs(make_events(["a"] * 3))
    joined = [run.joined(fmt) for _subscriber in range(1000)]
    # frames() after joined() must not encode again either
    frames = run.frames(fmt)
    assert fmt.calls == [1, 2, 3]
    assert joined[0] == b"a:1\na:2\na:3\n" == b"".join(frames)
    assert all(j is joined[0] for j in joined)


def test_joined_of_one_event_is_its_frame() -> None:
    fmt = CountingFormat()
    (run,) = split_runs(make_events(["a"]))
    assert run.joined(fmt) == b"a:1\n"
    assert run.joined(fmt) is run.frames(fmt)[0]
    assert fmt.calls == [1]


def test_wired_frames_the_joined_bytes_once_per_format_and_framing() -> None:
    fmt, other = CountingFormat(), CountingFormat("other")
    (run,) = split_runs(make_events(["a"] * 2))
    framed: list[list[bytes]] = []

    def chunk(data: bytes) -> list[bytes]:
        framed.append([data])
        return [b"%x\r\n" % len(data), data, b"\r\n"]

    def bare(data: bytes) -> list[bytes]:
        return [data]

    wired = [run.wired(fmt, chunk) for _subscriber in range(100)]
    assert wired[0] == b"8\r\na:1\na:2\n\r\n"
    assert all(w is wired[0] for w in wired) and len(framed) == 1 and fmt.calls == [1, 2]
    assert run.wired(fmt, bare) == run.joined(fmt)
    assert run.wired(other, chunk) == wired[0] and len(framed) == 2  # another format's bytes


def test_each_format_encodes_once_and_formats_do_not_mix() -> None:
    sse, ndjson = CountingFormat("sse"), CountingFormat("ndjson")
    # Same name, another instance (e.g. a new epoch): compared by identity, so encoded anew.
    sse_again = CountingFormat("sse")
    runs = split_runs(make_events(["a", "a", "b", "a"]))
    for _subscriber in range(50):
        for run in runs:
            run.joined(sse)
            run.frames(ndjson)
            run.joined(sse_again)
    assert sse.calls == ndjson.calls == sse_again.calls == [1, 2, 3, 4]
    assert [r.joined(sse) for r in runs] == [b"a:1\na:2\n", b"b:3\n", b"a:4\n"]


def test_format_repr_names_it() -> None:
    assert repr(Format("sse", lambda e: b"")) == "Format('sse')"


# -- Run.after -------------------------------------------------------------------------------


def test_after_keeps_only_the_later_events() -> None:
    (run,) = split_runs(make_events(["a"] * 5, first_seq=10))  # seqs 10..14
    later = run.after(12)
    assert later.topic == "a"
    assert [e.seq for e in later.events] == [13, 14]
    assert (later.first_seq, later.last_seq) == (13, 14)
    assert later.nbytes == sum(event_size(e) for e in later.events)
    assert [e.seq for e in run.events] == [10, 11, 12, 13, 14]  # the original is untouched


def test_after_does_not_share_the_original_frames() -> None:
    fmt = CountingFormat()
    (run,) = split_runs(make_events(["a"] * 4))
    assert run.joined(fmt) == b"a:1\na:2\na:3\na:4\n"
    later = run.after(2)
    assert later.joined(fmt) == b"a:3\na:4\n"


def test_after_with_gaps_in_seqs() -> None:
    run = Run("a", [make_events(["a"], first_seq=s)[0] for s in (3, 7, 20)])
    assert [e.seq for e in run.after(5).events] == [7, 20]
    assert [e.seq for e in run.after(2).events] == [3, 7, 20]
    assert [e.seq for e in run.after(7).events] == [20]


def test_run_repr() -> None:
    (run,) = split_runs(make_events(["a"] * 3))
    assert repr(run) == "Run('a', 1..3, n=3)"


# -- replays ---------------------------------------------------------------------------------


def test_a_replayed_event_is_encoded_once_for_every_reader() -> None:
    fmt = CountingFormat()
    events = make_events(["a"] * 1000)
    for _reader in range(10):
        assert [fmt.encode_replayed(e) for e in events] == [fmt.encode(e) for e in events]
    assert fmt.calls.count(1) == 1 + 10  # once replayed, then once per direct encode above


def test_replayed_encodings_are_bounded_by_count_and_by_bytes() -> None:
    import broker.encoding as encoding

    fmt = CountingFormat()
    events = make_events(["a"] * (2 * encoding.RECENT_EVENTS + 1))
    for event in events:
        fmt.encode_replayed(event)
    fmt.encode_replayed(events[0])  # two generations later: forgotten, encoded again
    assert fmt.calls.count(1) == 2
    fmt.encode_replayed(events[-1])  # the newest: remembered
    assert fmt.calls.count(events[-1].seq) == 1

    big = Format("big", lambda e: b"x" * (encoding.RECENT_BYTES // 4))
    for event in events[:20]:
        big.encode_replayed(event)
    held = sum(map(len, big._recent.values())) + sum(map(len, big._older.values()))
    assert held <= 2 * encoding.RECENT_BYTES
