"""hybridrelay: a self-hostable relay wire-compatible with Azure Relay Hybrid Connections.

This module is the public API: the asyncio SDK (the same names as :mod:`hybridrelay.client`)
and the exception tree (:mod:`hybridrelay.exceptions`). ``__all__`` lists exactly the names
``docs/SDK.md`` documents (``tests/test_exports.py`` checks it); the relay server, the bridge
and the transport layer are programs and their internals, not API.
"""

from __future__ import annotations

from hybridrelay.client import (
    AcceptContext,
    AcceptHandler,
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    ListenerStatus,
    RelayedHttpContext,
    RequestHandler,
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    SpliceSocket,
    StreamSink,
    TokenProvider,
)
from hybridrelay.exceptions import (
    AuthorizationError,
    CertificateError,
    ConfigurationError,
    ConnectionRejectedError,
    EndpointNotFoundError,
    ListenerRejectedError,
    ProtocolError,
    QuotaExceededError,
    RelayConnectionError,
    RelayError,
    RelayHttpError,
    RelayTimeoutError,
    StreamClosedError,
    TokenError,
)

__version__ = "0.1.0"

__all__ = [
    "AcceptContext",
    "AcceptHandler",
    "AuthorizationError",
    "CertificateError",
    "ConfigurationError",
    "ConnectionRejectedError",
    "EndpointNotFoundError",
    "HybridConnectionClient",
    "HybridConnectionListener",
    "HybridConnectionStream",
    "ListenerRejectedError",
    "ListenerStatus",
    "ProtocolError",
    "QuotaExceededError",
    "RelayConnectionError",
    "RelayError",
    "RelayHttpError",
    "RelayTimeoutError",
    "RelayedHttpContext",
    "RequestHandler",
    "SharedAccessKeyTokenProvider",
    "SharedAccessSignatureTokenProvider",
    "SpliceSocket",
    "StreamClosedError",
    "StreamSink",
    "TokenError",
    "TokenProvider",
    "__version__",
]
