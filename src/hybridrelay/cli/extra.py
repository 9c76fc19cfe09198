"""Subcommands contributed by other parts of the package (bridge, serve-app).

Each part exposes ``add_*_arguments(parser)`` and an async ``run_*(args) -> int``; this module
is the one place that wires them into the ``hybridrelay`` command.
"""

from __future__ import annotations

import argparse

__all__ = ["add_extra_commands"]


def add_extra_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the bridge and serve-app subcommands (wired once those parts exist)."""
