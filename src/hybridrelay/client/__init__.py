"""The asyncio SDK: listen on and connect to hybrid connections (see ``docs/SDK.md``).

``__all__`` is the SDK's whole public surface, and ``docs/SDK.md`` documents every name in it
(``tests/test_exports.py`` checks both). Anything else in this package is internal and may
change without notice. ``StreamSink`` and ``SpliceSocket`` are defined in the transport layer
but are public here because they are :meth:`HybridConnectionStream.attach`'s argument and
result.
"""

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
]
