"""``hybridrelay bridge``: the command line of the bridge.

Options mirror azbridge where they exist (``-x``, ``-e``/``-E``, ``-K``, ``-k``, ``-s``/``-S``,
``-L``, ``-R``, ``-H``, ``-f``, ``-a``; azbridge's ``-b`` source address is not supported); they
and the YAML file's keys come from one model (:mod:`hybridrelay.bridge.config`, reference in
docs/CONFIGURATION.md). Command-line options win over the file; ``-L``/``-R``/``-H`` add to
the file's forwards. Without ``-x``, ``-e`` or a file connection, the connection string is
read from ``--connection-string-file PATH``, else taken from ``HYBRIDRELAY_CONNECTION_STRING``
or azbridge's ``AZURE_BRIDGE_CONNECTIONSTRING``; a key given on the command line (``-x`` with
a ``SharedAccessKey``, ``-k``) is warned about, since every user can read it in ``ps``.

``--metrics-port PORT`` serves Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` on
loopback (``--metrics-host`` to change; port 0 picks one, and the bound address is logged at
start): docs/METRICS.md.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for a configuration error (a metrics
port that cannot be bound included), 1 when the bridge fails: at start, the relay refuses a
forward's credentials (401/403), does not know its hybrid connection (404) or presents a
certificate that is not trusted (one line naming the forward, the cause and the fix).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import (
    CONNECTION_STRING_ENV,
    BridgeConfig,
    add_bridge_options,
    load_config,
    merge_arguments,
)
from hybridrelay.bridge.specs import Protocol
from hybridrelay.cli.credentials import (
    add_connection_string_file_argument,
    given_connection_string,
    key_on_command_line_warning,
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
    add_connection_string_file_argument(parser)
    parser.add_argument("-f", "--config", metavar="FILE", help="YAML configuration file")


def build_config(args: argparse.Namespace) -> BridgeConfig:
    """The effective configuration: file, then environment, then command line.

    Raises:
        ConfigurationError: anything is malformed or inconsistent.
    """
    config = load_config(args.config) if args.config else BridgeConfig()
    fallback = None
    endpoint = getattr(args, "connection.endpoint", None)
    if getattr(args, "connection_string_file", None) is not None:
        fallback, warning = given_connection_string(args)
        if warning is not None:
            args.credential_warnings = [warning]
    elif args.connection_string is None and endpoint is None and not config.connection.endpoint:
        fallback = next(
            (os.environ[name] for name in CONNECTION_STRING_ENV if os.environ.get(name)), None
        )
    config = merge_arguments(config, args, connection_string=fallback)
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
        check_before_binding(config)
        agent = BridgeAgent(config)
    except ConfigurationError as exc:
        _error(f"hybridrelay bridge: {exc}")
        return 2
    configure_logging(config.log_level, logger="hybridrelay")
    for warning in _credential_warnings(args):
        logger.warning("%s", warning)
    for forward in config.local_forwards:
        if forward.spec.binds_non_loopback or (
            forward.spec.bind_address is None and config.bind_host(forward) not in _LOOPBACK
        ):
            logger.warning(
                "-L %s: listening beyond loopback%s",
                forward.spec,
                "" if forward.allow else " with no allow-list",
            )
    with stop_on_signals(agent.shutdown):
        try:
            await agent.run()
        except ConfigurationError as exc:
            _error(f"hybridrelay bridge: {exc}")
            return 2
        except RelayError as exc:
            # The message names the forward, the cause and the fix (never a key).
            _error(f"hybridrelay bridge: {exc}")
            return 1
    return 0


def _credential_warnings(args: argparse.Namespace) -> list[str]:
    """A key on the command line (``-x`` with a SharedAccessKey, ``-k``), a readable file."""
    warnings: list[str] = list(getattr(args, "credential_warnings", []))
    on_command_line = key_on_command_line_warning(args.connection_string)
    if on_command_line is None and getattr(args, "connection.key", None):
        on_command_line = key_on_command_line_warning("SharedAccessKey=-k")
    if on_command_line is not None:
        warnings.append(on_command_line)
    return warnings


def check_before_binding(config: BridgeConfig) -> None:
    """What would make a forward fail once the others are bound, checked before any is: the
    directories of Unix sockets, the CA file, and that every bind address is this machine's.
    A bridge that exits on its third forward must not have opened the first two meanwhile
    (a public port, even for a moment).

    Raises:
        ConfigurationError: the first problem, naming the forward and the path or address.
    """
    for forward in config.local_forwards:
        spec = forward.spec
        if spec.protocol is Protocol.UNIX:
            assert spec.path is not None
            directory = Path(spec.path).parent
            if not directory.is_dir():
                raise ConfigurationError(
                    f"-L {spec}: the socket's directory {directory} does not exist: create it "
                    "(systemd: RuntimeDirectory=) or choose another path"
                )
            continue
        host = config.bind_host(forward)
        if host is not None:
            _check_local_address(host, f"-L {spec}")
    if config.metrics_port is not None:
        _check_local_address(config.metrics_host, "--metrics-host")
    ca_file = config.connection.ca_file
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigurationError(f"--ca-file {ca_file}: no such readable file")


def _check_local_address(host: str, what: str) -> None:
    """``host`` names an address of this machine: binding it on an ephemeral port works (the
    socket is closed at once, so no port stays taken)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"{what}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.bind(address)
    except OSError as exc:
        raise ConfigurationError(
            f"{what}: cannot listen on {host}: {exc.strerror or exc} (not an address of this "
            "machine?)"
        ) from None
    finally:
        probe.close()


def _error(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
