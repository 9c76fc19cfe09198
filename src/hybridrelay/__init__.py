"""hybridrelay: a self-hostable relay wire-compatible with Azure Relay Hybrid Connections.

The public SDK is re-exported here; see the README for usage.
"""

from __future__ import annotations

from hybridrelay.client import (
    AcceptContext,
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    RelayedHttpContext,
    RequestHandler,
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    TokenProvider,
)
from hybridrelay.exceptions import (
    AuthorizationError,
    ConfigurationError,
    ConnectionRejectedError,
    EndpointNotFoundError,
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
    "AuthorizationError",
    "ConfigurationError",
    "ConnectionRejectedError",
    "EndpointNotFoundError",
    "HybridConnectionClient",
    "HybridConnectionListener",
    "HybridConnectionStream",
    "ProtocolError",
    "QuotaExceededError",
    "RelayConnectionError",
    "RelayedHttpContext",
    "RelayError",
    "RelayHttpError",
    "RelayTimeoutError",
    "RequestHandler",
    "SharedAccessKeyTokenProvider",
    "SharedAccessSignatureTokenProvider",
    "StreamClosedError",
    "TokenError",
    "TokenProvider",
    "__version__",
]
