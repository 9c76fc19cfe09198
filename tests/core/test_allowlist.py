"""Client allow-lists (protocol/allowlist.py), shared by bridge -L and the relay's ingress."""

from __future__ import annotations

import pytest

from hybridrelay.protocol.allowlist import allows, parse_network


def test_empty_allows_everyone_and_cidrs_match() -> None:
    assert allows((), "203.0.113.9")
    nets = (parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"))
    assert allows(nets, "10.1.2.3")
    assert allows(nets, "2001:db8::1")
    assert not allows(nets, "192.0.2.1")
    assert not allows(nets, "not-an-address")


def test_mapped_ipv4_and_zone_index() -> None:
    nets = (parse_network("127.0.0.0/8"), parse_network("fe80::/10"))
    assert allows(nets, "::ffff:127.0.0.1")  # IPv4 client on a dual-stack socket
    assert allows(nets, "fe80::1%eth0")


def test_parse_network_is_lenient_on_host_bits_and_strict_on_garbage() -> None:
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    assert str(parse_network(" 192.0.2.7 ")) == "192.0.2.7/32"
    with pytest.raises(ValueError):
        parse_network("10.0.0.0/33")
