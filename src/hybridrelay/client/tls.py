"""TLS client contexts for connections to the relay."""

from __future__ import annotations

import ssl

from hybridrelay.exceptions import ConfigurationError

__all__ = ["build_ssl_context"]


def build_ssl_context(
    *, ssl_context: ssl.SSLContext | None = None, ca_file: str | None = None
) -> ssl.SSLContext:
    """The context that verifies the relay's certificate.

    * ``ssl_context`` given: used as is.
    * ``ca_file`` given: only the CAs in that PEM file are trusted (a private relay CA).
    * neither: the system store, via :func:`ssl.create_default_context`, which honours the
      ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` environment variables.

    Hostname checking and certificate verification are always on in the contexts built here.

    Raises:
        ConfigurationError: both were given, or ``ca_file`` cannot be read or parsed.
    """
    if ssl_context is not None:
        if ca_file is not None:
            raise ConfigurationError("give either an ssl context or a ca_file, not both")
        return ssl_context
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load CA file {ca_file!r}: {exc}") from exc
