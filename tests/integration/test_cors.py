"""CORS (``cors_origins``): what a page on another origin is allowed to read and send."""

from __future__ import annotations

import httpx
import pytest

from broker.config import ConfigError, Settings
from tests.integration.conftest import StartBroker

APP = "https://app.example.com"


async def test_without_cors_origins_no_response_allows_another_origin(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/v1/topics/t", content=b"x", headers={"Origin": APP})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_any_origin_may_read_publish_answers_problems_and_streams(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(cors_origins="*")
    async with httpx.AsyncClient(base_url=broker.url, headers={"Origin": APP}) as http:
        published = await http.post("/v1/topics/t", content=b"x")
        problem = await http.get("/v1/sse?topic=a..b")
        async with http.stream("GET", "/v1/ndjson?topic=t&from=earliest") as stream:
            lines = stream.aiter_lines()
            assert '"type":"hello"' in await anext(lines)
            streamed = stream.headers
        script = await http.get("/static/broker.js")
    for response in (published, problem, script):
        assert response.headers["access-control-allow-origin"] == APP
        assert response.headers["vary"].lower() == "origin"
    assert problem.status_code == 400  # the page can read why
    assert streamed["access-control-allow-origin"] == APP
    # credentials only for origins listed by name
    assert "access-control-allow-credentials" not in published.headers


async def test_a_preflight_allows_the_methods_and_the_headers_asked_for(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(cors_origins=f"https://other.example, {APP}")
    async with httpx.AsyncClient(base_url=broker.url) as http:
        preflight = await http.options(
            "/v1/ndjson?topic=t",
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization,last-event-id",
            },
        )
        refused = await http.options(
            "/v1/topics/t",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        other = await http.post(
            "/v1/topics/t", content=b"x", headers={"Origin": "https://evil.example"}
        )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP
    assert preflight.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    assert preflight.headers["access-control-allow-headers"] == "authorization,last-event-id"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert int(preflight.headers["access-control-max-age"]) > 0
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in other.headers
    assert other.status_code == 200  # not a browser: CORS is the browser's to enforce


@pytest.mark.parametrize("bad", ["app.example.com", "https://app.example.com/path", "*, nope"])
def test_cors_origins_must_be_origins(bad: str) -> None:
    with pytest.raises(ConfigError, match="cors_origins"):
        Settings(cors_origins=bad)
