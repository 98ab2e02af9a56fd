"""The Python client: publish over HTTP, subscribe over SSE, NDJSON, WebSocket or long-poll.

::

    seq = await publish("http://127.0.0.1:8080", "chat.lobby", "hello")
    async with subscribe("http://127.0.0.1:8080", ["chat.*"], transport="ws") as sub:
        async for item in sub:
            ...  # Message, GapNotice or ResetNotice
"""

from broker.client.errors import ProblemError, PublishError, SubscribeError
from broker.client.events import GapNotice, Message, Received, ResetNotice
from broker.client.publish import publish, publish_batch
from broker.client.subscribe import TRANSPORTS, Subscriber, Transport, subscribe

__all__ = [
    "TRANSPORTS",
    "GapNotice",
    "Message",
    "ProblemError",
    "PublishError",
    "Received",
    "ResetNotice",
    "SubscribeError",
    "Subscriber",
    "Transport",
    "publish",
    "publish_batch",
    "subscribe",
]
