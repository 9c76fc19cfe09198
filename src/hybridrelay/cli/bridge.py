"""``hybridrelay bridge``: the command line of the bridge.

Options mirror azbridge where they exist (``-x``, ``-e``/``-E``, ``-K``, ``-k``, ``-s``/``-S``,
``-L``, ``-R``, ``-H``, ``-f``, ``-a``; azbridge's ``-b`` source address is not supported); they
and the YAML file's keys come from one model (:mod:`hybridrelay.bridge.config`, reference in
docs/CONFIGURATION.md). Command-line options win over the file; ``-L``/``-R``/``-H`` add to
the file's forwards. Without ``-x``, ``-e`` or a file connection, the connection string is
taken from ``HYBRIDRELAY_CONNECTION_STRING`` or azbridge's ``AZURE_BRIDGE_CONNECTIONSTRING``.

``--metrics-port PORT`` serves Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` on
loopback (``--metrics-host`` to change; port 0 picks one, and the bound address is logged at
start): docs/METRICS.md.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for a configuration error (a metrics
port that cannot be bound included), 1 when the bridge fails while running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import (
    CONNECTION_STRING_ENV,
    BridgeConfig,
    add_bridge_options,
    load_config,
    merge_arguments,
)
from hybridrelay.cli.logs import configure_logging
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError, RelayError

__all__ = ["CONNECTION_STRING_ENV", "add_bridge_arguments", "build_config", "run_bridge"]

logger = logging.getLogger("hybridrelay.bridge")

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_bridge_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bridge's options to ``parser`` (a sub-command parser)."""
    parser.description = (
        "Forward local sockets to hybrid connections (-L), hybrid connections to "
        "configured destinations (-R), and HTTP requests relayed on a hybrid connection to a "
        "local HTTP server (-H); compatible with Azure Relay Bridge (azbridge). Every option "
        "and the YAML file's keys: docs/CONFIGURATION.md."
    )
    add_bridge_options(parser)
    parser.add_argument("-f", "--config", metavar="FILE", help="YAML configuration file")


def build_config(args: argparse.Namespace) -> BridgeConfig:
    """The effective configuration: file, then environment, then command line.

    Raises:
        ConfigurationError: anything is malformed or inconsistent.
    """
    config = load_config(args.config) if args.config else BridgeConfig()
    from_environment = None
    endpoint = getattr(args, "connection.endpoint", None)
    if args.connection_string is None and endpoint is None and not config.connection.endpoint:
        from_environment = next(
            (os.environ[name] for name in CONNECTION_STRING_ENV if os.environ.get(name)), None
        )
    config = merge_arguments(config, args, connection_string=from_environment)
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
    configure_logging(config.log_level, logger="hybridrelay")
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
    with stop_on_signals(agent.shutdown):
        try:
            await agent.run()
        except ConfigurationError as exc:
            _error(f"hybridrelay bridge: {exc}")
            return 2
        except RelayError as exc:
            _error(f"hybridrelay bridge: {type(exc).__name__}: {exc}")
            return 1
    return 0


def _error(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
