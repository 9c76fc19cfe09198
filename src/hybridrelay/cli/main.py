"""The ``hybridrelay`` command: ``serve``, ``bridge``, ``serve-app``, ``token`` and
``connection-string``.

``main(argv)`` is importable and returns an exit code, so tests can call it in-process; CLI tests
also run it as a real subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from hybridrelay import __version__
from hybridrelay.auth.sas import Rights, create_token, token_audience
from hybridrelay.cli.credentials import (
    FILE_OPTION,
    add_connection_string_file_argument,
    given_connection_string,
)
from hybridrelay.cli.embedded import ROOT_RULE, STORE_FILE
from hybridrelay.cli.logs import (
    add_log_format_argument,
    add_log_level_argument,
    configure_logging,
    install_batched_stderr,
    name_worker,
    say,
)
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV, ConnectionString
from hybridrelay.server.config import (
    DEFAULT_MANAGEMENT_PORT,
    ManagementSettings,
    RelayConfig,
    ServerSettings,
)
from hybridrelay.settings import add_arguments, apply, given_arguments
from hybridrelay.socket_errors import bind_failure
from hybridrelay.transport.event_loop import (
    LOOPS,
    UvloopMissingError,
    default_loop,
    use_event_loop,
)
from hybridrelay.transport.tuning import (
    freeze_startup_objects,
    set_malloc_thresholds,
    set_tls_read_buffer,
)

__all__ = ["main"]

logger = logging.getLogger("hybridrelay.cli")


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
    add_log_format_argument(parser)
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
        metavar="CS",
        help=f"the connection string whose key signs the token (default: ${CONNECTION_STRING_ENV})",
    )
    add_connection_string_file_argument(parser)
    parser.add_argument("--entity", "-e", help="hybrid connection (default: EntityPath)")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    parser.set_defaults(func=_cmd_token)


def _add_connection_string(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "connection-string",
        help="print the embedded default relay's root connection string",
        description="Print a connection string of the embedded default relay, with the key its "
        "store holds now (a regenerated key shows at once).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the embedded relay's data directory (default: $HYBRIDRELAY_DATA_DIR, else "
        "~/.local/share/hybridrelay)",
    )
    parser.add_argument("--entity", "-e", help="add EntityPath=NAME")
    parser.add_argument(
        "--rule", default=ROOT_RULE, help=f"the namespace rule whose key to print ({ROOT_RULE})"
    )
    parser.add_argument("--secondary", action="store_true", help="the secondary key")
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
    # Imported here: `hybridrelay token` need not load the bridge, the ASGI adapter or admin.
    from hybridrelay.cli.admin import add_admin_arguments, run_admin
    from hybridrelay.cli.bridge import add_bridge_arguments
    from hybridrelay.cli.serve_app import add_serve_app_arguments

    admin = sub.add_parser("admin", help="manage a running relay over its management API")
    add_admin_arguments(admin)
    admin.set_defaults(func=run_admin)
    bridge = sub.add_parser(
        "bridge",
        help="forward ports (-L ingress, -R edge) and HTTP (-H) through the relay, like azbridge",
    )
    add_bridge_arguments(bridge)
    add_log_format_argument(bridge)
    bridge.set_defaults(func=_cmd_bridge)
    serve_app = sub.add_parser(
        "serve-app",
        help="serve an ASGI application (module:app) through a hybrid connection",
    )
    add_serve_app_arguments(serve_app)
    add_log_format_argument(serve_app)
    serve_app.set_defaults(func=_cmd_serve_app)


def _cmd_bridge(args: argparse.Namespace) -> int:
    from hybridrelay.cli.bridge import run_bridge

    freeze_startup_objects()
    return asyncio.run(run_bridge(args))


def _cmd_serve_app(args: argparse.Namespace) -> int:
    from hybridrelay.cli.serve_app import run_serve_app

    freeze_startup_objects()  # the app is imported later: a few thousand objects, not frozen
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
        install_batched_stderr(args.log_format)
        raise_open_file_limit()
        set_tls_read_buffer()
        set_malloc_thresholds()
        try:
            use_event_loop(args.loop)
        except (ValueError, UvloopMissingError) as exc:
            print(f"hybridrelay: --loop {args.loop}: {exc}", file=sys.stderr)
            return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a worker runs again
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from hybridrelay.cli.embedded import Endpoints, default_data_dir, open_store, write_endpoints
    from hybridrelay.server import RelayServer
    from hybridrelay.server.worker import WorkerRole, worker_index
    from hybridrelay.store.base import Store

    configure_logging(args.log_level)
    data_dir: Path = args.data_dir or default_data_dir()
    embedded = not args.config
    config = _serve_config(args, data_dir)
    index = worker_index(config)
    if config.server.workers > 1 and index is None:
        from hybridrelay.cli.workers import supervise

        return supervise(config, args.argv)
    worker = None if index is None else WorkerRole.of(config, index)
    if index is not None:
        name_worker(index)
    if embedded and config.store.cluster:  # no SQLite file makes it: for the endpoint file
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def run() -> int:
        # The embedded default's store holds its root rule (made on first start); a
        # configuration file's relay opens its store itself (its rules are the file's).
        store: Store | None = None
        if embedded and config.store.cluster:  # the root rule lives in the cluster's Redis
            from hybridrelay.store.redis import RedisStore

            store = await RedisStore.open(
                config.store.cluster,
                namespace=config.namespace_name,
                initial_rules=[(ROOT_RULE, Rights.LISTEN | Rights.SEND | Rights.MANAGE)],
            )
        elif embedded:
            store = await open_store(data_dir)
        server = RelayServer(config, store=store, worker=worker)
        try:
            await server.start()
        except OSError as exc:
            if store is not None:
                await store.aclose()
            raise ConfigurationError(
                bind_failure(
                    f"{config.server.host}:{config.server.port}", exc, port_option="--port"
                )
            ) from exc
        stop = asyncio.Event()

        def on_stop_signal() -> None:
            if stop.is_set():  # a second SIGTERM/SIGINT during the drain: stop at once
                server.stop_draining()
            stop.set()

        def on_reload_signal() -> None:
            # Synchronous, in the loop's signal callback: one reload at a time, and the file
            # read and the certificate load take milliseconds.
            try:
                changes = server.reload(_serve_config(args, data_dir))
            except ConfigurationError as exc:
                logger.error("reload failed, the running configuration is kept: %s", exc)
                return
            logger.info("reloaded: %s", "; ".join(changes) or "nothing changed")

        try:
            # The handlers are in place before the line that tells a supervisor we are up.
            with stop_on_signals(on_stop_signal, reload=on_reload_signal):
                if worker is not None:  # the supervisor's "ready" line names it
                    say(
                        f"worker {worker.index}: rendezvous addresses name {server.worker_base_url}"
                    )
                say(f"hybridrelay {__version__}: relay listening on {server.base_url}")
                # The command that prints the connection string, naming the data directory
                # when it was given on the command line (the default would be another relay's).
                cs_command = "hybridrelay connection-string" + (
                    f" --data-dir {shlex.quote(str(args.data_dir))}" if args.data_dir else ""
                )
                if server.management_url is not None:
                    say(
                        f"management (Azure management API, /metrics, /healthz, /dashboard) on "
                        f"{server.management_url}; a Manage token: "
                        f'hybridrelay token -x "$({cs_command})"'
                    )
                if embedded and not (worker and worker.index):  # one worker writes it
                    write_endpoints(data_dir, Endpoints(server.base_url, server.management_url))
                    say(
                        "Embedded default: plain ws:// on loopback; hybrid connections are "
                        "created on first listen.\n"
                        + (
                            "The keys are kept in the cluster's Redis: read them through the "
                            "management API (hybridrelay admin)."
                            if config.store.cluster
                            else f"Root connection string: run `{cs_command}` "
                            f"(the keys are kept in {config.store.path})."
                        )
                    )
                await stop.wait()
                await server.drain()  # a second signal ends it early (on_stop_signal)
        finally:
            await server.aclose()
            if store is not None:
                await store.aclose()
        say("hybridrelay: relay stopped")
        return 0

    freeze_startup_objects()  # the relay's full collections walked its modules' objects too
    return asyncio.run(run())


def _serve_config(args: argparse.Namespace, data_dir: Path) -> RelayConfig:
    """The configuration ``serve`` runs with: the file's (else the embedded default's), the
    store in the data directory unless the file names one, the options over it. Read again on
    SIGHUP.

    Raises:
        ConfigurationError: the file cannot be read or breaks the schema (its path is named).
    """
    if args.config:
        config = RelayConfig.load(args.config)
    else:
        config = RelayConfig(
            server=ServerSettings(plaintext=True),  # the defaults: 127.0.0.1, DEFAULT_PORT
            management=ManagementSettings(port=DEFAULT_MANAGEMENT_PORT),
            auto_create_hybrid_connections=True,
        )
    if config.store.path is None:  # the store is SQLite in the data directory by default
        config = replace(config, store=replace(config.store, path=str(data_dir / STORE_FILE)))
    return apply(config, given_arguments(args, RelayConfig))


# -- token / connection-string -----------------------------------------------------------------


def _cmd_token(args: argparse.Namespace) -> int:
    text, warning = given_connection_string(args)
    text = text or os.environ.get(CONNECTION_STRING_ENV)
    if warning is not None:
        print(f"hybridrelay token: warning: {warning}", file=sys.stderr)
    if not text:
        raise ConfigurationError(
            f"no connection string: pass -x CONNECTION_STRING or {FILE_OPTION} PATH, or set "
            f"${CONNECTION_STRING_ENV}"
        )
    cs = ConnectionString.parse(text)
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
    from hybridrelay.cli.embedded import default_data_dir, is_running, read_endpoints, read_key

    data_dir = args.data_dir or default_data_dir()
    endpoints = read_endpoints(data_dir)
    if endpoints is None or not (data_dir / STORE_FILE).exists():
        raise ConfigurationError(
            f"no embedded relay data in {data_dir}: start it once with `hybridrelay serve`"
        )
    key = read_key(data_dir, args.rule, secondary=args.secondary)
    if not is_running(endpoints):
        print(
            f"hybridrelay: note: no relay answers at {endpoints.management or endpoints.relay} "
            "now; the keys are those of the store it will serve",
            file=sys.stderr,
        )
    cs = ConnectionString(
        endpoint=endpoints.relay.rstrip("/") + "/",
        key_name=args.rule,
        key=key,
        entity_path=args.entity,
    )
    print(str(cs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
