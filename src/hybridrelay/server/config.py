"""Relay configuration: the YAML schema, validated into frozen dataclasses.

Unknown keys are errors (with the path of the key in the message); secrets never appear in
``repr``. The schema is documented in the README ("Relay configuration").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridrelay.auth.sas import AuthorizationRule, Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.allowlist import Network, allows, parse_network

__all__ = [
    "HybridConnectionConfig",
    "IngressConfig",
    "LimitsConfig",
    "RelayConfig",
    "ServerSettings",
    "TlsConfig",
]


@dataclass(frozen=True)
class TlsConfig:
    cert: str
    key: str


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9400
    tls: TlsConfig | None = None
    #: Plain ws/http must be asked for explicitly when there is no TLS.
    plaintext: bool = False
    #: Base of rendezvous addresses (``wss://relay.example.com``); default: the scheme and the
    #: Host header the client used, so the relay works behind load balancers and TLS proxies.
    public_base_url: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls is not None


@dataclass(frozen=True)
class LimitsConfig:
    max_listeners_per_connection: int = 25
    rendezvous_timeout: float = 30.0
    keep_alive_interval: float = 30.0
    max_message_size: int = 16 * 1024 * 1024
    #: How late a ``renewToken`` may arrive after the old token expired (PROTOCOL.md 4.6).
    token_grace_period: float = 300.0
    http_response_timeout: float = 60.0
    max_pending_rendezvous: int = 10_000
    #: How long a connection may wait without a request, before its first and between HTTP
    #: requests, before the relay closes it (WebSockets are not affected).
    idle_timeout: float = 75.0


@dataclass(frozen=True)
class HybridConnectionConfig:
    name: str
    requires_client_authorization: bool = True
    authorization_rules: tuple[AuthorizationRule, ...] = ()
    user_metadata: str = ""
    #: Per-connection override of the HTTP response deadline (seconds); None = the default.
    http_response_timeout: float | None = None


@dataclass(frozen=True)
class IngressConfig:
    """A TCP port the relay itself listens on, carried to a hybrid connection's listener.

    The relay plays the sender: each accepted connection is offered to a listener of
    ``hybrid_connection`` like a sender's connect, and spliced to its rendezvous WebSocket;
    with ``port_name`` the azbridge preamble selects a logical port at the edge agent.
    """

    host: str
    port: int
    hybrid_connection: str
    port_name: str | None = None
    #: Client networks allowed to connect; empty allows every client.
    allow: tuple[Network, ...] = ()
    max_connections: int = 10_000

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        name = f"/{self.port_name}" if self.port_name else ""
        return f"{host}:{self.port}{name} -> {self.hybrid_connection}"

    def allows(self, address: str) -> bool:
        return allows(self.allow, address)


@dataclass(frozen=True)
class RelayConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: Namespace host name checked against token audiences; None accepts any host.
    namespace_host: str | None = None
    authorization_rules: tuple[AuthorizationRule, ...] = ()
    hybrid_connections: tuple[HybridConnectionConfig, ...] = ()
    #: Create a hybrid connection when a listener first opens one (the embedded default).
    auto_create_hybrid_connections: bool = False
    #: Ports the relay listens on itself (``ingress:``), each carried to a hybrid connection.
    ingress: tuple[IngressConfig, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> RelayConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: invalid YAML: {exc}") from exc
        config = cls.from_dict(document or {})
        base = Path(path).resolve().parent
        tls = config.server.tls
        if tls is not None:  # relative certificate paths are relative to the config file
            resolved = TlsConfig(str(base / tls.cert), str(base / tls.key))
            config = _replace_server(config, tls=resolved)
        return config

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> RelayConfig:
        reader = _Reader(document, "")
        server_doc = reader.section("server")
        namespace_doc = reader.section("namespace")
        limits_doc = reader.section("limits")
        ingress_docs = reader.items("ingress")
        reader.done()

        tls_doc = server_doc.section("tls")
        tls = None
        if tls_doc.present:
            tls = TlsConfig(
                cert=tls_doc.string("cert", required=True), key=tls_doc.string("key", required=True)
            )
        tls_doc.done()
        server = ServerSettings(
            host=server_doc.string("host", "127.0.0.1"),
            port=server_doc.integer("port", 9400, low=0, high=65535),
            tls=tls,
            plaintext=server_doc.boolean("plaintext", False),
            public_base_url=server_doc.string("public_base_url", None),
        )
        server_doc.done()
        if tls is None and not server.plaintext:
            raise ConfigurationError(
                "server: no 'tls' section: set tls.cert and tls.key, or 'plaintext: true' to "
                "serve unencrypted ws:// and http:// (only sensible on loopback or behind a "
                "TLS-terminating proxy)"
            )
        _check_host(server.host)

        defaults = LimitsConfig()
        limits = LimitsConfig(
            max_listeners_per_connection=limits_doc.integer(
                "max_listeners_per_connection",
                defaults.max_listeners_per_connection,
                low=1,
                high=10_000,
            ),
            rendezvous_timeout=limits_doc.number("rendezvous_timeout", defaults.rendezvous_timeout),
            keep_alive_interval=limits_doc.number(
                "keep_alive_interval", defaults.keep_alive_interval
            ),
            max_message_size=limits_doc.integer(
                "max_message_size", defaults.max_message_size, low=1024, high=2**31
            ),
            token_grace_period=limits_doc.number(
                "token_grace_period", defaults.token_grace_period, low=0
            ),
            http_response_timeout=limits_doc.number(
                "http_response_timeout", defaults.http_response_timeout
            ),
            max_pending_rendezvous=limits_doc.integer(
                "max_pending_rendezvous", defaults.max_pending_rendezvous, low=1, high=10**7
            ),
            idle_timeout=limits_doc.number("idle_timeout", defaults.idle_timeout),
        )
        limits_doc.done()

        namespace_host = namespace_doc.string("host", None)
        rules = _rules(namespace_doc.items("authorization_rules"))
        auto_create = namespace_doc.boolean("auto_create_hybrid_connections", False)
        connections: list[HybridConnectionConfig] = []
        seen: set[str] = set()
        for item in namespace_doc.items("hybrid_connections"):
            name = item.string("name", required=True).strip("/")
            if not name or name.lower() in seen:
                raise ConfigurationError(f"{item.path}.name: empty or duplicate name {name!r}")
            if name.startswith("$") or any(not part for part in name.split("/")):
                raise ConfigurationError(f"{item.path}.name: invalid entity path {name!r}")
            seen.add(name.lower())
            timeout = item.number("http_response_timeout", -1.0)
            connections.append(
                HybridConnectionConfig(
                    name=name,
                    requires_client_authorization=item.boolean(
                        "requires_client_authorization", True
                    ),
                    authorization_rules=_rules(item.items("authorization_rules")),
                    user_metadata=item.string("user_metadata", ""),
                    http_response_timeout=None if timeout < 0 else timeout,
                )
            )
            item.done()
        namespace_doc.done()
        ingress = _ingress(ingress_docs, {c.name.lower() for c in connections}, auto_create)
        return cls(
            server=server,
            limits=limits,
            namespace_host=namespace_host,
            authorization_rules=rules,
            hybrid_connections=tuple(connections),
            auto_create_hybrid_connections=auto_create,
            ingress=ingress,
        )


def _replace_server(config: RelayConfig, **changes: Any) -> RelayConfig:
    from dataclasses import replace

    return replace(config, server=replace(config.server, **changes))


def _check_host(host: str) -> None:
    if not host:
        raise ConfigurationError("server.host must not be empty")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part.replace("-", "").isalnum() for part in host.split(".") if part):
            raise ConfigurationError(
                f"server.host: {host!r} is not an address or host name"
            ) from None


def _ingress(
    items: list[_Reader], configured: set[str], auto_create: bool
) -> tuple[IngressConfig, ...]:
    """The ``ingress:`` list: ``listen: "[host:]port"`` (host 127.0.0.1 by default, like the
    bridge's ``-L``), ``hybrid_connection``, optional ``port_name``, ``allow`` (CIDRs) and
    ``max_connections``."""
    result: list[IngressConfig] = []
    bound: set[tuple[str, int]] = set()
    for item in items:
        listen = item.raw("listen", None)
        if isinstance(listen, int) and not isinstance(listen, bool):
            listen = str(listen)
        if not isinstance(listen, str) or not listen.strip():
            raise ConfigurationError(f'{item.path}.listen: required, as "[host:]port"')
        host, port = _listen_address(listen.strip(), f"{item.path}.listen")
        if port != 0 and (host, port) in bound:
            raise ConfigurationError(f"{item.path}.listen: {listen} is already used above")
        bound.add((host, port))
        name = item.string("hybrid_connection", required=True).strip("/")
        if not name or (name.lower() not in configured and not auto_create):
            raise ConfigurationError(
                f"{item.path}.hybrid_connection: {name!r} is not a configured hybrid connection"
            )
        port_name = item.string("port_name", None)
        if port_name is not None and not 0 < len(port_name.encode("utf-8")) <= 255:
            raise ConfigurationError(f"{item.path}.port_name: 1 to 255 bytes of UTF-8")
        raw_allow = item.raw("allow", [])
        if not isinstance(raw_allow, list):
            raise ConfigurationError(f"{item.path}.allow: expected a list of CIDRs")
        allow = []
        for entry in raw_allow:
            try:
                allow.append(parse_network(str(entry)))
            except ValueError:
                raise ConfigurationError(
                    f"{item.path}.allow: {entry!r} is not an address or CIDR"
                ) from None
        result.append(
            IngressConfig(
                host=host,
                port=port,
                hybrid_connection=name,
                port_name=port_name,
                allow=tuple(allow),
                max_connections=item.integer("max_connections", 10_000, low=1, high=10**6),
            )
        )
        item.done()
    return tuple(result)


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


def _rules(items: list[_Reader]) -> tuple[AuthorizationRule, ...]:
    rules: list[AuthorizationRule] = []
    names: set[str] = set()
    for item in items:
        name = item.string("name", required=True)
        if name in names:
            raise ConfigurationError(f"{item.path}.name: duplicate rule name {name!r}")
        names.add(name)
        primary = item.string("primary_key", required=True)
        secondary = item.string("secondary_key", None)
        raw_rights = item.raw("rights", [])
        if not isinstance(raw_rights, list) or not raw_rights:
            raise ConfigurationError(f"{item.path}.rights: a non-empty list of Listen/Send/Manage")
        try:
            rights = Rights.parse(str(r) for r in raw_rights)
        except ValueError as exc:
            raise ConfigurationError(f"{item.path}.rights: {exc}") from None
        if len(primary) < 16 or (secondary is not None and len(secondary) < 16):
            raise ConfigurationError(f"{item.path}: keys must be at least 16 characters long")
        rules.append(AuthorizationRule(name, primary, secondary, rights))
        item.done()
    if len(rules) > 12:
        raise ConfigurationError("at most 12 authorization rules per scope (as in Azure)")
    return tuple(rules)


class _Reader:
    """Reads one mapping of the document, remembering which keys were used."""

    def __init__(self, document: Any, path: str) -> None:
        if document is None:
            document = {}
            self.present = False
        else:
            self.present = True
        if not isinstance(document, Mapping):
            raise ConfigurationError(f"{path or 'config'}: expected a mapping")
        self.document = document
        self.path = path
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.document.get(key, default)

    def section(self, key: str) -> _Reader:
        return _Reader(self.raw(key, None), self._key(key))

    def items(self, key: str) -> list[_Reader]:
        value = self.raw(key, None)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigurationError(f"{self._key(key)}: expected a list")
        return [_Reader(item, f"{self._key(key)}[{i}]") for i, item in enumerate(value)]

    def string(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None and required:
            raise ConfigurationError(f"{self._key(key)}: required")
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{self._key(key)}: expected a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{self._key(key)}: expected true or false")
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigurationError(f"{self._key(key)}: expected an integer from {low} to {high}")
        return value

    def number(self, key: str, default: float, *, low: float = 0.001) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(f"{self._key(key)}: expected a number")
        if value < low and value != default:
            raise ConfigurationError(f"{self._key(key)}: must be at least {low}")
        return float(value)

    def done(self) -> None:
        unknown = sorted(set(self.document) - self.used)
        if unknown:
            raise ConfigurationError(
                f"unknown key(s) {', '.join(self._key(str(k)) for k in unknown)}"
            )
