"""The pure core imports no I/O: no event loop, no sockets, no network clients (see STYLE.md).

Like trio's test_exports.py, this reads the source with `ast` instead of importing it, so an
import hidden in a function body or behind ``if TYPE_CHECKING`` is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = frozenset(
    {
        *("trio", "asyncio", "socket", "ssl", "select", "selectors", "subprocess", "threading"),
        *("nats", "grpc", "quart", "quart_trio", "hypercorn", "httpx", "trio_websocket"),
        *("h11", "wsproto"),
    }
)
# Modules that must exist: without them the scan below would pass vacuously.
REQUIRED = ("broker/model.py", "broker/wire/sse.py")
# Pure modules other engineers are still writing: scanned once they exist.
OPTIONAL = (
    "broker/errors.py",
    "broker/hub.py",
    "broker/encoding.py",
    "broker/subscription.py",
    "broker/backplane/base.py",
)


def pure_modules() -> list[str]:
    wire = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "broker/wire").glob("*.py"))
    optional = [name for name in OPTIONAL if (ROOT / name).exists()]
    return sorted({*REQUIRED, *optional, *wire})


def forbidden_imports(source: str, filename: str) -> list[str]:
    """Every import of a forbidden module in ``source``, as ``"line N: import X"``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]  # a relative import stays inside broker
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        found.extend(
            (node.lineno, f"line {node.lineno}: {ast.unparse(node)}")
            for name in names
            if name.partition(".")[0] in FORBIDDEN
        )
    return [text for _, text in sorted(found)]  # ast.walk is breadth-first


@pytest.mark.parametrize("module", REQUIRED)
def test_required_modules_exist(module: str) -> None:
    assert (ROOT / module).is_file(), f"{module} is missing: the purity scan needs it"


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_imports_no_io(module: str) -> None:
    path = ROOT / module
    assert path.is_file(), f"{module} is missing"
    offenders = forbidden_imports(path.read_text(encoding="utf-8"), module)
    assert not offenders, f"{module} is pure but imports I/O: " + "; ".join(offenders)


def test_scan_covers_every_wire_module() -> None:
    modules = pure_modules()
    assert {"broker/wire/sse.py", "broker/wire/ndjson.py", "broker/wire/ws.py"} <= set(modules)


def test_checker_catches_offenders() -> None:
    source = "\n".join(
        [
            "import os, json",
            "import trio",
            "from asyncio import sleep",
            "import trio_websocket.server as tws",
            "def f():",
            "    import socket",
            "    if True:",
            "        from grpc.aio import server",
            "import importlib",
            "importlib.import_module('nats')",
            "__import__('ssl')",
            "from . import socket as ours",  # relative: a broker module, allowed
            "import triolet, sockets, h11x",  # names that only start like forbidden ones
            "from msgpack import packb",
        ]
    )
    assert forbidden_imports(source, "<synthetic>") == [
        "line 2: import trio",
        "line 3: from asyncio import sleep",
        "line 4: import trio_websocket.server as tws",
        "line 6: import socket",
        "line 8: from grpc.aio import server",
        "line 10: importlib.import_module('nats')",
        "line 11: __import__('ssl')",
    ]
    assert forbidden_imports("import json\nfrom broker.model import Event\n", "<clean>") == []
