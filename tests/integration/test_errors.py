"""Every bad input gets its documented problem document, and the broker keeps serving.

The table below is the contract of docs/protocol.md ("Errors"), row by row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import RejectConnection, RejectData, Request

from broker.server import Running
from tests.integration.conftest import StartBroker

MAX_PAYLOAD = 1024
MAX_BATCH = 64 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    status: int
    type: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


NDJSON = {"Content-Type": "application/x-ndjson"}
GOOD_LINE = b'{"topic":"ok","data":1}'

CASES = [
    Case("publish: empty token", "POST", "/v1/topics/a..b", 400, "bad-topic", b"x"),
    Case("publish: wildcard", "POST", "/v1/topics/a.*", 400, "bad-topic", b"x"),
    Case("publish: space", "POST", "/v1/topics/a%20b", 400, "bad-topic", b"x"),
    Case("publish: 17 tokens", "POST", "/v1/topics/" + ".".join("t" * 17), 400, "bad-topic", b"x"),
    Case("publish: 256 bytes", "POST", "/v1/topics/" + "t" * 256, 400, "bad-topic", b"x"),
    Case(
        "publish: too large",
        "POST",
        "/v1/topics/ok",
        413,
        "payload-too-large",
        b"x" * (MAX_PAYLOAD + 1),
    ),
    Case("publish: event name", "POST", "/v1/topics/ok?event=a%20b", 400, "bad-event-name", b"x"),
    Case("publish: reserved event", "POST", "/v1/topics/ok?event=gap", 400, "bad-event-name", b"x"),
    Case(
        "publish: idempotency key",
        "POST",
        "/v1/topics/ok",
        400,
        "bad-idempotency-key",
        b"x",
        {"Idempotency-Key": "has space"},
    ),
    Case(
        "publish: content type",
        "POST",
        "/v1/topics/ok",
        400,
        "bad-parameter",
        b"x",
        {"Content-Type": "t/" + "x" * 300},
        {"name": "Content-Type"},
    ),
    Case(
        "batch: media type",
        "POST",
        "/v1/publish",
        415,
        "unsupported-media-type",
        GOOD_LINE,
        {"Content-Type": "application/json"},
    ),
    Case(
        "batch: bad JSON on line 2",
        "POST",
        "/v1/publish",
        400,
        "bad-batch-line",
        GOOD_LINE + b"\n{nope\n" + GOOD_LINE,
        NDJSON,
        {"line": 2},
    ),
    Case(
        "batch: bad topic on line 3",
        "POST",
        "/v1/publish",
        400,
        "bad-batch-line",
        GOOD_LINE + b"\n\n" + b'{"topic":"a..b","data":1}',
        NDJSON,
        {"line": 3},
    ),
    Case(
        "batch: data and data_b64",
        "POST",
        "/v1/publish",
        400,
        "bad-batch-line",
        b'{"topic":"ok","data":1,"data_b64":"AA=="}',
        NDJSON,
        {"line": 1},
    ),
    Case(
        "batch: unknown key",
        "POST",
        "/v1/publish",
        400,
        "bad-batch-line",
        b'{"topic":"ok","data":1,"colour":"red"}',
        NDJSON,
        {"line": 1},
    ),
    Case("batch: empty", "POST", "/v1/publish", 400, "bad-batch-line", b"\n\n", NDJSON),
    Case(
        "batch: a payload too large",
        "POST",
        "/v1/publish",
        413,
        "payload-too-large",
        GOOD_LINE + b"\n" + json.dumps({"topic": "ok", "data": "x" * (MAX_PAYLOAD + 1)}).encode(),
        NDJSON,
        {"line": 2},
    ),
    Case(
        "batch: body too large",
        "POST",
        "/v1/publish",
        413,
        "payload-too-large",
        (GOOD_LINE + b"\n") * (MAX_BATCH // len(GOOD_LINE) + 1),
        NDJSON,
    ),
    Case("sse: bad pattern", "GET", "/v1/sse?topic=a.%3E.b", 400, "bad-pattern"),
    Case("sse: no topic", "GET", "/v1/sse", 400, "missing-topic"),
    Case(
        "sse: 65 topics",
        "GET",
        "/v1/sse?" + "&".join(f"topic=t{i}" for i in range(65)),
        400,
        "too-many-topics",
    ),
    Case("sse: from_seq letters", "GET", "/v1/sse?topic=a&from_seq=abc", 400, "bad-position"),
    Case("sse: from_seq negative", "GET", "/v1/sse?topic=a&from_seq=-1", 400, "bad-position"),
    Case(
        "sse: Last-Event-ID garbage",
        "GET",
        "/v1/sse?topic=a",
        400,
        "bad-position",
        b"",
        {"Last-Event-ID": "E1:x"},
    ),
    Case("sse: position ahead", "GET", "/v1/sse?topic=a&from_seq=999", 400, "position-ahead"),
    Case(
        "sse: bad from",
        "GET",
        "/v1/sse?topic=a&from=middle",
        400,
        "bad-parameter",
        b"",
        {},
        {"name": "from"},
    ),
    Case("sse: POST", "POST", "/v1/sse?topic=a", 405, "method-not-allowed"),
    Case("ndjson: bad path topic", "GET", "/v1/topics/a..b/ndjson", 400, "bad-pattern"),
    Case("ndjson: bad epoch", "GET", "/v1/ndjson?topic=a&from_seq=e%20e:1", 400, "bad-position"),
    Case("poll: no topic", "GET", "/v1/poll", 400, "missing-topic"),
    Case(
        "poll: timeout too long",
        "GET",
        "/v1/poll?topic=a&timeout=61",
        400,
        "bad-parameter",
        b"",
        {},
        {"name": "timeout"},
    ),
    Case("poll: timeout letters", "GET", "/v1/poll?topic=a&timeout=soon", 400, "bad-parameter"),
    Case("poll: limit negative", "GET", "/v1/poll?topic=a&limit=-5", 400, "bad-parameter"),
    Case("poll: bad position", "GET", "/v1/poll?topic=a&from_seq=1.5", 400, "bad-position"),
    Case("unknown route", "GET", "/v2/anything", 404, "not-found"),
    Case("publish: DELETE", "DELETE", "/v1/topics/ok", 405, "method-not-allowed"),
]


@pytest.fixture
async def small_broker(start_broker: StartBroker) -> Running:
    return await start_broker(max_payload_bytes=MAX_PAYLOAD, max_batch_bytes=MAX_BATCH)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_gets_its_problem_document(case: Case, small_broker: Running) -> None:
    async with httpx.AsyncClient(base_url=small_broker.url) as http:
        before = small_broker.node.log.last_seq
        response = await http.request(
            case.method, case.path, content=case.body or None, headers=case.headers
        )
        assert response.status_code == case.status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == f"urn:broker:problem:{case.type}"
        assert problem["status"] == case.status
        assert problem["title"] and problem["detail"]
        for key, value in case.extra.items():
            assert problem[key] == value
        assert small_broker.node.log.last_seq == before  # nothing was stored
        # and the broker goes on serving everyone else
        assert (await http.post("/v1/topics/ok", content=b"fine")).json()["seq"] == before + 1


async def test_a_websocket_offering_only_unknown_subprotocols_is_refused(broker: Running) -> None:
    host, port = broker.url.split("//", 1)[1].rsplit(":", 1)
    with trio.socket.socket() as sock:
        await sock.connect((host, int(port)))
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send(ws.send(Request(host=host, target="/v1/ws", subprotocols=["mqtt"])))
        events: list[object] = []
        with trio.fail_after(10):
            while not any(isinstance(e, RejectData) and e.body_finished for e in events):
                ws.receive_data(await sock.recv(65536))
                events.extend(ws.events())
    (reject,) = [e for e in events if isinstance(e, RejectConnection)]
    assert reject.status_code == 400
    body = b"".join(e.data for e in events if isinstance(e, RejectData))
    assert json.loads(body)["type"] == "urn:broker:problem:bad-parameter"
