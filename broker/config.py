"""Settings: one frozen dataclass with unit-named limits.

Sources, later ones winning: the defaults below, a TOML file (``--config`` or ``BROKER_CONFIG``;
keys are the field names, at the top level or under ``[broker]``), ``BROKER_<FIELD>``
environment variables, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from broker.subscription import OverflowPolicy

ENV_PREFIX = "BROKER_"
KiB = 1024
MiB = 1024 * KiB


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+\Z")


class ConfigError(ValueError):
    """A setting has a bad value (reported to the operator at start, never at run time)."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port (tests)
    # Heartbeats: SSE comment, NDJSON empty line, WS heartbeat frame. Proxies idle out at 60 s
    # (nginx proxy_read_timeout); 15 s is the usual SSE keepalive (WHATWG's example, Mercure).
    heartbeat_seconds: float = 15.0
    sse_retry_ms: int = 2000  # EventSource's reconnect delay; browsers default to ~3 s
    # Per-subscription buffer. Centrifugo: client_queue_max_size 1 MiB.
    buffer_events: int = 10_000
    buffer_bytes: int = 1 * MiB
    overflow_policy: OverflowPolicy = OverflowPolicy.CATCHUP
    catchup_page_events: int = 1000  # events read from the log per catch-up step
    # Embedded log retention. nchan: nchan_message_timeout 1h; bounded by count and bytes too.
    retention_messages: int = 1_000_000
    retention_bytes: int = 256 * MiB
    retention_seconds: float = 3600.0
    retention_messages_per_topic: int = 0  # 0: no limit (JetStream's max_msgs_per_subject)
    dedupe_window_seconds: float = 120.0  # JetStream's default duplicate window (2 min)
    max_payload_bytes: int = 1 * MiB  # NATS' default max_payload
    max_batch_bytes: int = 16 * MiB
    max_batch_lines: int = 10_000
    max_topics_per_subscription: int = 64
    max_ws_subscriptions: int = 256  # subscriptions on one WebSocket
    poll_timeout_seconds: float = 30.0  # default wait of a long-poll
    poll_max_timeout_seconds: float = 60.0
    poll_limit_events: int = 1000
    drain_seconds: float = 10.0  # grace for clients to leave on SIGTERM (k8s gives 30 s)
    # A client whose socket has accepted nothing for this long is cut (it resumes on reconnect).
    # Centrifugo cuts WebSocket writes after 1 s; SSE on mobile networks deserves longer.
    write_timeout_seconds: float = 30.0
    # Cluster mode: a NATS JetStream stream as the shared log (empty: embedded mode).
    nats_urls: str = ""  # comma-separated, e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222
    nats_stream: str = "BROKER"
    nats_subject_prefix: str = "broker.t"  # topic t is the subject <prefix>.t
    nats_replicas: int = 1  # 3 on a 3-node NATS cluster
    # gRPC: HOST:PORT of the grpc.aio server (port 0 picks a free one), or "off".
    grpc_listen: str = "127.0.0.1:50051"
    grpc_keepalive_seconds: float = 20.0  # server pings an idle connection this often
    grpc_keepalive_timeout_seconds: float = 10.0  # and drops it when no answer comes this soon
    # Browsers on other origins: comma-separated origins (https://app.example.com) or "*", allowed
    # to read responses (EventSource, fetch) and to send headers such as Authorization. Empty:
    # same-origin pages only. WebSocket is not subject to CORS (see docs/operations.md).
    cors_origins: str = ""
    # Subscriber streams (SSE, NDJSON, WebSocket) written straight to the socket; false: every
    # connection through hypercorn (the slow path, kept complete; see docs/performance.md).
    native_streams: bool = True
    # Publish requests (POST /v1/publish, /v1/topics/{topic} with a Content-Length body) answered
    # on the raw socket; false: through hypercorn and quart (see docs/performance.md).
    native_publish: bool = True
    # gRPC's Subscribe streams written straight to the socket by the broker's own HTTP/2
    # listener, which passes every other call on to grpc.aio on a loopback port; false: grpc.aio
    # serves the gRPC port itself (see docs/performance.md).
    native_grpc: bool = True
    # Connections the kernel queues before they are accepted. When clients reconnect all at once
    # (a node restarted), a short queue drops SYNs and each dropped one waits 1 s (then 3 s...)
    # to retry; Linux caps this at net.core.somaxconn (4096 by default).
    listen_backlog: int = 4096
    # Garbage collection: objects alive are frozen out of the collector's way this often (0: off,
    # the interpreter's default behaviour), and a full collection runs this often.
    gc_freeze_seconds: float = 1.0
    gc_full_collect_seconds: float = 600.0
    log_level: str = "info"
    log_format: str = "json"  # or "text"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            # written so that NaN, which fails every comparison, is refused too
            allowed = value > 0 or (value == 0 and f.name in _ZERO_ALLOWED)
            if not allowed or value == math.inf:
                raise ConfigError(f"{f.name} must be a finite positive number, got {value}")
        try:  # accept the policy's name too (Settings(overflow_policy="drop"))
            object.__setattr__(self, "overflow_policy", OverflowPolicy(self.overflow_policy))
        except ValueError:
            choices = ", ".join(p.value for p in OverflowPolicy)
            raise ConfigError(
                f"overflow_policy must be one of {choices}, not {self.overflow_policy!r}"
            ) from None
        if self.grpc_listen != "off":
            host, _, port = self.grpc_listen.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"grpc_listen must be HOST:PORT or off, got {self.grpc_listen!r}")
        for origin in self.cors_origin_list:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ConfigError(
                    f"cors_origins: {origin!r} is not an origin (scheme://host[:port]) or *"
                )
        if self.log_format not in {"json", "text"}:
            raise ConfigError(f"log_format must be json or text, got {self.log_format!r}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"log_level must be debug/info/warning/error, not {self.log_level!r}")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_ZERO_ALLOWED = {"port", "retention_messages_per_topic", "gc_freeze_seconds"}
_FIELDS = frozenset(f.name for f in fields(Settings))
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(name: str, raw: object) -> object:
    """Turn a TOML value or an environment string into the field's type."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting {name!r}")
    default = getattr(Settings(), name)
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {raw!r}")
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise ConfigError(f"{name}: expected a {type(default).__name__}, got {raw!r}")
    try:
        if isinstance(default, OverflowPolicy):
            return OverflowPolicy(str(raw).lower())
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except ValueError as exc:
        choices = ""
        if isinstance(default, OverflowPolicy):
            choices = " (one of " + ", ".join(p.value for p in OverflowPolicy) + ")"
        raise ConfigError(f"{name}: cannot use {raw!r}{choices}") from exc


def load_settings(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings)}
    values: dict[str, object] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            document = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        table = document
        if "broker" in document:
            table = document["broker"]
            others = sorted(set(document) - {"broker"})
            if others or not isinstance(table, dict):
                raise ConfigError(
                    f"{config_file}: put every setting under [broker] (found {others or 'broker'})"
                )
        for key, raw in table.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r} in {config_file}")
            values[key] = _convert(key, raw)
    for key in known:
        raw_env = environ.get(ENV_PREFIX + key.upper())
        if raw_env is not None:
            values[key] = _convert(key, raw_env)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _convert(key, raw)
    return Settings(**values)  # type: ignore[arg-type]
