"""A `Subscriber`'s connection over httpx: an SSE or NDJSON stream, or a run of long-polls.

Each ``run_*`` runs one connection until it ends (returns) or fails (raises); it calls
``opened`` once the server has accepted it, and hands what arrives to the `Subscriber`, which
resumes and de-duplicates. A refusal is `SubscribeError`, a 5xx `Unavailable`, a network fault
or ``heartbeat_timeout_seconds`` without a byte `BrokenError`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, cast

import httpx

from broker.client._limits import CONNECT_TIMEOUT_SECONDS, MAX_FRAME_BYTES
from broker.client.errors import SubscribeError, describe, problem_from_body
from broker.client.events import Message, from_object, json_object, server_position
from broker.errors import BrokenError, ProtocolError, Unavailable
from broker.wire.ndjson import LineSplitter
from broker.wire.sse import SSEMessage, SSEParser

if TYPE_CHECKING:
    from broker.client.subscribe import Subscriber

# A long-poll answers within its timeout; the server caps it at 30 s by default.
MAX_POLL_SECONDS = 30.0


def sse_topic(topics: Sequence[str]) -> str:
    """The topic of a `Message` read from SSE, which does not carry one: the subscription's
    topic when it names one literal topic, else ``""``."""
    if len(topics) == 1 and not any(token in ("*", ">") for token in topics[0].split(".")):
        return topics[0]
    return ""


def _timeout(sub: Subscriber) -> httpx.Timeout:
    """httpx's read timeout is the heartbeat timeout."""
    return httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=sub.heartbeat_timeout_seconds)


@asynccontextmanager
async def _stream(
    sub: Subscriber,
    http: httpx.AsyncClient,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A streaming GET's body chunks."""
    url = sub.base_url + path
    try:
        async with http.stream(
            "GET", url, params=tuple(query), headers=headers, timeout=_timeout(sub)
        ) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_refusal(response)
            # aiter_raw is an async generator: close it here, not when it is collected.
            chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            async with aclosing(chunks):
                yield chunks
    except httpx.ReadTimeout as exc:
        raise BrokenError(f"{url}: no bytes for {sub.heartbeat_timeout_seconds} s") from exc
    except httpx.HTTPError as exc:
        raise BrokenError(f"{url}: {describe(exc)}") from exc


async def run_sse(sub: Subscriber, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
    headers = {"Accept": "text/event-stream"}
    position = sub._position()
    if position is not None:
        headers["Last-Event-ID"] = position  # what EventSource sends when it reconnects
    query = sub._query(with_position=False)
    async with _stream(sub, http, "/v1/sse", query, headers) as chunks:
        opened()
        parser = SSEParser(max_line_bytes=MAX_FRAME_BYTES)
        async for chunk in chunks:
            for message in parser.feed(chunk):
                await _on_sse(sub, message)
            if parser.last_event_id and parser.last_event_id != sub._position():
                # An id with no data (not sent today) states a position without an event.
                await sub._adopt(parser.last_event_id)


async def _on_sse(sub: Subscriber, message: SSEMessage) -> None:
    position = server_position(message.id) if message.id else None
    epoch = position.epoch if position is not None else None
    if message.event in ("gap", "reset"):
        obj = json_object(message.data)
        item = from_object({**obj, "type": message.event})
        assert item is not None
        await sub._deliver(item, epoch)
        return
    if position is None:
        raise ProtocolError(f"SSE event without an id: {message!r:.120}")
    event = None if message.event == "message" else message.event
    data = message.data.encode("utf-8")
    await sub._deliver(Message(position.seq, sub._sse_topic, data, None, event), epoch)


async def run_ndjson(sub: Subscriber, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
    async with _stream(sub, http, "/v1/ndjson", sub._query(), {}) as chunks:
        opened()
        splitter = LineSplitter(max_line_bytes=MAX_FRAME_BYTES)
        async for chunk in chunks:
            for line in splitter.feed(chunk):
                if line:  # an empty line is the heartbeat
                    await sub._on_object(json_object(line))


async def run_poll(sub: Subscriber, http: httpx.AsyncClient, opened: Callable[[], None]) -> None:
    url = sub.base_url + "/v1/poll"
    # The server must answer well before the heartbeat timeout calls the request dead.
    wait_seconds = min(MAX_POLL_SECONDS, sub.heartbeat_timeout_seconds / 2)
    timeout = _timeout(sub)
    is_open = False
    while True:
        # The first poll of a subscription with no position returns at once: it fixes
        # where "latest" is, so that the subscription is open when `subscribe` returns.
        seconds = 0.0 if sub._position() is None else wait_seconds
        query = [*sub._query(), ("timeout", f"{seconds:g}")]
        try:
            response = await http.get(url, params=tuple(query), timeout=timeout)
        except httpx.ReadTimeout as exc:
            raise BrokenError(f"{url}: no answer in {sub.heartbeat_timeout_seconds} s") from exc
        except httpx.HTTPError as exc:
            raise BrokenError(f"{url}: {describe(exc)}") from exc
        if response.status_code != 200:
            _raise_refusal(response)
        if not is_open:  # a "connection" is a run of answered polls
            opened()
            is_open = True
        body = json_object(response.content)
        events, position = body.get("events"), body.get("position")
        if not isinstance(events, list) or not isinstance(position, str):
            raise ProtocolError(f"poll answer without events and position: {body!r:.120}")
        # Learn the epoch before the events, so that they leave "<epoch>:<seq>" behind.
        sub._learn_epoch(position)
        for obj in events:
            if not isinstance(obj, dict):
                raise ProtocolError(f"poll event is not an object: {obj!r:.120}")
            await sub._on_object(obj)
        await sub._adopt(position)


def _raise_refusal(response: httpx.Response) -> None:
    problem = problem_from_body(response.status_code, response.reason_phrase, response.content)
    if response.status_code < 500:  # a redirect or a refusal: asking again gets the same
        raise SubscribeError(response.status_code, problem)
    raise Unavailable(f"{response.url}: {response.status_code} {problem.get('detail', '')}")
