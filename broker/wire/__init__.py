"""Sans-io wire formats: bytes in, bytes out, no sockets and no clocks (like h11).

- `broker.wire.sse`: Server-Sent Events encoder, and the WHATWG EventSource parser for clients.
- `broker.wire.ndjson`: NDJSON event and control lines, the line splitter, batch-publish parsing.
- `broker.wire.ws`: WebSocket subprotocols (``broker.v1.json``, ``broker.v1.msgpack``): event and
  control frames out, client operations in.

Every encoder here runs once per event per transport and its result is shared by every subscriber,
so they assemble bytes directly where docs/protocol.md allows. Every parser raises only the
exceptions its docstring names (`RequestError` for what a client sent us, `ProtocolError` for a
garbled stream from a server), whatever the input: the tests fuzz them with Hypothesis.
"""
