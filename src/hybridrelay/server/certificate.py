"""The certificate a TLS listener of the relay presents, replaceable while it serves (SIGHUP).

asyncio (and uvloop) keep the :class:`ssl.SSLContext` a server was started with, so the
context given to the server stays the same object; its ``sni_callback``, which OpenSSL runs
on every ClientHello (with or without a server name), hands the handshake the context of the
current certificate. A reload builds that context whole from the files first: a bad
certificate or key is refused before anything changes (``load_cert_chain`` on the live
context would leave it half replaced when the key does not match), and connections already
established keep theirs.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable

from hybridrelay.server.config import TlsConfig

__all__ = ["ServedCertificate", "certificate_expiry"]


def _fingerprint(tls: TlsConfig) -> bytes:
    """What the files hold now (a renewal writes new bytes to the same paths); unreadable
    files give an empty fingerprint (loading them names the problem)."""
    digest = hashlib.sha256()
    for path in (tls.cert, tls.key):
        try:
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
        except OSError:
            return b""
    return digest.digest()


def certificate_expiry(path: str) -> str | None:
    """The ``notAfter`` of the first certificate in a PEM file (``Mar  1 12:00:00 2027 GMT``),
    or None where it cannot be read: only for the log line, so CPython's own decoder (used by
    its test suite, not public) is tried and its absence tolerated."""
    decode = getattr(ssl, "_ssl", None)
    decoder = getattr(decode, "_test_decode_cert", None)
    if decoder is None:
        return None
    try:
        value = decoder(path).get("notAfter")
    except (OSError, ssl.SSLError, ValueError):
        return None
    return str(value) if value else None


class ServedCertificate:
    """The context a TLS listener was started with, and the certificate it presents now.

    ``make_context`` builds a server context from a :class:`TlsConfig`, raising
    :class:`~hybridrelay.exceptions.ConfigurationError` that names the file at fault.
    """

    def __init__(self, tls: TlsConfig, make_context: Callable[[TlsConfig], ssl.SSLContext]):
        self._make_context = make_context
        #: Given to the server once; every new handshake is switched to ``_current``.
        self.context = make_context(tls)
        self.context.sni_callback = self._select
        self._current = self.context
        self._tls = tls
        self._fingerprint = _fingerprint(tls)

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        current = self._current
        if connection.context is not current:
            connection.context = current

    def prepare(self, tls: TlsConfig) -> Callable[[], str] | None:
        """Load ``tls``'s files; None when they hold what is served already, else a function
        that makes new handshakes present them and describes the change (for the log line).

        Raises:
            ConfigurationError: a file cannot be read or the certificate and key do not load
                (nothing changed).
        """
        fingerprint = _fingerprint(tls)
        if tls == self._tls and fingerprint == self._fingerprint and fingerprint:
            return None
        context = self._make_context(tls)

        def commit() -> str:
            self._current, self._tls, self._fingerprint = context, tls, fingerprint
            expiry = certificate_expiry(tls.cert)
            return f"certificate {tls.cert}" + (f" (new expiry {expiry})" if expiry else "")

        return commit
