"""The one exception tree of hybridrelay.

Every error raised through the public API is a :class:`RelayError`; no exception type of a
library we use (aiohttp, OSError, ssl, yaml) leaks out without one of ours wrapped around it
(``raise ... from exc`` keeps the cause)::

    RelayError
    ├── ConfigurationError          bad connection string, config file, CLI argument
    ├── TokenError                  a SAS token that cannot be parsed or created
    ├── ProtocolError               a message or URL that breaks the Hybrid Connections protocol
    ├── RelayConnectionError        the relay could not be reached or the connection broke
    │   ├── RelayTimeoutError       an operation did not finish in time
    │   └── CertificateError        the relay's TLS certificate is not accepted (untrusted CA,
    │                               another host name, expired): retrying cannot fix it
    ├── RelayHttpError              the relay or the listener answered with an HTTP error status
    │   ├── AuthorizationError      401 / 403
    │   ├── EndpointNotFoundError   404 (unknown hybrid connection)
    │   ├── QuotaExceededError      429: a limit of the relay was hit (too many listeners, ...)
    │   └── ConnectionRejectedError any other refusal of a connect: the listener's rejection or
    │       │                       the relay's own error, which Azure's wire cannot tell apart
    │       └── ListenerRejectedError  the listener refused, as our relay says (any status,
    │                               401/403 included: not a question of the sender's token)
    └── StreamClosedError           *you* closed the stream (or the listener) and then used it
"""

from __future__ import annotations

__all__ = [
    "AuthorizationError",
    "CertificateError",
    "ConfigurationError",
    "ConnectionRejectedError",
    "EndpointNotFoundError",
    "ListenerRejectedError",
    "ProtocolError",
    "QuotaExceededError",
    "RelayConnectionError",
    "RelayError",
    "RelayHttpError",
    "RelayTimeoutError",
    "StreamClosedError",
    "TokenError",
]


class RelayError(Exception):
    """Root of every exception raised by hybridrelay."""


class ConfigurationError(RelayError):
    """A connection string, configuration file or argument is invalid."""


class TokenError(RelayError):
    """A Shared Access Signature token is malformed or cannot be created."""


class ProtocolError(RelayError):
    """A peer broke the Hybrid Connections protocol (bad JSON message, bad URL, ...)."""


class RelayConnectionError(RelayError):
    """The relay could not be reached, or an established connection broke."""


class RelayTimeoutError(RelayConnectionError):
    """An operation against the relay did not complete in time."""


class CertificateError(RelayConnectionError):
    """The relay's TLS certificate was not accepted: its CA is not trusted, it names another
    host, or it has expired. The message says which, and how to give a private CA."""


class RelayHttpError(RelayError):
    """The relay (or the listener, through it) answered with an HTTP error status.

    Attributes:
        status: the HTTP status code.
        description: the reason phrase, which for relay errors carries a ``TrackingId``.
        hint: what to do about it (see :func:`refusal_hint`), or None; it ends the message.
    """

    def __init__(self, status: int, description: str, hint: str | None = None) -> None:
        super().__init__(f"{status} {description}" + (f"; {hint}" if hint else ""))
        self.status = status
        self.description = description
        self.hint = hint


class AuthorizationError(RelayHttpError):
    """401 (missing or invalid token) or 403 (token lacks the right for this entity)."""


class EndpointNotFoundError(RelayHttpError):
    """404: the hybrid connection does not exist on the relay."""


class QuotaExceededError(RelayHttpError):
    """429: a limit of the relay was reached (for example the 25 listeners of an entity)."""


class ConnectionRejectedError(RelayHttpError):
    """A sender's connect was refused with a status other than 401, 403, 404 and 429.

    Usually the listener's rejection (its status and description as it sent them); the relay's
    own errors (502 no listener, 504 no answer) look the same on the wire and are raised as this
    class too.
    """


class ListenerRejectedError(ConnectionRejectedError):
    """The listener refused the sender's connect: our relay marks its answer so (PROTOCOL.md
    5.4, ``X-Hybridrelay-Rejected-By: listener``), whatever the status; a 403 from an
    application that refused a WebSocket is not the relay refusing the sender's token."""


class StreamClosedError(RelayError):
    """The stream or listener was closed by this side and then used again."""


def http_error(
    status: int, description: str, hint: str | None = None, *, by_listener: bool = False
) -> RelayHttpError:
    """Map an HTTP error status from the relay to the most specific exception class;
    ``by_listener``: the relay said the listener refused (:class:`ListenerRejectedError`)."""
    if by_listener:
        return ListenerRejectedError(status, description, LISTENER_REFUSAL_HINT)
    if status in (401, 403):
        return AuthorizationError(status, description, hint)
    if status == 404:
        return EndpointNotFoundError(status, description, hint)
    if status == 429:
        return QuotaExceededError(status, description, hint)
    return RelayHttpError(status, description, hint)


#: The hint of a :class:`ListenerRejectedError`.
LISTENER_REFUSAL_HINT = (
    "the listener refused the connection (the relay accepted the token): its status and reason "
    "say why"
)


def refusal_hint(status: int, entity: str, right: str) -> str | None:
    """What to do when the relay refuses a client of hybrid connection ``entity`` that needs
    ``right`` (``Listen`` or ``Send``) with ``status``; None when there is nothing obvious.

    The same words on every command (bridge, serve-app) and in the SDK's exceptions.
    """
    if status == 401:
        return (
            "the relay does not accept the credentials: check SharedAccessKeyName and "
            "SharedAccessKey (or the SharedAccessSignature) of the connection string; was the "
            "key regenerated?"
        )
    if status == 403:
        return (
            f"the rule is not allowed to {right.lower()} on hybrid connection {entity!r}: use a "
            f"rule with the {right} right on it (or on the namespace)"
        )
    if status == 404:
        return (
            f"no hybrid connection {entity!r} on this relay: check the name (EntityPath, -L/-R/"
            f"-H, -e) or create it (hybridrelay admin hc create {entity})"
        )
    return None


def with_hint(exc: RelayHttpError, entity: str, right: str) -> RelayHttpError:
    """``exc`` again, of the same class, with :func:`refusal_hint`'s words when it has none."""
    hint = refusal_hint(exc.status, entity, right)
    if exc.hint is not None or hint is None:
        return exc
    return type(exc)(exc.status, exc.description, hint)
