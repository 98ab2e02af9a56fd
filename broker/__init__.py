"""broker: a real-time fan-out broker (publish to topics; subscribe over SSE, WebSocket, NDJSON
or long-poll; resume from any sequence number)."""

__version__ = "0.1.0"
