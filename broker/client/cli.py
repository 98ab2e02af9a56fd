"""``broker pub`` and ``broker sub``: the client library on the command line.

Exit codes: 0 done, 1 the broker refused or could not be reached (one line on stderr,
``broker: <problem type>: <detail>``), 2 bad usage (argparse), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from broker.client._grpc import publish as grpc_publish
from broker.client.errors import ProblemError
from broker.client.events import GapNotice, Message, Received
from broker.client.publish import publish
from broker.client.subscribe import STARTS, TRANSPORTS, subscribe
from broker.errors import BrokerError, RequestError, Unavailable
from broker.model import parse_position
from broker.wire.ndjson import dumps_compact

URL_ENV = "BROKER_URL"
GRPC_ENV = "BROKER_GRPC"
DEFAULT_GRPC = "grpc://127.0.0.1:50051"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


def _from_seq(text: str) -> str:
    try:
        parse_position(text)
    except RequestError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return text


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return count


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], *, default_url: str
) -> None:
    """Add ``pub`` and ``sub``; ``BROKER_URL`` in the environment replaces ``default_url``."""
    url = os.environ.get(URL_ENV) or default_url
    url_help = f"the broker's base URL (default {url}; set {URL_ENV} to change it)"
    grpc_target = os.environ.get(GRPC_ENV) or DEFAULT_GRPC
    grpc_help = (
        f"the broker's gRPC target with --transport grpc (default {grpc_target}; {GRPC_ENV})"
    )

    pub = commands.add_parser(
        "pub",
        help="publish one message",
        description='Publish one message; print the broker\'s answer, e.g. {"seq":42}.',
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        default="-",
        help="the payload, sent as UTF-8 text; '-' or absent: read bytes from stdin",
    )
    pub.add_argument("--url", default=url, help=url_help)
    pub.add_argument("--transport", choices=("http", "grpc"), default="http", help="default: http")
    pub.add_argument("--grpc", default=grpc_target, help=grpc_help)
    pub.add_argument("--event", metavar="NAME", help="the SSE event name")
    pub.add_argument("--key", metavar="KEY", help="idempotency key: a repeat stores nothing")
    pub.add_argument(
        "--content-type",
        metavar="CT",
        help="default: text/plain; charset=utf-8 for DATA, application/octet-stream for stdin",
    )

    sub = commands.add_parser(
        "sub",
        help="subscribe and print messages as they arrive",
        description="Print one line per message (and per gap or reset notice) as it arrives. "
        "Reconnects and resumes after a disconnect unless --no-reconnect.",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+", help="a topic or pattern (*, >)")
    sub.add_argument("--url", default=url, help=url_help)
    sub.add_argument("--grpc", default=grpc_target, help=grpc_help)
    start = sub.add_mutually_exclusive_group()
    start.add_argument(
        "--from-seq", metavar="N|EPOCH:N", type=_from_seq, help="start after this position"
    )
    start.add_argument("--from", dest="start", choices=STARTS, help="default: latest")
    sub.add_argument(
        "--transport",
        choices=TRANSPORTS,
        # NDJSON carries the topic, the time and binary payloads; SSE carries neither.
        default="ndjson",
        help="default: ndjson",
    )
    sub.add_argument("--count", metavar="N", type=_count, help="exit after N messages")
    sub.add_argument("--no-reconnect", action="store_true", help="exit when the stream ends")
    sub.add_argument("--format", choices=("json", "text"), default="json", help="default: json")


def run(args: argparse.Namespace) -> int:
    """Run ``pub`` or ``sub``; return the process exit code."""
    work: Callable[[], Awaitable[int]]
    if args.command == "pub":
        try:
            payload: bytes | str = sys.stdin.buffer.read() if args.data == "-" else args.data
        except KeyboardInterrupt:  # Ctrl-C while we wait for stdin: trio is not running yet
            return EXIT_INTERRUPTED
        work = partial(_pub, args, payload)
    elif args.command == "sub":
        work = partial(_sub, args)
    else:
        raise ValueError(f"not a client command: {args.command!r}")
    return trio.run(_interruptible, work)


async def _interruptible(work: Callable[[], Awaitable[int]]) -> int:
    """``work()``, or 130 on SIGINT: cancelling lets every connection close in order."""
    code = EXIT_INTERRUPTED
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            code = await work()
            nursery.cancel_scope.cancel()
    return code


def _fail(message: str) -> int:
    print(f"broker: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def _failure(exc: BrokerError) -> int:
    if isinstance(exc, ProblemError):
        return _fail(str(exc))  # already "<slug>: <detail>"
    if isinstance(exc, Unavailable):
        return _fail(f"unavailable: {exc}")
    return _fail(str(exc))


async def _pub(args: argparse.Namespace, payload: bytes | str) -> int:
    try:
        if args.transport == "grpc":
            data = payload.encode() if isinstance(payload, str) else payload
            content_type = args.content_type
            if content_type is None and isinstance(payload, str):
                content_type = "text/plain; charset=utf-8"
            seq = await grpc_publish(
                args.grpc,
                args.topic,
                data,
                content_type=content_type,
                event=args.event,
                key=args.key,
            )
            print(dumps_compact({"seq": seq}).decode(), flush=True)
            return 0
        seq = await publish(
            args.url,
            args.topic,
            payload,
            content_type=args.content_type,
            event=args.event,
            key=args.key,
        )
    except BrokerError as exc:
        return _failure(exc)
    print(dumps_compact({"seq": seq}).decode(), flush=True)
    return 0


async def _sub(args: argparse.Namespace) -> int:
    received = 0
    line = _json_line if args.format == "json" else _text_line
    try:
        async with subscribe(
            args.grpc if args.transport == "grpc" else args.url,
            args.topics,
            transport=args.transport,
            from_seq=args.from_seq,
            start=args.start,
            reconnect=not args.no_reconnect,
        ) as subscriber:
            async for item in subscriber:
                if not _print(line(item)):
                    return 0  # the reader went away (`broker sub ... | head -1`): its choice
                if isinstance(item, Message):
                    received += 1
                    if received == args.count:
                        return 0
    except BrokerError as exc:
        return _failure(exc)
    if args.count is not None:
        return _fail(f"the server ended the subscription after {received} of {args.count}")
    return 0


def _print(line: str) -> bool:
    """Print and flush one line; False if stdout's reader has gone away."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


def _json_line(item: Received) -> str:
    obj: dict[str, Any]
    if isinstance(item, Message):
        obj = {"seq": item.seq, "topic": item.topic}
        if item.event is not None:
            obj["event"] = item.event
        try:
            obj["data"] = item.data.decode("utf-8")
        except UnicodeDecodeError:
            obj["data_b64"] = base64.b64encode(item.data).decode("ascii")
    elif isinstance(item, GapNotice):
        obj = {"type": "gap", "from_seq": item.from_seq, "to_seq": item.to_seq}
        if item.topic is not None:
            obj["topic"] = item.topic
    else:
        obj = {"type": "reset", "epoch": item.epoch}
    return dumps_compact(obj).decode("utf-8")


def _text_line(item: Received) -> str:
    if isinstance(item, Message):
        return f"{item.seq} {item.topic} {item.data.decode('utf-8', errors='backslashreplace')}"
    if isinstance(item, GapNotice):
        where = f" topic={item.topic}" if item.topic is not None else ""
        return f"gap from_seq={item.from_seq} to_seq={item.to_seq}{where}"
    return f"reset epoch={item.epoch}"
