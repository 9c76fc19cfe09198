"""Parsers for the bridge's ``-L``, ``-R`` and ``-H`` forward specifications.

Pure functions and frozen dataclasses: no I/O, no DNS. Every malformed spec raises
:class:`~hybridrelay.exceptions.ConfigurationError` with a message that names the spec and the
part that is wrong; nothing else escapes, whatever the text (a Hypothesis test holds us to it).
``str(spec)`` gives the canonical form, which parses back to an equal spec.

Grammar
-------

=========================  ===============================================================
``-L`` (local forward, the ingress: a local socket carried to a hybrid connection)
-------------------------------------------------------------------------------------------
``LOCAL``                  ``ENDPOINT ":" HC``
``ENDPOINT``               ``[BIND ":"] PORT ["/" PORTNAME] ["/" PROTO]``
                           | ``"unix:" PATH ["#" PORTNAME]``
``BIND``                   IPv4 address | ``"[" IPv6 "]"`` | host name | ``"*"`` (all
                           interfaces). Without ``BIND`` the forward binds the configured
                           default, which is loopback.
``PORT``                   0-65535 (0 picks a free port; the agent logs the one it got)
``PROTO``                  ``tcp`` (default) | ``udp``
``PATH``                   an absolute path; may not contain ``#``
``HC``                     the hybrid connection: the text after the *last* ``:``
-------------------------------------------------------------------------------------------
``-R`` (remote forward, the edge: a hybrid connection carried to a destination)
-------------------------------------------------------------------------------------------
``REMOTE``                 ``HC ":" [PORTNAME "/"] TARGET``
``TARGET``                 ``[HOST ":"] PORT ["/" PROTO]`` | ``"unix:" PATH``
``HOST``                   IPv4 address | ``"[" IPv6 "]"`` | host name (default
                           ``localhost``)
``PORT``                   1-65535
``HC``                     the hybrid connection: the text before the *first* ``:``
-------------------------------------------------------------------------------------------
``PORTNAME``               1-255 bytes of UTF-8 (the azbridge preamble's length is one
                           byte); no ``/ : # [ ]``, whitespace or control characters
``HC`` (name)              letters, digits, ``. - _ /``; 1-260 characters; no leading or
                           trailing ``/``
=========================  ===============================================================

Examples::

    -L 8080:web                    127.0.0.1:8080 (the default bind) -> hybrid connection "web"
    -L [::1]:2222/ssh:hosts        [::1]:2222 -> "hosts", logical port "ssh"
    -L *:5353/dns/udp:hosts        UDP on every interface -> "hosts", logical port "dns"
    -L unix:/run/app.sock#app:hc   a Unix socket -> "hc", logical port "app"
    -R web:localhost:80            "web" -> localhost:80
    -R hosts:ssh/10.0.0.5:22       "hosts", logical port "ssh" -> 10.0.0.5:22
    -R hosts:dns/[fd00::53]:53/udp UDP
    -R hc:app/unix:/run/app.sock   a Unix socket

A port name selects among the routes configured on the edge; it never names a destination.

``-H`` (HTTP forward) is ``HC ":" ("http" | "https") "://" HOST [":" PORT] [BASE]``, e.g.
``-H api:http://127.0.0.1:8080/v1``; no credentials, query or fragment in the URL.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from hybridrelay.exceptions import ConfigurationError

__all__ = [
    "ANY_ADDRESS",
    "DEFAULT_REMOTE_HOST",
    "LocalForwardSpec",
    "Protocol",
    "RemoteForwardSpec",
    "format_host",
    "is_loopback_host",
    "parse_http_spec",
    "parse_local_spec",
    "parse_remote_spec",
    "validate_hybrid_connection_name",
    "validate_host",
    "validate_http_target",
    "validate_port_name",
]

#: The destination host of a ``-R`` spec that names only a port (as azbridge does).
DEFAULT_REMOTE_HOST = "localhost"

#: Bind address meaning "all interfaces" in a ``-L`` spec.
ANY_ADDRESS = "*"

_MAX_PORT_NAME_BYTES = 255
_MAX_HC_NAME = 260
_HC_NAME_RE = re.compile(r"[A-Za-z0-9._\-/]+")
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?")
_FORBIDDEN_IN_PORT_NAME = frozenset("/:#[]")
_REMOTE_UNIX_RE = re.compile(r"(?:([^/]*)/)?unix:(.*)", re.DOTALL)


class Protocol(enum.Enum):
    """The transport of a forward's socket side."""

    TCP = "tcp"
    UDP = "udp"
    UNIX = "unix"

    @property
    def is_stream(self) -> bool:
        """TCP and Unix stream sockets carry a byte stream; UDP carries framed datagrams."""
        return self is not Protocol.UDP


def validate_port_name(name: str, *, what: str = "port name") -> str:
    """Check a logical port name (azbridge preamble: one length byte, UTF-8)."""
    if not name:
        raise ConfigurationError(f"{what} is empty")
    if len(name.encode("utf-8", errors="surrogatepass")) > _MAX_PORT_NAME_BYTES:
        raise ConfigurationError(f"{what} {name!r} is longer than 255 bytes of UTF-8")
    for char in name:
        if char in _FORBIDDEN_IN_PORT_NAME or char.isspace() or not char.isprintable():
            raise ConfigurationError(f"{what} {name!r} contains the forbidden character {char!r}")
        if 0xD800 <= ord(char) <= 0xDFFF:
            raise ConfigurationError(f"{what} {name!r} is not valid Unicode")
    return name


def validate_hybrid_connection_name(name: str) -> str:
    """Check a hybrid connection (entity) name."""
    if not name:
        raise ConfigurationError("hybrid connection name is empty")
    if len(name) > _MAX_HC_NAME:
        raise ConfigurationError(f"hybrid connection name {name[:40]!r}... is too long")
    if not _HC_NAME_RE.fullmatch(name) or name.startswith("/") or name.endswith("/"):
        raise ConfigurationError(
            f"hybrid connection name {name!r} may contain only letters, digits, '.', '-', '_' "
            "and inner '/'"
        )
    return name


def validate_host(host: str, *, what: str = "host") -> str:
    """Check an IP address (IPv6 without brackets) or a DNS host name."""
    if not host:
        raise ConfigurationError(f"{what} is empty")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigurationError(f"{what} {host!r} is neither an IP address nor a host name")
    return host


def _validate_port(text: str, spec: str, *, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigurationError(f"{spec!r}: port {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535 or len(text) > 5:
        raise ConfigurationError(f"{spec!r}: port {text} is outside {low}-65535")
    return port


def _validate_unix_path(path: str, spec: str) -> str:
    if not path.startswith("/"):
        raise ConfigurationError(f"{spec!r}: Unix socket path {path!r} must be absolute")
    if "\x00" in path or "#" in path:
        raise ConfigurationError(f"{spec!r}: Unix socket path {path!r} contains '#' or NUL")
    if len(path.encode("utf-8", errors="surrogatepass")) > 107:
        raise ConfigurationError(f"{spec!r}: Unix socket path is longer than 107 bytes")
    return path


def format_host(host: str) -> str:
    """Bracket IPv6 addresses for ``host:port`` text."""
    return f"[{host}]" if ":" in host else host


def is_loopback_host(host: str) -> bool:
    """True for loopback addresses and ``localhost``; ``*`` and other names are not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host_port(text: str, spec: str, *, what: str) -> tuple[str | None, str]:
    """``host:port``, ``[v6]:port`` or ``port`` -> (host or None, port text)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigurationError(f"{spec!r}: '[' without ']' in the {what}")
        host = text[1:close]
        rest = text[close + 1 :]
        if not rest.startswith(":"):
            raise ConfigurationError(f"{spec!r}: expected ':port' after [{host}]")
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError(host)
        except ValueError:
            raise ConfigurationError(
                f"{spec!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        return None, text
    if ":" in host:
        raise ConfigurationError(f"{spec!r}: IPv6 addresses must be written in brackets, [{host}]")
    if not host:
        raise ConfigurationError(f"{spec!r}: empty {what} before ':' (use '*' for all interfaces)")
    return host, port


def _split_proto(segments: list[str]) -> tuple[list[str], Protocol | None]:
    if len(segments) > 1 and segments[-1].lower() in ("tcp", "udp"):
        return segments[:-1], Protocol(segments[-1].lower())
    return segments, None


@dataclass(frozen=True)
class LocalForwardSpec:
    """One ``-L``: a local listening socket carried to a hybrid connection.

    Attributes:
        hybrid_connection: the hybrid connection the ingress sends to.
        protocol: TCP, UDP or UNIX.
        port: the local port (TCP/UDP; 0 picks a free one); 0 for Unix sockets.
        bind_address: the address to bind, ``"*"`` for all interfaces, or None for the
            configured default (loopback).
        path: the Unix socket path (UNIX only).
        port_name: the azbridge logical port name; None sends no preamble.
    """

    hybrid_connection: str
    protocol: Protocol = Protocol.TCP
    port: int = 0
    bind_address: str | None = None
    path: str | None = None
    port_name: str | None = None

    def __post_init__(self) -> None:
        spec = f"-L for {self.hybrid_connection!r}"
        validate_hybrid_connection_name(self.hybrid_connection)
        if self.protocol is Protocol.UNIX:
            if self.path is None or self.bind_address is not None or self.port != 0:
                raise ConfigurationError(
                    f"{spec}: a Unix socket forward has a path and no bind address or port"
                )
            _validate_unix_path(self.path, spec)
        else:
            if self.path is not None:
                raise ConfigurationError(f"{spec}: only Unix socket forwards have a path")
            if not 0 <= self.port <= 65535:
                raise ConfigurationError(f"{spec}: port {self.port} is outside 0-65535")
            if self.bind_address is not None and self.bind_address != ANY_ADDRESS:
                validate_host(self.bind_address, what="bind address")
        if self.port_name is not None:
            validate_port_name(self.port_name)

    @property
    def binds_non_loopback(self) -> bool:
        """True when the spec explicitly binds something other than loopback."""
        return self.bind_address is not None and not is_loopback_host(self.bind_address)

    def endpoint_text(self) -> str:
        """The local side as text, for logs: ``127.0.0.1:8080/udp``, ``unix:/x.sock``."""
        if self.protocol is Protocol.UNIX:
            return f"unix:{self.path}"
        bind = "" if self.bind_address is None else f"{format_host(self.bind_address)}:"
        suffix = "/udp" if self.protocol is Protocol.UDP else ""
        return f"{bind}{self.port}{suffix}"

    def __str__(self) -> str:
        if self.protocol is Protocol.UNIX:
            name = "" if self.port_name is None else f"#{self.port_name}"
            return f"unix:{self.path}{name}:{self.hybrid_connection}"
        bind = "" if self.bind_address is None else f"{format_host(self.bind_address)}:"
        name = "" if self.port_name is None else f"/{self.port_name}"
        if self.protocol is Protocol.UDP:
            proto = "/udp"
        elif self.port_name is not None and self.port_name.lower() in ("tcp", "udp"):
            proto = "/tcp"  # keep a port name called "udp" from reading as the protocol
        else:
            proto = ""
        return f"{bind}{self.port}{name}{proto}:{self.hybrid_connection}"


@dataclass(frozen=True)
class RemoteForwardSpec:
    """One ``-R``: a hybrid connection whose connections go to a configured destination.

    Attributes:
        hybrid_connection: the hybrid connection the edge listens on.
        protocol: TCP, UDP or UNIX.
        host: the destination host (TCP/UDP).
        port: the destination port (TCP/UDP); 0 for Unix sockets.
        path: the destination Unix socket path (UNIX only).
        port_name: the logical port name that selects this route; None for a plain route.
    """

    hybrid_connection: str
    protocol: Protocol = Protocol.TCP
    host: str | None = DEFAULT_REMOTE_HOST
    port: int = 0
    path: str | None = None
    port_name: str | None = None

    def __post_init__(self) -> None:
        spec = f"-R for {self.hybrid_connection!r}"
        validate_hybrid_connection_name(self.hybrid_connection)
        if self.protocol is Protocol.UNIX:
            if self.path is None or self.host is not None or self.port != 0:
                raise ConfigurationError(f"{spec}: a Unix socket target has a path and no host")
            _validate_unix_path(self.path, spec)
        else:
            if self.path is not None:
                raise ConfigurationError(f"{spec}: only Unix socket targets have a path")
            if self.host is None:
                raise ConfigurationError(f"{spec}: a TCP/UDP target needs a host")
            validate_host(self.host, what="destination host")
            if not 1 <= self.port <= 65535:
                raise ConfigurationError(f"{spec}: destination port {self.port} is outside 1-65535")
        if self.port_name is not None:
            validate_port_name(self.port_name)

    def target_text(self) -> str:
        """The destination as text, for logs: ``localhost:80``, ``unix:/x.sock``."""
        if self.protocol is Protocol.UNIX:
            return f"unix:{self.path}"
        suffix = "/udp" if self.protocol is Protocol.UDP else ""
        return f"{format_host(self.host or '')}:{self.port}{suffix}"

    def __str__(self) -> str:
        name = "" if self.port_name is None else f"{self.port_name}/"
        return f"{self.hybrid_connection}:{name}{self.target_text()}"


def _spec_text(text: object, flag: str) -> str:
    if not isinstance(text, str):
        raise ConfigurationError(f"{flag} spec must be text, not {type(text).__name__}")
    return text.strip()


def parse_local_spec(text: str) -> LocalForwardSpec:
    """Parse a ``-L`` spec (see the grammar in the module docstring).

    Raises:
        ConfigurationError: the spec is malformed; the message quotes it.
    """
    spec = text
    endpoint, sep, hc = _spec_text(text, "-L").rpartition(":")
    if not sep or not endpoint:
        raise ConfigurationError(
            f"-L {spec!r}: expected [bind_address:]port[/portname]:hybrid_connection "
            "or unix:/path[#portname]:hybrid_connection"
        )
    if not hc:
        raise ConfigurationError(f"-L {spec!r}: the hybrid connection after the last ':' is empty")
    validate_hybrid_connection_name(hc)
    if endpoint.startswith("unix:"):
        path, hash_sep, name = endpoint[len("unix:") :].partition("#")
        if not path:
            raise ConfigurationError(f"-L {spec!r}: the Unix socket path is empty")
        return LocalForwardSpec(
            hybrid_connection=hc,
            protocol=Protocol.UNIX,
            path=_validate_unix_path(path, f"-L {spec}"),
            port_name=validate_port_name(name) if hash_sep else None,
        )
    host, rest = _split_host_port(endpoint, spec, what="bind address")
    segments, proto = _split_proto(rest.split("/"))
    if len(segments) > 2:
        raise ConfigurationError(
            f"-L {spec!r}: too many '/' parts in {rest!r} (expected port[/portname][/udp])"
        )
    port = _validate_port(segments[0], f"-L {spec}", allow_zero=True)
    port_name = segments[1] if len(segments) == 2 else None
    if host is not None and host != ANY_ADDRESS:
        validate_host(host, what="bind address")
    return LocalForwardSpec(
        hybrid_connection=hc,
        protocol=proto or Protocol.TCP,
        port=port,
        bind_address=host,
        port_name=None if port_name is None else validate_port_name(port_name),
    )


def parse_remote_spec(text: str) -> RemoteForwardSpec:
    """Parse a ``-R`` spec (see the grammar in the module docstring).

    Raises:
        ConfigurationError: the spec is malformed; the message quotes it.
    """
    spec = text
    hc, sep, target = _spec_text(text, "-R").partition(":")
    if not sep or not target:
        raise ConfigurationError(
            f"-R {spec!r}: expected hybrid_connection:[portname/]host:port "
            "or hybrid_connection:[portname/]unix:/path"
        )
    validate_hybrid_connection_name(hc)
    name: str | None = None
    unix = _REMOTE_UNIX_RE.fullmatch(target)
    if unix is not None:
        if unix.group(1) is not None:
            name = validate_port_name(unix.group(1))
        return RemoteForwardSpec(
            hybrid_connection=hc,
            protocol=Protocol.UNIX,
            host=None,
            path=_validate_unix_path(unix.group(2), f"-R {spec}"),
            port_name=name,
        )
    if not target.startswith("[") and "/" in target.split(":", 1)[0]:
        name, _, target = target.partition("/")
        validate_port_name(name)
    host, rest = _split_host_port(target, spec, what="destination host")
    segments, proto = _split_proto(rest.split("/"))
    if len(segments) != 1:
        raise ConfigurationError(
            f"-R {spec!r}: unexpected '/' in {rest!r} (expected port or port/udp; "
            "the port name goes before the host: hc:portname/host:port)"
        )
    port = _validate_port(segments[0], f"-R {spec}", allow_zero=False)
    return RemoteForwardSpec(
        hybrid_connection=hc,
        protocol=proto or Protocol.TCP,
        host=validate_host(host, what="destination host") if host else DEFAULT_REMOTE_HOST,
        port=port,
        port_name=name,
    )


def parse_http_spec(spec: str) -> tuple[str, str]:
    """``(hybrid connection, upstream base URL)`` of a ``-H hc:http(s)://host[:port][/base]``
    (the hybrid connection may contain ``/``; the URL loses a trailing ``/``).

    Raises:
        ConfigurationError: no hybrid connection, or the target is not an http(s) URL with a
            host (see :func:`validate_http_target`).
    """
    for scheme in ("http://", "https://"):
        entity, sep, rest = spec.partition(":" + scheme)
        if sep:
            break
    else:
        raise ConfigurationError(
            f"-H expects hybrid_connection:http://host:port[/base], not {spec!r}"
        )
    entity = entity.strip("/")
    target = scheme + rest
    validate_http_target(target)
    if not entity:
        raise ConfigurationError(f"-H {spec!r}: the hybrid connection name is missing")
    return entity, target.rstrip("/")


def validate_http_target(target: str) -> None:
    """Check an upstream base URL: ``http(s)://host[:port][/base]``.

    Raises:
        ConfigurationError: another scheme, no host, a bad port, credentials, a query or a
            fragment.
    """
    try:
        parts = urlsplit(target)
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid upstream URL {target!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"the upstream must be http(s)://host[:port][/base]: {target!r}")
    if "@" in parts.netloc:
        # Credentials in the URL would end up in logs; the sender's Authorization is passed on.
        raise ConfigurationError("the upstream URL must not contain credentials (user@host)")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"the upstream URL must not have a query: {target!r}")
