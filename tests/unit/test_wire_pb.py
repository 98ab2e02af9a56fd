"""The hand-written Delivery encoders against the classes generated from the proto."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker._pb import broker_pb2
from broker.model import Event
from broker.wire import pb

topics = st.from_regex(r"[a-z0-9_-]{1,8}(\.[a-z0-9_-]{1,8}){0,3}", fullmatch=True)
events = st.builds(
    Event,
    seq=st.integers(1, 2**63 - 1),
    topic=topics,
    payload=st.binary(max_size=300),
    content_type=st.sampled_from(["", "text/plain", "application/json; charset=utf-8"]),
    time=st.floats(0, 4e9, allow_nan=False),
    event=st.none() | st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True),
)


@given(st.lists(events, max_size=5))
def test_joined_events_are_one_delivery(batch: list[Event]) -> None:
    message = broker_pb2.Delivery.FromString(b"".join(pb.encode_event(e) for e in batch))
    assert [
        (e.seq, e.topic, e.time_ms, e.payload, e.content_type, e.event) for e in message.events
    ] == [
        (e.seq, e.topic, round(e.time * 1000), e.payload, e.content_type, e.event or "")
        for e in batch
    ]


@given(st.integers(1, 2**40), st.integers(1, 2**40), st.none() | topics, st.text(max_size=8))
def test_gap(from_seq: int, to_seq: int, topic: str | None, sub: str) -> None:
    (gap,) = broker_pb2.Delivery.FromString(pb.encode_gap(from_seq, to_seq, topic, sub)).gaps
    assert (gap.from_seq, gap.to_seq, gap.topic, gap.sub) == (from_seq, to_seq, topic or "", sub)


def test_control_messages() -> None:
    joined = (
        pb.encode_reset("e2", "s1")
        + pb.encode_subscribed("s1", "e2", "e2:7")
        + pb.HEARTBEAT
        + pb.encode_ack("r1", 9, duplicate=True)
        + pb.encode_error("r2", "s3", "bad-topic", "topic 'a b' ☃")
    )
    message = broker_pb2.Delivery.FromString(joined)
    assert (message.reset.epoch, message.reset.sub) == ("e2", "s1")
    assert (message.subscribed.sub, message.subscribed.position) == ("s1", "e2:7")
    assert message.HasField("heartbeat")
    assert (message.ack.id, message.ack.seq, message.ack.duplicate) == ("r1", 9, True)
    assert (message.error.problem, message.error.detail) == ("bad-topic", "topic 'a b' ☃")


def test_varints_at_every_length_boundary() -> None:
    def reference(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    for bits in range(0, 64):
        for n in {(1 << bits) - 1, 1 << bits, (1 << bits) + 1}:
            assert pb._varint(n) == reference(n), n


def test_events_sharing_or_changing_their_millisecond() -> None:
    """The last time's field is reused: consecutive events with the same, a later, an earlier
    and a zero time each carry their own."""
    times = [1763790000.1231, 1763790000.1232, 1763790000.125, 5.0, 0.0, 0.0, 1763790000.125]
    batch = [Event(i + 1, "t", b"x", "", t) for i, t in enumerate(times)]
    message = broker_pb2.Delivery.FromString(b"".join(pb.encode_event(e) for e in batch))
    assert [e.time_ms for e in message.events] == [round(t * 1000) for t in times]
