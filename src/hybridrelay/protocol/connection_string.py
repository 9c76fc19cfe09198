"""Azure-style relay connection strings (PROTOCOL.md 8.1).

``Endpoint=sb://host[:port]/;SharedAccessKeyName=..;SharedAccessKey=..;EntityPath=..`` or, instead
of the key pair, ``SharedAccessSignature=<token>``. Keys are matched case-insensitively; values
may contain ``=`` (base64 keys end with it). Secrets never appear in ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hybridrelay.exceptions import ConfigurationError

__all__ = ["CONNECTION_STRING_ENV", "ConnectionString"]

#: The environment variable every command reads a connection string from when none is given.
CONNECTION_STRING_ENV = "HYBRIDRELAY_CONNECTION_STRING"

_KNOWN = {
    "endpoint": "endpoint",
    "sharedaccesskeyname": "key_name",
    "sharedaccesskey": "key",
    "sharedaccesssignature": "token",
    "entitypath": "entity_path",
    "operationtimeout": "operation_timeout",
    "authentication": "authentication",
}


@dataclass(frozen=True)
class ConnectionString:
    """A parsed connection string."""

    endpoint: str
    key_name: str | None = None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    entity_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        values: dict[str, str] = {}
        for item in text.strip().split(";"):
            if not item.strip():
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise ConfigurationError(f"connection string item {name.strip()!r} has no '='")
            attr = _KNOWN.get(name.strip().lower())
            if attr is None:
                raise ConfigurationError(f"unknown connection string key {name.strip()!r}")
            values[attr] = value.strip()
        endpoint = values.get("endpoint")
        if not endpoint:
            raise ConfigurationError("connection string has no Endpoint")
        try:
            parts = urlsplit(endpoint)
            _ = parts.port  # a port that is not a number in range raises too
        except ValueError as exc:  # "Invalid IPv6 URL" (an unclosed '['), a bad port
            raise ConfigurationError(f"Endpoint must look like sb://host[:port]/ ({exc})") from None
        if parts.scheme.lower() not in ("sb", "ws", "wss", "http", "https") or not parts.hostname:
            raise ConfigurationError("Endpoint must look like sb://host[:port]/")
        token = values.get("token")
        key_name, key = values.get("key_name"), values.get("key")
        if token and (key_name or key):
            raise ConfigurationError(
                "SharedAccessSignature cannot be combined with SharedAccessKeyName/Key"
            )
        if not token and bool(key_name) != bool(key):
            raise ConfigurationError("SharedAccessKeyName and SharedAccessKey go together")
        return cls(
            endpoint=endpoint,
            key_name=key_name,
            key=key,
            token=token,
            entity_path=values.get("entity_path") or None,
        )

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint."""
        return urlsplit(self.endpoint).netloc

    def base_url(self, *, secure: bool | None = None) -> str:
        """The WebSocket base URL: ``sb://`` and ``wss://`` map to wss, ``ws://`` to ws.

        ``http``/``https`` endpoints are accepted as ws/wss too, so a plain-text relay on
        loopback can be named ``Endpoint=ws://127.0.0.1:9400/``.
        """
        scheme = urlsplit(self.endpoint).scheme.lower()
        if secure is None:
            secure = scheme not in ("ws", "http")
        return f"{'wss' if secure else 'ws'}://{self.host}"

    def __str__(self) -> str:
        items = [f"Endpoint={self.endpoint}"]
        if self.key_name:
            items += [f"SharedAccessKeyName={self.key_name}", f"SharedAccessKey={self.key}"]
        if self.token:
            items.append(f"SharedAccessSignature={self.token}")
        if self.entity_path:
            items.append(f"EntityPath={self.entity_path}")
        return ";".join(items)
