"""The ``hybridrelay`` command: ``serve``, ``bridge``, ``serve-app``, ``token`` and
``connection-string``.

``main(argv)`` is importable and returns an exit code, so tests can call it in-process; CLI tests
also run it as a real subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import sys
import time
from pathlib import Path

from hybridrelay import __version__
from hybridrelay.auth.sas import AuthorizationRule, Rights, create_token, token_audience
from hybridrelay.cli.logs import add_log_level_argument, configure_logging, install_batched_stderr
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV, ConnectionString
from hybridrelay.server.config import DEFAULT_PORT, RelayConfig, ServerSettings
from hybridrelay.settings import add_arguments, apply, given_arguments
from hybridrelay.transport.event_loop import (
    LOOPS,
    UvloopMissingError,
    default_loop,
    use_event_loop,
)
from hybridrelay.transport.tuning import set_malloc_thresholds, set_tls_read_buffer

__all__ = ["main"]

ROOT_RULE = "RootManageSharedAccessKey"


def default_data_dir() -> Path:
    explicit = os.environ.get("HYBRIDRELAY_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hybridrelay"


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run a relay",
        description="Run a relay. With no --config: an embedded default on loopback (plain ws, "
        "generated root key kept in the data directory, hybrid connections created on first "
        "listen).",
    )
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="YAML configuration file (docs/CONFIGURATION.md)"
    )
    add_arguments(parser, RelayConfig)  # --host, --port: they override the file's
    parser.add_argument("--data-dir", type=Path, help="embedded default's data directory")
    add_log_level_argument(parser)
    parser.set_defaults(func=_cmd_serve)


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "token",
        help="print a SAS token for a hybrid connection",
        description="Print a SAS token signed with a connection string's key.",
    )
    parser.add_argument(
        "--connection-string",
        "-x",
        default=os.environ.get(CONNECTION_STRING_ENV),
        metavar="CS",
        help=f"the connection string whose key signs the token (default: ${CONNECTION_STRING_ENV})",
    )
    parser.add_argument("--entity", "-e", help="hybrid connection (default: EntityPath)")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    parser.set_defaults(func=_cmd_token)


def _add_connection_string(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "connection-string", help="print the embedded default relay's root connection string"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the embedded relay's data directory (default: $HYBRIDRELAY_DATA_DIR, else "
        "~/.local/share/hybridrelay)",
    )
    parser.add_argument("--entity", "-e", help="add EntityPath=NAME")
    parser.set_defaults(func=_cmd_connection_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridrelay",
        description="Self-hostable hybrid relay (Azure Relay Hybrid Connections compatible).",
    )
    parser.add_argument("--version", action="version", version=f"hybridrelay {__version__}")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default=os.environ.get("HYBRIDRELAY_LOOP") or default_loop(),
        help="event loop of serve, bridge and serve-app (default: $HYBRIDRELAY_LOOP, else "
        "uvloop where it is installed, else asyncio; docs/DECISIONS.md D7)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_token(sub)
    _add_connection_string(sub)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Imported here: `hybridrelay token` need not load the bridge and the ASGI adapter.
    from hybridrelay.cli.bridge import add_bridge_arguments
    from hybridrelay.cli.serve_app import add_serve_app_arguments

    bridge = sub.add_parser(
        "bridge",
        help="forward ports (-L ingress, -R edge) and HTTP (-H) through the relay, like azbridge",
    )
    add_bridge_arguments(bridge)
    bridge.set_defaults(func=_cmd_bridge)
    serve_app = sub.add_parser(
        "serve-app",
        help="serve an ASGI application (module:app) through a hybrid connection",
    )
    add_serve_app_arguments(serve_app)
    serve_app.set_defaults(func=_cmd_serve_app)


def _cmd_bridge(args: argparse.Namespace) -> int:
    from hybridrelay.cli.bridge import run_bridge

    return asyncio.run(run_bridge(args))


def _cmd_serve_app(args: argparse.Namespace) -> int:
    from hybridrelay.cli.serve_app import run_serve_app

    return asyncio.run(run_serve_app(args))


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit: every relayed connection costs
    the relay two sockets and the bridge two, and distributions default the soft limit to 1024.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "bridge", "serve-app"):
        install_batched_stderr()
        raise_open_file_limit()
        set_tls_read_buffer()
        set_malloc_thresholds()
        try:
            use_event_loop(args.loop)
        except (ValueError, UvloopMissingError) as exc:
            print(f"hybridrelay: --loop {args.loop}: {exc}", file=sys.stderr)
            return 2
    try:
        result: int = args.func(args)
        return result
    except ConfigurationError as exc:
        print(f"hybridrelay: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"hybridrelay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- serve -------------------------------------------------------------------------------------


def _embedded_store(data_dir: Path) -> tuple[object, AuthorizationRule]:
    from hybridrelay.server.store import FileEntityStore

    store = FileEntityStore(data_dir / "namespace.json")
    rules = list(store.namespace_rules())
    root = next((r for r in rules if r.name == ROOT_RULE), None)
    if root is None:
        root = AuthorizationRule(
            ROOT_RULE,
            base64.b64encode(secrets.token_bytes(32)).decode(),
            base64.b64encode(secrets.token_bytes(32)).decode(),
            Rights.LISTEN | Rights.SEND | Rights.MANAGE,
        )
        store.set_namespace_rules([*rules, root])
    return store, root


def _cmd_serve(args: argparse.Namespace) -> int:
    from hybridrelay.server import RelayServer
    from hybridrelay.server.store import EntityStore

    configure_logging(args.log_level)
    store: EntityStore | None = None
    data_dir: Path | None = None
    if args.config:
        config = RelayConfig.load(args.config)
    else:
        data_dir = args.data_dir or default_data_dir()
        file_store, _ = _embedded_store(data_dir)
        store = file_store  # type: ignore[assignment]
        config = RelayConfig(
            server=ServerSettings(plaintext=True),  # the defaults: 127.0.0.1, DEFAULT_PORT
            auto_create_hybrid_connections=True,
        )
    config = apply(config, given_arguments(args, RelayConfig))

    async def run() -> int:
        server = RelayServer(config, store=store)
        try:
            await server.start()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}"
            ) from exc
        stop = asyncio.Event()
        try:
            # The handlers are in place before the line that tells a supervisor we are up.
            with stop_on_signals(stop.set):
                print(
                    f"hybridrelay {__version__}: relay listening on {server.base_url}", flush=True
                )
                if data_dir is not None:
                    endpoint_file = data_dir / "endpoint"
                    endpoint_file.write_text(server.base_url + "\n", encoding="utf-8")
                    print(
                        "Embedded default: plain ws:// on loopback; hybrid connections are "
                        "created on first listen.\nRoot connection string: run `hybridrelay "
                        f"connection-string` (the key is kept in {data_dir / 'namespace.json'}).",
                        flush=True,
                    )
                await stop.wait()
        finally:
            await server.aclose()
        print("hybridrelay: relay stopped", flush=True)
        return 0

    return asyncio.run(run())


# -- token / connection-string -----------------------------------------------------------------


def _cmd_token(args: argparse.Namespace) -> int:
    if not args.connection_string:
        raise ConfigurationError(
            f"no connection string: pass -x CONNECTION_STRING or set ${CONNECTION_STRING_ENV}"
        )
    cs = ConnectionString.parse(args.connection_string)
    entity = args.entity or cs.entity_path or ""
    if cs.token:
        print(cs.token)
        return 0
    if not cs.key_name or not cs.key:
        raise ConfigurationError("the connection string has no SharedAccessKeyName/Key")
    if args.ttl <= 0:
        raise ConfigurationError("--ttl must be positive")
    audience = token_audience(cs.host, entity)
    print(create_token(audience, cs.key_name, cs.key, expiry=int(time.time()) + args.ttl))
    return 0


def _cmd_connection_string(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / "namespace.json").exists():
        raise ConfigurationError(
            f"no embedded relay data in {data_dir}: start it once with `hybridrelay serve`"
        )
    _, root = _embedded_store(data_dir)
    endpoint_file = data_dir / "endpoint"
    base = (
        endpoint_file.read_text(encoding="utf-8").strip()
        if endpoint_file.exists()
        else f"ws://127.0.0.1:{DEFAULT_PORT}"
    )
    cs = ConnectionString(
        endpoint=base + "/", key_name=root.name, key=root.primary_key, entity_path=args.entity
    )
    print(str(cs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
