"""The root of a node: one nursery holding the log, the router, hypercorn and the gRPC server;
drain on signal.

Shutdown is one sequence: readiness goes false, every connection is told to leave (SSE gets a
short ``retry`` and its stream ends, WebSocket closes with 1012, gRPC streams end with
UNAVAILABLE), we wait until they have left or
``drain_seconds`` passes, then hypercorn stops and the nursery is cancelled.
"""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app

from broker.backplane.base import Log
from broker.backplane.memory import MemoryLog
from broker.backplane.nats import JetStreamLog
from broker.config import Settings
from broker.errors import StartupError
from broker.node import Node
from broker.transports.asgi import create_app
from broker.transports.cors import with_cors
from broker.transports.grpc import GrpcServer
from broker.transports.http import create_quart_app
from broker.transports.listener import listen
from broker.transports.listener import serve as serve_asgi

logger = logging.getLogger("broker.server")
GRACEFUL_SECONDS = 1.0  # hypercorn's own grace once the subscribers have been drained


@dataclass(frozen=True)
class Running:
    """What a started server tells its starter."""

    node: Node
    url: str  # http://127.0.0.1:PORT
    server: Server
    grpc: str | None = None  # 127.0.0.1:PORT of the gRPC server, None when it is off


def make_log(settings: Settings) -> Log:
    """Embedded mode's in-memory log, or cluster mode's JetStream stream."""
    if not settings.nats_urls:
        return MemoryLog(
            retention_messages=settings.retention_messages,
            retention_bytes=settings.retention_bytes,
            retention_seconds=settings.retention_seconds,
            retention_messages_per_topic=settings.retention_messages_per_topic,
            dedupe_window_seconds=settings.dedupe_window_seconds,
        )
    return JetStreamLog(
        [url.strip() for url in settings.nats_urls.split(",") if url.strip()],
        stream=settings.nats_stream,
        subject_prefix=settings.nats_subject_prefix,
        replicas=settings.nats_replicas,
        retention_messages=settings.retention_messages,
        retention_bytes=settings.retention_bytes,
        retention_seconds=settings.retention_seconds,
        retention_messages_per_topic=settings.retention_messages_per_topic,
        dedupe_window_seconds=settings.dedupe_window_seconds,
    )


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    # WebSocket heartbeats are application frames written by the outlet (see websocket.py);
    # hypercorn still answers a client's pings.
    config.websocket_ping_interval = None
    # a WS publish op carries the payload plus a small envelope (and base64 for binary in JSON)
    config.websocket_max_message_size = settings.max_payload_bytes * 2 + 64 * 1024
    config.graceful_timeout = GRACEFUL_SECONDS  # connections have already been drained by then
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def keep_gc_young(interval: float, full_every: float) -> None:
    """Move every object alive now out of the collector's reach (``gc.freeze``), once per
    ``interval``, so that collections walk only what is new: the log's events (a million by
    default) would otherwise make each full collection a pause of 100-300 ms. Objects freed by
    reference counting (events leaving the log) are freed as usual; garbage *cycles* among frozen
    objects wait for the full collection every ``full_every`` seconds. See decisions #19."""
    last_full = trio.current_time()
    while True:
        await trio.sleep(interval)
        if trio.current_time() - last_full >= full_every:
            gc.unfreeze()
            gc.collect()
            last_full = trio.current_time()
        gc.freeze()


class Server:
    def __init__(self, settings: Settings, log: Log | None = None) -> None:
        self.settings = settings
        self.node = Node(settings, log if log is not None else make_log(settings))
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
    ) -> None:
        node = self.node
        app = create_app(node, create_quart_app(node))
        if self.settings.cors_origin_list:
            app = with_cors(app, self.settings.cors_origin_list)
        shutdown = trio.Event()
        http_done = trio.Event()

        async def serve_http(*, task_status: trio.TaskStatus[str]) -> None:
            config = hypercorn_config(self.settings)
            settings = self.settings
            try:
                sock = listen(settings.host, settings.port, backlog=settings.listen_backlog)
            except OSError as exc:
                address = f"{settings.host}:{settings.port}"
                raise StartupError(f"cannot listen on {address}: {exc}") from None
            try:
                await serve_asgi(
                    wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi"),
                    config,
                    sock,
                    node.connections,
                    shutdown_trigger=shutdown.wait,
                    native_app=app if self.settings.native_streams else None,
                    native_publish=node if self.settings.native_publish else None,
                    task_status=task_status,
                )
            finally:
                http_done.set()
                sock.close()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.log.run)
                node.hub.routed_seq = node.log.last_seq  # known once the log follows its source
                await nursery.start(node.router.run)
                await nursery.start(node.cut_stalled_writes)
                await nursery.start(node.heartbeats.run)
                if self.settings.gc_freeze_seconds:
                    nursery.start_soon(
                        keep_gc_young,
                        self.settings.gc_freeze_seconds,
                        self.settings.gc_full_collect_seconds,
                    )
                grpc = None
                if self.settings.grpc_listen != "off":
                    grpc = await nursery.start(GrpcServer(node).run)
                url = await nursery.start(serve_http)
                logger.info("serving", extra={"url": url, "grpc": grpc, "epoch": node.log.epoch})
                task_status.started(Running(node, url, self, grpc))
                await self._stop.wait()
                await self._drain()
                shutdown.set()
                with trio.move_on_after(GRACEFUL_SECONDS + 0.5):
                    await http_done.wait()
                if not http_done.is_set():
                    # what is left is stuck in a write (hypercorn shields those): sever it
                    cut = node.connections.cut_all()
                    logger.info("cut", extra={"connections": cut})
                    with trio.move_on_after(5.0):
                        await http_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()
            logger.info("stopped")

    async def _drain(self) -> None:
        node = self.node
        logger.info("draining", extra={"connections": len(node.outlets)})
        node.drain()
        with trio.move_on_after(self.settings.drain_seconds):
            await node.wait_no_outlets()
        # a subscriber still here is stuck in a write: sever its connection (only those: the
        # others are finishing their last bytes)
        stuck = list(node.outlets)
        cut = sum(outlet.cut() for outlet in stuck)
        logger.info("drained", extra={"connections_left": len(stuck), "connections_cut": cut})

    def stop(self) -> None:
        """Begin the graceful shutdown (idempotent)."""
        self._stop.set()

    async def stopped(self) -> None:
        await self._stopped.wait()


async def serve_until_signalled(settings: Settings) -> None:
    server = Server(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("signal", extra={"signal": signal.Signals(signum).name})
                server.stop()
                break
        await server.stopped()
