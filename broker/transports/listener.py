"""Our own accept loop in front of hypercorn, and a way to cut a connection whose write is stuck.

hypercorn writes to a client inside a *shielded* cancel scope (``TCPServer.protocol_send``), so
a client that stops reading, or vanishes without a FIN, pins its connection task: no
cancellation reaches it and a graceful shutdown never ends. What does unstick it is the socket
failing. So we accept connections ourselves, remember each one's socket by peer address (what
ASGI's ``scope["client"]`` says), and when a write has been stuck too long, or the drain grace
is over, shut that socket down (``shutdown(SHUT_RDWR)``: hypercorn's blocked send fails and
everything unwinds the normal way, with the socket closed by its owner).

`serve` is hypercorn's ``trio.run.worker_serve`` cut down to plain HTTP (no TLS, QUIC or statsd)
with `TrackingListener` as the listener. It is also the seam where a native fast path for
subscriber streams can later read the request head before handing a connection to hypercorn.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr

from broker.transports import native

logger = logging.getLogger("broker.listener")

Address = tuple[Any, ...]
SWEEP_AT_ENTRIES = 4096  # past this many, forget connections that have closed


class ConnectionRegistry:
    """Open connections by peer address."""

    def __init__(self, *, user_timeout_seconds: float) -> None:
        self._sockets: dict[Address, trio.socket.SocketType] = {}
        self._user_timeout_ms = int(user_timeout_seconds * 1000)
        self._sweep_at = SWEEP_AT_ENTRIES

    def __len__(self) -> int:
        return len(self._sockets)

    def accepted(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # the kernel gives up on a peer that acknowledges nothing for this long
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self._user_timeout_ms)
        self._sockets[tuple(sock.getpeername())] = sock
        if len(self._sockets) >= self._sweep_at:
            self._sockets = {a: s for a, s in self._sockets.items() if s.fileno() != -1}
            self._sweep_at = max(SWEEP_AT_ENTRIES, 2 * len(self._sockets))

    def cut(self, addr: Address | None) -> bool:
        """Shut down the connection from ``addr``; False if there is none open."""
        sock = self._sockets.pop(tuple(addr), None) if addr is not None else None
        if sock is None or sock.fileno() == -1:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True

    def cut_all(self) -> int:
        return sum(self.cut(addr) for addr in list(self._sockets))


class TrackingListener(trio.abc.Listener[trio.SocketStream]):
    """A `trio.SocketListener` (final, hence wrapped) that registers what it accepts."""

    def __init__(self, sock: trio.socket.SocketType, registry: ConnectionRegistry) -> None:
        self._inner = trio.SocketListener(sock)
        self._registry = registry

    async def accept(self) -> trio.SocketStream:
        stream = await self._inner.accept()
        with contextlib.suppress(OSError):  # the peer left already; hypercorn will find out
            self._registry.accepted(stream)
        return stream

    async def aclose(self) -> None:
        await self._inner.aclose()


class ClosingTCPServer(TCPServer):
    """hypercorn's connection, closed when its protocol says so.

    The protocol sends ``Closed`` (after a ``Connection: close`` response) and ``Updated(idle)``
    (which starts the keep-alive timeout) from inside the app's task, and quart-trio cancels
    that task's scope as its response ends: the close, or the timeout's start, was cancelled
    at its first checkpoint, and such a connection stayed open until the client closed it.
    Both are quick (a shutdown, a close, starting a task), so they run shielded."""

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Closed | Updated):
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
        else:
            await super().protocol_send(event)


def listen(host: str, port: int, *, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.setblocking(False)
    sock.listen(backlog)
    return sock


async def serve(
    app: AppWrapper,
    config: Config,
    sock: socket.socket,
    registry: ConnectionRegistry,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    native_app: Any = None,
    native_publish: Any = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``sock`` until ``shutdown_trigger`` returns; started with the URL.
    With ``native_app`` (the plain ASGI app), subscriber streams are served by `native`; with
    ``native_publish`` (the node), publish requests are (`native_publish`)."""
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            listener = TrackingListener(trio.socket.from_stdlib_socket(sock), registry)
            url = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
            task_status.started(url)
            state = ConnectionState(lifespan_state.copy())
            handler: Callable[[trio.SocketStream], Awaitable[None]]
            handler = partial(ClosingTCPServer, app, config, context, state)
            hangups = native.Hangups()
            server_nursery.start_soon(hangups.run)
            if native_app is not None or native_publish is not None:  # the raw socket (native.py)
                handler = partial(
                    native.handle, app=native_app, fallback=handler,
                    max_ws_message=config.websocket_max_message_size, hangups=hangups,
                    node=native_publish,
                )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    serve_listeners = partial(
                        trio.serve_listeners, handler, [listener], handler_nursery=server_nursery
                    )
                    nursery.start_soon(serve_listeners)
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                hangups.close()
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
