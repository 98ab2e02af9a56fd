"""``broker bench``: scenarios against the broker and its baselines, in one run, on pinned cores.

Every server under test runs on one core (``taskset -c 0``); the load generator and the
publisher run on the other (``-c 1``). Each measurement step: the subscribers' counters are
reset, the publisher sends ``rate x seconds`` messages at ``rate``, and the step ends when every
subscriber has every message (or nothing arrived for ``--settle`` seconds). A step passes with
0 lost and p99 <= the latency budget. Results: ``bench/results/<stamp>.json`` and ``.md``, PNG
plots, and ``latest.*`` copies; see docs/performance.md for what each scenario means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SERVER_CORE, LOAD_CORE = "0", "1"
# A failed step during which the hypervisor took more than this share of either core is run
# again, at most `STEAL_RETRIES` times (this VM's host lends its cores to other guests: minutes
# with 6-44 % of a core stolen).
STEAL_LIMIT_PERCENT = 5.0
STEAL_RETRIES = 3
P99_BUDGET_MS = 50.0
RATE_KEPT = 0.95  # a step passes only if the publisher kept at least this much of its rate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


CHILDREN: list[subprocess.Popen[Any]] = []  # every process the bench started, for cleanup


def spawn(core: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
    process = subprocess.Popen(pinned(core, argv), cwd=ROOT, **kw)
    CHILDREN.append(process)
    return process


def kill_children() -> None:
    for process in CHILDREN:
        if process.poll() is None:
            process.kill()
            process.wait()


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") and os.cpu_count() else argv


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (held open together while they are picked,
    so that no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerExited(RuntimeError):
    """A server under test exited before it listened."""


def wait_port(port: int, process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerExited(f"the server exited ({process.returncode}) before listening on "
                               f"{port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def start_listening(
    start: Callable[[list[int]], subprocess.Popen[Any]], ports: int, tries: int = 3
) -> tuple[subprocess.Popen[Any], list[int]]:
    """Start a server on ``ports`` ports picked free (``start`` is given them) and wait until
    it listens on every one. A port picked free can be taken before the server binds it (by
    another process's connection, or by one of the server's own loopback listeners); a server
    that exits before listening is started again on new ports."""
    for attempt in range(tries):
        chosen = free_ports(ports)
        process = start(chosen)
        try:
            for port in chosen:
                wait_port(port, process)
        except ServerExited as exc:
            log(f"  {exc}; starting it again on other ports")
            if attempt == tries - 1:
                raise
            continue
        return process, chosen
    raise AssertionError("unreachable")


# -- servers under test ---------------------------------------------------------------------


@dataclass
class Target:
    name: str
    process: subprocess.Popen[bytes]
    port: int  # HTTP (broker, starlette), NATS client port (nats-server)
    grpc_port: int = 0
    ws_port: int = 0  # nats-server's WebSocket listener
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        for proc in [self.process, *self.extra]:
            proc.terminate()
        for proc in [self.process, *self.extra]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_broker(name: str = "broker", nats_url: str = "", stream: str = "") -> Target:
    def start(ports: list[int]) -> subprocess.Popen[Any]:
        port, grpc_port = ports
        argv = [PYTHON, "-m", "broker", "serve", "--port", str(port), "--log-level", "warning",
                "--grpc-listen", f"127.0.0.1:{grpc_port}", "--heartbeat-seconds", "15"]
        if nats_url:
            argv += ["--nats", nats_url, "--nats-stream", stream, "--nats-subject-prefix",
                     stream.lower()]
        return spawn(SERVER_CORE, argv)

    process, (port, grpc_port) = start_listening(start, 2)
    return Target(name, process, port, grpc_port=grpc_port)


def start_starlette() -> Target:
    def start(ports: list[int]) -> subprocess.Popen[Any]:
        return spawn(SERVER_CORE, [PYTHON, "-m", "uvicorn", "--factory",
                                   "bench.baselines:starlette_app", "--port", str(ports[0]),
                                   "--log-level", "warning", "--no-access-log"])

    process, (port,) = start_listening(start, 1)
    return Target("starlette", process, port)


def nats_binary() -> str:
    from broker.cluster import nats_server_binary

    return nats_server_binary()


def start_nats(name: str = "nats-server", jetstream: bool = False) -> Target:
    def start(ports: list[int]) -> subprocess.Popen[Any]:
        port, ws_port = ports
        config = Path(tempfile.mkdtemp(prefix="bench-nats-")) / "nats.conf"
        config.write_text(
            f'listen: "127.0.0.1:{port}"\nwebsocket {{ listen: "127.0.0.1:{ws_port}"\n'
            f"  no_tls: true }}\n"
            + (f'jetstream {{ store_dir: "{config.parent}" }}\n' if jetstream else "")
        )
        return spawn(SERVER_CORE, [nats_binary(), "-c", str(config)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    process, (port, ws_port) = start_listening(start, 2)
    return Target(name, process, port, ws_port=ws_port)


def start_trivial(events_per_write: int = 0) -> Target:
    def start(ports: list[int]) -> subprocess.Popen[Any]:
        return spawn(SERVER_CORE, [PYTHON, "-m", "bench.baselines", "trivial", "--port",
                                   str(ports[0]), "--events-per-write", str(events_per_write)])

    process, (port,) = start_listening(start, 1)
    return Target("trivial", process, port)


# -- load ---------------------------------------------------------------------------------

LOADGEN_C = ROOT / "bench" / "loadgen.c"
LOADGEN_BIN = ROOT / "bench" / ".build" / "loadgen"


def loadgen_argv() -> list[str]:
    """The C load generator (built here with the system's cc: ~1 us per read, so it is never
    what bounds a step), else the Python one (bench/loadgen.py: the same protocol)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler:
        fresh = LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= LOADGEN_C.stat().st_mtime
        if not fresh:
            LOADGEN_BIN.parent.mkdir(exist_ok=True)
            built = subprocess.run([compiler, "-O2", "-o", str(LOADGEN_BIN), str(LOADGEN_C)],
                                   capture_output=True, text=True)
            if built.returncode != 0:
                log(f"warning: cannot build {LOADGEN_C.name}: {built.stderr[-500:]}")
        if LOADGEN_BIN.exists():
            return [str(LOADGEN_BIN)]
    return [PYTHON, "-m", "bench.loadgen"]



class Subscribers:
    """One load generator process holding ``n`` connections."""

    def __init__(self, target: Target, transport: str, n: int, *, topic: str = "bench",
                 sample_every: int = 10, path: str | None = None) -> None:
        port = target.ws_port if transport == "nats-ws" else target.port
        if path is None:
            path = {"sse": f"/v1/sse?topic={topic}", "ndjson": f"/v1/ndjson?topic={topic}",
                    "ws": "/v1/ws", "nats-ws": "/"}[transport]
        self._launch(transport, n, [
            *loadgen_argv(), "--port", str(port), "--transport", transport, "--path", path,
            "--connections", str(n), "--sample-every", str(sample_every),
            "--ws-subscribe", topic, "--nats-subject", topic])

    def _launch(self, what: str, n: int, argv: list[str]) -> None:
        self.n = n
        self.process = spawn(LOAD_CORE, argv, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        ready = self._answer()
        if ready["ready"] != n:
            self.close()
            raise RuntimeError(f"{what}: only {ready['ready']} of {n} connected: "
                               f"{ready['errors']}")

    def _answer(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            raise RuntimeError("the load generator exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, name: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            with suppress(BrokenPipeError, OSError):
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def publish(target: Target, mode: str, count: int, rate: float, topic: str = "bench",
            subject: str = "", topics: int = 1) -> dict[str, Any]:
    port = {"grpc": target.grpc_port, "nats": target.port}.get(mode, target.port)
    argv = [PYTHON, "-m", "bench.publisher", "--mode", mode, "--port", str(port),
            "--count", str(count), "--rate", str(rate), "--topic", topic, "--topics", str(topics),
            "--subject", subject or f"broker.t.{topic}"]
    done = subprocess.run(pinned(LOAD_CORE, argv), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"publisher {mode}: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@dataclass
class Step:
    rate: float
    subscribers: int
    published: int
    received: int
    lost: int
    seconds: float
    delivered_per_second: float
    latency: dict[str, float]
    server_cpu_percent: float
    server_rss_mb: float
    load_cpu_percent: float = 0.0  # the load generator's core: near 100 means it bounds this step
    # The rate the publisher achieved: under ``RATE_KEPT`` of ``rate``, the server held it back
    # (one request in flight), and latency stamped at sending would hide the wait; such a step
    # has not sustained its rate. None: not known.
    publish_rate: float | None = None
    # Whether its rate held, over every try at that rate (see `ramps`); None outside a ramp.
    held: bool | None = None
    # The share of each core ("cpu0": the servers', "cpu1": the load's) that the hypervisor
    # gave to someone else during the step ("steal" in /proc/stat). None: not measured.
    steal_percent: dict[str, float] | None = None
    stolen: bool = False  # it failed with too much stolen, and was run again (`unstolen_step`)

    @property
    def passed(self) -> bool:
        kept = self.publish_rate is None or self.publish_rate >= RATE_KEPT * self.rate
        return kept and self.lost == 0 and self.latency.get("p99_ms", 1e9) <= P99_BUDGET_MS


def step(target: Target, subs: Subscribers, rate: float, seconds: float, *, mode: str,
         topic: str = "bench", subject: str = "", settle: float = 3.0, topics: int = 1,
         fanout: int | None = None) -> Step:
    """``fanout``: deliveries per published message (default: every subscriber gets each)."""
    subs.command("reset")
    load = psutil.Process(subs.process.pid) if hasattr(subs, "process") else None
    load0 = _cpu(load)
    cpu0, start = target.cpu_seconds(), time.monotonic()
    ticks0 = core_ticks()
    count = max(1, int(rate * seconds))
    sent = publish(target, mode, count, rate, topic, subject, topics)
    published = sent["published"]
    late = sent.get("late_seconds", 0.0)
    publish_rate = published / (published / rate + late) if published else 0.0
    expected = published * (fanout or subs.n)
    last, last_change = -1, time.monotonic()
    while True:
        # "count", not "report": percentiles sort every sample, which would take the load
        # generator away from its sockets while it is being timed
        report = subs.command("count")
        if report["received"] >= expected:
            break
        if report["received"] != last:
            last, last_change = report["received"], time.monotonic()
        elif time.monotonic() - last_change > settle:
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    cpu = target.cpu_seconds() - cpu0
    load_cpu = _cpu(load) - load0
    report = subs.command("report")
    return Step(
        rate=rate, subscribers=subs.n, published=sent["published"],
        received=report["received"], lost=max(0, expected - report["received"]),
        seconds=round(elapsed, 3), delivered_per_second=round(report["received"] / elapsed),
        latency=report["latency"], server_cpu_percent=round(100 * cpu / elapsed, 1),
        server_rss_mb=round(target.rss() / 2**20, 1),
        load_cpu_percent=round(100 * load_cpu / elapsed, 1),
        publish_rate=round(publish_rate, 1),
        steal_percent=stolen_since(ticks0),
    )


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def _rates(start_rate: float, factor: float, max_steps: int,
           refine: int) -> Generator[float, bool, None]:
    """A ramp's rates, each step's verdict sent back: raise the rate by ``factor`` until a step
    fails, then bisect (geometrically, ``refine`` times) between the highest rate that held and
    the lowest that did not. With ``factor`` 1.6 and 3 bisections the result is within 6 % of
    the limit, where the bare ramp left it anywhere in a 60 % band (too coarse to say whether
    two transports are within 10 % of each other). If the first rate fails, it is halved up to
    three times to find one that holds."""
    rate = start_rate
    held, failed = 0.0, 0.0
    downward = 0
    for _ in range(max_steps):
        if (yield rate):
            held = rate
            if failed:
                break  # found the rate that holds below the one that did not
            rate *= factor
            continue
        failed = rate
        if held or downward >= 3 or rate / 2 < 1:
            break
        downward += 1
        rate /= 2
    for _ in range(refine if held and failed else 0):
        rate = (held * failed) ** 0.5
        if (yield rate):
            held = rate
        else:
            failed = rate


def ramp(target: Target, subs: Subscribers, *, mode: str, start_rate: float, seconds: float,
         factor: float, max_steps: int, label: str, refine: int = 0,
         **kw: Any) -> dict[str, Any]:
    """One server's ramp (`_rates`); the best passing step is the result."""
    return ramps([(label, target, subs)], mode=mode, start_rate=start_rate, seconds=seconds,
                 factor=factor, max_steps=max_steps, refine=refine, **kw)[label]


def ramps(series: Sequence[tuple[str, Target, Subscribers]], *, mode: str, start_rate: float,
          seconds: float, factor: float, max_steps: int, refine: int = 0,
          **kw: Any) -> dict[str, dict[str, Any]]:
    """Several ramps in lockstep: each round, every series still going runs its next step.
    This VM's speed drifts from minute to minute (the same transport's p99 at one rate moved
    from 39 to 114 ms between runs a few minutes apart), so ramps run one after the other could
    not tell transports 10 % apart; interleaved, the drift falls on all of them alike.

    A rate holds if its step passes, or if, after it failed, the next two tries at that rate
    both pass. With the broker's core saturated (1,000 subscribers: every rate from ~80 msg/s
    up) the p99 wanders around the 50 ms budget from one 5 s step to the next, and a ramp that
    ended on its first unlucky step measured luck rather than the server."""
    going: dict[str, tuple[Target, Subscribers, Generator[float, bool, None], float]] = {}
    steps: dict[str, list[Step]] = {}
    for label, target, subs in series:
        rates = _rates(start_rate, factor, max_steps, refine)
        going[label] = (target, subs, rates, next(rates))
        steps[label] = []
    while going:
        for label, (target, subs, rates, rate) in list(going.items()):
            attempt = partial(unstolen_step, target, subs, rate, seconds, mode=mode,
                              label=label, **kw)
            taken = attempt()  # every step run: those run again for steal too
            tries = [taken[-1]]
            if not tries[0].passed:  # one unlucky step does not end a ramp: try twice more
                taken += attempt(note="again")
                tries.append(taken[-1])
                if tries[-1].passed:
                    taken += attempt(note="again")
                    tries.append(taken[-1])
            held = tries[0].passed or (len(tries) == 3 and tries[2].passed)
            for tried in tries:
                tried.held = held
            steps[label].extend(taken)
            try:
                going[label] = (target, subs, rates, rates.send(held))
            except StopIteration:
                del going[label]
    out: dict[str, dict[str, Any]] = {}
    for label, taken in steps.items():
        best = max((s for s in taken if s.passed and s.held and not s.stolen),
                   key=lambda s: s.delivered_per_second, default=None)
        out[label] = {"best": best.__dict__ if best else None,
                      "steps": [s.__dict__ for s in taken]}
    return out


def unstolen_step(target: Target, subs: Subscribers, rate: float, seconds: float, *,
                  label: str, note: str = "", **kw: Any) -> list[Step]:
    """`step`, run again once the machine is quiet if it failed while the hypervisor took more
    than `STEAL_LIMIT_PERCENT` of either core (at most `STEAL_RETRIES` times): such a step
    measured the host's other tenants, not the server (at 1,000 SSE subscribers: p99 31-168 ms
    with 6-44 % of a core stolen, 21-31 ms with under 3 %). Every step run is returned, the last
    one counts; the others are marked ``stolen``."""
    taken: list[Step] = []
    while True:
        result = step(target, subs, rate, seconds, **kw)
        taken.append(result)
        _log_step(label, rate, result, note)
        stolen = max((result.steal_percent or {}).values(), default=0.0)
        if result.passed or stolen <= STEAL_LIMIT_PERCENT or len(taken) > STEAL_RETRIES:
            return taken
        result.stolen = True
        waited = wait_until_quiet()
        log(f"  {label}: {stolen}% of a core was stolen by the hypervisor during that step; "
            f"it runs again (the machine was quiet after {waited:.0f} s)")


def wait_until_quiet(most_seconds: float = 120.0) -> float:
    """Wait until the hypervisor steals under 1 % of both cores over 2 s (or ``most_seconds``
    have passed); the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < most_seconds:
        before = core_ticks()
        time.sleep(2.0)
        if max(stolen_since(before).values()) < 1.0:
            break
    return time.monotonic() - start


def _log_step(label: str, rate: float, result: Step, note: str = "") -> None:
    mark = "ok" if result.passed else "FAIL"
    log(f"  {label}: {rate:,.0f} msg/s{' ' + note if note else ''} (kept "
        f"{result.publish_rate or rate:,.0f}) -> {result.delivered_per_second:,.0f} delivered/s, "
        f"lost {result.lost}, p99 {result.latency.get('p99_ms')} ms, cpu "
        f"{result.server_cpu_percent}% (load {result.load_cpu_percent}%), stolen "
        f"{'/'.join(str(v) for v in (result.steal_percent or {}).values())}% [{mark}]")


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Plan:
    seconds: float = 5.0
    fanout_subscribers: tuple[int, ...] = (100, 1000, 10000)
    transports: tuple[str, ...] = ("sse", "ndjson", "ws", "grpc")
    baselines: bool = True
    idle_connections: tuple[int, ...] = (10000,)
    publish_count: int = 50000
    max_steps: int = 16
    refine: int = 3  # bisections after the ramp's first failure
    idle_seconds: float = 16.0
    topics: int = 10000
    slow_subscribers: int = 100
    slow_rate: float = 5000.0  # 10 s of it overflows a stopped reader's buffer (10,000 events)
    latency_rate: float = 1000.0  # when the fan-out scenario did not run
    rounds: int = 3  # the transports at equal load: interleaved rounds (the median is kept)


def deliveries_start(n: int) -> float:
    return max(10.0, 20000.0 / n)  # the first step: ~20k deliveries/s


def scenario_capacity(plan: Plan) -> dict[str, Any]:
    """How much the load generator absorbs, against the trivial server (no broker): big writes
    on 100 connections (its byte rate), and one event per write on as many connections as the
    largest fan-out (its rate of reads; the trivial server is Python too, so this is a floor)."""
    out: dict[str, Any] = {}
    n_small = max(plan.fanout_subscribers)
    for label, per_write, n in (("bulk", 0, 100), ("one-event-writes", 1, n_small)):
        target = start_trivial(per_write)
        try:
            subs = Subscribers(target, "sse", n, sample_every=1_000_000)
            load = psutil.Process(subs.process.pid)
            time.sleep(1.0)
            start, first, cpu0 = time.monotonic(), subs.command("count")["received"], _cpu(load)
            time.sleep(plan.seconds)
            seconds = time.monotonic() - start
            got = subs.command("count")["received"] - first
            cpu = 100 * (_cpu(load) - cpu0) / seconds
            subs.close()
            out[label] = {"connections": n, "msgs_per_second": round(got / seconds),
                          "load_cpu_percent": round(cpu, 1)}
            log(f"  load generator, {label} x{n}: {got / seconds:,.0f} msg/s "
                f"(its CPU {cpu:.0f}%)")
        finally:
            target.stop()
    out["sse_msgs_per_second"] = out["bulk"]["msgs_per_second"]
    return out


# 10,000 subscribers held no rate on one core for any transport or server; gRPC's connections
# (an HTTP/2 state each) are not opened there.
GRPC_MAX_SUBSCRIBERS = 1000


def scenario_fanout(plan: Plan) -> dict[str, Any]:
    """Per subscriber count, the broker's transports ramp interleaved (`ramps`), each on a
    broker of its own (the idle ones cost ~1 % of the core); then each baseline on its own.
    gRPC ramps with the others up to `GRPC_MAX_SUBSCRIBERS`."""
    out: dict[str, Any] = {}
    for n in plan.fanout_subscribers:
        labels = {f"fan-out broker {t} x{n}": t for t in plan.transports
                  if t != "grpc" or n <= GRPC_MAX_SUBSCRIBERS}
        log(", ".join(labels))
        started: list[tuple[str, Target, Subscribers]] = []
        try:
            for label, transport in labels.items():
                target = start_broker()
                try:
                    subs = (GrpcSubscribers(target, n) if transport == "grpc"
                            else Subscribers(target, transport, n))
                    started.append((label, target, subs))
                except RuntimeError as exc:
                    target.stop()
                    log(f"  {label}: {exc}")
                    out.setdefault("broker", {}).setdefault(transport, {})[str(n)] = {
                        "best": None, "steps": [], "error": str(exc)}
            try:
                results = ramps(started, mode="http-batch", start_rate=deliveries_start(n),
                                seconds=plan.seconds, factor=1.6, max_steps=plan.max_steps,
                                refine=plan.refine)
            except RuntimeError as exc:
                log(f"  fan-out broker x{n}: {exc}")
                results = {label: {"best": None, "steps": [], "error": str(exc)}
                           for label, _, _ in started}
            for label, result in results.items():
                out.setdefault("broker", {}).setdefault(labels[label], {})[str(n)] = result
        finally:
            for _, target, subs in started:
                subs.close()
                target.stop()
    baselines: list[tuple[str, Callable[[], Target], str, str]] = [
        ("starlette", start_starlette, "sse", "http-batch"),
        ("nats-server", start_nats, "nats-ws", "nats")] if plan.baselines else []
    for name, start, transport, mode in baselines:
        for n in plan.fanout_subscribers:
            label = f"fan-out {name} {transport} x{n}"
            log(label)
            target = start()
            try:
                subs = Subscribers(target, transport, n)
                result = ramp(target, subs, mode=mode, start_rate=deliveries_start(n),
                              seconds=plan.seconds, factor=1.6, max_steps=plan.max_steps,
                              label=label, subject="bench", refine=plan.refine)
                subs.close()
            except RuntimeError as exc:
                log(f"  {label}: {exc}")
                result = {"best": None, "steps": [], "error": str(exc)}
            finally:
                target.stop()
            out.setdefault(name, {}).setdefault(transport, {})[str(n)] = result
    return out


EQUAL_LOAD_CPU_PERCENT = 70.0  # the equal load: SSE's highest held step at most this busy


def equal_load_rate(n: int) -> tuple[float, str] | None:
    """The publish rate at which the transports are compared with ``n`` subscribers: the
    highest rate SSE held in this run's fan-out ramp with the broker's core at most
    `EQUAL_LOAD_CPU_PERCENT` busy (so no transport is saturated), else half the lowest it
    held; without a ramp, ~20,000 deliveries/s. None when SSE held no rate at all there."""
    ramp_ = RESULTS.get("fanout", {}).get("broker", {}).get("sse", {}).get(str(n))
    if ramp_ is None:
        return deliveries_start(n), "plan"
    held = [s for s in ramp_["steps"] if s["held"] and s["lost"] == 0]
    if not held:
        return None
    light = [s["rate"] for s in held if s["server_cpu_percent"] <= EQUAL_LOAD_CPU_PERCENT]
    if light:
        return max(light), (f"fan-out sse x{n}: its highest held rate at <= "
                            f"{EQUAL_LOAD_CPU_PERCENT:.0f} % CPU")
    return min(s["rate"] for s in held) / 2, f"fan-out sse x{n}: half its lowest held rate"


def scenario_transports(plan: Plan) -> dict[str, Any]:
    """The broker's transports at the same load, for what each costs: the fan-out ramp's best
    rate moves by 20-30 % between runs of the same code on this VM (near the p99 budget, a
    saturated core's p99 is luck), so it cannot tell transports 10 % apart. Here every
    transport gets the same rate, with headroom (`equal_load_rate`), in ``plan.rounds``
    interleaved rounds, and the result is the broker's CPU per delivered message (the median
    over the rounds). Where the broker is CPU-bound, its capacity goes as the inverse: the
    `relative_capacity` column is SSE's cost over each transport's."""
    out: dict[str, Any] = {}
    for n in plan.fanout_subscribers:
        chosen = equal_load_rate(n)
        if chosen is None:
            log(f"  transports x{n}: SSE held no rate in the fan-out ramp; not compared")
            continue
        rate, rate_from = chosen
        transports = [t for t in plan.transports if t != "grpc" or n <= GRPC_MAX_SUBSCRIBERS]
        started: list[tuple[str, Target, Subscribers]] = []
        rounds: dict[str, list[Step]] = {}
        errors: dict[str, str] = {}
        try:
            for transport in transports:
                target = start_broker()
                try:
                    subs = (GrpcSubscribers(target, n) if transport == "grpc"
                            else Subscribers(target, transport, n))
                except RuntimeError as exc:  # as in fan-out: the others are still compared
                    target.stop()
                    log(f"  transports x{n}: {transport}: {exc}")
                    errors[transport] = str(exc)
                    continue
                started.append((transport, target, subs))
                rounds[transport] = []
            for round_ in range(plan.rounds):
                for transport, target, subs in started:
                    result = step(target, subs, rate, plan.seconds, mode="http-batch")
                    rounds[transport].append(result)
                    log(f"  transports x{n} round {round_ + 1}: {transport} at {rate:,.0f} "
                        f"msg/s: {_us_per_delivery(result)} us of broker CPU per delivery, "
                        f"lost {result.lost}, p99 {result.latency.get('p99_ms')} ms")
        finally:
            for _, target, subs in started:
                subs.close()
                target.stop()
        by_transport = {t: _equal_load_summary(steps) for t, steps in rounds.items()}
        sse = by_transport.get("sse", {}).get("us_per_delivery")
        for summary in by_transport.values():
            cost = summary["us_per_delivery"]
            summary["relative_capacity"] = round(sse / cost, 2) if sse and cost else None
        out[str(n)] = {"rate": rate, "rate_from": rate_from, "rounds": plan.rounds,
                       "transports": by_transport, **({"errors": errors} if errors else {})}
    return out


def _us_per_delivery(result: Step) -> float | None:
    if not result.received:
        return None
    return round(result.server_cpu_percent / 100 * result.seconds / result.received * 1e6, 3)


def _equal_load_summary(steps: list[Step]) -> dict[str, Any]:
    costs = [c for c in map(_us_per_delivery, steps) if c is not None]

    def middle(values: list[float], digits: int) -> float | None:
        return round(statistics.median(values), digits) if values else None

    return {"us_per_delivery": middle(costs, 3), "us_per_delivery_each": costs,
            "p50_ms": middle([s.latency["p50_ms"] for s in steps if "p50_ms" in s.latency], 3),
            "p99_ms": middle([s.latency["p99_ms"] for s in steps if "p99_ms" in s.latency], 3),
            "lost": sum(s.lost for s in steps),
            "delivered_per_second": middle([s.delivered_per_second for s in steps], 0),
            "server_cpu_percent": middle([s.server_cpu_percent for s in steps], 1),
            "steps": [s.__dict__ for s in steps]}


class GrpcSubscribers(Subscribers):
    """``Subscribe`` calls: the C load generator speaks HTTP/2 itself (~1 us per read); without
    a C compiler, grpc.aio in Python (bench/grpcload.py), which costs ~40 us per message."""

    def __init__(self, target: Target, n: int, topic: str = "bench") -> None:
        argv = loadgen_argv()
        if argv[0] == str(LOADGEN_BIN):
            self._launch("grpc", n, [
                *argv, "--port", str(target.grpc_port), "--transport", "grpc", "--path", "/",
                "--connections", str(n), "--ws-subscribe", topic])
        else:
            self._launch("grpc", n, [PYTHON, "-m", "bench.grpcload", "--port",
                                     str(target.grpc_port), "--connections", str(n),
                                     "--topic", topic])


def scenario_idle(plan: Plan) -> dict[str, Any]:
    """Idle connections: RSS per connection, and CPU with heartbeats going."""
    out: dict[str, Any] = {}
    for transport in ("sse", "ws"):
        for n in plan.idle_connections:
            label = f"idle broker {transport} x{n}"
            target = start_broker()
            try:
                time.sleep(0.5)
                base = target.rss()
                subs = Subscribers(target, transport, n, sample_every=1_000_000)
                time.sleep(1.0)
                rss = target.rss()
                cpu0, t0 = target.cpu_seconds(), time.monotonic()
                time.sleep(plan.idle_seconds)  # 16 s: at least one heartbeat round (15 s)
                cpu = 100 * (target.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                per = (rss - base) / n
                open_ = subs.command("count")["open"]
                subs.close()
                out.setdefault(transport, {})[str(n)] = {
                    "connections": open_, "rss_base_mb": round(base / 2**20, 1),
                    "rss_mb": round(rss / 2**20, 1), "bytes_per_connection": round(per),
                    "cpu_percent": round(cpu, 2)}
                log(f"  {label}: {per / 1024:.1f} KiB per connection, cpu {cpu:.2f}%")
            finally:
                target.stop()
    return out


def scenario_publish(plan: Plan) -> dict[str, Any]:
    """Ingest alone (no subscribers): how fast each publish path stores messages."""
    out: dict[str, Any] = {}
    counts = {"http": max(1000, plan.publish_count // 20), "http-batch": plan.publish_count,
              "grpc": plan.publish_count // 5}
    target = start_broker()
    try:
        for mode, count in counts.items():
            result = publish(target, mode, count, 0)
            out[mode] = result
            log(f"  publish {mode}: {result['rate']:,.0f} msg/s")
    finally:
        target.stop()
    nats = start_nats("nats-js", jetstream=True)
    node = start_broker(nats_url=f"nats://127.0.0.1:{nats.port}", stream="BENCH")
    try:
        started = time.monotonic()
        result = publish(nats, "nats", plan.publish_count, 0, subject="bench.bench")
        # stored and followed: the node has the last one (a long-poll for it returns)
        last = plan.publish_count
        seen = wait_stored(node.port, last, timeout=120)
        seconds = time.monotonic() - started
        result["stored_rate"] = round(last / seconds, 1) if seen else 0
        out["nats"] = result
        log(f"  publish nats (core NATS to the stream's subject): {result['rate']:,.0f} msg/s "
            f"sent, {result['stored_rate']:,.0f} msg/s stored and followed by a node")
        batch = publish(node, "http-batch", plan.publish_count // 2, 0)
        out["http-batch-cluster"] = batch
        log(f"  publish http-batch through a cluster node: {batch['rate']:,.0f} msg/s")
    finally:
        node.stop()
        nats.stop()
    return out


def wait_stored(port: int, seq: int, timeout: float) -> bool:
    """Whether the node at ``port`` has event ``seq`` within ``timeout`` (a long-poll for it;
    400 position-ahead while the log is not there yet)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/v1/poll?topic=bench&from_seq={seq - 1}&timeout=10"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                if json.load(answer)["events"]:
                    return True
        except urllib.error.HTTPError as error:
            if error.code != 400:
                raise
            time.sleep(0.01)
    return False


def scenario_cluster(plan: Plan) -> dict[str, Any]:
    """Fan-out of SSE subscribers on 1 node versus 2 nodes on one NATS server (publishing with
    batches through node 1; the subscribers split over the nodes)."""
    out: dict[str, Any] = {}
    n = plan.fanout_subscribers[min(1, len(plan.fanout_subscribers) - 1)]
    for nodes in (1, 2):
        nats = start_nats("nats-js", jetstream=True)
        stream = f"BENCH{nodes}"
        targets = [start_broker(f"node{i}", f"nats://127.0.0.1:{nats.port}", stream)
                   for i in range(nodes)]
        label = f"cluster {nodes} node(s) sse x{n}"
        log(label)
        try:
            fleets = [Subscribers(t, "sse", n // nodes) for t in targets]
            group = _Group(fleets)
            out[str(nodes)] = ramp(_Cpu(targets), group, mode="http-batch",  # type: ignore[arg-type]
                                   start_rate=deliveries_start(n), seconds=plan.seconds,
                                   factor=1.6, max_steps=plan.max_steps, label=label,
                                   refine=plan.refine)
            for fleet in fleets:
                fleet.close()
        finally:
            for target in targets:
                target.stop()
            nats.stop()
    return out


def scenario_latency(plan: Plan) -> dict[str, Any]:
    """Publish -> delivery latency at a light load: 100 SSE subscribers, published at 10 % of
    the highest rate the fan-out scenario sustained for them in this run (or
    ``plan.latency_rate``), embedded (HTTP batch; HTTP single requests, at most 500/s) and through
    NATS (core NATS publish to the stream's subject, a node on JetStream delivering); and HTTP
    batches at the same rate to 1 and to 10 subscribers."""
    n = 100
    fanout = RESULTS.get("fanout", {}).get("broker", {}).get("sse", {}).get(str(n), {})
    best = (fanout or {}).get("best")
    rate = round(best["rate"] / 10, 1) if best else plan.latency_rate
    out: dict[str, Any] = {"subscribers": n, "rate": rate,
                           "rate_from": "fan-out sse x100 / 10" if best else "plan"}
    target = start_broker()
    try:
        # the same rate with fewer subscribers: how much of the latency is the fan-out's
        for few in (1, 10):
            subs = Subscribers(target, "sse", few)
            result = step(target, subs, rate, plan.seconds, mode="http-batch")
            out[f"embedded http-batch x{few}"] = result.__dict__
            log(f"  latency embedded http-batch, {few} subscribers: {result.latency}")
            subs.close()
        subs = Subscribers(target, "sse", n)
        for mode, mode_rate in (("http-batch", rate), ("http", min(rate, 500.0))):
            result = step(target, subs, mode_rate, plan.seconds, mode=mode)
            out[f"embedded {mode}"] = result.__dict__
            log(f"  latency embedded {mode} at {mode_rate:,.0f} msg/s: {result.latency}")
        subs.close()
    finally:
        target.stop()
    nats = start_nats("nats-js", jetstream=True)
    node = start_broker(nats_url=f"nats://127.0.0.1:{nats.port}", stream="BENCH")
    try:
        subs = Subscribers(node, "sse", n)
        via_nats = dataclasses.replace(node, port=nats.port)  # publish to NATS, CPU of the node
        result = step(via_nats, subs, rate, plan.seconds, mode="nats", subject="bench.bench")
        out["nats"] = result.__dict__
        log(f"  latency through NATS at {rate:,.0f} msg/s: {result.latency}")
        subs.close()
    finally:
        node.stop()
        nats.stop()
    return out


class _Group:
    """Several load generators as one."""

    def __init__(self, fleets: list[Subscribers]) -> None:
        self.fleets = fleets
        self.n = sum(f.n for f in fleets)

    def command(self, name: str) -> dict[str, Any]:
        answers = [f.command(name) for f in self.fleets]
        if name not in ("report", "count"):
            return answers[0]
        received = sum(a["received"] for a in answers)
        if name == "count":
            return {"received": received, "latency": {"count": 0}}
        latencies = [a["latency"] for a in answers if a["latency"].get("count")]
        worst = max(latencies, key=lambda s: s["p99_ms"], default={"count": 0})
        return {"received": received, "latency": worst}


class _Cpu:
    """Several targets as one for CPU and RSS; publishes go to the first."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        first = targets[0]
        self.name, self.port, self.grpc_port, self.ws_port = (
            "cluster", first.port, first.grpc_port, first.ws_port)

    def cpu_seconds(self) -> float:
        return sum(t.cpu_seconds() for t in self.targets)

    def rss(self) -> int:
        return sum(t.rss() for t in self.targets)


def scenario_topics(plan: Plan) -> dict[str, Any]:
    """Many topics: each SSE subscriber on a topic of its own (``many.<i>``), or on a pattern of
    its own (``many.<i>.*``, published to ``many.<i>.x``); the messages go round the topics, so
    each is delivered once. Needs the C load generator (a path per connection)."""
    out: dict[str, Any] = {}
    n = plan.topics
    if Path(loadgen_argv()[-1]).name != "loadgen":
        return {"error": "needs the C load generator (one topic per connection)"}
    for kind, sub_topic, pub_topic in (("topics", "many.{i}", "many.{i}"),
                                       ("patterns", "many.{i}.*", "many.{i}.x")):
        label = f"{kind}: {n:,} subscribers, one each"
        log(label)
        target = start_broker()
        try:
            subs = Subscribers(target, "sse", n, path=f"/v1/sse?topic={sub_topic}")
            out[kind] = ramp(target, subs, mode="http-batch", start_rate=1000.0,
                             seconds=plan.seconds, factor=1.6, max_steps=plan.max_steps,
                             label=label, topic=pub_topic, topics=n, fanout=1,
                             refine=plan.refine)
            subs.close()
        finally:
            target.stop()
    return out


def scenario_slow(plan: Plan) -> dict[str, Any]:
    """Slow readers: a tenth of the SSE subscribers stop reading while the publisher goes on.
    The others' latency is compared with a run where everyone reads; the broker's memory is
    read while they are stopped; then they read again, and the time until they have every
    message gives the catch-up rate (from the broker's buffers, its log, and the kernel's)."""
    n, rate = plan.slow_subscribers, plan.slow_rate
    count = int(rate * plan.seconds * 2)
    target = start_broker()
    try:
        subs = Subscribers(target, "sse", n)
        if Path(loadgen_argv()[-1]).name != "loadgen":
            return {"error": "needs the C load generator (pause/resume)"}
        baseline = step(target, subs, rate, plan.seconds * 2, mode="http-batch")
        rss_before = target.rss()
        ten = _stop_and_catch_up(target, subs, 10, count, rate)
        paused, sent, during, after = ten.paused, ten.sent, ten.during, ten.after
        behind, seconds = ten.behind, ten.seconds
        # and a reader on its own (every replayed event is its alone: nothing shared)
        alone = _stop_and_catch_up(target, subs, n - 1, count, rate)
        subs.close()
        result = {
            "subscribers": n, "paused": paused, "rate": rate, "published": sent,
            "all_reading_p99_ms": baseline.latency.get("p99_ms"),
            "others_p99_ms": during["latency"].get("p99_ms"),
            "others_lost": max(0, sent * (n - paused) - (during["received"] -
                                                          during["paused_received"])),
            "rss_mb_before": round(rss_before / 2**20, 1),
            "rss_mb_while_stopped": round(ten.rss_paused / 2**20, 1),
            "behind_when_resumed": behind, "catchup_seconds": round(seconds, 3),
            "catchup_msgs_per_second": round(behind / seconds) if seconds else 0,
            "all_received": after["received"] >= sent * n,
            "alone_paused": alone.paused, "alone_behind": alone.behind,
            "alone_catchup_msgs_per_second": round(alone.behind / alone.seconds)
            if alone.seconds else 0,
            "alone_all_received": alone.after["received"] >= alone.sent * n,
            "catchup_server_cpu_percent": after["server_cpu_percent"],
            "alone_catchup_server_cpu_percent": alone.after["server_cpu_percent"],
        }
        log(f"  slow readers: {paused} of {n} stopped; the others' p99 "
            f"{result['all_reading_p99_ms']} -> {result['others_p99_ms']} ms; RSS "
            f"{result['rss_mb_before']} -> {result['rss_mb_while_stopped']} MB; caught up "
            f"{behind:,} messages at {result['catchup_msgs_per_second']:,} msg/s; one alone "
            f"caught up {alone.behind:,} at {result['alone_catchup_msgs_per_second']:,} msg/s")
        return result
    finally:
        target.stop()


class CatchUp(NamedTuple):
    paused: int  # subscribers stopped
    sent: int  # messages published while they were
    during: dict[str, Any]  # the load generator's report while they were stopped
    rss_paused: int  # the broker's RSS then
    behind: int  # messages the stopped ones had not read when they resumed
    seconds: float  # until they had every one
    after: dict[str, Any]  # the report then, with the broker's CPU during the catch-up


def _stop_and_catch_up(target: Target, subs: Subscribers, k: int, count: int,
                       rate: float) -> CatchUp:
    """Stop every ``k``-th subscriber, publish ``count`` at ``rate``, wait for the others, then
    let the stopped ones read, and time that."""
    subs.command("reset")
    paused = subs.command(f"pause {k}")["paused"]
    sent = publish(target, "http-batch", count, rate)["published"]
    active = subs.n - paused
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        during = subs.command("count")
        if during["received"] - during["paused_received"] >= sent * active:
            break
        time.sleep(0.05)
    during = subs.command("report")
    rss_paused = target.rss()
    behind = sent * paused - during["paused_received"]
    started, cpu = time.monotonic(), target.cpu_seconds()
    subs.command("resume")
    deadline = started + 300
    while time.monotonic() < deadline:
        after = subs.command("count")
        if after["received"] >= sent * subs.n:
            break
        time.sleep(0.02)
    seconds = time.monotonic() - started
    after["server_cpu_percent"] = round(100 * (target.cpu_seconds() - cpu) / seconds, 1)
    return CatchUp(paused, sent, during, rss_paused, behind, seconds, after)


SCENARIOS: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "capacity": scenario_capacity,
    "fanout": scenario_fanout,
    "transports": scenario_transports,
    "idle": scenario_idle,
    "publish": scenario_publish,
    "cluster": scenario_cluster,
    "slow": scenario_slow,
    "topics": scenario_topics,
    "latency": scenario_latency,
}
RESULTS: dict[str, Any] = {}  # this run's results so far (the latency scenario reads fan-out's)

PLANS = {
    "full": Plan(),
    "quick": Plan(seconds=3.0, fanout_subscribers=(100, 1000), idle_connections=(2000,),
                  publish_count=20000, max_steps=8, topics=1000, refine=1, rounds=2),
    "tiny": Plan(seconds=1.0, fanout_subscribers=(10,), idle_connections=(20,),
                 publish_count=2000, max_steps=2, refine=0, idle_seconds=1.0,
                 slow_subscribers=20, topics=20,
                 slow_rate=500.0, latency_rate=100.0, rounds=1),
}


# -- the record -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "loadgen": Path(loadgen_argv()[-1]).name,
            "memory_gb": round(
        psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
        "python": platform.python_version(),
        "pinning": f"servers on core {SERVER_CORE}, load on core {LOAD_CORE} (taskset)"
        if shutil.which("taskset") else "none (no taskset)"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def raised_fd_limit() -> Iterator[None]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def core_ticks() -> dict[str, list[int]]:
    """Each core's /proc/stat counters: user nice system idle iowait irq softirq steal ..."""
    out = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                out[name] = [int(v) for v in values[:8]]
    return out


def _share(a: dict[str, list[int]], b: dict[str, list[int]],
           fields: Sequence[int]) -> dict[str, float]:
    """Per core, the percentage of the ticks between ``a`` and ``b`` spent in ``fields``."""
    shares = {}
    for name in a:
        total = max(1, sum(b[name]) - sum(a[name]))
        shares[name] = round(100 * sum(b[name][f] - a[name][f] for f in fields) / total, 1)
    return shares


def stolen_since(before: dict[str, list[int]]) -> dict[str, float]:
    """The share of the servers' core and of the load's that the hypervisor stole since
    ``before`` (a `core_ticks`)."""
    steal = _share(before, core_ticks(), (7,))
    return {f"cpu{core}": steal[f"cpu{core}"] for core in (SERVER_CORE, LOAD_CORE)}


def cores_busy(seconds: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """Each core's busy share over ``seconds`` (another load skews results), and the share the
    hypervisor stole (part of the busy share), from /proc/stat."""
    a = core_ticks()
    time.sleep(seconds)
    b = core_ticks()
    idle = _share(a, b, (3, 4))  # idle, iowait
    return {name: round(100 - share, 1) for name, share in idle.items()}, _share(a, b, (7,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker bench", description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="quick")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only these (repeatable; default: all)")
    parser.add_argument("--transports",
                        help="fan-out transports, comma-separated (sse,ndjson,ws,grpc)")
    parser.add_argument("--subscribers", help="fan-out sizes, comma-separated (e.g. 1000)")
    parser.add_argument("--no-baselines", action="store_true", help="the broker only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    plan = PLANS[args.plan]
    if args.transports:
        plan = dataclasses.replace(plan, transports=tuple(args.transports.split(",")))
    if args.subscribers:
        sizes = tuple(int(n) for n in args.subscribers.split(","))
        plan = dataclasses.replace(plan, fanout_subscribers=sizes)
    if args.no_baselines:
        plan = dataclasses.replace(plan, baselines=False)
    names = args.scenario or list(SCENARIOS)
    complete = set(names) == set(SCENARIOS) and plan == PLANS[args.plan]
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(), "command": " ".join(["broker bench", *(argv or sys.argv[1:])]),
        "plan": args.plan, "complete": complete, "machine": machine(),
        "plan_detail": plan.__dict__, "steal_limit_percent": STEAL_LIMIT_PERCENT, "results": {}}
    busy, stolen = cores_busy()
    record["machine"]["cores_busy_before_percent"] = busy
    record["machine"]["cores_stolen_before_percent"] = stolen
    if any(b > 10 for b in busy.values()):
        log(f"warning: cores already busy before the run: {busy}, stolen by the hypervisor: "
            f"{stolen} (results will be low)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with raised_fd_limit():
            for name in names:
                log(f"== {name}")
                started = time.monotonic()
                record["results"][name] = RESULTS[name] = SCENARIOS[name](plan)
                log(f"   ({time.monotonic() - started:.0f} s)")
    finally:
        kill_children()  # nothing of the bench may outlive it (it would skew the next run)
    from bench.report import write

    paths = write(record, Path(args.out))
    for path in paths:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
