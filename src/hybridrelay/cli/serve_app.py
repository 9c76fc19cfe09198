"""``hybridrelay serve-app MODULE:APP``: an ASGI application served through a hybrid
connection (:func:`hybridrelay.asgi.serve`) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from hybridrelay.asgi import load_app, serve
from hybridrelay.cli.logs import add_log_level_argument, configure_logging
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError

__all__ = ["CONNECTION_STRING_ENV", "add_serve_app_arguments", "run_serve_app"]

#: Where ``-x`` comes from when it is not given.
CONNECTION_STRING_ENV = "HYBRIDRELAY_CONNECTION_STRING"

logger = logging.getLogger("hybridrelay.asgi")


def add_serve_app_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hybridrelay serve-app``."""
    parser.description = (
        "Serve an ASGI application (FastAPI, Starlette, Quart, ...) through a hybrid "
        "connection: HTTP requests sent to the relay at /{hybrid connection}/... reach the "
        "app, and no inbound port is opened on this machine. WebSocket senders are "
        "rejected (501)."
    )
    parser.epilog = (
        'example: hybridrelay serve-app myproject.main:app -x "$CS" -e api  '
        '(then: curl -H "Authorization: $TOKEN" https://relay.example.com/api/items)'
    )
    parser.add_argument(
        "app", metavar="MODULE:APP", help="the ASGI application, e.g. myproject.main:app"
    )
    parser.add_argument(
        "--connection-string",
        "-x",
        metavar="CS",
        default=os.environ.get(CONNECTION_STRING_ENV),
        help=f"relay connection string with a Listen right (default: ${CONNECTION_STRING_ENV})",
    )
    parser.add_argument(
        "--entity",
        "-e",
        metavar="NAME",
        help="hybrid connection to serve on (default: the connection string's EntityPath)",
    )
    parser.add_argument(
        "--app-dir",
        metavar="DIR",
        default=".",
        help="directory to import MODULE from (default: the current directory)",
    )
    parser.add_argument(
        "--factory", action="store_true", help="MODULE:APP is a factory that returns the app"
    )
    parser.add_argument(
        "--lifespan",
        choices=("auto", "on", "off"),
        default="auto",
        help="run the app's lifespan startup/shutdown: auto (if the app supports it, the "
        "default), on (required), off",
    )
    parser.add_argument(
        "--root-path", metavar="PATH", default="", help="ASGI root_path to report (default: '')"
    )
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="HTTP CONNECT proxy http://[user:pass@]host:port to reach the relay "
        "(default: HTTPS_PROXY/NO_PROXY)",
    )
    parser.add_argument(
        "--ca-file", metavar="PEM", help="CA bundle to verify the relay's certificate with"
    )
    add_log_level_argument(parser)


async def run_serve_app(args: argparse.Namespace) -> int:
    """Run ``hybridrelay serve-app`` until SIGINT/SIGTERM; returns the exit status (0).

    Raises:
        ConfigurationError: no connection string, the app cannot be imported, its lifespan
            startup failed.
        RelayError: the relay refused the listener (first connection, or for good later).
    """
    configure_logging(args.log_level)
    if not args.connection_string:
        raise ConfigurationError(
            f"a connection string is required (--connection-string or ${CONNECTION_STRING_ENV})"
        )
    app = load_app(args.app, app_dir=args.app_dir, factory=args.factory)
    kwargs: dict[str, Any] = {}
    if args.ca_file:
        kwargs["ca_file"] = args.ca_file
    if args.proxy:
        kwargs["proxy"] = args.proxy
    serving = asyncio.create_task(
        serve(
            app,
            args.connection_string,
            args.entity,
            lifespan=args.lifespan,
            root_path=args.root_path,
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
            serving.result()
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
