"""``hybridrelay bridge``: the command line of the bridge.

The lead wires :func:`add_bridge_arguments` and :func:`run_bridge` into ``hybridrelay.cli``.
Options mirror azbridge where they exist (``-x``, ``-e``/``-E``, ``-K``, ``-k``, ``-s``/``-S``,
``-L``, ``-R``, ``-H``, ``-f``, ``-a``; azbridge's ``-b`` source address is not supported); the
rest lives in the YAML file
(:mod:`hybridrelay.bridge.config`). Command-line options win over the file; ``-L``/``-R``/``-H``
add to the file's forwards. Without ``-x``, ``-e`` or a file connection, the connection string is
taken from ``HYBRIDRELAY_CONNECTION_STRING`` or azbridge's ``AZURE_BRIDGE_CONNECTIONSTRING``.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for a configuration error, 1 when
the bridge fails while running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import (
    LOG_LEVELS,
    BridgeConfig,
    CliOverrides,
    load_config,
    merge_cli,
)
from hybridrelay.exceptions import ConfigurationError, RelayError

__all__ = ["CONNECTION_STRING_ENV", "add_bridge_arguments", "build_config", "run_bridge"]

#: Environment variables consulted, in order, when no connection is given otherwise.
CONNECTION_STRING_ENV = ("HYBRIDRELAY_CONNECTION_STRING", "AZURE_BRIDGE_CONNECTIONSTRING")

logger = logging.getLogger("hybridrelay.bridge")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def add_bridge_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bridge's options to ``parser`` (a sub-command parser)."""
    parser.description = (
        "Forward local sockets to hybrid connections (-L), hybrid connections to "
        "configured destinations (-R), and HTTP requests relayed on a hybrid connection to a "
        "local HTTP server (-H); compatible with Azure Relay Bridge (azbridge)."
    )
    conn = parser.add_argument_group("relay connection")
    conn.add_argument(
        "-x",
        "--connection-string",
        metavar="CONNECTION_STRING",
        help="Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=... (or "
        "SharedAccessSignature=...); default from $HYBRIDRELAY_CONNECTION_STRING or "
        "$AZURE_BRIDGE_CONNECTIONSTRING",
    )
    conn.add_argument("-e", "-E", "--endpoint", help="relay endpoint, sb://host[:port]")
    conn.add_argument("-K", "--key-name", help="shared access rule name")
    conn.add_argument("-k", "--key", help="shared access key")
    conn.add_argument("-s", "-S", "--signature", help="a SAS token instead of a key")
    conn.add_argument(
        "--proxy",
        metavar="URL",
        help="HTTP CONNECT proxy http://[user:pass@]host:port (default: HTTPS_PROXY/NO_PROXY)",
    )
    conn.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the relay with")
    fwd = parser.add_argument_group("forwards")
    fwd.add_argument(
        "-L",
        dest="local",
        action="append",
        default=[],
        metavar="[BIND:]PORT[/PORTNAME][/udp]:HC",
        help="listen locally (TCP, UDP or unix:/path[#PORTNAME]:HC) and carry each connection "
        "to hybrid connection HC; repeatable",
    )
    fwd.add_argument(
        "-R",
        "-T",
        dest="remote",
        action="append",
        default=[],
        metavar="HC:[PORTNAME/]HOST:PORT[/udp]",
        help="listen on hybrid connection HC and forward each connection to HOST:PORT "
        "(or unix:/path); repeatable",
    )
    fwd.add_argument(
        "-H",
        dest="http",
        action="append",
        default=[],
        metavar="HC:http://HOST:PORT[/BASE]",
        help="listen on hybrid connection HC and forward each relayed HTTP request for "
        "/HC/PATH to http://HOST:PORT/BASE/PATH (reverse proxy, adds Via and X-Forwarded-*); "
        "repeatable",
    )
    opts = parser.add_argument_group("options")
    opts.add_argument("-f", "--config", metavar="FILE", help="YAML configuration file")
    opts.add_argument(
        "--bind-address",
        help="default bind address of -L forwards (default 127.0.0.1; '*' for all interfaces)",
    )
    opts.add_argument(
        "-a",
        "--keep-alive-interval",
        type=_positive,
        metavar="SECONDS",
        help="ping interval of the listeners' control channel (default 30)",
    )
    opts.add_argument(
        "--connect-timeout",
        type=_positive,
        metavar="SECONDS",
        help="timeout to reach the relay or a destination (default 30)",
    )
    opts.add_argument(
        "--shutdown-grace-period",
        type=_non_negative,
        metavar="SECONDS",
        help="how long open connections may finish after SIGINT/SIGTERM (default 10)",
    )
    opts.add_argument("--log-level", choices=list(LOG_LEVELS), help="default info")


def build_config(args: argparse.Namespace) -> BridgeConfig:
    """The effective configuration: file, then environment, then command line.

    Raises:
        ConfigurationError: anything is malformed or inconsistent.
    """
    config = load_config(args.config) if args.config else BridgeConfig()
    connection_string = args.connection_string
    if connection_string is None and args.endpoint is None and config.connection.endpoint is None:
        connection_string = next(
            (os.environ[name] for name in CONNECTION_STRING_ENV if os.environ.get(name)), None
        )
    config = merge_cli(
        config,
        CliOverrides(
            connection_string=connection_string,
            endpoint=args.endpoint,
            key_name=args.key_name,
            key=args.key,
            token=args.signature,
            proxy=args.proxy,
            ca_file=args.ca_file,
            local_specs=args.local,
            remote_specs=args.remote,
            http_specs=args.http,
            bind_address=args.bind_address,
            keep_alive_interval=args.keep_alive_interval,
            connect_timeout=args.connect_timeout,
            shutdown_grace_period=args.shutdown_grace_period,
            log_level=args.log_level,
        ),
    )
    if not config.local_forwards and not config.remote_forwards and not config.http_forwards:
        raise ConfigurationError("nothing to do: give at least one -L, -R or -H (or a config file)")
    if not config.connection.endpoint:
        raise ConfigurationError(
            "no relay endpoint: give -x CONNECTION_STRING, -e ENDPOINT, or 'connection:' in the "
            "config file"
        )
    return config


async def run_bridge(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM; returns the exit status."""
    try:
        config = build_config(args)
    except ConfigurationError as exc:
        _error(f"hybridrelay bridge: {exc}")
        return 2
    _configure_logging(config.log_level)
    for forward in config.local_forwards:
        if forward.spec.binds_non_loopback or (
            forward.spec.bind_address is None and config.bind_host(forward) not in _LOOPBACK
        ):
            logger.warning(
                "-L %s: listening beyond loopback%s",
                forward.spec,
                "" if forward.allow else " with no allow-list",
            )
    try:
        agent = BridgeAgent(config)
    except ConfigurationError as exc:
        _error(f"hybridrelay bridge: {exc}")
        return 2
    with _signals(agent):
        try:
            await agent.run()
        except ConfigurationError as exc:
            _error(f"hybridrelay bridge: {exc}")
            return 2
        except RelayError as exc:
            _error(f"hybridrelay bridge: {type(exc).__name__}: {exc}")
            return 1
    return 0


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _error(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _configure_logging(level_name: str) -> None:
    level = LOG_LEVELS[level_name]
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    logging.getLogger("hybridrelay").setLevel(level)


@contextlib.contextmanager
def _signals(agent: BridgeAgent) -> Iterator[None]:
    """SIGINT/SIGTERM start the graceful shutdown; the previous handlers come back after."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, agent.shutdown)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without it
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
