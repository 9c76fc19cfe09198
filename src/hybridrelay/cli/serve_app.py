"""``hybridrelay serve-app MODULE:APP``: an ASGI application served through a hybrid
connection (:func:`hybridrelay.asgi.serve`) until SIGINT/SIGTERM.

The connection string comes from ``-x``, ``--connection-string-file PATH`` or
``$HYBRIDRELAY_CONNECTION_STRING`` (a key given with ``-x`` is warned about: ``ps`` shows it).
When the first connection to the relay fails, the command exits 1 with one line naming the
hybrid connection, the cause and the fix (the bridge's words).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any

from hybridrelay.asgi import load_app, serve
from hybridrelay.cli.credentials import add_connection_string_file_argument, given_connection_string
from hybridrelay.cli.logs import configure_logging
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV, ConnectionString
from hybridrelay.settings import LOG_LEVEL, add_arguments, check_fields, given_arguments, setting

__all__ = ["CONNECTION_STRING_ENV", "ServeAppConfig", "add_serve_app_arguments", "run_serve_app"]

logger = logging.getLogger("hybridrelay.asgi")


@dataclass(frozen=True)
class ServeAppConfig:
    """What ``hybridrelay serve-app`` runs (command line only: there is no file)."""

    app: str = setting(help="the ASGI application, e.g. myproject.main:app", metavar="MODULE:APP")
    connection_string: str | None = setting(
        None,
        help=f"relay connection string with a Listen right (default: ${CONNECTION_STRING_ENV})",
        flags=("--connection-string", "-x"),
        metavar="CS",
        secret=True,
    )
    entity: str | None = setting(
        None,
        help="hybrid connection to serve on (default: the connection string's EntityPath)",
        flags=("--entity", "-e"),
        metavar="NAME",
    )
    app_dir: str = setting(
        ".",
        help="directory to import MODULE from",
        flags=("--app-dir",),
        metavar="DIR",
    )
    factory: bool = setting(
        False, help="MODULE:APP is a factory that returns the app", flags=("--factory",)
    )
    lifespan: str = setting(
        "auto",
        help="run the app's lifespan startup/shutdown: auto (if the app supports it), on "
        "(required), off",
        choices=("auto", "on", "off"),
        flags=("--lifespan",),
    )
    root_path: str | None = setting(
        None,
        help="ASGI root_path to report (default: /ENTITY, the hybrid connection's path on "
        "the relay, so the URLs the app builds are the public ones; '' for none)",
        flags=("--root-path",),
        metavar="PATH",
    )
    access_log: bool = setting(
        True,
        help="log each request at INFO on hybridrelay.access, uvicorn-style (method, path, "
        "status, bytes, duration)",
        flags=("--access-log",),
    )
    proxy: str | None = setting(
        None,
        help="HTTP CONNECT proxy http://[user:pass@]host:port to reach the relay "
        "(default: HTTPS_PROXY/NO_PROXY)",
        flags=("--proxy",),
        metavar="URL",
        secret=True,
    )
    ca_file: str | None = setting(
        None,
        help="CA bundle to verify the relay's certificate with",
        flags=("--ca-file",),
        metavar="PEM",
    )
    log_level: str = setting(
        "info", help=LOG_LEVEL.help, choices=LOG_LEVEL.choices, flags=LOG_LEVEL.flags
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.connection_string:
            raise ConfigurationError(
                f"a connection string is required (--connection-string or ${CONNECTION_STRING_ENV})"
            )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> ServeAppConfig:
        """The options of :func:`add_serve_app_arguments`; ``-x`` defaults to
        ``$HYBRIDRELAY_CONNECTION_STRING``.

        Raises:
            ConfigurationError: no connection string, or an option breaks its rules.
        """
        given = given_arguments(args, cls)
        text, _ = given_connection_string(args)
        given["connection_string"] = os.environ.get(CONNECTION_STRING_ENV) if text is None else text
        return cls(app=args.app, **given)


def add_serve_app_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hybridrelay serve-app`` (from :class:`ServeAppConfig`)."""
    parser.description = (
        "Serve an ASGI application (FastAPI, Starlette, Quart, ...) through a hybrid "
        "connection: HTTP requests and WebSockets sent to the relay at /{hybrid "
        "connection}/... reach the app (as ASGI http and websocket scopes), and no inbound "
        "port is opened on this machine."
    )
    parser.epilog = (
        'example: hybridrelay serve-app myproject.main:app -x "$CS" -e api  '
        '(then: curl -H "Authorization: $TOKEN" https://relay.example.com/api/items)'
    )
    app = next(f for f in fields(ServeAppConfig) if f.name == "app").metadata["setting"]
    parser.add_argument("app", metavar=app.metavar, help=app.help)
    add_arguments(parser, ServeAppConfig)
    add_connection_string_file_argument(parser)


async def run_serve_app(args: argparse.Namespace) -> int:
    """Run ``hybridrelay serve-app`` until SIGINT/SIGTERM; returns the exit status (0).

    Raises:
        ConfigurationError: no connection string, the app cannot be imported, its lifespan
            startup failed.
        RelayError: the relay refused the listener (first connection, or for good later).
    """
    config = ServeAppConfig.from_arguments(args)
    configure_logging(config.log_level)
    app = load_app(config.app, app_dir=config.app_dir, factory=config.factory)
    _warn_about_credentials(args)
    kwargs: dict[str, Any] = {}
    if config.ca_file:
        kwargs["ca_file"] = config.ca_file
    if config.proxy:
        kwargs["proxy"] = config.proxy
    serving = asyncio.create_task(
        serve(
            app,
            config.connection_string or "",
            config.entity,
            lifespan=config.lifespan,
            root_path=config.root_path,
            access_log=config.access_log,
            **kwargs,
        ),
        name="hybridrelay-serve-app",
    )
    stop = asyncio.Event()
    stopping = asyncio.create_task(stop.wait())
    try:
        with stop_on_signals(stop.set):
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            # serve() only returns by raising (the relay refuses the listener for good).
            try:
                serving.result()
            except ConfigurationError:
                raise
            except RelayError as exc:
                entity = config.entity or _entity_of(config.connection_string)
                # The SDK's message names the cause and the fix (never a key).
                sys.stderr.write(f"hybridrelay serve-app: {entity}: cannot listen: {exc}\n")
                sys.stderr.flush()
            return 1
        logger.info("serve-app: shutting down")
        return 0
    finally:
        stopping.cancel()
        # Closes the listener (in-flight requests end) and runs the lifespan shutdown.
        serving.cancel()
        await asyncio.wait([stopping, serving])
        if not serving.cancelled() and (error := serving.exception()) is not None:
            logger.debug("serve-app: stopped with %s: %s", type(error).__name__, error)


def _warn_about_credentials(args: argparse.Namespace) -> None:
    _, warning = given_connection_string(args)
    if warning is not None:
        logger.warning("%s", warning)


def _entity_of(connection_string: str | None) -> str:
    try:
        return ConnectionString.parse(connection_string or "").entity_path or "-"
    except ConfigurationError:
        return "-"
