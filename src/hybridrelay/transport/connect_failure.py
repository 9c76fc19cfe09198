"""One line for a connection to the relay that could not be made: the address, the cause in
words and, where there is an obvious one, the fix.

Every client connection of the SDK (control channels, senders, rendezvous, the runtime
information request) reports its failures through :func:`connect_failure`, so the bridge,
``serve-app`` and SDK users all read the same words: ``cannot connect to 127.0.0.1:9400:
connection refused (is the relay running, and on this port?)``. The exception's type names
nothing the user can act on (``ConnectionRefusedError``, ``gaierror``,
``SSLCertVerificationError``): it stays the exception's ``__cause__``.
"""

from __future__ import annotations

import errno
import socket
import ssl

from hybridrelay.exceptions import CertificateError, RelayConnectionError, RelayTimeoutError

__all__ = ["CA_FIX", "connect_failure", "describe_cause"]

#: Where a private CA is given, on every command and in the SDK.
CA_FIX = (
    "give the relay's CA with --ca-file (SDK: ca_file=) or SSL_CERT_FILE, or use the name its "
    "certificate was issued for"
)

# OpenSSL's verify codes (X509_V_ERR_*) that name a cause better than "not trusted".
_HOSTNAME_MISMATCH = 62
_EXPIRED = 10
_NOT_YET_VALID = 9


def describe_cause(exc: BaseException, *, timeout: float | None = None) -> str:
    """The cause of a failed connect in words (``connection refused``, ``host name not found``,
    ``TLS: certificate not trusted (...): <fix>``, ``timed out after 10 s``, ...)."""
    if isinstance(exc, TimeoutError):
        return f"timed out (no answer within {timeout:g} s)" if timeout is not None else "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        detail = exc.verify_message or exc.reason or "verification failed"
        if code == _HOSTNAME_MISMATCH:
            return (
                f"TLS: the certificate is for another host name ({detail}): connect with a name "
                "the certificate lists"
            )
        if code in (_EXPIRED, _NOT_YET_VALID):
            return f"TLS: the certificate is not valid now ({detail}): renew the relay's one"
        return f"TLS: certificate not trusted ({detail}): {CA_FIX}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return (
                f"TLS handshake failed ({reason}): the port does not speak TLS; for a plain-text "
                "relay use Endpoint=ws://"
            )
        return f"TLS handshake failed ({reason})"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror or 'DNS lookup failed'}): check the Endpoint"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the relay running, and on this port?)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "the connection was reset (a TLS relay reached with ws://, or a proxy?)"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"{exc.strerror or 'unreachable'}: check the address and the network"
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def connect_failure(
    address: str, exc: BaseException, *, timeout: float | None = None, via: str | None = None
) -> RelayConnectionError:
    """The exception for a connect to ``address`` (``host:port``, never a URL: those may carry
    a secret) that failed with ``exc``; ``via`` names a proxy the connection went through.

    A certificate the client does not accept is a :class:`CertificateError` (retrying cannot
    fix it), a timeout a :class:`RelayTimeoutError`, the rest :class:`RelayConnectionError`.
    """
    where = f"{address} (through the proxy {via})" if via else address
    message = f"cannot connect to {where}: {describe_cause(exc, timeout=timeout)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateError(message)
    if isinstance(exc, TimeoutError):
        return RelayTimeoutError(message)
    return RelayConnectionError(message)
