"""The port-forwarding bridge (``hybridrelay bridge``), built on the public SDK only.

``-L`` forwards (the ingress, :mod:`.ingress` and :mod:`.udp`) carry local TCP, UDP or Unix
sockets to a hybrid connection; ``-R`` forwards (the edge, :mod:`.edge`) carry a hybrid
connection's streams to configured destinations. Wire-compatible with Azure Relay Bridge
(azbridge): logical port names use its preamble (:mod:`.preamble`), UDP its framing.
"""

from __future__ import annotations

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import BridgeConfig, load_config, merge_cli, parse_config
from hybridrelay.bridge.specs import (
    LocalForwardSpec,
    RemoteForwardSpec,
    parse_local_spec,
    parse_remote_spec,
)

__all__ = [
    "BridgeAgent",
    "BridgeConfig",
    "LocalForwardSpec",
    "RemoteForwardSpec",
    "load_config",
    "merge_cli",
    "parse_config",
    "parse_local_spec",
    "parse_remote_spec",
]
