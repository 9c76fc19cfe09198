"""The relay's configuration: a tree of frozen dataclasses, checked on construction.

The YAML reader, the ``serve`` options and docs/CONFIGURATION.md are derived from the fields
(:mod:`hybridrelay.settings`). Unknown keys are errors (with the path of the key in the
message); secrets never appear in ``repr``. A configuration is a value: the management plane
replaces it whole (:func:`dataclasses.replace`), nothing derived from it is kept elsewhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from hybridrelay.auth.sas import AuthorizationRule, Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.allowlist import Network, allows, is_loopback, parse_network
from hybridrelay.settings import Extra, check_fields, from_document, read_document, setting
from hybridrelay.store.base import MAX_RULES_PER_SCOPE

__all__ = [
    "DEFAULT_MANAGEMENT_PORT",
    "DEFAULT_PORT",
    "HybridConnectionConfig",
    "IngressConfig",
    "LimitsConfig",
    "ManagementSettings",
    "RelayConfig",
    "RuleEntry",
    "ServerSettings",
    "StoreSettings",
    "TlsConfig",
]

#: The relay's port unless told otherwise (the embedded default's too).
DEFAULT_PORT = 9400


@dataclass(frozen=True)
class TlsConfig:
    """The relay's certificate; relative paths are relative to the configuration file."""

    cert: str = setting(help="PEM certificate chain")
    key: str = setting(help="PEM private key")

    def __post_init__(self) -> None:
        check_fields(self)


def _check_host(host: str) -> None:
    if not host:
        raise ConfigurationError("host must not be empty")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part.replace("-", "").isalnum() for part in host.split(".") if part):
            raise ConfigurationError(f"host: {host!r} is not an address or host name") from None


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the relay listens."""

    host: str = setting(
        "127.0.0.1", help="address or host name to listen on", flags=("--host",), metavar="HOST"
    )
    port: int = setting(
        DEFAULT_PORT,
        help="port to listen on (0 = any free port)",
        low=0,
        high=65535,
        flags=("--port",),
        metavar="PORT",
    )
    tls: TlsConfig | None = setting(None, help="serve wss:// and https:// with this certificate")
    #: Plain ws/http must be asked for explicitly when there is no TLS.
    plaintext: bool = setting(
        False,
        help="serve unencrypted ws:// and http:// when there is no `tls` (only sensible on "
        "loopback or behind a TLS-terminating proxy)",
    )
    #: Base of rendezvous addresses (``wss://relay.example.com``); default: the scheme and the
    #: Host header the client used, so the relay works behind load balancers and TLS proxies.
    public_base_url: str | None = setting(
        None,
        help="base of the rendezvous addresses handed to listeners (default: the scheme and "
        "Host header the client used)",
    )
    #: SIGTERM/SIGINT drain the relay (docs/OPERATIONS.md): new connections are refused at
    #: once, listeners told to reconnect (1012), and what is relayed gets this long to finish.
    shutdown_grace_period: float = setting(
        30.0,
        help="seconds relayed connections and HTTP requests get to finish after SIGINT/SIGTERM "
        "(a second signal stops at once)",
        low=0.0,
        high=86_400.0,
        flags=("--shutdown-grace-period",),
        metavar="SECONDS",
    )
    #: Worker processes sharing ``port`` (SO_REUSEPORT), each a cluster node (docs/CLUSTER.md).
    workers: int = setting(
        1,
        help="worker processes on this machine sharing the port (SO_REUSEPORT), each a node "
        "of the cluster; more than 1 needs store.cluster (docs/CLUSTER.md)",
        low=1,
        high=256,
        flags=("--workers",),
        metavar="N",
    )
    worker_port: int = setting(
        0,
        help="with workers > 1: worker i also listens on worker_port + i, the port its "
        "rendezvous addresses name (0 = any free port)",
        low=0,
        high=65535,
        flags=("--worker-port",),
        metavar="PORT",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        _check_host(self.host)
        if self.tls is None and not self.plaintext:
            raise ConfigurationError(
                "no 'tls' section: set tls.cert and tls.key, or 'plaintext: true' to "
                "serve unencrypted ws:// and http:// (only sensible on loopback or behind a "
                "TLS-terminating proxy)"
            )

    @property
    def secure(self) -> bool:
        return self.tls is not None


#: The management listener's port in the embedded default and the example files.
DEFAULT_MANAGEMENT_PORT = 9401


def _check_workers(config: RelayConfig) -> None:
    """What ``server.workers`` > 1 needs: a cluster to share listeners and the store, and
    fixed ingress ports (a port 0 would be a different port in every worker)."""
    workers = config.server.workers
    if not config.store.cluster:
        raise ConfigurationError(
            f"server.workers: {workers} workers share listeners and the store through Redis: "
            "give --cluster redis://HOST:6379/0 (store.cluster), or run 1 worker"
        )
    if config.server.worker_port and config.server.worker_port + workers - 1 > 65535:
        raise ConfigurationError(
            f"server.worker_port: {config.server.worker_port} + {workers} workers passes 65535"
        )
    for i, entry in enumerate(config.ingress):
        if entry.port == 0:
            raise ConfigurationError(
                f"ingress[{i}].listen: port 0 with server.workers {workers} would be a "
                "different port in each worker: give a fixed port"
            )


@dataclass(frozen=True)
class ManagementSettings:
    """The management listener: Azure's management API, runtime information, metrics, health
    and the dashboard (docs/MANAGEMENT.md). Served only when it has a port."""

    host: str = setting(
        "127.0.0.1",
        help="address of the management listener",
        flags=("--management-host",),
        metavar="HOST",
    )
    port: int | None = setting(
        None,
        help="port of the management listener (0 = any free port; default: not served)",
        low=0,
        high=65535,
        flags=("--management-port",),
        metavar="PORT",
    )
    tls: TlsConfig | None = setting(
        None, help="its certificate (default: the relay's `server.tls`)"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        _check_host(self.host)

    @property
    def enabled(self) -> bool:
        return self.port is not None


@dataclass(frozen=True)
class StoreSettings:
    """The management store: what the management API creates (SQLite, one file)."""

    path: str | None = setting(
        None,
        help="the SQLite file (relative to the configuration file; default: the data "
        "directory's `relay.db` for `serve`, memory only for a relay built in code)",
    )
    #: Join a cluster: the store and the listeners' registrations are in this Redis
    #: (docs/CLUSTER.md). None: one node, SQLite, no Redis.
    cluster: str | None = setting(
        None,
        help="join a cluster through this Redis (`redis://[:password@]host:port/db`, "
        "`rediss://` for TLS, `unix://`; Sentinel: "
        "`redis+sentinel://[:password@]host:port[,host:port]/service[/db]`; Redis Cluster: "
        "`redis+cluster://[:password@]host:port[,host:port]`; `rediss+...` for TLS): "
        "entities, rules and keys live there and senders reach listeners on every node "
        "(docs/CLUSTER.md)",
        flags=("--cluster",),
    )
    #: How a cluster node shares senders between its listeners and other nodes'.
    spread: str = setting(
        "auto",
        help="cluster: `weighted` draws each sender over the listeners of every node by their "
        "counts; `local-first` gives it to this node's listeners whenever one can take it "
        "(other nodes' only when none can): no Redis hop, for evenly balanced nodes such as "
        "--workers; `auto`: local-first with --workers > 1, else weighted (docs/CLUSTER.md)",
        choices=("auto", "weighted", "local-first"),
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds and timeouts (seconds)."""

    max_listeners_per_connection: int = setting(
        25, help="listeners per hybrid connection", low=1, high=10_000
    )
    rendezvous_timeout: float = setting(
        30.0, help="how long a sender waits for a listener's rendezvous", low=0.001
    )
    keep_alive_interval: float = setting(
        30.0,
        help="seconds between pings on idle WebSockets; paces TCP keep-alive on ingress ports",
        low=0.001,
    )
    max_message_size: int = setting(
        16 * 1024 * 1024, help="largest WebSocket message, in bytes", low=1024, high=2**31
    )
    #: How late a ``renewToken`` may arrive after the old token expired (PROTOCOL.md 4.6).
    token_grace_period: float = setting(
        300.0, help="how late a listener's renewToken may arrive after expiry", low=0.0
    )
    http_response_timeout: float = setting(
        60.0, help="how long a relayed HTTP request waits for its response", low=0.001
    )
    max_pending_rendezvous: int = setting(
        10_000, help="rendezvous waiting for their listener, in all", low=1, high=10**7
    )
    #: One hybrid connection's share of the table above, so that one tenant's senders (or a
    #: flood of them) cannot leave the other entities without slots.
    max_pending_per_connection: int = setting(
        1_000,
        help="rendezvous and HTTP requests waiting for the listeners of one hybrid connection",
        low=1,
        high=10**7,
    )
    #: A listener that stops reading its control channel queues the messages meant for it;
    #: past this many it is passed over (its senders get 503 when every listener is full).
    max_queued_per_listener: int = setting(
        64,
        help="messages waiting to be sent on one listener's control channel",
        low=1,
        high=10**6,
    )
    #: The connection gate (server/connection_gate.py), in front of the relay's ports.
    max_connections: int = setting(
        0,
        help="TCP connections the relay keeps open on its ports, in all (0: the open-file "
        "limit less 64, read at start)",
        low=0,
        high=10**8,
    )
    max_connections_per_source: int = setting(
        0,
        help="TCP connections from one IP address (0: a quarter of max_connections; raise it "
        "for many agents behind one NAT)",
        low=0,
        high=10**8,
    )
    header_timeout: float = setting(
        10.0,
        help="how long a new connection may take to send its first request's headers",
        low=0.001,
    )
    max_header_bytes: int = setting(
        64 * 1024,
        help="largest first request head (request line and headers), in bytes",
        low=1024,
        high=16 * 1024 * 1024,
    )
    #: How long a connection may wait without a request, before its first and between HTTP
    #: requests, before the relay closes it (WebSockets are not affected).
    idle_timeout: float = setting(
        75.0,
        help="how long a connection may stay without a request before the relay closes it "
        "(WebSockets are not affected)",
        low=0.001,
    )

    def __post_init__(self) -> None:
        check_fields(self)


#: Shortest key a file may give: 32 characters, as 24 random bytes in base64; Azure's (and
#: ``openssl rand -base64 32``'s) are 44.
MIN_KEY_LENGTH = 32
#: Words of the examples' placeholders (``REPLACE-ME-...``): a key with one of them was
#: copied, not made, and a relay started with it would accept anyone who read the example.
_PLACEHOLDER_WORDS = ("replace", "change-me", "changeme", "placeholder", "your-key")
KEY_RULE = (
    f"at least {MIN_KEY_LENGTH} characters, not a placeholder; make one with "
    "`openssl rand -base64 32`"
)


def _check_key(key: str, name: str) -> None:
    """Refuse a short or placeholder key; the message never quotes the key."""
    make_one = "make one with `openssl rand -base64 32`"
    lowered = key.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS):
        raise ConfigurationError(f"{name}: a placeholder, not a key: {make_one}")
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigurationError(
            f"{name}: {len(key)} characters, a key needs at least {MIN_KEY_LENGTH}: {make_one}"
        )


@dataclass(frozen=True)
class RuleEntry:
    """A shared access rule as the file writes it (keys never appear in ``repr``)."""

    name: str = setting(help="the rule's name (SharedAccessKeyName)")
    primary_key: str = setting(help=KEY_RULE, secret=True)
    secondary_key: str | None = setting(None, help=KEY_RULE, secret=True)
    rights: tuple[str, ...] = setting(
        (), help="a non-empty list of Listen, Send, Manage", kind="list of strings"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.rights:
            raise ConfigurationError("rights: a non-empty list of Listen/Send/Manage")
        try:
            Rights.parse(self.rights)
        except ValueError as exc:
            raise ConfigurationError(f"rights: {exc}") from None
        _check_key(self.primary_key, "primary_key")
        if self.secondary_key is not None:
            _check_key(self.secondary_key, "secondary_key")

    def rule(self) -> AuthorizationRule:
        return AuthorizationRule(
            self.name, self.primary_key, self.secondary_key, Rights.parse(self.rights)
        )


def _rules(entries: tuple[RuleEntry, ...], where: str) -> tuple[AuthorizationRule, ...]:
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.name in names:
            raise ConfigurationError(f"{where}[{i}].name: duplicate rule name {entry.name!r}")
        names.add(entry.name)
    return tuple(entry.rule() for entry in entries)


def _check_rules(rules: tuple[AuthorizationRule, ...]) -> None:
    if len(rules) > MAX_RULES_PER_SCOPE:
        raise ConfigurationError(
            f"at most {MAX_RULES_PER_SCOPE} authorization rules per scope (as in Azure)"
        )


@dataclass(frozen=True)
class HybridConnectionConfig:
    """A hybrid connection the file defines."""

    name: str = setting(help="the entity path (may contain `/`; case-insensitive)")
    requires_client_authorization: bool = setting(
        True, help="senders need a token with the Send right"
    )
    authorization_rules: tuple[AuthorizationRule, ...] = setting(
        (), help="rules of this hybrid connection", entry=RuleEntry, parse=_rules
    )
    user_metadata: str = setting("", help="free text reported to management clients")
    #: Per-connection override of the HTTP response deadline (seconds); None = the default.
    http_response_timeout: float | None = setting(
        None, help="overrides `limits.http_response_timeout` for this one", low=0.001
    )

    def __post_init__(self) -> None:
        check_fields(self)
        _check_rules(self.authorization_rules)


def _hybrid_connections(
    entries: tuple[HybridConnectionConfig, ...], where: str
) -> tuple[HybridConnectionConfig, ...]:
    seen: set[str] = set()
    result = []
    for i, entry in enumerate(entries):
        name = entry.name.strip("/")
        if not name or name.lower() in seen:
            raise ConfigurationError(f"{where}[{i}].name: empty or duplicate name {name!r}")
        if name.startswith("$") or any(not part for part in name.split("/")):
            raise ConfigurationError(f"{where}[{i}].name: invalid entity path {name!r}")
        seen.add(name.lower())
        result.append(replace(entry, name=name))
    return tuple(result)


def _networks(value: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise ConfigurationError(f"{where}: expected a list of CIDRs")
    networks = []
    for entry in value:
        try:
            networks.append(parse_network(str(entry)))
        except ValueError:
            raise ConfigurationError(f"{where}: {entry!r} is not an address or CIDR") from None
    return tuple(networks)


def _listen_address(text: str, where: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigurationError(f"{where}: {text!r}: the port must be 0 to 65535") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigurationError(f"{where}: {text!r}: the host must be an IP address") from None
    return host, port


@dataclass(frozen=True)
class IngressConfig:
    """A TCP port the relay itself listens on, carried to a hybrid connection's listener.

    The relay plays the sender: each accepted connection is offered to a listener of
    ``hybrid_connection`` like a sender's connect, and spliced to its rendezvous WebSocket;
    with ``port_name`` the azbridge preamble selects a logical port at the edge agent.
    """

    YAML_EXTRAS: ClassVar[Mapping[str, Extra]] = {
        "listen": Extra('"[host:]port" (required; host an IP address, 127.0.0.1 by default)')
    }

    # host and port are written together in the file, as ``listen``.
    host: str = setting(help="address to listen on", key="")
    port: int = setting(help="port to listen on", key="", low=0, high=65535)
    hybrid_connection: str = setting(help="a configured hybrid connection")
    port_name: str | None = setting(
        None, help="the azbridge logical port selected at the edge (1 to 255 bytes of UTF-8)"
    )
    #: Client networks allowed to connect; empty allows every client.
    allow: tuple[Network, ...] = setting(
        (),
        help="client CIDRs allowed to connect (default: every client)",
        parse=_networks,
        kind="list of CIDRs",
    )
    max_connections: int = setting(
        10_000, help="concurrent connections on this port", low=1, high=10**6
    )

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "hybrid_connection", self.hybrid_connection.strip("/"))
        if not self.hybrid_connection:
            raise ConfigurationError("hybrid_connection: must not be empty")
        if self.port_name is not None and not 0 < len(self.port_name.encode("utf-8")) <= 255:
            raise ConfigurationError("port_name: 1 to 255 bytes of UTF-8")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigurationError(f"host: {self.host!r} is not an IP address") from None

    @classmethod
    def from_yaml(
        cls, values: dict[str, Any], extras: Mapping[str, Any], where: str
    ) -> dict[str, Any]:
        """``listen: "[host:]port"`` (host 127.0.0.1 by default, like the bridge's ``-L``)."""
        listen = extras.get("listen")
        if isinstance(listen, int) and not isinstance(listen, bool):
            listen = str(listen)
        key = f"{where}.listen" if where else "listen"
        if not isinstance(listen, str) or not listen.strip():
            raise ConfigurationError(f'{key}: required, as "[host:]port"')
        values["host"], values["port"] = _listen_address(listen.strip(), key)
        return values

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        name = f"/{self.port_name}" if self.port_name else ""
        return f"{host}:{self.port}{name} -> {self.hybrid_connection}"

    def allows(self, address: str) -> bool:
        return allows(self.allow, address)


@dataclass(frozen=True)
class RelayConfig:
    """The relay's whole configuration (``hybridrelay serve --config FILE``)."""

    server: ServerSettings = setting(
        default_factory=ServerSettings, help="where and how the relay listens"
    )
    limits: LimitsConfig = setting(default_factory=LimitsConfig, help="bounds and timeouts")
    management: ManagementSettings = setting(
        default_factory=ManagementSettings, help="the management listener"
    )
    store: StoreSettings = setting(default_factory=StoreSettings, help="the management store")
    namespace_name: str = setting(
        "hybridrelay",
        key="name",
        section="namespace",
        help="the namespace's name in the management API",
    )
    #: Namespace host name checked against token audiences; None: the hosts the relay serves.
    namespace_host: str | None = setting(
        None,
        key="host",
        section="namespace",
        help="the namespace's host name, the one a token's audience must name (default: the "
        "host a request reached the relay by, or public_base_url's)",
    )
    #: Off only where a proxy in front rewrites the Host header and public_base_url cannot
    #: name the host clients use (docs/DEPLOYMENT.md, load balancers).
    check_audience_host: bool = setting(
        True,
        section="namespace",
        help="refuse tokens whose audience names another host than the relay's (when "
        "namespace.host is not set)",
    )
    authorization_rules: tuple[AuthorizationRule, ...] = setting(
        (),
        section="namespace",
        help="namespace-wide rules",
        entry=RuleEntry,
        parse=_rules,
    )
    hybrid_connections: tuple[HybridConnectionConfig, ...] = setting(
        (),
        section="namespace",
        help="the hybrid connections",
        entry=HybridConnectionConfig,
        parse=_hybrid_connections,
    )
    #: Create a hybrid connection when a listener first opens one (the embedded default).
    auto_create_hybrid_connections: bool = setting(
        False, section="namespace", help="create a hybrid connection when a listener opens it"
    )
    #: Ports the relay listens on itself (``ingress:``), each carried to a hybrid connection.
    ingress: tuple[IngressConfig, ...] = setting(
        (), help="TCP ports the relay listens on itself, each carried to a hybrid connection"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        _check_rules(self.authorization_rules)
        management = self.management
        if (
            management.enabled
            and not is_loopback(management.host)
            and management.tls is None
            and self.server.tls is None
        ):
            raise ConfigurationError(
                f"management.host: {management.host!r} is not loopback, so the management "
                "listener needs TLS: set management.tls (or server.tls), or keep it on 127.0.0.1"
            )
        if self.server.workers > 1:
            _check_workers(self)
        configured = {c.name.lower() for c in self.hybrid_connections}
        bound: set[tuple[str, int]] = set()
        for i, entry in enumerate(self.ingress):
            where = f"ingress[{i}]"
            if entry.port != 0 and (entry.host, entry.port) in bound:
                raise ConfigurationError(
                    f"{where}.listen: {entry.host}:{entry.port} is already used above"
                )
            bound.add((entry.host, entry.port))
            name = entry.hybrid_connection
            if name.lower() not in configured and not self.auto_create_hybrid_connections:
                raise ConfigurationError(
                    f"{where}.hybrid_connection: {name!r} is not a configured hybrid connection"
                )

    @classmethod
    def load(cls, path: str | Path) -> RelayConfig:
        """Read a YAML file; relative certificate paths are relative to it.

        Raises:
            ConfigurationError: unreadable, not YAML, or breaks the schema (the key's path
                is named).
        """
        document = read_document(path)  # its errors name the file
        try:
            config = cls.from_dict(document)
        except ConfigurationError as exc:
            raise ConfigurationError(f"config file {path}: {exc}") from None
        # Relative paths (certificates, the store) are relative to the config file.
        base = Path(path).resolve().parent

        def resolved(tls: TlsConfig | None) -> TlsConfig | None:
            return tls and TlsConfig(str(base / tls.cert), str(base / tls.key))

        return replace(
            config,
            server=replace(config.server, tls=resolved(config.server.tls)),
            management=replace(config.management, tls=resolved(config.management.tls)),
            store=replace(config.store, path=config.store.path and str(base / config.store.path)),
        )

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> RelayConfig:
        """Validate a parsed YAML document.

        Raises:
            ConfigurationError: the first mistake, naming the key's path.
        """
        return from_document(cls, document)
