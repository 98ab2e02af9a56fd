"""Limits that every transport applies to a subscriber's connections.

Limits of one transport stay with it (`broker.client._http_stream`,
`broker.client._websocket`); `broker.client.subscribe` re-exports them all.
"""

# httpx's default connect timeout is 5 s; a TLS handshake across continents can take longer.
CONNECT_TIMEOUT_SECONDS = 10.0
# A frame or line carries a payload of up to max_payload_bytes (1 MiB by default) as base64 or as
# JSON-escaped text (up to 6 bytes a character), plus its envelope: 16 MiB bounds all of those.
MAX_FRAME_BYTES = 16 * 1024 * 1024
