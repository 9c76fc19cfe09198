"""The asyncio SDK: listen on and connect to hybrid connections (see ``docs/SDK.md``)."""

from __future__ import annotations

from hybridrelay.client.http import RelayedHttpContext, RequestHandler
from hybridrelay.client.listener import (
    AcceptContext,
    AcceptHandler,
    HybridConnectionListener,
    ListenerStatus,
)
from hybridrelay.client.sender import HybridConnectionClient
from hybridrelay.client.stream import HybridConnectionStream
from hybridrelay.client.tls import build_ssl_context
from hybridrelay.client.tokens import (
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    TokenProvider,
)
from hybridrelay.transport.base import SpliceSocket, StreamSink

__all__ = [
    "AcceptContext",
    "AcceptHandler",
    "HybridConnectionClient",
    "HybridConnectionListener",
    "HybridConnectionStream",
    "ListenerStatus",
    "RelayedHttpContext",
    "RequestHandler",
    "SharedAccessKeyTokenProvider",
    "SharedAccessSignatureTokenProvider",
    "SpliceSocket",
    "StreamSink",
    "TokenProvider",
    "build_ssl_context",
]
