"""Bridge configuration: the YAML file and the command line, validated into frozen dataclasses.

The YAML schema (every key optional; unknown keys are errors that name the key's path)::

    connection:                      # how to reach the relay
      connection_string: "Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=..."
      endpoint: sb://relay.example.com     # or the parts one by one
      key_name: bridge
      key: "..."
      token: "SharedAccessSignature sr=..."   # instead of key_name/key
      proxy: http://proxy:3128        # HTTP CONNECT proxy; default: HTTPS_PROXY / NO_PROXY
      ca_file: /etc/ssl/relay-ca.pem  # trust anchor for the relay's certificate
    bind_address: 127.0.0.1          # default bind of local forwards (loopback)
    keep_alive_interval: 30          # seconds between pings on the listener's control channel
    connect_timeout: 30              # seconds to reach the relay or a destination
    handshake_timeout: 10            # seconds for the azbridge preamble exchange
    shutdown_grace_period: 10        # seconds open connections get to finish on SIGINT/SIGTERM
    log_level: info                  # debug | info | warning | error | critical
    max_connections: 1024            # per forward, concurrent TCP/Unix connections
    udp_idle_timeout: 240            # seconds a UDP flow may stay silent (azbridge: 4 min)
    max_udp_flows: 256               # per forward, concurrent UDP flows
    local_forwards:                  # -L
      - "8080:web"                   # a spec string, as on the command line, or a mapping:
      - hybrid_connection: hosts
        port: 2222
        bind_address: 127.0.0.1
        protocol: tcp                # tcp | udp | unix
        port_name: ssh
        allow: [127.0.0.0/8]         # client CIDRs (TCP/UDP only); default: everyone
        max_connections: 64          # overrides the global value; also udp_idle_timeout,
                                     # max_udp_flows
      - spec: "unix:/run/app.sock#app:hosts"   # a spec string plus per-forward options
        max_connections: 8
    remote_forwards:                 # -R
      - "web:localhost:80"
      - hybrid_connection: hosts
        port_name: ssh
        host: 10.0.0.5
        port: 22
        protocol: tcp                # tcp | udp | unix (with path:)
    http_forwards:                   # -H: relayed HTTP requests to a local HTTP server
      - "api:http://127.0.0.1:8000/v1"   # a spec string, as on the command line, or a mapping:
      - hybrid_connection: admin
        target: http://127.0.0.1:9000

Merging with the command line (:func:`merge_cli`): scalar options given on the command line
win; ``-L``/``-R``/``-H`` forwards are added to the file's; ``-x`` replaces the file's
connection and ``-e``/``-K``/``-k``/``-s`` then replace single parts of it (as azbridge's
``-E/-K/-k/-S``).

Routing rule for an edge (checked here, at load time): the routes of one hybrid connection are
either a single route without a port name (a plain stream, no preamble) or any number of named
routes (every connection must then open with the azbridge preamble naming one of them).
A hybrid connection of an HTTP forward serves nothing else in the same agent (no ``-R``, no
second ``-H``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

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

__all__ = [
    "DEFAULT_BIND_ADDRESS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_KEEP_ALIVE_INTERVAL",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_UDP_FLOWS",
    "DEFAULT_SHUTDOWN_GRACE_PERIOD",
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "LOG_LEVELS",
    "BridgeConfig",
    "CliOverrides",
    "ConnectionSettings",
    "HttpForward",
    "LocalForward",
    "Network",
    "RemoteForward",
    "load_config",
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
LOG_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


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

    endpoint: str | None = None
    key_name: str | None = None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    entity_path: str | None = None
    proxy: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    def __repr__(self) -> str:
        return (
            f"ConnectionSettings(endpoint={self.endpoint!r}, key_name={self.key_name!r}, "
            f"key={'***' if self.key else None!r}, token={'***' if self.token else None!r}, "
            f"entity_path={self.entity_path!r}, proxy={_mask_url(self.proxy)!r}, "
            f"ca_file={self.ca_file!r})"
        )

    @classmethod
    def from_connection_string(cls, text: str) -> ConnectionSettings:
        parsed = ConnectionString.parse(text)
        return cls(
            endpoint=parsed.endpoint,
            key_name=parsed.key_name,
            key=parsed.key,
            token=parsed.token,
            entity_path=parsed.entity_path,
        )

    def validated(self, where: str = "connection") -> ConnectionSettings:
        """Check that the parts fit together; returns self."""
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme.lower() not in ("sb", "ws", "wss", "http", "https") or not (
                parts.hostname
            ):
                raise ConfigurationError(
                    f"{where}.endpoint: {self.endpoint!r} must look like sb://host[:port]/"
                )
        if self.token and (self.key_name or self.key):
            raise ConfigurationError(
                f"{where}: a SAS token cannot be combined with key_name/key (give one or the other)"
            )
        if bool(self.key_name) != bool(self.key):
            raise ConfigurationError(f"{where}: key_name and key go together")
        if self.proxy is not None:
            proxy = urlsplit(self.proxy)
            if proxy.scheme not in ("http", "https") or not proxy.hostname:
                raise ConfigurationError(
                    f"{where}.proxy: expected http://[user:pass@]host:port, got "
                    f"{_mask_url(self.proxy)!r}"
                )
        return self


@dataclass(frozen=True)
class LocalForward:
    """A ``-L`` with its options; None options inherit the global value."""

    spec: LocalForwardSpec
    allow: tuple[Network, ...] = ()
    max_connections: int | None = None
    udp_idle_timeout: float | None = None
    max_udp_flows: int | None = None

    def allows(self, host: str) -> bool:
        """True when ``host`` (a peer address) may use this forward."""
        return allows(self.allow, host)


@dataclass(frozen=True)
class RemoteForward:
    """A ``-R`` with its options; None options inherit the global value."""

    spec: RemoteForwardSpec
    max_connections: int | None = None
    udp_idle_timeout: float | None = None
    max_udp_flows: int | None = None


@dataclass(frozen=True)
class HttpForward:
    """A ``-H hybrid_connection:http://host:port[/base]``: relayed HTTP requests on
    ``hybrid_connection`` go to the upstream base URL ``target``."""

    hybrid_connection: str
    target: str

    def __str__(self) -> str:
        return f"{self.hybrid_connection}:{self.target}"

    @classmethod
    def parse(cls, spec: str) -> HttpForward:
        """Parse the command-line form.

        Raises:
            ConfigurationError: malformed.
        """
        return cls(*parse_http_spec(spec))


@dataclass(frozen=True)
class BridgeConfig:
    """The whole bridge configuration."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    local_forwards: tuple[LocalForward, ...] = ()
    remote_forwards: tuple[RemoteForward, ...] = ()
    http_forwards: tuple[HttpForward, ...] = ()
    bind_address: str = DEFAULT_BIND_ADDRESS
    keep_alive_interval: float = DEFAULT_KEEP_ALIVE_INTERVAL
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    shutdown_grace_period: float = DEFAULT_SHUTDOWN_GRACE_PERIOD
    log_level: str = "info"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    max_udp_flows: int = DEFAULT_MAX_UDP_FLOWS

    def validated(self) -> BridgeConfig:
        """Check the rules that span several forwards; returns self.

        Raises:
            ConfigurationError: duplicate local bindings, an edge hybrid connection whose
                routes cannot be told apart, or a forward outside the connection string's
                EntityPath.
        """
        self.connection.validated()
        if self.log_level not in LOG_LEVELS:
            raise ConfigurationError(
                f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if self.bind_address != ANY_ADDRESS:
            validate_host(self.bind_address, what="bind_address")
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
        return self

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


@dataclass(frozen=True)
class CliOverrides:
    """What the command line says; None / empty means "not given"."""

    connection_string: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    key_name: str | None = None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    proxy: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    local_specs: Sequence[str] = ()
    remote_specs: Sequence[str] = ()
    http_specs: Sequence[str] = ()
    bind_address: str | None = None
    keep_alive_interval: float | None = None
    connect_timeout: float | None = None
    shutdown_grace_period: float | None = None
    log_level: str | None = None


def merge_cli(config: BridgeConfig, cli: CliOverrides) -> BridgeConfig:
    """Apply the command line to a (file) configuration: the command line wins.

    Raises:
        ConfigurationError: a spec or option is malformed, or the result is inconsistent.
    """
    connection = config.connection
    if cli.connection_string is not None:
        connection = replace(
            ConnectionSettings.from_connection_string(cli.connection_string),
            proxy=connection.proxy,
            ca_file=connection.ca_file,
        )
    if cli.endpoint is not None:
        connection = replace(connection, endpoint=cli.endpoint)
    if cli.key_name is not None or cli.key is not None:
        connection = replace(
            connection,
            key_name=cli.key_name if cli.key_name is not None else connection.key_name,
            key=cli.key if cli.key is not None else connection.key,
            token=None,
        )
    if cli.token is not None:
        connection = replace(connection, token=cli.token, key_name=None, key=None)
    if cli.proxy is not None:
        connection = replace(connection, proxy=cli.proxy)
    if cli.ca_file is not None:
        connection = replace(connection, ca_file=cli.ca_file)
    changes: dict[str, Any] = {
        "connection": connection,
        "local_forwards": config.local_forwards
        + tuple(LocalForward(parse_local_spec(text)) for text in cli.local_specs),
        "remote_forwards": config.remote_forwards
        + tuple(RemoteForward(parse_remote_spec(text)) for text in cli.remote_specs),
        "http_forwards": config.http_forwards
        + tuple(HttpForward.parse(text) for text in cli.http_specs),
    }
    for name in (
        "bind_address",
        "keep_alive_interval",
        "connect_timeout",
        "shutdown_grace_period",
        "log_level",
    ):
        value = getattr(cli, name)
        if value is not None:
            if isinstance(value, float) and (value < 0 or (value == 0 and "grace" not in name)):
                raise ConfigurationError(f"--{name.replace('_', '-')} must be positive")
            changes[name] = value
    return replace(config, **changes).validated()


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate a YAML configuration file.

    Raises:
        ConfigurationError: the file cannot be read, is not YAML, or breaks the schema.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read bridge config {path}: {exc}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: invalid YAML: {exc}") from exc
    try:
        return parse_config(document if document is not None else {})
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


def parse_config(document: Any) -> BridgeConfig:
    """Validate a parsed YAML document into a :class:`BridgeConfig`.

    Raises:
        ConfigurationError: the document breaks the schema; the message names the key path.
    """
    root = _Section(document, "")
    conn = root.section("connection")
    connection = ConnectionSettings()
    connection_string = conn.string("connection_string")
    if connection_string is not None:
        try:
            connection = ConnectionSettings.from_connection_string(connection_string)
        except ConfigurationError as exc:
            raise ConfigurationError(f"connection.connection_string: {exc}") from None
    parts = {name: conn.string(name) for name in ("endpoint", "key_name", "key", "token")}
    if connection_string is not None and any(v is not None for v in parts.values()):
        raise ConfigurationError(
            "connection: give either connection_string or endpoint/key_name/key/token"
        )
    if connection_string is None:
        connection = ConnectionSettings(**parts)
    connection = replace(connection, proxy=conn.string("proxy"), ca_file=conn.string("ca_file"))
    conn.done()

    defaults = BridgeConfig()
    local = [_local_forward(item) for item in root.items("local_forwards")]
    remote = [_remote_forward(item) for item in root.items("remote_forwards")]
    http = [_http_forward(item) for item in root.items("http_forwards")]
    log_level = root.string("log_level") or defaults.log_level
    config = BridgeConfig(
        connection=connection,
        local_forwards=tuple(local),
        remote_forwards=tuple(remote),
        http_forwards=tuple(http),
        bind_address=root.string("bind_address") or defaults.bind_address,
        keep_alive_interval=root.number("keep_alive_interval", defaults.keep_alive_interval),
        connect_timeout=root.number("connect_timeout", defaults.connect_timeout),
        handshake_timeout=root.number("handshake_timeout", defaults.handshake_timeout),
        shutdown_grace_period=root.number(
            "shutdown_grace_period", defaults.shutdown_grace_period, low=0.0
        ),
        log_level=log_level.lower(),
        max_connections=root.integer("max_connections", defaults.max_connections),
        udp_idle_timeout=root.number("udp_idle_timeout", defaults.udp_idle_timeout),
        max_udp_flows=root.integer("max_udp_flows", defaults.max_udp_flows),
    )
    root.done()
    return config.validated()


_LOCAL_FIELDS = ("hybrid_connection", "port", "bind_address", "protocol", "path", "port_name")
_REMOTE_FIELDS = ("hybrid_connection", "host", "port", "protocol", "path", "port_name")


def _protocol(section: _Section) -> Protocol:
    text = section.string("protocol") or "tcp"
    try:
        return Protocol(text.lower())
    except ValueError:
        raise ConfigurationError(
            f"{section.key('protocol')}: {text!r} is not tcp, udp or unix"
        ) from None


def _located(where: str, exc: ConfigurationError) -> ConfigurationError:
    """``exc`` prefixed with the forward's place in the file (once)."""
    return exc if str(exc).startswith(where) else ConfigurationError(f"{where}: {exc}")


def _forward_limits(item: _Section) -> dict[str, Any]:
    """The per-forward overrides that local and remote forwards share."""
    return {
        "max_connections": item.integer("max_connections", None),
        "udp_idle_timeout": item.number("udp_idle_timeout", None),
        "max_udp_flows": item.integer("max_udp_flows", None),
    }


def _local_forward(item: _Section) -> LocalForward:
    where = item.path
    try:
        if isinstance(item.document, str):
            return LocalForward(parse_local_spec(item.document))
        spec_text = item.string("spec")
        if spec_text is not None:
            item.forbid(_LOCAL_FIELDS, "spec")
            spec = parse_local_spec(spec_text)
        else:
            protocol = _protocol(item)
            spec = LocalForwardSpec(
                hybrid_connection=item.string("hybrid_connection", required=True),
                protocol=protocol,
                port=item.integer("port", None, low=0, high=65535, required=True)
                if protocol is not Protocol.UNIX
                else item.absent("port", "a Unix socket forward has a path, not a port"),
                bind_address=item.string("bind_address"),
                path=item.string("path", required=protocol is Protocol.UNIX),
                port_name=item.string("port_name"),
            )
        allow = tuple(_network(text, f"{item.key('allow')}") for text in item.strings("allow"))
        if allow and spec.protocol is Protocol.UNIX:
            raise ConfigurationError(f"{item.key('allow')}: Unix socket forwards have no CIDRs")
        forward = LocalForward(spec=spec, allow=allow, **_forward_limits(item))
        item.done()
        return forward
    except ConfigurationError as exc:
        raise _located(where, exc) from None


def _remote_forward(item: _Section) -> RemoteForward:
    where = item.path
    try:
        if isinstance(item.document, str):
            return RemoteForward(parse_remote_spec(item.document))
        spec_text = item.string("spec")
        if spec_text is not None:
            item.forbid(_REMOTE_FIELDS, "spec")
            spec = parse_remote_spec(spec_text)
        else:
            protocol = _protocol(item)
            unix = protocol is Protocol.UNIX
            spec = RemoteForwardSpec(
                hybrid_connection=item.string("hybrid_connection", required=True),
                protocol=protocol,
                host=None if unix else (item.string("host") or "localhost"),
                port=0 if unix else item.integer("port", None, low=1, high=65535, required=True),
                path=item.string("path", required=unix),
                port_name=item.string("port_name"),
            )
            if unix:
                item.absent("host", "a Unix socket target has a path, not a host")
                item.absent("port", "a Unix socket target has a path, not a port")
        forward = RemoteForward(spec=spec, **_forward_limits(item))
        item.done()
        return forward
    except ConfigurationError as exc:
        raise _located(where, exc) from None


def _http_forward(item: _Section) -> HttpForward:
    where = item.path
    try:
        if isinstance(item.document, str):
            return HttpForward.parse(item.document)
        hc = item.string("hybrid_connection", required=True).strip("/")
        if not hc:
            raise ConfigurationError(f"{item.key('hybrid_connection')}: must not be empty")
        target = item.string("target", required=True)
        try:
            validate_http_target(target)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{item.key('target')}: {exc}") from None
        item.done()
        return HttpForward(hc, target.rstrip("/"))
    except ConfigurationError as exc:
        raise _located(where, exc) from None


def _network(text: str, where: str) -> Network:
    try:
        return parse_network(text)
    except ValueError:
        raise ConfigurationError(f"{where}: {text!r} is not a CIDR like 10.0.0.0/8") from None


class _Section:
    """One mapping of the document; remembers which keys were read so the rest are errors."""

    def __init__(self, document: Any, path: str) -> None:
        if document is None:
            document = {}
        if not isinstance(document, Mapping | str):
            raise ConfigurationError(f"{path or 'the document'}: expected a mapping")
        self.document: Any = document
        self.path = path
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _raw(self, key: str) -> Any:
        if isinstance(self.document, str):
            raise ConfigurationError(f"{self.path or 'the document'}: expected a mapping")
        self.used.add(key)
        return self.document.get(key)

    def section(self, key: str) -> _Section:
        value = self._raw(key)
        if isinstance(value, str):
            raise ConfigurationError(f"{self.key(key)}: expected a mapping")
        return _Section(value, self.key(key))

    def items(self, key: str) -> list[_Section]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigurationError(f"{self.key(key)}: expected a list")
        return [_Section(item, f"{self.key(key)}[{i}]") for i, item in enumerate(value)]

    def string(self, key: str, *, required: bool = False) -> Any:
        value = self._raw(key)
        if value is None:
            if required:
                raise ConfigurationError(f"{self.key(key)}: required")
            return None
        if not isinstance(value, str):
            raise ConfigurationError(f"{self.key(key)}: expected a string")
        return value

    def strings(self, key: str) -> list[str]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{self.key(key)}: expected a list of strings")
        return list(value)

    def integer(
        self,
        key: str,
        default: Any,
        *,
        low: int = 1,
        high: int = 1_000_000,
        required: bool = False,
    ) -> Any:
        value = self._raw(key)
        if value is None:
            if required:
                raise ConfigurationError(f"{self.key(key)}: required")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigurationError(f"{self.key(key)}: expected an integer from {low} to {high}")
        return value

    def number(self, key: str, default: Any, *, low: float = 0.001) -> Any:
        value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
            raise ConfigurationError(f"{self.key(key)}: expected a number of at least {low}")
        if value > 1e7:
            raise ConfigurationError(f"{self.key(key)}: {value} is unreasonably large")
        return float(value)

    def absent(self, key: str, why: str) -> int:
        if self._raw(key) is not None:
            raise ConfigurationError(f"{self.key(key)}: {why}")
        return 0

    def forbid(self, keys: Sequence[str], given: str) -> None:
        for key in keys:
            if self._raw(key) is not None:
                raise ConfigurationError(f"{self.key(key)}: not allowed together with {given!r}")

    def done(self) -> None:
        if isinstance(self.document, str):
            return
        unknown = sorted(str(k) for k in set(self.document) - self.used)
        if unknown:
            raise ConfigurationError(f"unknown key(s): {', '.join(self.key(k) for k in unknown)}")
