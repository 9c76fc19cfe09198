"""The bridge's configuration: a tree of frozen dataclasses, checked on construction.

The YAML reader, the ``hybridrelay bridge`` options and docs/CONFIGURATION.md are derived from
the fields (:mod:`hybridrelay.settings`); every key is optional and unknown keys are errors
that name the key's path. A forward is written as its command-line spec (``"8080:web"``) or as
a mapping of the spec's parts (or ``spec:``) plus per-forward options.

Merging with the command line (:func:`merge_cli`): scalar options given on the command line
win; ``-L``/``-R``/``-H`` forwards are added to the file's; ``-x`` replaces the file's
connection and ``-e``/``-K``/``-k``/``-s`` then replace single parts of it (as azbridge's
``-E/-K/-k/-S``).

Routing rule for an edge (checked on construction): the routes of one hybrid connection are
either a single route without a port name (a plain stream, no preamble) or any number of named
routes (every connection must then open with the azbridge preamble naming one of them).
A hybrid connection of an HTTP forward serves nothing else in the same agent (no ``-R``, no
second ``-H``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from hybridrelay.bridge.specs import (
    ANY_ADDRESS,
    LocalForwardSpec,
    Protocol,
    RemoteForwardSpec,
    parse_http_spec,
    parse_local_spec,
    parse_remote_spec,
    validate_host,
    validate_http_target,
)
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.allowlist import Network, allows, parse_network
from hybridrelay.protocol.connection_string import ConnectionString
from hybridrelay.settings import (
    LOG_LEVEL,
    LOG_LEVELS,
    Extra,
    Setting,
    add_arguments,
    apply,
    check_fields,
    check_value,
    from_document,
    given_arguments,
    load_yaml,
    setting,
)

__all__ = [
    "CONNECTION_STRING_ENV",
    "DEFAULT_BIND_ADDRESS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_KEEP_ALIVE_INTERVAL",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_UDP_FLOWS",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_SHUTDOWN_GRACE_PERIOD",
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "LOG_LEVELS",
    "BridgeConfig",
    "ConnectionSettings",
    "HttpForward",
    "LocalForward",
    "Network",
    "RemoteForward",
    "add_bridge_options",
    "load_config",
    "merge_arguments",
    "merge_cli",
    "parse_config",
]

DEFAULT_BIND_ADDRESS = "127.0.0.1"
DEFAULT_KEEP_ALIVE_INTERVAL = 30.0
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_GRACE_PERIOD = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
#: azbridge drops a UDP route after four idle minutes.
DEFAULT_UDP_IDLE_TIMEOUT = 240.0
DEFAULT_MAX_UDP_FLOWS = 256
#: Metrics and health stay on loopback unless the operator says otherwise: they name the
#: hybrid connections the bridge serves.
DEFAULT_METRICS_HOST = "127.0.0.1"
#: Environment variables consulted, in order, when no connection is given otherwise.
CONNECTION_STRING_ENV = ("HYBRIDRELAY_CONNECTION_STRING", "AZURE_BRIDGE_CONNECTIONSTRING")

#: Bounds shared by the global options and the per-forward overrides.
_MAX_COUNT = 1_000_000
_MAX_SECONDS = 1e7


def _mask_url(url: str | None) -> str | None:
    """Hide the password of ``scheme://user:pass@host``."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()
    except ValueError:
        return "***"


@dataclass(frozen=True)
class ConnectionSettings:
    """How the bridge reaches the relay. ``key``, ``token`` and proxy passwords stay out of repr.

    Attributes:
        endpoint: ``sb://host[:port]``, ``wss://...`` or ``ws://...`` (plain relays only).
        key_name, key: a SAS rule to sign tokens with, or
        token: a ready-made ``SharedAccessSignature ...`` token, or neither (an anonymous
            hybrid connection).
        entity_path: the connection string's ``EntityPath``; when set, every forward must use
            that hybrid connection.
        proxy: HTTP CONNECT proxy URL; None lets the SDK honour HTTPS_PROXY / NO_PROXY.
        ca_file: a PEM bundle to verify the relay's certificate with.
    """

    YAML_EXTRAS: ClassVar[Mapping[str, Extra]] = {
        "connection_string": Extra(
            "`Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...` (or "
            "`SharedAccessSignature=...`), instead of the parts",
            flags=("-x", "--connection-string"),
        )
    }

    endpoint: str | None = setting(
        None, help="relay endpoint, sb://host[:port]", flags=("-e", "-E", "--endpoint")
    )
    #: A cluster's other nodes (docs/CLUSTER.md): listeners and -L connects move to the next
    #: on failure.
    more_endpoints: tuple[str, ...] = setting(
        (),
        help="another relay endpoint of the same cluster, tried in turn when the relay a "
        "listener (-R, -H) or a -L connection uses cannot be reached (repeatable)",
        flags=("--also-endpoint",),
        metavar="ENDPOINT",
    )
    key_name: str | None = setting(None, help="shared access rule name", flags=("-K", "--key-name"))
    key: str | None = setting(None, help="shared access key", flags=("-k", "--key"), secret=True)
    token: str | None = setting(
        None,
        help="a SAS token instead of a key",
        flags=("-s", "-S", "--signature"),
        metavar="SIGNATURE",
        secret=True,
    )
    entity_path: str | None = setting(None, key="", help="the connection string's EntityPath")
    proxy: str | None = setting(
        None,
        help="HTTP CONNECT proxy http://[user:pass@]host:port (default: HTTPS_PROXY/NO_PROXY)",
        flags=("--proxy",),
        metavar="URL",
        secret=True,
    )
    ca_file: str | None = setting(
        None, help="CA bundle to verify the relay with", flags=("--ca-file",), metavar="PEM"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        first = [self.endpoint] if self.endpoint is not None else []
        for endpoint in [*first, *self.more_endpoints]:
            parts = urlsplit(endpoint)
            if parts.scheme.lower() not in ("sb", "ws", "wss", "http", "https") or not (
                parts.hostname
            ):
                raise ConfigurationError(f"endpoint: {endpoint!r} must look like sb://host[:port]/")
        if self.token and (self.key_name or self.key):
            raise ConfigurationError(
                "a SAS token cannot be combined with key_name/key (give one or the other)"
            )
        if bool(self.key_name) != bool(self.key):
            raise ConfigurationError("key_name and key go together")
        if self.proxy is not None:
            proxy = urlsplit(self.proxy)
            if proxy.scheme not in ("http", "https") or not proxy.hostname:
                raise ConfigurationError(
                    f"proxy: expected http://[user:pass@]host:port, got {_mask_url(self.proxy)!r}"
                )

    def __repr__(self) -> str:
        return (
            f"ConnectionSettings(endpoint={self.endpoint!r}, key_name={self.key_name!r}, "
            f"key={'***' if self.key else None!r}, token={'***' if self.token else None!r}, "
            f"entity_path={self.entity_path!r}, proxy={_mask_url(self.proxy)!r}, "
            f"ca_file={self.ca_file!r})"
        )

    @classmethod
    def from_connection_string(cls, text: str) -> ConnectionSettings:
        """The parts of a connection string.

        Raises:
            ConfigurationError: malformed; the message quotes none of its text (a piece of
                it may be the key).
        """
        try:
            parsed = ConnectionString.parse(text)
        except ConfigurationError as exc:
            message = str(exc)
            for piece in sorted({text, *text.split(";")}, key=len, reverse=True):
                if len(piece) >= 4:
                    message = message.replace(piece, "***")
            raise ConfigurationError(message) from None
        return cls(
            endpoint=parsed.endpoint,
            key_name=parsed.key_name,
            key=parsed.key,
            token=parsed.token,
            entity_path=parsed.entity_path,
        )

    @classmethod
    def from_yaml(
        cls, values: dict[str, Any], extras: Mapping[str, Any], where: str
    ) -> dict[str, Any]:
        """``connection_string:`` stands for the endpoint and the credentials."""
        text = extras.get("connection_string")
        if text is None:
            return values
        key = f"{where}.connection_string"
        if not isinstance(text, str):
            raise ConfigurationError(f"{key}: expected a string")
        if any(values.get(name) is not None for name in ("endpoint", "key_name", "key", "token")):
            raise ConfigurationError(
                f"{where}: give either connection_string or endpoint/key_name/key/token"
            )
        try:
            parsed = cls.from_connection_string(text)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{key}: {exc}") from None
        return {**values, **_connection_parts(parsed)}


def _connection_parts(connection: ConnectionSettings) -> dict[str, Any]:
    """What a connection string sets (the proxy and the CA file are not part of it)."""
    return {
        "endpoint": connection.endpoint,
        "key_name": connection.key_name,
        "key": connection.key,
        "token": connection.token,
        "entity_path": connection.entity_path,
    }


def _networks(value: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{where}: expected a list of strings")
    networks = []
    for text in value:
        try:
            networks.append(parse_network(text))
        except ValueError:
            raise ConfigurationError(f"{where}: {text!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(networks)


_PORT = Setting(help="", low=0, high=65535)
_REMOTE_PORT = Setting(help="", low=1, high=65535)
_SPEC_PARTS: Mapping[str, Extra] = {
    "hybrid_connection": Extra("the hybrid connection (instead of `spec`)"),
    "protocol": Extra("`tcp` (default), `udp` or `unix`", kind="tcp \\| udp \\| unix"),
    "port_name": Extra("the azbridge logical port name (sends or selects the preamble)"),
    "path": Extra("the Unix socket's path (`protocol: unix`)"),
}


def _part(parts: Mapping[str, Any], key: str, where: str, tp: Any = str | None) -> Any:
    return check_value(tp, None, parts.get(key), f"{where}.{key}" if where else key)


def _protocol(parts: Mapping[str, Any], where: str) -> Protocol:
    text = _part(parts, "protocol", where) or "tcp"
    try:
        return Protocol(text.lower())
    except ValueError:
        raise ConfigurationError(f"{where}.protocol: {text!r} is not tcp, udp or unix") from None


def _with_spec(
    values: dict[str, Any],
    extras: Mapping[str, Any],
    where: str,
    build: Callable[[Mapping[str, Any], Protocol, str], Any],
) -> dict[str, Any]:
    """A forward's values with its spec built from the parts (when there is no ``spec:``)."""
    if "spec" in values:
        for key in extras:
            raise ConfigurationError(f"{where}.{key}: not allowed together with 'spec'")
        return values
    try:
        spec = build(extras, _protocol(extras, where), where)
    except ConfigurationError as exc:
        text = str(exc)
        raise (exc if text.startswith(where) else ConfigurationError(f"{where}: {text}")) from None
    return {**values, "spec": spec}


def _local_spec(parts: Mapping[str, Any], protocol: Protocol, where: str) -> LocalForwardSpec:
    unix = protocol is Protocol.UNIX
    if unix and parts.get("port") is not None:
        raise ConfigurationError(f"{where}.port: a Unix socket forward has a path, not a port")
    return LocalForwardSpec(
        hybrid_connection=_part(parts, "hybrid_connection", where, str),
        protocol=protocol,
        port=0 if unix else check_value(int, _PORT, parts.get("port"), f"{where}.port"),
        bind_address=_part(parts, "bind_address", where),
        path=_part(parts, "path", where, str if unix else str | None),
        port_name=_part(parts, "port_name", where),
    )


def _remote_spec(parts: Mapping[str, Any], protocol: Protocol, where: str) -> RemoteForwardSpec:
    unix = protocol is Protocol.UNIX
    hybrid_connection = _part(parts, "hybrid_connection", where, str)
    path = _part(parts, "path", where, str if unix else str | None)
    for key in ("host", "port") if unix else ():
        if parts.get(key) is not None:
            raise ConfigurationError(f"{where}.{key}: a Unix socket target has a path, not a {key}")
    return RemoteForwardSpec(
        hybrid_connection=hybrid_connection,
        protocol=protocol,
        host=None if unix else (_part(parts, "host", where) or "localhost"),
        port=0 if unix else check_value(int, _REMOTE_PORT, parts.get("port"), f"{where}.port"),
        path=path,
        port_name=_part(parts, "port_name", where),
    )


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: expected a string")
    return value


def _seconds(default: float, help: str, *flags: str, low: float = 0.001) -> Any:
    """A global option in seconds, up to :data:`_MAX_SECONDS`."""
    metavar = "SECONDS" if flags else None
    return setting(default, help=help, low=low, high=_MAX_SECONDS, flags=flags, metavar=metavar)


def _override(name: str, *, low: float, high: float) -> Any:
    """A per-forward option; None inherits the global one."""
    return setting(None, help=f"overrides the global `{name}`", low=low, high=high)


@dataclass(frozen=True)
class LocalForward:
    """A ``-L``: a local socket carried to a hybrid connection. Options left out (None)
    inherit the global value."""

    YAML_EXTRAS: ClassVar[Mapping[str, Extra]] = {
        **_SPEC_PARTS,
        "port": Extra("the local port (0 picks a free one; not for `unix`)", kind="integer"),
        "bind_address": Extra("the address to bind (default: the global `bind_address`)"),
    }

    spec: LocalForwardSpec = setting(
        help="the forward as on the command line (`[BIND:]PORT[/PORTNAME][/udp]:HC`), or "
        "give its parts (the keys below)",
        parse=lambda value, where: parse_local_spec(_check_text(value, where)),
        kind="string",
    )
    allow: tuple[Network, ...] = setting(
        (),
        help="client CIDRs allowed (TCP/UDP; default: everyone)",
        parse=_networks,
        kind="list of CIDRs",
    )
    max_connections: int | None = _override("max_connections", low=1, high=_MAX_COUNT)
    udp_idle_timeout: float | None = _override("udp_idle_timeout", low=0.001, high=_MAX_SECONDS)
    max_udp_flows: int | None = _override("max_udp_flows", low=1, high=_MAX_COUNT)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.allow and self.spec.protocol is Protocol.UNIX:
            raise ConfigurationError("allow: Unix socket forwards have no CIDRs")

    @classmethod
    def from_text(cls, text: str) -> LocalForward:
        """The command-line form (``-L``)."""
        return cls(parse_local_spec(text))

    @classmethod
    def from_yaml(
        cls, values: dict[str, Any], extras: Mapping[str, Any], where: str
    ) -> dict[str, Any]:
        return _with_spec(values, extras, where, _local_spec)

    def allows(self, host: str) -> bool:
        """True when ``host`` (a peer address) may use this forward."""
        return allows(self.allow, host)


@dataclass(frozen=True)
class RemoteForward:
    """A ``-R``: a hybrid connection carried to a configured destination. Options left out
    (None) inherit the global value."""

    YAML_EXTRAS: ClassVar[Mapping[str, Extra]] = {
        **_SPEC_PARTS,
        "host": Extra("the destination host (default localhost; not for `unix`)"),
        "port": Extra("the destination port, 1-65535 (not for `unix`)", kind="integer"),
    }

    spec: RemoteForwardSpec = setting(
        help="the forward as on the command line (`HC:[PORTNAME/]HOST:PORT[/udp]`), or give "
        "its parts (the keys below)",
        parse=lambda value, where: parse_remote_spec(_check_text(value, where)),
        kind="string",
    )
    max_connections: int | None = _override("max_connections", low=1, high=_MAX_COUNT)
    udp_idle_timeout: float | None = _override("udp_idle_timeout", low=0.001, high=_MAX_SECONDS)
    max_udp_flows: int | None = _override("max_udp_flows", low=1, high=_MAX_COUNT)

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_text(cls, text: str) -> RemoteForward:
        """The command-line form (``-R``)."""
        return cls(parse_remote_spec(text))

    @classmethod
    def from_yaml(
        cls, values: dict[str, Any], extras: Mapping[str, Any], where: str
    ) -> dict[str, Any]:
        return _with_spec(values, extras, where, _remote_spec)


@dataclass(frozen=True)
class HttpForward:
    """A ``-H hybrid_connection:http://host:port[/base]``: relayed HTTP requests on
    ``hybrid_connection`` go to the upstream base URL ``target``."""

    hybrid_connection: str = setting(help="the hybrid connection whose requests are forwarded")
    target: str = setting(help="the upstream base URL, http(s)://host[:port][/base]")

    def __post_init__(self) -> None:
        check_fields(self)
        hybrid_connection = self.hybrid_connection.strip("/")
        if not hybrid_connection:
            raise ConfigurationError("hybrid_connection: must not be empty")
        try:
            validate_http_target(self.target)
        except ConfigurationError as exc:
            raise ConfigurationError(f"target: {exc}") from None
        object.__setattr__(self, "hybrid_connection", hybrid_connection)
        object.__setattr__(self, "target", self.target.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.hybrid_connection}:{self.target}"

    @classmethod
    def from_text(cls, text: str) -> HttpForward:
        """The command-line form (``-H``).

        Raises:
            ConfigurationError: malformed.
        """
        return cls(*parse_http_spec(text))


def _log_level(value: Any, where: str) -> str:
    return _check_text(value, where).lower()


@dataclass(frozen=True)
class BridgeConfig:
    """The whole bridge configuration (``hybridrelay bridge [-f FILE] ...``)."""

    connection: ConnectionSettings = setting(
        default_factory=ConnectionSettings, help="how to reach the relay"
    )
    local_forwards: tuple[LocalForward, ...] = setting(
        (),
        help="listen locally (TCP, UDP or unix:/path[#PORTNAME]:HC) and carry each connection "
        "to hybrid connection HC; repeatable",
        flags=("-L",),
        kind="list of specs or mappings",
        metavar="[BIND:]PORT[/PORTNAME][/udp]:HC",
        from_text=LocalForward.from_text,
    )
    remote_forwards: tuple[RemoteForward, ...] = setting(
        (),
        help="listen on hybrid connection HC and forward each connection to HOST:PORT "
        "(or unix:/path); repeatable",
        flags=("-R", "-T"),
        kind="list of specs or mappings",
        metavar="HC:[PORTNAME/]HOST:PORT[/udp]",
        from_text=RemoteForward.from_text,
    )
    http_forwards: tuple[HttpForward, ...] = setting(
        (),
        help="listen on hybrid connection HC and forward each relayed HTTP request for "
        "/HC/PATH to http://HOST:PORT/BASE/PATH (reverse proxy, adds Via and X-Forwarded-*); "
        "repeatable",
        flags=("-H",),
        kind="list of specs or mappings",
        metavar="HC:http://HOST:PORT[/BASE]",
        from_text=HttpForward.from_text,
    )
    access_log: bool = setting(
        True,
        help="log each request of the -H forwards at INFO on hybridrelay.access, "
        "uvicorn-style (client, method, path, status, bytes, duration)",
        flags=("--access-log",),
    )
    rewrite_cookie_path: bool = setting(
        False,
        help="-H: put the Path of the upstream's Set-Cookie headers under /HC (by default "
        "left as the upstream set it)",
        flags=("--rewrite-cookie-path",),
    )
    bind_address: str = setting(
        DEFAULT_BIND_ADDRESS,
        help="default bind address of -L forwards ('*' for all interfaces)",
        flags=("--bind-address",),
    )
    keep_alive_interval: float = _seconds(
        DEFAULT_KEEP_ALIVE_INTERVAL,
        "seconds between pings on control channels, and before a ping on a silent stream; "
        "paces TCP keep-alive on -L ports",
        "-a",
        "--keep-alive-interval",
    )
    connect_timeout: float = _seconds(
        DEFAULT_CONNECT_TIMEOUT, "seconds to reach the relay or a destination", "--connect-timeout"
    )
    handshake_timeout: float = _seconds(
        DEFAULT_HANDSHAKE_TIMEOUT, "seconds for the azbridge preamble exchange"
    )
    shutdown_grace_period: float = _seconds(
        DEFAULT_SHUTDOWN_GRACE_PERIOD,
        "seconds open connections get to finish after SIGINT/SIGTERM",
        "--shutdown-grace-period",
        low=0.0,
    )
    log_level: str = setting(
        "info",
        help=LOG_LEVEL.help,
        choices=LOG_LEVEL.choices,
        flags=LOG_LEVEL.flags,
        parse=_log_level,
    )
    max_connections: int = setting(
        DEFAULT_MAX_CONNECTIONS,
        help="concurrent TCP/Unix connections per forward",
        low=1,
        high=_MAX_COUNT,
    )
    udp_idle_timeout: float = _seconds(
        DEFAULT_UDP_IDLE_TIMEOUT, "seconds a UDP flow may stay silent (azbridge: 4 minutes)"
    )
    max_udp_flows: int = setting(
        DEFAULT_MAX_UDP_FLOWS, help="concurrent UDP flows per forward", low=1, high=_MAX_COUNT
    )
    metrics_port: int | None = setting(
        None,
        help="serve Prometheus /metrics, /healthz and /readyz on this TCP port (0: any free "
        "port, logged at start; default: not served)",
        low=0,
        high=65535,
        flags=("--metrics-port",),
        metavar="PORT",
    )
    metrics_host: str = setting(
        DEFAULT_METRICS_HOST,
        help="the address --metrics-port listens on (beyond loopback, anyone who reaches it "
        "sees the hybrid connections' names and traffic)",
        flags=("--metrics-host",),
        metavar="HOST",
    )

    def __post_init__(self) -> None:
        """Check the fields and the rules that span several forwards.

        Raises:
            ConfigurationError: a field out of bounds, duplicate local bindings, an edge
                hybrid connection whose routes cannot be told apart, or a forward outside the
                connection string's EntityPath.
        """
        check_fields(self)
        if self.bind_address != ANY_ADDRESS:
            validate_host(self.bind_address, what="bind_address")
        validate_host(self.metrics_host, what="metrics_host")
        entity = self.connection.entity_path
        if entity is not None:
            specs: list[LocalForwardSpec | RemoteForwardSpec | HttpForward] = [
                f.spec for f in self.local_forwards
            ]
            specs += [r.spec for r in self.remote_forwards]
            specs += self.http_forwards
            for spec in specs:
                if spec.hybrid_connection.strip("/") != entity.strip("/"):
                    raise ConfigurationError(
                        f"forward {spec}: the connection string names EntityPath={entity!r}, "
                        f"so every forward must use that hybrid connection"
                    )
        # Entity names are case-insensitive on the relay (as on Azure).
        edges = {hc.strip("/").lower() for hc in self.edge_routes()}
        http_hcs: set[str] = set()
        for http in self.http_forwards:
            hc = http.hybrid_connection.strip("/").lower()
            if hc in edges:
                raise ConfigurationError(
                    f"-H {http}: hybrid connection {http.hybrid_connection!r} is also a -R "
                    "(remote forward) target; an HTTP forward needs a hybrid connection of its own"
                )
            if hc in http_hcs:
                raise ConfigurationError(
                    f"-H {http}: hybrid connection {http.hybrid_connection!r} has two HTTP "
                    "forwards; give each upstream a hybrid connection of its own"
                )
            http_hcs.add(hc)
        bindings: set[tuple[str, ...]] = set()
        for forward in self.local_forwards:
            spec = forward.spec
            if spec.protocol is Protocol.UNIX:
                key: tuple[str, ...] = ("unix", spec.path or "")
            elif spec.port == 0:
                continue
            else:
                key = (spec.protocol.value, spec.bind_address or self.bind_address, str(spec.port))
            if key in bindings:
                raise ConfigurationError(f"local forward {spec}: this address is bound twice")
            bindings.add(key)
        for hc, routes in self.edge_routes().items():
            names = [r.spec.port_name for r in routes]
            if len(routes) > 1 and None in names:
                raise ConfigurationError(
                    f"remote forwards on hybrid connection {hc!r}: several routes share it, so "
                    "each needs a port name (hc:portname/host:port); the senders select one "
                    "with the azbridge preamble"
                )
            if len(set(names)) != len(names):
                raise ConfigurationError(
                    f"remote forwards on hybrid connection {hc!r}: port name used twice"
                )

    def edge_routes(self) -> dict[str, tuple[RemoteForward, ...]]:
        """The remote forwards grouped by hybrid connection (one listener each)."""
        routes: dict[str, list[RemoteForward]] = {}
        for forward in self.remote_forwards:
            routes.setdefault(forward.spec.hybrid_connection, []).append(forward)
        return {hc: tuple(items) for hc, items in routes.items()}

    def bind_host(self, forward: LocalForward) -> str | None:
        """The host to bind a TCP/UDP local forward to; None means all interfaces."""
        host = forward.spec.bind_address or self.bind_address
        return None if host == ANY_ADDRESS else host

    def max_connections_of(self, forward: LocalForward | RemoteForward) -> int:
        return forward.max_connections or self.max_connections

    def udp_idle_timeout_of(self, forward: LocalForward | RemoteForward) -> float:
        return forward.udp_idle_timeout or self.udp_idle_timeout

    def max_udp_flows_of(self, forward: LocalForward | RemoteForward) -> int:
        return forward.max_udp_flows or self.max_udp_flows


# -- the command line --------------------------------------------------------------------------


def add_bridge_options(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`BridgeConfig` (and ``-x``), grouped as ``--help`` shows them."""
    conn = parser.add_argument_group("relay connection")
    conn.add_argument(
        *ConnectionSettings.YAML_EXTRAS["connection_string"].flags,
        dest="connection_string",
        metavar="CONNECTION_STRING",
        help="Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=... (or "
        "SharedAccessSignature=...); default from "
        + " or ".join(f"${name}" for name in CONNECTION_STRING_ENV),
    )
    add_arguments(conn, BridgeConfig, only=lambda name: name.startswith("connection."))
    forwards = parser.add_argument_group("forwards")
    add_arguments(forwards, BridgeConfig, only=lambda name: name.endswith("_forwards"))
    options = parser.add_argument_group("options")
    add_arguments(
        options,
        BridgeConfig,
        only=lambda name: not name.startswith("connection.") and not name.endswith("_forwards"),
    )


def merge_arguments(
    config: BridgeConfig, args: argparse.Namespace, *, connection_string: str | None = None
) -> BridgeConfig:
    """Apply parsed options (of :func:`add_bridge_options`) to a (file) configuration: the
    command line wins, forwards add up, ``-x`` (or ``connection_string``) replaces the file's
    connection and the parts given replace pieces of it.

    Raises:
        ConfigurationError: the connection string is malformed or the result is inconsistent.
    """
    given = given_arguments(args, BridgeConfig)
    parts = {
        name.partition(".")[2]: given.pop(name)
        for name in list(given)
        if name.startswith("connection.")
    }
    connection_string = getattr(args, "connection_string", None) or connection_string
    connection = config.connection
    changes: dict[str, Any] = {}
    if connection_string is not None:
        changes.update(
            _connection_parts(ConnectionSettings.from_connection_string(connection_string))
        )
    if "key_name" in parts or "key" in parts:
        changes.update(
            key_name=parts.get("key_name", changes.get("key_name", connection.key_name)),
            key=parts.get("key", changes.get("key", connection.key)),
            token=None,
        )
    if "token" in parts:
        changes.update(key_name=None, key=None)
    changes.update(parts)
    if changes:
        config = replace(config, connection=replace(connection, **changes))
    return apply(config, given)


def merge_cli(config: BridgeConfig, argv: Sequence[str]) -> BridgeConfig:
    """:func:`merge_arguments` of a command line (``["-x", cs, "-L", "8080:web"]``).

    Raises:
        ConfigurationError: an option or spec is malformed, or the result is inconsistent.
    """
    parser = _Parser(prog="hybridrelay bridge", add_help=False)
    add_bridge_options(parser)
    return merge_arguments(config, parser.parse_args(list(argv)))


class _Parser(argparse.ArgumentParser):
    """Reports a bad option as a :class:`ConfigurationError` instead of exiting."""

    def error(self, message: str) -> Any:
        raise ConfigurationError(message)


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate a YAML configuration file.

    Raises:
        ConfigurationError: the file cannot be read, is not YAML, or breaks the schema.
    """
    return load_yaml(BridgeConfig, path, what="bridge config")


def parse_config(document: Any) -> BridgeConfig:
    """Validate a parsed YAML document into a :class:`BridgeConfig`.

    Raises:
        ConfigurationError: the document breaks the schema; the message names the key path.
    """
    return from_document(BridgeConfig, document)
