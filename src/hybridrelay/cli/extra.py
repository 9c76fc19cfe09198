"""Subcommands contributed by other parts of the package (bridge, serve-app).

Each part exposes ``add_*_arguments(parser)`` and an async ``run_*(args) -> int``; this module
is the one place that wires them into the ``hybridrelay`` command.
"""

from __future__ import annotations

import argparse
import asyncio

__all__ = ["add_extra_commands"]


def _run_bridge(args: argparse.Namespace) -> int:
    from hybridrelay.bridge.cli import run_bridge

    return asyncio.run(run_bridge(args))


def _run_serve_app(args: argparse.Namespace) -> int:
    from hybridrelay.asgi import run_serve_app

    return asyncio.run(run_serve_app(args))


def add_extra_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hybridrelay.asgi import add_serve_app_arguments
    from hybridrelay.bridge.cli import add_bridge_arguments

    bridge = sub.add_parser(
        "bridge",
        help="forward ports (-L ingress, -R edge) and HTTP (-H) through the relay, like azbridge",
    )
    add_bridge_arguments(bridge)
    bridge.set_defaults(func=_run_bridge)
    serve_app = sub.add_parser(
        "serve-app",
        help="serve an ASGI application (module:app) through a hybrid connection",
    )
    add_serve_app_arguments(serve_app)
    serve_app.set_defaults(func=_run_serve_app)
