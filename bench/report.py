"""Writes a bench record: JSON (everything), a Markdown summary, PNG plots; ``latest.*`` copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def _best(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return (result or {}).get("best")


def fanout_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (server, transport, subscribers) with its best passing step."""
    rows = []
    fanout = record["results"].get("fanout", {})
    grpc = record["results"].get("grpc", {})  # records before 2026-11-22: its own scenario
    entries = [(server, transport, n, result)
               for server, transports in fanout.items()
               for transport, by_n in transports.items()
               for n, result in by_n.items()]
    entries += [("broker", "grpc", n, result) for n, result in grpc.items()]
    for server, transport, n, result in entries:
        best = _best(result)
        rows.append({"server": server, "transport": transport, "subscribers": int(n),
                     "best": best, "error": result.get("error")})
    baseline = {(r["server"], r["subscribers"]): r["best"] for r in rows if r["best"]}
    for row in rows:
        for name in ("starlette", "nats-server"):
            other = baseline.get((name, row["subscribers"]))
            mine = row["best"]
            row[f"vs_{name}"] = (round(mine["delivered_per_second"] /
                                       other["delivered_per_second"], 2)
                                 if mine and other else None)
    return rows


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = [
        f"# Bench {record['date']} ({record['plan']} plan)",
        "",
        f"- commit `{record['commit']}`, command `{record['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}, "
        f"Python {m['python']}; {m['pinning']}",
        f"- a step passes with 0 lost, p99 <= 50 ms, and the publisher kept >= 95 % of its "
        f"rate; each step publishes for {record['plan_detail']['seconds']} s with 100-byte "
        f"payloads; after its first failure a ramp bisects "
        f"{record['plan_detail'].get('refine', 0)} times"
        + (
            "; a rate holds if its step passes, or if after a failed step the next two tries "
            "at that rate both pass"
            if _retried(record["results"])
            else ""
        ),
    ]
    stolen = _stolen_steps(record["results"])
    if stolen is not None:
        lines.append(
            f"- {stolen} failed step{'s were' if stolen != 1 else ' was'} run again because "
            f"the hypervisor took more than {record.get('steal_limit_percent', 5.0):g} % of a "
            f"core during {'them' if stolen != 1 else 'it'}"
            " (`steal` in /proc/stat; every step's share of each core is in the JSON)")
    lines.append("")
    results = record["results"]
    if "capacity" in results:
        cap = results["capacity"]
        lines += ["Load generator capacity (against a trivial server, no broker): "
                  f"**{cap['bulk']['msgs_per_second']:,} msg/s** in big writes on "
                  f"{cap['bulk']['connections']} connections; "
                  f"**{cap['one-event-writes']['msgs_per_second']:,} msg/s** with one event per "
                  f"write on {cap['one-event-writes']['connections']:,} connections "
                  f"(its CPU {cap['one-event-writes']['load_cpu_percent']}%; the trivial "
                  "server is Python too, so this is a floor). The `load CPU %` column says "
                  "when a step was bound by the load generator rather than the server.", ""]
    rows = fanout_rows(record)
    if rows:
        lines += ["## Fan-out: 1 topic, N subscribers (best sustained step)", "",
                  "| server | transport | subscribers | publish msg/s | delivered msg/s | "
                  "p50 ms | p99 ms | max ms | server CPU % | load CPU % | vs Starlette | "
                  "vs nats-server |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: |"]
        for r in rows:
            b = r["best"]
            if b is None:
                why = (r["error"] or "").strip().splitlines()[-1:] or [""]
                lines.append(f"| {r['server']} | {r['transport']} | {r['subscribers']:,} | "
                             f"no step passed {why[0][:120]} | | | | | | | | |")
                continue
            lat = b["latency"]
            ratio = [f"{r[k]}x" if r[k] else "" for k in ("vs_starlette", "vs_nats-server")]
            lines.append(
                f"| {r['server']} | {r['transport']} | {r['subscribers']:,} | {b['rate']:,.0f} | "
                f"{b['delivered_per_second']:,} | {lat.get('p50_ms')} | {lat.get('p99_ms')} | "
                f"{lat.get('max_ms')} | {b['server_cpu_percent']} | "
                f"{b.get('load_cpu_percent', '')} | {ratio[0]} | {ratio[1]} |")
        lines.append("")
    equal = results.get("transports")
    if equal:
        lines += ["## The broker's transports at equal load", "",
                  "Each transport gets the same publish rate (with the broker's core not "
                  "saturated), in interleaved rounds; the cost is the broker's CPU time per "
                  "delivered message, the median over the rounds. Where the broker is "
                  "CPU-bound its capacity goes as the inverse: `capacity vs SSE` is SSE's cost "
                  "over the transport's.", "",
                  "| subscribers | publish msg/s | transport | rounds | broker us per delivery | "
                  "each round | capacity vs SSE | p50 ms | p99 ms | lost |",
                  "| ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for n, r in equal.items():
            for transport, t in r["transports"].items():
                each = ", ".join(f"{c}" for c in t["us_per_delivery_each"])
                relative = f"{t['relative_capacity']}x" if t["relative_capacity"] else ""
                lines.append(f"| {int(n):,} | {r['rate']:,.0f} | {transport} | {r['rounds']} | "
                             f"{t['us_per_delivery']} | {each} | {relative} | {t['p50_ms']} | "
                             f"{t['p99_ms']} | {t['lost']} |")
        lines += ["", "The rate: " + "; ".join(f"x{n}: {r['rate_from']}"
                                               for n, r in equal.items()) + "."]
        lines += [f"Not compared at {int(n):,}: {transport} ({error.strip()[:120]})."
                  for n, r in equal.items() for transport, error in r.get("errors", {}).items()]
        lines.append("")
    if "idle" in results:
        lines += ["## Idle connections", "", "| transport | connections | KiB per connection | "
                  "broker CPU % (heartbeats included) |", "| --- | ---: | ---: | ---: |"]
        for transport, by_n in results["idle"].items():
            for n, r in by_n.items():
                lines.append(f"| {transport} | {int(n):,} | {r['bytes_per_connection'] / 1024:.1f}"
                             f" | {r['cpu_percent']} |")
        lines.append("")
    if "publish" in results:
        lines += ["## Publish throughput (no subscribers)", "", "| path | msg/s |",
                  "| --- | ---: |"]
        for mode, r in results["publish"].items():
            rate = r.get("stored_rate", r["rate"])
            lines.append(f"| {mode} | {rate:,.0f} |")
        lines.append("")
    many = results.get("topics")
    if many and "error" not in many:
        lines += ["## Many topics (each SSE subscriber on its own topic or pattern)", "",
                  "| subscribed to | subscribers | publish msg/s (each delivered once) | p50 ms | "
                  "p99 ms | server CPU % |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for kind, r in many.items():
            b = _best(r)
            if b:
                lines.append(f"| {kind} | {b['subscribers']:,} | {b['delivered_per_second']:,} | "
                             f"{b['latency'].get('p50_ms')} | {b['latency'].get('p99_ms')} | "
                             f"{b['server_cpu_percent']} |")
            else:
                lines.append(f"| {kind} | | no step passed | | | |")
        lines.append("")
    slow = results.get("slow")
    if slow and "error" not in slow:
        lines += ["## Slow readers", "",
                  f"{slow['paused']} of {slow['subscribers']} SSE subscribers stop reading while "
                  f"{slow['published']:,} messages are published at {slow['rate']:,.0f} msg/s.",
                  "", "| the others' p99, all reading | while some stop | the others lost | "
                  "broker RSS before | while stopped | behind at resume | catch-up msg/s | "
                  "all received |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
                  f"| {slow['all_reading_p99_ms']} ms | {slow['others_p99_ms']} ms | "
                  f"{slow['others_lost']} | {slow['rss_mb_before']} MB | "
                  f"{slow['rss_mb_while_stopped']} MB | {slow['behind_when_resumed']:,} | "
                  f"{slow['catchup_msgs_per_second']:,} | {slow['all_received']} |", ""]
        if "alone_catchup_msgs_per_second" in slow:
            lines += [f"One reader stopped alone ({slow['alone_behind']:,} messages behind) "
                      f"caught up at {slow['alone_catchup_msgs_per_second']:,} msg/s (broker "
                      f"CPU {slow['alone_catchup_server_cpu_percent']} %; the ten together: "
                      f"{slow['catchup_server_cpu_percent']} %); all received: "
                      f"{slow['alone_all_received']}.", ""]
    latency = results.get("latency")
    if latency:
        lines += ["## Latency at a light load", "",
                  f"SSE subscribers; publish rate {latency['rate']:,} "
                  f"msg/s ({latency['rate_from']}); HTTP single requests at most 500/s.", "",
                  "| path | subscribers | publish msg/s | lost | p50 ms | p99 ms | max ms | "
                  "server CPU % |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        n = latency["subscribers"]
        latency_rows = [  # (path, its key in the record, subscribers)
            ("embedded http-batch", "embedded http-batch x1", 1),
            ("embedded http-batch", "embedded http-batch x10", 10),
            ("embedded http-batch", "embedded http-batch", n),
            ("embedded http", "embedded http", n),
            ("nats", "nats", n),
        ]
        for path, key, subscribers in latency_rows:
            r = latency.get(key)
            if r:
                lat = r["latency"]
                lines.append(f"| {path} | {subscribers} | {r['rate']:,} | {r['lost']} | "
                             f"{lat.get('p50_ms')} | {lat.get('p99_ms')} | {lat.get('max_ms')} | "
                             f"{r['server_cpu_percent']} |")
        lines.append("")
    if "cluster" in results:
        lines += ["## Cluster: SSE fan-out on 1 node vs 2 nodes (one NATS server)", "",
                  "| nodes | publish msg/s | delivered msg/s | p99 ms | CPU % (all nodes) |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for nodes, r in results["cluster"].items():
            b = _best(r)
            if b:
                lines.append(f"| {nodes} | {b['rate']:,.0f} | {b['delivered_per_second']:,} | "
                             f"{b['latency'].get('p99_ms')} | {b['server_cpu_percent']} |")
            else:
                lines.append(f"| {nodes} | no step passed | | | |")
        lines.append("")
    return "\n".join(lines)


def plots(record: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in fanout_rows(record) if r["best"]]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            series.setdefault(f"{r['server']} {r['transport']}", []).append(
                (r["subscribers"], r["best"]["delivered_per_second"]))
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("subscribers (one topic)")
        ax.set_ylabel("delivered msg/s (0 lost, p99 <= 50 ms)")
        ax.set_title(f"Fan-out, one server core ({record['commit']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-fanout.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 4.2))
        labels = [f"{r['server']}\n{r['transport']} x{r['subscribers']}" for r in rows]
        for key, color in (("p50_ms", "#2f6fed"), ("p99_ms", "#f0a020"), ("max_ms", "#c62828")):
            ax.scatter(range(len(rows)), [r["best"]["latency"].get(key, 0) for r in rows],
                       label=key.replace("_ms", ""), color=color)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60)
        ax.set_ylabel("publish -> delivery latency, ms")
        ax.set_yscale("log")
        ax.set_title("Latency at the best sustained rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    idle = record["results"].get("idle")
    if idle:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names, values = [], []
        for transport, by_n in idle.items():
            for n, r in by_n.items():
                names.append(f"{transport} x{int(n):,}")
                values.append(r["bytes_per_connection"] / 1024)
        ax.bar(names, values, color="#2f6fed")
        ax.set_ylabel("broker RSS per idle connection, KiB")
        ax.set_title("Idle connections")
        fig.tight_layout()
        path = stem.with_name(stem.name + "-idle.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(record: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = out / f"{stamp}-{record['plan']}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(record) + "\n")
    paths = [json_path, md_path, *plots(record, stem)]
    partial = "" if record.get("complete", True) else "-partial"
    for path in list(paths):
        latest = out / path.name.replace(stem.name, f"latest-{record['plan']}{partial}")
        shutil.copyfile(path, latest)
        paths.append(latest)
    return paths


def _stolen_steps(results: Any) -> int | None:
    """How many steps were run again for steal; None for records that did not measure it
    (before 2026-11-22 11:00 UTC)."""
    if isinstance(results, dict):
        if "steal_percent" in results:
            return int(bool(results.get("stolen")))
        counts = [_stolen_steps(value) for value in results.values()]
    elif isinstance(results, list):
        counts = [_stolen_steps(value) for value in results]
    else:
        return None
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def _retried(results: Any) -> bool:
    """Whether this record's ramps retried failed steps (its steps say whether their rate
    held; records before 2026-11-22 02:00 UTC do not)."""
    if isinstance(results, dict):
        return "held" in results or any(_retried(value) for value in results.values())
    if isinstance(results, list):
        return any(_retried(value) for value in results)
    return False
