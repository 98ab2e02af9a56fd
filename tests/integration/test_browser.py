"""broker.js and the console page in real headless Chromium (Debian's package), over CDP.

The page is served by the broker under test; everything between the page and the broker is the
browser's own EventSource, WebSocket and fetch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.config import Settings
from broker.server import Running, Server
from tests.browser import Chromium, Page, launch_chromium, open_page
from tests.integration.conftest import StartBroker
from tests.integration.test_cluster import cluster_settings
from tests.natsserver import NatsServer

TRANSPORTS = ["sse", "ws", "ndjson"]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "browser"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    browser = launch_chromium()
    yield browser
    browser.stop()


@pytest.fixture
async def page(chromium: Chromium) -> AsyncIterator[Page]:
    async with open_page(chromium) as tab:
        yield tab


async def open_subscription(
    page: Page, url: str, topics: list[str], *, page_url: str | None = None, **options: Any
) -> None:
    """Load a page (by default one of the broker's origin), import the broker's broker.js and
    subscribe; what arrives is kept in ``window.seen`` (events' seqs), ``window.events``,
    ``window.gaps``, ``window.statuses``, ``window.errors``."""
    await page.goto(page_url or f"{url}/healthz")
    options.setdefault("url", url)
    await page.evaluate(
        f"""(async () => {{
            const {{ subscribe, publish }} = await import("{url}/static/broker.js");
            Object.assign(window, {{ seen: [], events: [], gaps: [], statuses: [], delays: [],
                                     errors: [], publish }});
            window.sub = subscribe({json.dumps(topics)}, {{
                ...{json.dumps(options)},
                onEvent: (e) => {{ seen.push(e.seq); events.push(e); }},
                onGap: (g) => gaps.push(g),
                onStatus: (s, d) => {{
                    statuses.push(s);
                    if (d.delayMs !== undefined) delays.push(d.delayMs);
                }},
                onError: (e) => errors.push({{ code: e.code, status: e.status,
                                               message: e.message }}),
            }});
        }})()"""
    )


async def wait_open(page: Page) -> None:
    await page.wait_for("window.sub.status === 'open'", what="the subscription to open")


async def seen(page: Page) -> list[int]:
    result: list[int] = await page.evaluate("window.seen")
    return result


async def publish_http(client: httpx.AsyncClient, topic: str, n: int, start: int = 0) -> list[int]:
    seqs = []
    for i in range(start, start + n):
        response = await client.post(f"/v1/topics/{topic}", json={"n": i})
        response.raise_for_status()
        seqs.append(response.json()["seq"])
    return seqs


async def publish_through(
    url: str, topic: str, n: int, *, on_published: Any = None
) -> list[int]:
    """``n`` publishes that keep going through a broker restart or cut: a failed attempt is
    retried with the same idempotency key, so each message is stored exactly once."""
    seqs: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        for i in range(n):
            with trio.fail_after(30):
                while True:
                    try:
                        response = await client.post(
                            f"/v1/topics/{topic}", json={"n": i},
                            headers={"Idempotency-Key": f"{topic}-{i}"},
                        )
                        if response.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.02)
            seqs.append(response.json()["seq"])
            if on_published is not None:
                await on_published(i)
            await trio.sleep(0.002)
    return seqs


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_500_messages_in_order_then_every_one_across_a_cut(
    start_broker: StartBroker, page: Page, transport: str
) -> None:
    """Every connection the broker has is cut (the socket shut down under it) while publishing
    goes on: the page reconnects by itself and has every message exactly once, in order."""
    broker = await start_broker(heartbeat_seconds=5.0)
    await open_subscription(page, broker.url, ["load.*"], transport=transport,
                            initialDelayMs=50, maxDelayMs=500)
    await wait_open(page)
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
        first = await publish_http(client, "load.a", 500)
    await page.wait_for("window.seen.length >= 500", what="500 events")
    assert await seen(page) == first

    async def cut(i: int) -> None:
        if i in (50, 150):
            await wait_open(page)  # the second cut finds the page connected again
            assert broker.node.connections.cut_all() >= 1

    rest = await publish_through(broker.url, "load.b", 300, on_published=cut)
    await page.wait_for("window.seen.length >= 800", what="all 800 events")
    await trio.sleep(0.2)  # anything more (a duplicate) would be handed over by now
    assert await seen(page) == first + rest
    stats = await page.evaluate("window.sub.stats")
    assert stats["reconnects"] >= 2, stats
    assert await page.evaluate("window.gaps") == []
    assert await page.evaluate("window.errors") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_message_once_across_a_broker_restart(
    nursery: trio.Nursery, nats_server: NatsServer, page: Page, transport: str
) -> None:
    """The broker is stopped and started again on the same port, on the same log (a JetStream
    stream), while a publisher goes on (retrying while it is away). It stays away longer than
    EventSource's one quick retry, so the client's own backoff has to bring it back."""
    settings = Settings(**{**cluster_settings(nats_server, "browser"), "port": 0,
                           "grpc_listen": "off", "drain_seconds": 1.0})
    first: Running = await nursery.start(Server(settings).run)
    port = int(first.url.rsplit(":", 1)[1])
    await open_subscription(page, first.url, ["restart.*"], transport=transport,
                            initialDelayMs=50, maxDelayMs=500)
    await wait_open(page)
    current = [first]

    async def restart(i: int) -> None:
        if i == 100:
            current[0].server.stop()
            await current[0].server.stopped()
            await trio.sleep(1.5)
            again = dataclasses.replace(settings, port=port)
            current[0] = await nursery.start(Server(again).run)

    try:
        seqs = await publish_through(first.url, "restart.a", 300, on_published=restart)
        await page.wait_for("window.seen.length >= 300", timeout=30, what="all 300 events")
        await trio.sleep(0.2)
        assert await seen(page) == seqs
        stats = await page.evaluate("window.sub.stats")
        assert stats["reconnects"] >= 1, stats
        statuses = await page.evaluate("window.statuses")
        assert statuses[:2] == ["connecting", "open"] and statuses[-1] == "open", statuses
        assert "reconnecting" in statuses, statuses
        assert await page.evaluate("window.delays"), "the client's backoff took over"
        assert await page.evaluate("window.gaps") == []
    finally:
        current[0].server.stop()
        with trio.fail_after(10):
            await current[0].server.stopped()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resume_older_than_retention_reaches_on_gap(
    start_broker: StartBroker, page: Page, transport: str
) -> None:
    broker = await start_broker(retention_messages=10)
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
        await publish_http(client, "old.t", 30)  # seqs 1..30; the log keeps 21..30
    await open_subscription(page, broker.url, ["old.t"], transport=transport, fromSeq=5)
    await page.wait_for("window.seen.length >= 10", what="the retained events")
    assert await page.evaluate("window.gaps") == [{"from_seq": 6, "to_seq": 20}]
    assert await seen(page) == list(range(21, 31))
    assert await page.evaluate("window.sub.stats.gaps") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_bad_pattern_fails_with_the_brokers_problem(
    broker: Running, page: Page, transport: str
) -> None:
    """A refusal that will not change is not retried: the subscription fails, saying why."""
    await open_subscription(page, broker.url, ["orders..eu"], transport=transport)
    await page.wait_for("window.sub.status === 'failed'", what="the subscription to fail")
    (error,) = await page.evaluate("window.errors")
    assert error["code"] == "bad-pattern", error
    assert await page.evaluate("window.sub.ready.then(() => 'open', (e) => e.code)") == (
        "bad-pattern"
    )
    assert "orders..eu" in error["message"] or "token" in error["message"], error
    assert len(broker.node.outlets) == 0


async def test_publish_resolves_to_the_seq_and_rejects_with_the_problem(
    broker: Running, page: Page
) -> None:
    await open_subscription(page, broker.url, ["chat.lobby"], transport="ws")
    await wait_open(page)
    answers = await page.evaluate(
        """(async () => [
            await publish("chat.lobby", "plain text"),
            await publish("chat.lobby", {text: "hi"}, {event: "note"}),
            await publish("chat.lobby", new Uint8Array([0, 1, 255])),
            await publish("chat.lobby", "once", {idempotencyKey: "k1"}),
            await publish("chat.lobby", "once", {idempotencyKey: "k1"}),
            await publish("chat lobby", "x").catch((e) => [e.name, e.code, e.status]),
        ])()"""
    )
    assert answers == [
        {"seq": 1, "duplicate": False},
        {"seq": 2, "duplicate": False},
        {"seq": 3, "duplicate": False},
        {"seq": 4, "duplicate": False},
        {"seq": 4, "duplicate": True},
        ["BrokerError", "bad-topic", 400],
    ]
    await page.wait_for("window.events.length >= 4", what="4 events")
    events = await page.evaluate(
        "window.events.map((e) => [e.seq, e.topic, e.event ?? null, "
        "e.data instanceof Uint8Array ? Array.from(e.data) : e.data])"
    )
    assert events == [
        [1, "chat.lobby", None, "plain text"],
        [2, "chat.lobby", "note", {"text": "hi"}],
        [3, "chat.lobby", None, [0, 1, 255]],
        [4, "chat.lobby", None, "once"],
    ]


async def test_the_console_page_shows_live_events_gaps_and_fits_a_phone(
    start_broker: StartBroker, page: Page
) -> None:
    broker = await start_broker(retention_messages=40)
    http = httpx.AsyncClient(base_url=broker.url, timeout=10.0)
    await page.viewport(1280, 860)
    await page.goto(f"{broker.url}/?topic=chat.>&transport=ws&from=earliest")
    await page.wait_for("document.getElementById('status').textContent === 'open'")
    # the form publishes
    await page.evaluate(
        """document.getElementById('publish-data').value = '{"text": "hello from the form"}';
           document.getElementById('publish-button').click()"""
    )
    await page.wait_for("document.getElementById('result').textContent.startsWith('published')")
    assert await page.evaluate("document.getElementById('result').textContent") == (
        "published: seq 1"
    )
    # a live stream on two topics, at a rate that changes every second (the chart's bars)
    i = 0
    for per_second in (15, 45, 25, 35):
        for _ in range(per_second):
            await http.post(f"/v1/topics/chat.{'lobby' if i % 3 else 'ops'}",
                            json={"user": f"u{i % 7}", "text": f"message {i}"})
            i += 1
            await trio.sleep(1 / per_second)
    await page.wait_for("document.getElementById('count-events').textContent === '121'")
    await page.wait_for("document.querySelector('#events li.event .seq').textContent === '#121'")
    await http.aclose()
    rows = await page.evaluate(
        "[...document.querySelectorAll('#events li.event')].map((li) => li.textContent)"
    )
    assert len(rows) == 121
    assert rows[-1].startswith("#1chat.lobby") and "hello from the form" in rows[-1]
    await trio.sleep(1.1)  # the last second's bar
    assert int(await page.evaluate("document.getElementById('count-reconnects').textContent")) == 0
    desktop = await page.screenshot(OUTPUT / "console.png")
    assert desktop.stat().st_size > 10_000

    # on a phone, over SSE, from a position the log (40 events) no longer holds: a gap row
    await page.viewport(390, 844, mobile=True)
    await page.goto(f"{broker.url}/?topic=chat.>&transport=sse&from=5")
    await page.wait_for("document.getElementById('count-events').textContent === '40'")
    gap = await page.evaluate("document.querySelector('#events li.gap').textContent")
    assert gap == "gap: events 6..81 are no longer held", gap
    # nothing is wider than the phone: no sideways scrolling
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    widths = await page.evaluate(
        "['subscribe-form', 'publish-form', 'events']"
        ".map((id) => document.getElementById(id).getBoundingClientRect().right)"
    )
    assert all(right <= 390 for right in widths), widths
    phone = await page.screenshot(OUTPUT / "console-phone.png")
    assert phone.stat().st_size > 5_000
    assert page.errors == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_page_on_another_origin_subscribes_and_publishes_with_cors(
    start_broker: StartBroker, page: Page, transport: str
) -> None:
    """The page is http://localhost:PORT, the broker http://127.0.0.1:PORT: another origin. It
    imports broker.js from the broker, subscribes (NDJSON with a bearer header, which needs a
    preflight) and publishes with an idempotency key (a preflight too)."""
    broker = await start_broker(cors_origins="*")
    page_url = broker.url.replace("127.0.0.1", "localhost") + "/healthz"
    await open_subscription(
        page, broker.url, ["cors.t"], page_url=page_url, transport=transport,
        headers={"Authorization": "Bearer token-1"},
    )
    await wait_open(page)
    assert await page.evaluate("location.origin") != broker.url
    answer = await page.evaluate(
        f'publish("cors.t", {{n: 1}}, {{url: "{broker.url}", idempotencyKey: "c1"}})'
    )
    assert answer == {"seq": 1, "duplicate": False}
    await page.wait_for("window.seen.length >= 1", what="the event")
    assert await seen(page) == [1]


async def test_reconnect_delays_grow_exponentially_with_full_jitter_and_a_cap(
    broker: Running, page: Page
) -> None:
    """Nothing listens where the subscription points: each failed attempt waits a random delay
    in [0, min(cap, initial * 2^n)]. With Math.random pinned to its top the ceilings show."""
    await page.goto(f"{broker.url}/healthz")
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening
        delays = await page.evaluate(
            """(async () => {
                const { subscribe } = await import("/static/broker.js");
                const delays = [];
                const random = Math.random;
                Math.random = () => 0.999999;
                const sub = subscribe("t", { url: "DEAD", transport: "ws", initialDelayMs: 20,
                    maxDelayMs: 200, onStatus: (s, d) => { if (d.delayMs !== undefined)
                    delays.push(d.delayMs); } });
                await new Promise((resolve) => {
                    const check = setInterval(() => {
                        if (delays.length >= 7) { clearInterval(check); resolve(); } }, 10);
                });
                sub.close();
                Math.random = random;
                return delays;
            })()""".replace("DEAD", dead)
        )
    assert delays == [20, 40, 80, 160, 200, 200, 200]


async def test_duplicates_gaps_and_resets_are_handled_once(broker: Running, page: Page) -> None:
    """The client's bookkeeping, fed frames directly (as NDJSON lines and WebSocket frames
    arrive): a seq at or below the position is dropped; a gap moves the position, a per-topic
    gap does not and is not repeated; a reset starts the new epoch's seqs."""
    await page.goto(f"{broker.url}/healthz")
    log = await page.evaluate(
        """(async () => {
            const { subscribe } = await import("/static/broker.js");
            const log = [];
            const sub = subscribe("t.*", { url: "http://127.0.0.1:9", transport: "ndjson",
                onEvent: (e) => log.push(["event", e.seq, e.id]),
                onGap: (g) => log.push(["gap", g.from_seq, g.to_seq, g.topic ?? null]),
                onReset: (r) => log.push(["reset", r.epoch]) });
            sub.close();
            const frames = [
                {type: "hello", epoch: "E1", position: "E1:4"},
                {seq: 5, topic: "t.a", data: 1}, {seq: 5, topic: "t.a", data: 1},
                {seq: 4, topic: "t.a", data: 0},
                {type: "gap", from_seq: 6, to_seq: 9, topic: "t.b"},
                {seq: 7, topic: "t.a", data: 2},
                {type: "gap", from_seq: 8, to_seq: 9, topic: "t.b"},
                {type: "gap", from_seq: 10, to_seq: 20},
                {type: "gap", from_seq: 10, to_seq: 20},
                {seq: 15, topic: "t.a", data: 3}, {seq: 21, topic: "t.a", data: 4},
                {type: "reset", epoch: "E2"}, {type: "reset", epoch: "E2"},
                {seq: 1, topic: "t.a", data: 5},
            ];
            for (const frame of frames) sub._frame(frame);
            log.push(["position", sub.position], ["stats", sub.stats]);
            return log;
        })()"""
    )
    assert log == [
        ["event", 5, "E1:5"],
        ["gap", 6, 9, "t.b"],
        ["event", 7, "E1:7"],
        ["gap", 10, 20, None],
        ["event", 21, "E1:21"],
        ["reset", "E2"],
        ["event", 1, "E2:1"],
        ["position", "E2:1"],
        ["stats", {"events": 4, "duplicates": 3, "gaps": 2, "resets": 1, "reconnects": 0}],
    ]


class FreezingProxy:
    """A TCP proxy on 127.0.0.1 whose connections can be frozen: bytes stop flowing both ways but
    nothing is closed, as when a laptop sleeps or a NAT forgets a mapping. New connections flow."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen: list[trio.Event] = []
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    def freeze(self) -> None:
        for thaw in self.frozen:
            thaw.set()

    async def _serve(self, client: trio.SocketStream) -> None:
        frozen = trio.Event()
        self.frozen.append(frozen)
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as up:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await source.receive_some(65536):
                        if frozen.is_set():
                            await trio.sleep_forever()
                        await sink.send_all(data)
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, up)
                nursery.start_soon(pump, up, client)
                await frozen.wait()
                await trio.sleep_forever()  # held open, silent


@pytest.mark.parametrize("transport", ["ws", "ndjson"])
async def test_a_connection_gone_silent_is_replaced_and_nothing_is_lost(
    nursery: trio.Nursery, start_broker: StartBroker, page: Page, transport: str
) -> None:
    """No close, no error: the connection just stops carrying bytes. The broker's heartbeats
    stop arriving, the client gives up on it after idleTimeoutMs and resumes on a new one."""
    broker = await start_broker(heartbeat_seconds=0.3)
    proxy = FreezingProxy(int(broker.url.rsplit(":", 1)[1]))
    await nursery.start(proxy.run)
    await open_subscription(page, proxy.url, ["quiet.t"], transport=transport,
                            idleTimeoutMs=1500, initialDelayMs=50)
    await wait_open(page)
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
        before = await publish_http(client, "quiet.t", 20)
        await page.wait_for("window.seen.length >= 20", what="20 events")
        proxy.freeze()
        after = await publish_http(client, "quiet.t", 30, start=20)
    await page.wait_for("window.seen.length >= 50", what="all 50 events")
    assert await seen(page) == before + after
    assert await page.evaluate("window.sub.stats.reconnects") == 1


async def test_the_online_event_cuts_a_long_backoff_short(broker: Running, page: Page) -> None:
    await open_subscription(page, broker.url, ["net.t"], transport="ws",
                            initialDelayMs=60_000, maxDelayMs=60_000)
    await wait_open(page)
    await page.evaluate("Math.random = () => 0.999999")  # the next wait: about a minute
    broker.node.connections.cut_all()
    await page.wait_for("window.sub.status === 'reconnecting'")
    await trio.sleep(0.3)
    assert await page.evaluate("window.sub.status") == "reconnecting"
    await page.evaluate("window.dispatchEvent(new Event('online'))")
    await page.wait_for("window.sub.status === 'open'", timeout=5, what="an immediate reconnect")
    assert await page.evaluate("window.sub.stats.reconnects") == 1


def module_snippets(path: str) -> list[str]:
    """The ``<script type="module">`` snippets of a document that import broker.js."""
    text = (Path(__file__).resolve().parents[2] / path).read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```html\n")[1:]]
    return [
        b.split('<script type="module">', 1)[1].rsplit("</script>", 1)[0]
        for b in blocks
        if "broker.js" in b
    ]


@pytest.mark.parametrize("document", ["README.md", "docs/browser.md"])
async def test_the_documented_snippet_runs(broker: Running, page: Page, document: str) -> None:
    (snippet,) = module_snippets(document)
    snippet = snippet.replace("http://127.0.0.1:8080", broker.url)
    await page.goto(f"{broker.url}/healthz")
    await page.evaluate(
        f"(() => {{ const s = document.createElement('script'); s.type = 'module';"
        f" s.textContent = {json.dumps(snippet)}; document.body.append(s); }})()"
    )
    with trio.fail_after(10):
        while not any(line.startswith("log: 1 ") for line in page.console):
            await trio.sleep(0.05)
    assert any(line.startswith("log: open") for line in page.console), page.said()
    assert page.errors == [], page.said()
