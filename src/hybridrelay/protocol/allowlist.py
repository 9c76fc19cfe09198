"""Client allow-lists: the networks a listening port accepts connections from (pure).

Used by the bridge's ``-L`` forwards and by the relay's own ingress ports; both configurations
give CIDRs, and both check a peer's address the same way (an IPv4 client on a dual-stack socket
shows up as ``::ffff:a.b.c.d`` and is matched as IPv4; a zone index is ignored).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["Network", "allows", "is_loopback", "parse_network"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """A CIDR (or a bare address, as a /32 or /128); host bits are ignored.

    Raises:
        ValueError: not an address or a CIDR.
    """
    return ipaddress.ip_network(str(text).strip(), strict=False)


def allows(networks: Iterable[Network], host: str) -> bool:
    """True when ``networks`` is empty or ``host`` (a peer address) is in one of them."""
    networks = tuple(networks)
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
