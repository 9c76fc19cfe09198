"""``python -m hybridrelay.cli.config_reference [--check]``: docs/CONFIGURATION.md, written
from the configuration models, so the reference cannot drift from the code.

Without arguments it prints the Markdown; ``--write PATH`` writes it; ``--check PATH`` exits
1 when the file differs (tests/test_config_reference.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hybridrelay.bridge.config import CONNECTION_STRING_ENV, BridgeConfig
from hybridrelay.cli.main import build_parser
from hybridrelay.server.config import RelayConfig
from hybridrelay.settings import reference, walk

__all__ = ["render", "main"]

_INTRO = """\
# Configuration reference

Written by `python -m hybridrelay.cli.config_reference --write docs/CONFIGURATION.md` from the
configuration models (`server/config.py`, `bridge/config.py`); a test fails when this file and
the models disagree. Every key is checked when the configuration is built, from a file or in
code: a value out of bounds, an unknown key or a missing required one is an error that names
the key's path (`namespace.hybrid_connections[2].name`). Secrets (keys, tokens, connection
strings, proxy passwords) never appear in `repr` or in error messages.

A flag given on the command line wins over the file; a repeatable flag (`-L`, `-R`, `-H`)
adds to the file's list.
"""

_RELAY = """\
## The relay: `hybridrelay serve --config FILE`

Without `--config`, `serve` runs the embedded default: plain `ws://` on 127.0.0.1, a root key
kept in the data directory (`--data-dir`, `$HYBRIDRELAY_DATA_DIR`), hybrid connections created
on first listen. Relative certificate paths are relative to the file. Examples:
[`examples/relay.yaml`](../examples/relay.yaml),
[`examples/relay-local.yaml`](../examples/relay-local.yaml).
"""

_BRIDGE = f"""\
## The bridge: `hybridrelay bridge [-f FILE] ...`

Without `-x`, `-e` or a file's `connection:`, the connection string comes from
{" or ".join(f"`${name}`" for name in CONNECTION_STRING_ENV)}. `-x` replaces the file's
connection; `-e`, `-K`/`-k` and `-s` then replace single parts of it. A forward is written as
its command-line spec (`"8080:web"`) or as a mapping of the spec's parts (or `spec:`) with
per-forward options. Examples: `examples/bridge-*.yaml`.
"""


def _command_only(command: str, model: type[Any] | None) -> list[str]:
    """The options of ``hybridrelay COMMAND`` that no configuration key stands for."""
    parser = _subcommand(command)
    fields = {name for name, _, _ in walk(model)} if model is not None else set()
    lines = ["| flag | meaning |", "|---|---|"]
    for action in parser._actions:
        if action.dest in fields or action.dest == "help":
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.metavar}`"
        lines.append(f"| {flags} | {action.help or ''} |")
    return lines


def _subcommand(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[command]
            return sub
    raise LookupError(command)


_SERVE_APP = """\
## An ASGI application: `hybridrelay serve-app MODULE:APP`

No configuration file: its options are these.
"""

_COMMON = """\
## Every command

`hybridrelay --loop asyncio|uvloop` (default `$HYBRIDRELAY_LOOP`, else uvloop where it is
installed) chooses the event loop of `serve`, `bridge` and `serve-app`. Logs go to stderr,
one line per record (`LOG_FORMAT` in `cli/logs.py`), written in batches.
"""


def render() -> str:
    """The whole reference, as committed in docs/CONFIGURATION.md."""
    lines = [
        _INTRO,
        _RELAY,
        *reference(RelayConfig),
        "",
        "### Options of `hybridrelay serve` without a key",
        "",
        *_command_only("serve", RelayConfig),
        "",
        _BRIDGE,
        *reference(BridgeConfig),
        "",
        "### Options of `hybridrelay bridge` without a key",
        "",
        *_command_only("bridge", BridgeConfig),
        "",
        _SERVE_APP,
        *_command_only("serve-app", None),
        "",
        _COMMON,
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridrelay.cli.config_reference")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", type=Path, help="write the reference there")
    group.add_argument("--check", metavar="PATH", type=Path, help="exit 1 if PATH is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write is not None:
        args.write.write_text(text, encoding="utf-8")
    elif args.check is not None:
        if args.check.read_text(encoding="utf-8") != text:
            print(f"{args.check} is out of date: run {parser.prog} --write {args.check}")
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
