"""The gRPC transport against a real broker (grpc.aio under trio-asyncio) on 127.0.0.1.

The test's client is grpcio's blocking API, run in worker threads, as `broker.client` does.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker._pb import broker_pb2 as pb2
from broker._pb import broker_pb2_grpc as pb2_grpc
from broker.server import Running
from broker.transports import native_grpc
from tests.integration.clients import subscribe, wait_for
from tests.integration.conftest import StartBroker
from tests.integration.test_cluster import cluster_settings
from tests.natsserver import start_nats_server

GRPC = {"grpc_listen": "127.0.0.1:0"}


@pytest.fixture
async def node(start_broker: StartBroker) -> Running:
    return await start_broker(heartbeat_seconds=5.0, **GRPC)


@pytest.fixture
def stub(node: Running) -> Iterator[Any]:
    assert node.grpc is not None
    with grpc.insecure_channel(node.grpc) as channel:
        yield pb2_grpc.BrokerStub(channel)


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking grpc call, off the trio thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def status_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = await call(fn, *args, **kwargs)
        if not isinstance(result, pb2.PublishResponse | pb2.PublishStreamResponse):
            await call(list, result)  # a stream: its status comes when it is read
    return caught.value.code(), caught.value.details()


class Stream:
    """A server stream read by a worker thread into a list; ``paused`` stops reading."""

    def __init__(self, responses: Any) -> None:
        self.responses = responses
        self.deliveries: list[Any] = []
        self.paused = threading.Event()
        self.resumed = threading.Event()
        self.error: grpc.RpcError | None = None

    def pump(self) -> None:
        try:
            for delivery in self.responses:
                self.deliveries.append(delivery)
                if self.paused.is_set():
                    self.resumed.wait()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    @property
    def events(self) -> list[tuple[int, str, bytes]]:
        return [(e.seq, e.topic, e.payload) for d in list(self.deliveries) for e in d.events]

    async def wait_events(self, n: int, seconds: float = 10.0) -> None:
        await wait_for(lambda: len(self.events) >= n or self.error is not None, seconds)
        assert self.error is None, self.error


@asynccontextmanager
async def stream(responses: Any) -> AsyncIterator[Stream]:
    reader = Stream(responses)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trio.to_thread.run_sync(reader.pump, abandon_on_cancel=True))
        try:
            yield reader
        finally:
            reader.resumed.set()
            responses.cancel()


def publish_request(topic: str, payload: bytes, **fields: Any) -> Any:
    return pb2.PublishRequest(topic=topic, payload=payload, **fields)


# -- the same log as every other transport ------------------------------------------------------


async def test_publish_over_grpc_subscribe_over_sse_and_the_reverse(
    node: Running, stub: Any
) -> None:
    async with (
        subscribe(node.url, "sse", ["x.*"]) as sse,
        stream(stub.Subscribe(pb2.SubscribeRequest(topics=["x.*"]))) as grpc_feed,
        httpx.AsyncClient(base_url=node.url) as http,
    ):
        await wait_for(lambda: len(node.node.hub) == 2)
        over_grpc = [
            (await call(stub.Publish, publish_request("x.g", b"g%d" % i))).seq for i in range(5)
        ]
        over_http = [
            (await http.post("/v1/topics/x.h", content=b"h%d" % i)).json()["seq"] for i in range(5)
        ]
        await sse.wait_count(10)
        await grpc_feed.wait_events(10)
    assert over_grpc + over_http == list(range(1, 11))
    assert [(i.seq, i.data) for i in sse.received] == [
        *[(seq, b"g%d" % i) for i, seq in enumerate(over_grpc)],
        *[(seq, b"h%d" % i) for i, seq in enumerate(over_http)],
    ]
    assert grpc_feed.events == [
        *[(seq, "x.g", b"g%d" % i) for i, seq in enumerate(over_grpc)],
        *[(seq, "x.h", b"h%d" % i) for i, seq in enumerate(over_http)],
    ]
    first = grpc_feed.deliveries[0].subscribed
    assert (first.epoch, first.position) == (node.node.log.epoch, f"{node.node.log.epoch}:0")


async def test_an_event_keeps_its_fields(node: Running, stub: Any) -> None:
    request = publish_request("f", b"\x00\xff", content_type="application/x-thing", event="made")
    seq = (await call(stub.Publish, request)).seq
    responses = stub.Subscribe(pb2.SubscribeRequest(topics=["f"], start=pb2.START_EARLIEST))
    async with stream(responses) as feed:
        await feed.wait_events(1)
    (event,) = [e for d in feed.deliveries for e in d.events]
    assert (event.seq, event.topic, event.payload, event.content_type, event.event) == (
        seq,
        "f",
        b"\x00\xff",
        "application/x-thing",
        "made",
    )
    assert event.time_ms > 1_700_000_000_000


async def test_resume_after_k_gets_the_rest_exactly_once(node: Running, stub: Any) -> None:
    batch = [publish_request("r", b"m%d" % i) for i in range(1, 101)]
    seqs = [a.seq for a in (await call(stub.PublishStream, iter(batch))).acks]
    assert seqs == list(range(1, 101))
    epoch = node.node.log.epoch
    for position in ("40", f"{epoch}:40"):
        responses = stub.Subscribe(pb2.SubscribeRequest(topics=["r"], position=position))
        async with stream(responses) as feed:
            await feed.wait_events(60)
            await trio.sleep(0.2)  # nothing more, nothing twice
        assert feed.events == [(seq, "r", b"m%d" % seq) for seq in range(41, 101)]


async def test_a_resume_older_than_retention_gets_a_gap(start_broker: StartBroker) -> None:
    node = await start_broker(retention_messages=10, **GRPC)
    assert node.grpc is not None
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb2_grpc.BrokerStub(channel)
        await call(stub.PublishStream, iter([publish_request("g", b"%d" % i) for i in range(30)]))
        async with stream(stub.Subscribe(pb2.SubscribeRequest(topics=["g"], position="5"))) as feed:
            await feed.wait_events(10)
    gaps = [(g.from_seq, g.to_seq) for d in feed.deliveries for g in d.gaps]
    assert gaps == [(6, 20)]
    assert [seq for seq, _, _ in feed.events] == list(range(21, 31))


async def test_the_python_client_subscribes_over_grpc(node: Running, stub: Any) -> None:
    from broker.client import subscribe as client_subscribe

    await call(stub.Publish, publish_request("c", b"one"))
    async with client_subscribe(
        f"grpc://{node.grpc}", "c", transport="grpc", start="earliest"
    ) as sub:
        await call(stub.Publish, publish_request("c", b"two"))
        got = []
        async for item in sub:
            got.append((item.seq, item.data))  # type: ignore[union-attr]
            if len(got) == 2:
                break
    assert got == [(1, b"one"), (2, b"two")]


# -- flow control and memory -----------------------------------------------------------------


async def test_a_slow_grpc_subscriber_is_bounded_and_later_gets_everything(
    start_broker: StartBroker,
) -> None:
    node = await start_broker(buffer_events=200, **GRPC)
    assert node.grpc is not None
    total, payload = 20_000, b"x" * 1000
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb2_grpc.BrokerStub(channel)
        responses = stub.Subscribe(pb2.SubscribeRequest(topics=["s"]))
        async with stream(responses) as feed:
            await wait_for(lambda: len(feed.deliveries) >= 1)  # subscribed
            feed.paused.set()  # the reader stops reading
            (sub,) = list(node.node.hub)
            most_pending = 0
            for _batch in range(total // 1000):
                batch = [publish_request("s", payload) for _ in range(1000)]
                await call(stub.PublishStream, iter(batch))
                most_pending = max(most_pending, sub.pending_events)
            await wait_for(lambda: sub.catchups >= 1)  # it fell back to reading the log
            assert most_pending <= 200 + 1000  # its buffer, or one run
            assert len(feed.events) < total  # the stall was real
            feed.resumed.set()
            await feed.wait_events(total, 30)
    assert [seq for seq, _, _ in feed.events] == list(range(1, total + 1))
    print(f"\nslow grpc reader: {sub.catchups} catch-ups, most pending {most_pending}")


async def test_a_client_that_goes_away_releases_its_subscription(node: Running, stub: Any) -> None:
    responses = stub.Subscribe(pb2.SubscribeRequest(topics=["gone"]))
    async with stream(responses) as feed:
        await wait_for(lambda: len(feed.deliveries) >= 1)
        assert len(node.node.hub) == 1
    await wait_for(lambda: len(node.node.hub) == 0 and not node.node.outlets, 5)


# -- Session and PublishStream ----------------------------------------------------------------


async def test_session_subscribes_unsubscribes_and_publishes_on_one_stream(
    node: Running, stub: Any
) -> None:
    outbox: list[Any] = []
    ready = threading.Condition()

    def request_iterator() -> Iterator[Any]:
        for sent in itertools.count():
            with ready:
                ready.wait_for(lambda n=sent: len(outbox) > n)  # type: ignore[misc]
                request = outbox[sent]
            if request is None:
                return
            yield request

    def send(request: Any) -> None:
        with ready:
            outbox.append(request)
            ready.notify_all()

    def op(id: str, **kwargs: Any) -> Any:
        return pb2.SessionRequest(id=id, **kwargs)

    responses = stub.Session(request_iterator())
    async with stream(responses) as feed:
        send(op("1", subscribe=pb2.SubscribeRequest(sub="a", topics=["s.a"])))
        send(op("2", subscribe=pb2.SubscribeRequest(sub="b", topics=["s.b"])))
        await wait_for(lambda: len(node.node.hub) == 2)
        send(op("3", publish=publish_request("s.a", b"a1")))
        send(op("4", publish=publish_request("s.b", b"b1")))
        await feed.wait_events(2)
        send(op("5", unsubscribe=pb2.UnsubscribeRequest(sub="b")))
        await wait_for(lambda: len(node.node.hub) == 1)
        send(op("6", publish=publish_request("s.b", b"b2")))  # nobody on this stream wants it
        send(op("7", publish=publish_request("s.a", b"a2")))
        send(op("8", publish=publish_request("bad topic", b"")))
        send(op("9", unsubscribe=pb2.UnsubscribeRequest(sub="nope")))
        await feed.wait_events(3)
        await wait_for(lambda: sum(d.HasField("error") for d in feed.deliveries) == 2)
        send(None)
    assert feed.events == [(1, "s.a", b"a1"), (2, "s.b", b"b1"), (4, "s.a", b"a2")]
    acks = {d.ack.id: (d.ack.seq, d.ack.duplicate) for d in feed.deliveries if d.HasField("ack")}
    assert acks == {"1": (0, False), "2": (0, False), "3": (1, False), "4": (2, False),
                    "5": (0, False), "6": (3, False), "7": (4, False)}  # fmt: skip
    subscribed = [d.subscribed.sub for d in feed.deliveries if d.HasField("subscribed")]
    assert subscribed == ["a", "b"]
    errors = [(d.error.id, d.error.problem) for d in feed.deliveries if d.HasField("error")]
    assert errors == [("8", "bad-topic"), ("9", "unknown-subscription")]


async def test_publish_stream_of_10000_acks_every_message_in_order(
    node: Running, stub: Any
) -> None:
    batch = [publish_request("p", b"%d" % i) for i in range(10_000)]
    response = await call(stub.PublishStream, iter(batch))
    seqs = [ack.seq for ack in response.acks]
    assert len(seqs) == 10_000
    assert seqs == sorted(seqs) and len(set(seqs)) == 10_000
    assert seqs == list(range(1, 10_001))


async def test_publish_stream_stops_at_a_bad_message_and_says_what_was_stored(
    node: Running, stub: Any
) -> None:
    batch = [publish_request("p", b"ok"), publish_request("p", b"ok"), publish_request("p q", b"")]
    code, message = await status_of(stub.PublishStream, iter(batch))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("bad-topic: message 3: ")
    assert "the 2 before it were stored (seqs up to 2)" in message


async def test_an_idempotency_key_is_stored_once(node: Running, stub: Any) -> None:
    first = await call(stub.Publish, publish_request("k", b"1", idempotency_key="order-7"))
    again = await call(stub.Publish, publish_request("k", b"1", idempotency_key="order-7"))
    assert (first.seq, first.duplicate, again.seq, again.duplicate) == (1, False, 1, True)


# -- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "slug"),
    [
        (pb2.SubscribeRequest(topics=["a b"]), grpc.StatusCode.INVALID_ARGUMENT, "bad-pattern"),
        (pb2.SubscribeRequest(topics=[]), grpc.StatusCode.INVALID_ARGUMENT, "missing-topic"),
        (
            pb2.SubscribeRequest(topics=["a"], position="x:y"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad-position",
        ),
        (
            pb2.SubscribeRequest(topics=["a"], position="99"),
            grpc.StatusCode.OUT_OF_RANGE,
            "position-ahead",
        ),
    ],
)
async def test_a_bad_subscribe_gets_its_status(
    stub: Any, request_: Any, code: grpc.StatusCode, slug: str
) -> None:
    got_code, message = await status_of(stub.Subscribe, request_)
    assert (got_code, message.split(":")[0]) == (code, slug)


@pytest.mark.parametrize(
    ("fields", "code", "slug"),
    [
        ({"topic": "a.*"}, grpc.StatusCode.INVALID_ARGUMENT, "bad-topic"),
        ({"topic": ""}, grpc.StatusCode.INVALID_ARGUMENT, "bad-topic"),
        ({"topic": "a", "event": "gap"}, grpc.StatusCode.INVALID_ARGUMENT, "bad-event-name"),
        (
            {"topic": "a", "idempotency_key": "has space"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad-idempotency-key",
        ),
        (
            {"topic": "a", "payload": b"x" * (1024 * 1024 + 1)},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "payload-too-large",
        ),
    ],
)
async def test_a_bad_publish_gets_its_status(
    node: Running, stub: Any, fields: dict[str, Any], code: grpc.StatusCode, slug: str
) -> None:
    got_code, message = await status_of(stub.Publish, pb2.PublishRequest(**fields))
    assert (got_code, message.split(":")[0]) == (code, slug)
    assert (await call(stub.Publish, publish_request("a", b"fine"))).seq >= 1  # still serving


async def test_a_message_over_the_transport_limit_is_resource_exhausted(stub: Any) -> None:
    code, _ = await status_of(stub.Publish, publish_request("a", b"x" * (2 * 1024 * 1024)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_draining_ends_streams_and_refuses_calls_with_unavailable(
    start_broker: StartBroker,
) -> None:
    node = await start_broker(drain_seconds=2.0, **GRPC)
    assert node.grpc is not None
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb2_grpc.BrokerStub(channel)
        async with stream(stub.Subscribe(pb2.SubscribeRequest(topics=["d"]))) as feed:
            await wait_for(lambda: len(feed.deliveries) >= 1)
            node.node.drain()
            await wait_for(lambda: feed.error is not None)
        assert feed.error is not None
        assert (feed.error.code(), feed.error.details().split(":")[0]) == (
            grpc.StatusCode.UNAVAILABLE,
            "unavailable",
        )
        code, _ = await status_of(stub.Publish, publish_request("d", b"late"))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_publishes_fail_with_unavailable_while_the_backplane_is_down(
    start_broker: StartBroker,
) -> None:
    server = start_nats_server()
    try:
        node = await start_broker(**cluster_settings(server, "grpcdown"), **GRPC)
        assert node.grpc is not None
        with grpc.insecure_channel(node.grpc) as channel:
            stub = pb2_grpc.BrokerStub(channel)
            assert (await call(stub.Publish, publish_request("o", b"up"))).seq == 1
            server.stop(keep_store=True)
            await wait_for(lambda: not node.node.ready)
            code, message = await status_of(stub.Publish, publish_request("o", b"down"))
            assert (code, message.split(":")[0]) == (grpc.StatusCode.UNAVAILABLE, "unavailable")
    finally:
        server.stop()


# -- health and reflection ----------------------------------------------------------------------


async def test_health_follows_readiness(node: Running) -> None:
    assert node.grpc is not None
    with grpc.insecure_channel(node.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "broker.v1.Broker"):
            answer = await call(health.Check, health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        node.node.drain()
        with trio.fail_after(5):  # the server polls readiness every 0.25 s
            while (await call(health.Check, health_pb2.HealthCheckRequest())).status != (
                health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                await trio.sleep(0.05)


async def test_reflection_lists_the_services(node: Running) -> None:
    assert node.grpc is not None
    with grpc.insecure_channel(node.grpc) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = await call(lambda: list(reflection.ServerReflectionInfo(iter([request]))))
    names = {s.name for s in answer.list_services_response.service}
    assert {"broker.v1.Broker", "grpc.health.v1.Health"} <= names


async def test_a_run_bigger_than_a_message_may_be_arrives_in_messages_that_fit(
    node: Running, stub: Any
) -> None:
    """Six events of ~900 KB published together are one run of 5.4 MB for the router; each
    `Delivery` stays within 1 MiB (a grpcio client refuses a message over 4 MiB by default)."""
    texts = [str(i) * 900_000 for i in range(6)]
    async with stream(stub.Subscribe(pb2.SubscribeRequest(topics=["big"]))) as feed:
        await wait_for(lambda: len(feed.deliveries) >= 1)  # subscribed
        async with httpx.AsyncClient(base_url=node.url) as http:
            response = await http.post(
                "/v1/publish",
                content="\n".join(json.dumps({"topic": "big", "data": t}) for t in texts),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert response.status_code == 200, response.text
        await feed.wait_events(6, seconds=20)
    assert [payload for _, _, payload in feed.events] == [t.encode() for t in texts]
    assert max(delivery.ByteSize() for delivery in feed.deliveries) <= 1024 * 1024 + 1024


# -- the native listener (transports/native_grpc.py) -------------------------------------------


async def test_subscribe_is_written_by_the_path_asked_for(
    node: Running, stub: Any, stream_path: str
) -> None:
    async with stream(stub.Subscribe(pb2.SubscribeRequest(topics=["p"]))) as feed:
        await wait_for(lambda: len(feed.deliveries) >= 1)
        (outlet,) = [o for o in node.node.outlets if o.transport == "grpc"]
        native = isinstance(outlet.sink, native_grpc.StreamSink)
        assert native is (stream_path == "native")
        await call(stub.Publish, publish_request("p", b"one"))
        await feed.wait_events(1)


class RawCall:
    """One call by hand over HTTP/2 (h2 as the client), for what grpcio would not send."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.headers: dict[bytes, bytes] = {}
        self.trailers: dict[bytes, bytes] = {}
        self.data = b""
        self.reset = False
        self.closed = False  # the server closed the connection

    async def run(
        self, headers: list[tuple[str, str]], body: bytes, *, end: bool = True
    ) -> RawCall:
        host, _, port = self.address.rpartition(":")
        connection = await trio.open_tcp_stream(host, int(port))
        async with connection:
            self.h2.initiate_connection()
            self.h2.send_headers(1, headers, end_stream=not body and end)
            if body:
                self.h2.send_data(1, body, end_stream=end)
            await connection.send_all(self.h2.data_to_send())
            with trio.fail_after(10):
                while not (self.trailers or self.reset):
                    try:
                        data = await connection.receive_some(65536)
                    except trio.BrokenResourceError:  # reset by the server
                        data = b""
                    if not data:
                        self.closed = True
                        break
                    for event in self.h2.receive_data(data):
                        self._event(event)
                    await connection.send_all(self.h2.data_to_send())
        return self

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.headers = dict(event.headers or ())
            if event.stream_ended:
                self.trailers = self.headers  # trailers-only, or plain HTTP
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers = dict(event.headers or ())
        elif isinstance(event, h2.events.DataReceived):
            self.data += event.data or b""
        elif isinstance(event, h2.events.StreamReset):
            self.reset = True

    @property
    def status(self) -> tuple[int, str]:
        return int(self.trailers[b"grpc-status"]), self.trailers.get(b"grpc-message", b"").decode()


def grpc_headers(path: str = "/broker.v1.Broker/Subscribe", **extra: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra.items()]


def message(data: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(data).to_bytes(4, "big") + data


SUBSCRIBE_REQUEST = pb2.SubscribeRequest(topics=["r"]).SerializeToString()


NATIVE_ONLY = pytest.mark.parametrize("stream_path", ["native"], indirect=True)


@pytest.fixture
async def native_node(start_broker: StartBroker) -> Running:
    return await start_broker(**GRPC)


@NATIVE_ONLY
async def test_native_refuses_what_is_not_grpc(native_node: Running) -> None:
    assert native_node.grpc is not None
    plain = [(":method", "POST"), (":scheme", "http"), (":path", "/broker.v1.Broker/Publish"),
             (":authority", "x"), ("content-type", "application/json")]
    answer = await RawCall(native_node.grpc).run(plain, b"{}")
    assert answer.headers[b":status"] == b"415"
    get = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    answer = await RawCall(native_node.grpc).run(get, b"")
    assert answer.headers[b":status"] == b"405"


@NATIVE_ONLY
@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        (
            message(SUBSCRIBE_REQUEST, compressed=True),
            12,
            "compressed messages are not supported (identity)",
        ),
        (message(SUBSCRIBE_REQUEST)[:-2], 13, "the request ended inside a message"),
        (message(b"\xff\xff"), 3, "bad-message: not a SubscribeRequest"),
        (b"", 12, "Subscribe takes one request message; none came"),
        (message(SUBSCRIBE_REQUEST) * 2, 12, "Subscribe takes one request message; more came"),
    ],
)
async def test_native_subscribe_refuses_a_bad_request(
    native_node: Running, body: bytes, code: int, detail: str
) -> None:
    assert native_node.grpc is not None
    answer = await RawCall(native_node.grpc).run(grpc_headers(), body)
    assert answer.status == (code, detail)
    assert not native_node.node.outlets  # nothing was left subscribed


@NATIVE_ONLY
async def test_native_refuses_a_message_over_the_limit_before_it_arrives(
    native_node: Running,
) -> None:
    assert native_node.grpc is not None
    limit = native_node.node.settings.max_payload_bytes + 64 * 1024
    announced = b"\x00" + (limit + 1).to_bytes(4, "big") + b"x" * 100  # the rest never comes
    headers = grpc_headers("/broker.v1.Broker/Publish")
    answer = await RawCall(native_node.grpc).run(headers, announced, end=False)
    code, detail = answer.status
    assert (code, detail) == (8, f"a message of {limit + 1} bytes is over the limit of {limit}")


@NATIVE_ONLY
async def test_native_passes_metadata_and_deadlines_to_grpc_aio(native_node: Running) -> None:
    assert native_node.grpc is not None
    request = pb2.PublishRequest(topic="m", payload=b"x").SerializeToString()
    answer = await RawCall(native_node.grpc).run(
        grpc_headers("/broker.v1.Broker/Publish", **{"grpc-timeout": "5S", "x-trace": "t1"}),
        message(request),
    )
    assert answer.status == (0, "")
    assert pb2.PublishResponse.FromString(answer.data[5:]).seq == 1
    unknown = await RawCall(native_node.grpc).run(grpc_headers("/broker.v1.Broker/Nope"), b"")
    assert unknown.status[0] == 12  # UNIMPLEMENTED, from grpc.aio



async def _keepalive_peer(
    start_broker: StartBroker,
) -> tuple[str, int, h2.connection.H2Connection]:
    """A node that pings after 0.3 s of silence and closes 0.3 s later, and an h2 client for it
    (its preface queued) that is never made to answer a PING."""
    node = await start_broker(
        grpc_keepalive_seconds=0.3, grpc_keepalive_timeout_seconds=0.3, **GRPC
    )
    assert node.grpc is not None
    host, _, port = node.grpc.rpartition(":")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return host, int(port), client


@NATIVE_ONLY
async def test_native_closes_a_connection_that_does_not_answer_its_ping(
    start_broker: StartBroker,
) -> None:
    host, port, client = await _keepalive_peer(start_broker)
    received: list[h2.events.Event] = []
    async with await trio.open_tcp_stream(host, port) as connection:
        await connection.send_all(client.data_to_send())  # and nothing more: no PING answer
        with trio.fail_after(5):
            while data := await connection.receive_some(65536):
                received.extend(client.receive_data(data))
    assert any(isinstance(event, h2.events.PingReceived) for event in received)


@NATIVE_ONLY
async def test_native_does_not_ping_a_connection_while_a_subscribe_stream_is_open(
    start_broker: StartBroker,
) -> None:
    """The stream's heartbeats, and TCP_USER_TIMEOUT, find a peer that is gone; once the stream
    has ended, the connection is pinged (and closed: this peer never answers)."""
    host, port, client = await _keepalive_peer(start_broker)
    client.send_headers(1, grpc_headers("/broker.v1.Broker/Subscribe"))
    client.send_data(1, message(pb2.SubscribeRequest(topics=["k"]).SerializeToString()),
                     end_stream=True)
    received: list[h2.events.Event] = []
    async with await trio.open_tcp_stream(host, port) as connection:
        await connection.send_all(client.data_to_send())
        closed = False
        with trio.move_on_after(1.5):  # five keep-alive periods
            while data := await connection.receive_some(65536):
                received.extend(client.receive_data(data))
            closed = True
        assert not closed
        assert not any(isinstance(event, h2.events.PingReceived) for event in received)
        assert any(isinstance(event, h2.events.ResponseReceived) for event in received)
        client.reset_stream(1)
        await connection.send_all(client.data_to_send())  # (no PING has come to be answered)
        with trio.fail_after(5):
            while data := await connection.receive_some(65536):
                received.extend(client.receive_data(data))
    assert any(isinstance(event, h2.events.PingReceived) for event in received)


@NATIVE_ONLY
async def test_native_a_connection_that_fails_leaves_the_others_served(
    node: Running, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.grpc is not None
    handle = native_grpc.Connection._handle

    def broken(self: native_grpc.Connection, event: h2.events.Event) -> None:
        failing = isinstance(event, h2.events.RequestReceived) and (b"x-fail", b"1") in (
            event.headers or []
        )
        if failing:
            raise RuntimeError("a bug in the listener")
        handle(self, event)

    monkeypatch.setattr(native_grpc.Connection, "_handle", broken)
    request = message(pb2.PublishRequest(topic="f", payload=b"x").SerializeToString())
    failed = await RawCall(node.grpc).run(
        grpc_headers("/broker.v1.Broker/Publish", **{"x-fail": "1"}), request
    )
    assert failed.closed and not failed.trailers
    assert (await call(stub.Publish, publish_request("f", b"y"))).seq == 1


@NATIVE_ONLY
async def test_native_connections_are_registered_with_a_user_timeout(
    node: Running, stub: Any
) -> None:
    before = len(node.node.connections)
    async with stream(stub.Subscribe(pb2.SubscribeRequest(topics=["u"]))) as feed:
        await wait_for(lambda: len(feed.deliveries) >= 1)
        assert len(node.node.connections) == before + 1
        sockets = node.node.connections._sockets.values()
        timeouts = {s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) for s in sockets}
        assert timeouts == {node.node.connections._user_timeout_ms}
