"""Prometheus metrics, kept as plain counters and rendered in the text format at scrape time.

Gauges that describe subscriptions (buffer fill, pending events, states) are computed from the
live subscriptions when scraped, so the hot path only ever increments integers.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from broker.backplane.base import AppendResult
from broker.subscription import State, Subscription

if TYPE_CHECKING:
    from broker.node import Node

PUBLISH_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5)
FILL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
PENDING_BUCKETS = (0, 1, 10, 100, 1000, 10_000, 100_000)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.published: Counter[str] = Counter()
        self.duplicates = 0
        self.delivered: Counter[str] = Counter()
        self.connections_opened: Counter[str] = Counter()
        self.publish_seconds = Histogram(PUBLISH_SECONDS_BUCKETS)
        self._closed_catchups = 0
        self._closed_gaps = 0
        self.stalled_cuts = 0

    def count_delivered(self, transport: str, events: int) -> None:
        self.delivered[transport] += events

    def count_connection(self, transport: str) -> None:
        self.connections_opened[transport] += 1

    def count_published(
        self, transport: str, results: Iterable[AppendResult], seconds: float
    ) -> None:
        for result in results:
            if result.duplicate:
                self.duplicates += 1
            else:
                self.published[transport] += 1
        self.publish_seconds.observe(seconds)

    def absorb(self, sub: Subscription) -> None:
        """Keep a closing subscription's totals."""
        self._closed_catchups += sub.catchups
        self._closed_gaps += sub.gaps

    def render(self, node: Node) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        connections: Counter[str] = Counter(o.transport for o in node.outlets)
        subs = list(node.hub)
        states: Counter[State] = Counter(s.state for s in subs)
        fill, pending = Histogram(FILL_BUCKETS), Histogram(PENDING_BUCKETS)
        for sub in subs:
            fill.observe(
                max(sub.pending_events / sub.buffer_events, sub.pending_bytes / sub.buffer_bytes)
            )
            pending.observe(sub.pending_events)
        transports = sorted(set(connections) | set(self.connections_opened))

        metric(
            "broker_connections",
            "gauge",
            "Open client connections.",
            (f'broker_connections{{transport="{t}"}} {connections[t]}' for t in transports),
        )
        metric(
            "broker_connections_opened_total",
            "counter",
            "Client connections accepted.",
            (
                f'broker_connections_opened_total{{transport="{t}"}} {self.connections_opened[t]}'
                for t in transports
            ),
        )
        metric(
            "broker_subscriptions",
            "gauge",
            "Subscriptions by state.",
            (
                f'broker_subscriptions{{state="{s.value}"}} {states[s]}'
                for s in (State.LIVE, State.CATCHUP)
            ),
        )
        metric(
            "broker_events_published_total",
            "counter",
            "Events stored, by publish transport.",
            (
                f'broker_events_published_total{{transport="{t}"}} {n}'
                for t, n in sorted(self.published.items())
            ),
        )
        metric(
            "broker_publish_duplicates_total",
            "counter",
            "Publishes answered from the idempotency window (nothing stored).",
            [f"broker_publish_duplicates_total {self.duplicates}"],
        )
        metric(
            "broker_events_delivered_total",
            "counter",
            "Events written to subscribers.",
            (
                f'broker_events_delivered_total{{transport="{t}"}} {n}'
                for t, n in sorted(self.delivered.items())
            ),
        )
        metric(
            "broker_catchups_total",
            "counter",
            "Times a subscription's buffer filled and it switched to replaying the log.",
            [f"broker_catchups_total {self._closed_catchups + sum(s.catchups for s in subs)}"],
        )
        metric(
            "broker_gaps_total",
            "counter",
            "Gap control events sent to clients.",
            [f"broker_gaps_total {self._closed_gaps + sum(s.gaps for s in subs)}"],
        )
        metric(
            "broker_subscription_buffer_fill_ratio",
            "histogram",
            "Per-subscription buffer fill (the larger of events and bytes), at scrape time.",
            fill.render("broker_subscription_buffer_fill_ratio"),
        )
        metric(
            "broker_subscription_pending_events",
            "histogram",
            "Per-subscription lag: events buffered but not yet written, at scrape time.",
            pending.render("broker_subscription_pending_events"),
        )
        metric(
            "broker_publish_seconds",
            "histogram",
            "Time to store a publish request in the log.",
            self.publish_seconds.render("broker_publish_seconds"),
        )
        log = node.log.statistics()
        hub = node.hub.statistics()
        for name, kind, help, value in (
            ("broker_log_first_seq", "gauge", "Seq of the oldest retained event.", log.first_seq),
            ("broker_log_last_seq", "gauge", "Seq of the newest event.", log.last_seq),
            ("broker_log_retained_events", "gauge", "Events held by the log.", log.retained_events),
            ("broker_log_retained_bytes", "gauge", "Bytes held by the log.", log.retained_bytes),
            (
                "broker_log_trimmed_events_total",
                "counter",
                "Events dropped by retention.",
                log.trimmed_events,
            ),
            (
                "broker_hub_routed_events_total",
                "counter",
                "Events routed to subscriptions.",
                hub.routed_events,
            ),
            (
                "broker_hub_pushes_total",
                "counter",
                "Runs pushed into subscription buffers.",
                hub.pushes,
            ),
            (
                "broker_stalled_connections_cut_total",
                "counter",
                "Connections severed because a write was blocked past write_timeout_seconds.",
                self.stalled_cuts,
            ),
            ("broker_draining", "gauge", "1 while the node drains.", int(node.draining)),
        ):
            metric(name, kind, help, [f"{name} {value}"])
        return "\n".join(out) + "\n"
