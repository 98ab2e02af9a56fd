"""Real headless Chromium for tests, driven over the Chrome DevTools Protocol from trio.

One browser process per test session (`launch_chromium`, started with ``--remote-debugging-port=0``
in a fresh profile); each test opens its own page (`open_page`), a target of its own with its own
CDP session over one trio-websocket connection. Only what the browser tests need: navigate,
evaluate (awaiting promises), wait for a condition, set the viewport, screenshot. Errors thrown in
the page and console messages are kept on the `Page`, so a failing test can say what the page said.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

# What this machine's closed network needs (nothing reaches out at start) and what root needs.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    # timers of a page in the background are not throttled: the test pages are never in front
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


def chromium_binary() -> str:
    """Debian's chromium (``make test`` installs it), or ``BROKER_CHROMIUM``."""
    found = os.environ.get("BROKER_CHROMIUM") or shutil.which("chromium")
    if not found:
        raise RuntimeError(
            "no chromium: `make test` installs Debian's package (apt-get install chromium); "
            "or set BROKER_CHROMIUM to a Chromium binary"
        )
    return found


@dataclass
class Chromium:
    process: subprocess.Popen[bytes]
    websocket_url: str  # the browser target's CDP endpoint
    profile_dir: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile_dir, ignore_errors=True)


def launch_chromium(timeout_seconds: float = 30.0) -> Chromium:
    profile = tempfile.mkdtemp(prefix="broker-chromium-")
    process = subprocess.Popen(
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ports_file = Path(profile) / "DevToolsActivePort"  # "<port>\n<browser target path>"
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} at start")
        lines = ports_file.read_text().split("\n") if ports_file.exists() else []
        if len(lines) >= 2 and lines[1]:
            return Chromium(process, f"ws://127.0.0.1:{lines[0]}{lines[1]}", profile)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout_seconds} s")


class CdpError(Exception):
    pass


class PageError(AssertionError):
    """An evaluation threw in the page, or a wait ran out: carries what the page logged."""


class _Cdp:
    """One CDP connection: numbered calls answered by id; events handed to their session's page."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.pages: dict[str, Page] = {}

    async def read(self) -> None:
        from trio_websocket import ConnectionClosed

        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except ConnectionClosed:
                return
            if "id" in message:
                channel = self._waiting.pop(message["id"], None)
                if channel is not None:
                    channel.send_nowait(message)
            elif message.get("sessionId") in self.pages:
                self.pages[message["sessionId"]].on_event(message["method"], message["params"])

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[call_id] = send
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        await self.ws.send_message(json.dumps(message))
        answer = await receive.receive()
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result


class Page:
    """One tab, with its own CDP session on the browser connection."""

    def __init__(self, cdp: _Cdp, session_id: str) -> None:
        self._cdp = cdp
        self._session = session_id
        self._load = trio.Event()
        self.console: list[str] = []  # "type: text", in order
        self.errors: list[str] = []  # uncaught exceptions in the page

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._load.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description", details["text"]))

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._cdp.call(method, params, self._session)

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        self._load = trio.Event()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise PageError(f"navigating to {url}: {result['errorText']}")
        with trio.fail_after(timeout):
            await self._load.wait()

    async def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        """The value of a JavaScript expression (a promise is awaited), as JSON."""
        with trio.fail_after(timeout):
            result = await self.send(
                "Runtime.evaluate",
                {"expression": expression, "awaitPromise": True, "returnByValue": True},
            )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            thrown = details.get("exception", {}).get("description", details.get("text"))
            raise PageError(f"{thrown}\n{self.said()}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll an expression until it is truthy; its value."""
        deadline = trio.current_time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if trio.current_time() > deadline:
                raise PageError(f"timed out waiting for {what or expression}\n{self.said()}")
            await trio.sleep(0.05)

    async def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        target = trio.Path(path)
        await target.parent.mkdir(parents=True, exist_ok=True)
        await target.write_bytes(base64.b64decode(shot["data"]))
        return path

    def said(self) -> str:
        lines = [*(f"page error: {e}" for e in self.errors), *self.console[-30:]]
        return "\n".join(lines) or "(the page logged nothing)"


@asynccontextmanager
async def open_page(browser: Chromium) -> AsyncIterator[Page]:
    """A new tab in a browser context of its own (no shared cookies, cache or storage)."""
    async with open_websocket_url(browser.websocket_url, max_message_size=64 * 2**20) as ws:
        cdp = _Cdp(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cdp.read)
            context = (await cdp.call("Target.createBrowserContext"))["browserContextId"]
            target = await cdp.call(
                "Target.createTarget", {"url": "about:blank", "browserContextId": context}
            )
            attached = await cdp.call(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )
            page = cdp.pages[attached["sessionId"]] = Page(cdp, attached["sessionId"])
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            try:
                yield page
            finally:
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await cdp.call("Target.closeTarget", {"targetId": target["targetId"]})
                    await cdp.call("Target.disposeBrowserContext", {"browserContextId": context})
                nursery.cancel_scope.cancel()
