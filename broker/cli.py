"""The command line: ``broker serve``, ``broker pub``, ``broker sub``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import trio

from broker import __version__
from broker.config import ConfigError, Settings, load_settings
from broker.errors import StartupError

DEFAULT_URL = "http://127.0.0.1:8080"


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a broker node (embedded mode: in-memory log, no other service needed)",
        description="Every setting can also come from BROKER_<NAME> or a TOML --config file.",
    )
    serve.add_argument("--config", help="TOML file of settings (also BROKER_CONFIG)")
    defaults = Settings()
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        shown = getattr(default, "value", default)
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "nats_urls":
            flags.append("--nats")  # broker serve --nats nats://a:4222,nats://b:4222
        serve.add_argument(
            *flags,
            dest=f.name,
            default=None,
            metavar=type(shown).__name__.upper(),
            help=f"default {shown}",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    cluster = commands.add_parser(
        "cluster",
        help="run a local cluster: a NATS cluster with JetStream and broker nodes on loopback",
    )
    cluster.add_argument("--nodes", type=int, default=3, help="broker nodes (default 3)")
    cluster.add_argument("--nats", type=int, default=3, help="NATS servers (default 3)")
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks (bench/, in a source checkout): scenarios against the broker "
        "and its baselines, results in bench/results/",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    from broker.client import cli as client_cli

    client_cli.add_commands(commands, default_url=DEFAULT_URL)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options are its own (bench/run.py)
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = {f.name: getattr(args, f.name) for f in fields(Settings)}
        try:
            settings = load_settings(config_file=args.config, overrides=overrides)
        except ConfigError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
        from broker import logs
        from broker.server import serve_until_signalled

        logs.configure(settings.log_level, settings.log_format)
        try:
            trio.run(serve_until_signalled, settings)
        except StartupError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 1
        except BaseExceptionGroup as group:  # (raised inside nurseries, so in a group)
            startup, rest = group.split(StartupError)
            if startup is None or rest is not None:
                raise
            for error in _leaves(startup):
                print(f"broker: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "cluster":
        from broker import cluster

        return cluster.run(brokers=args.nodes, nats=args.nats)
    from broker.client import cli as client_cli

    return client_cli.run(args)


def _leaves(group: BaseExceptionGroup[StartupError]) -> list[StartupError]:
    out: list[StartupError] = []
    for error in group.exceptions:
        out.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return out


def _bench(argv: list[str]) -> int:
    """``bench/`` lives beside the package in a checkout; it is not installed with it."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "bench" / "run.py").exists():
        print("broker: bench/ is not here: run `broker bench` from a source checkout "
              "(make bench)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    result: int = importlib.import_module("bench.run").main(argv)
    return result
