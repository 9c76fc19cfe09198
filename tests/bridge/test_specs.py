"""The -L / -R grammar: table-driven good and bad specs, round trips, and a fuzz test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.bridge.specs import (
    LocalForwardSpec,
    Protocol,
    RemoteForwardSpec,
    is_loopback_host,
    parse_local_spec,
    parse_remote_spec,
)
from hybridrelay.exceptions import ConfigurationError

L = LocalForwardSpec
R = RemoteForwardSpec
TCP, UDP, UNIX = Protocol.TCP, Protocol.UDP, Protocol.UNIX

LOCAL_GOOD: list[tuple[str, LocalForwardSpec, str]] = [
    ("8080:web", L("web", TCP, 8080), "8080:web"),
    ("127.0.0.1:8080:web", L("web", TCP, 8080, "127.0.0.1"), "127.0.0.1:8080:web"),
    ("localhost:22:ssh-hc", L("ssh-hc", TCP, 22, "localhost"), "localhost:22:ssh-hc"),
    ("[::1]:2222/ssh:hosts", L("hosts", TCP, 2222, "::1", port_name="ssh"), "[::1]:2222/ssh:hosts"),
    ("*:5353/dns/udp:hosts", L("hosts", UDP, 5353, "*", port_name="dns"), "*:5353/dns/udp:hosts"),
    ("5353/udp:dns", L("dns", UDP, 5353), "5353/udp:dns"),
    ("5353/UDP:dns", L("dns", UDP, 5353), "5353/udp:dns"),
    ("80/tcp:web", L("web", TCP, 80), "80:web"),
    ("0:web", L("web", TCP, 0), "0:web"),
    ("1/udp/tcp:x", L("x", TCP, 1, port_name="udp"), "1/udp/tcp:x"),
    ("1/udp/udp:x", L("x", UDP, 1, port_name="udp"), "1/udp/udp:x"),
    ("1/ssh:a/b.c_d", L("a/b.c_d", TCP, 1, port_name="ssh"), "1/ssh:a/b.c_d"),
    ("unix:/run/app.sock:hc", L("hc", UNIX, path="/run/app.sock"), "unix:/run/app.sock:hc"),
    (
        "unix:/run/a:b.sock#app:hc",
        L("hc", UNIX, path="/run/a:b.sock", port_name="app"),
        "unix:/run/a:b.sock#app:hc",
    ),
    ("  8080/émoji:web ", L("web", TCP, 8080, port_name="émoji"), "8080/émoji:web"),
]

LOCAL_BAD: list[tuple[str, str]] = [
    ("", "expected [bind_address:]port"),
    ("8080", "expected [bind_address:]port"),
    ("8080:", "hybrid connection after the last ':' is empty"),
    ("web:8080", "port 'web' is not a number"),
    ("65536:web", "outside 0-65535"),
    ("-1:web", "not a number"),
    ("::1:22:web", "IPv6 addresses must be written in brackets"),
    ("[::1:22:web", "'[' without ']'"),
    ("[127.0.0.1]:22:web", "not an IPv6 address"),
    ("[::1]22:web", "expected ':port'"),
    (":22:web", "use '*' for all interfaces"),
    ("bad_host!:22:web", "neither an IP address nor a host name"),
    ("22/a/b:web", "too many '/' parts"),
    ("22/a b:web", "forbidden character"),
    ("22/" + "x" * 256 + ":web", "longer than 255 bytes"),
    ("22:we b", "may contain only letters"),
    ("22:/web", "may contain only letters"),
    ("unix:relative.sock:hc", "must be absolute"),
    ("unix::hc", "path is empty"),
    ("unix:/a#b#c:hc", "forbidden character"),
    ("unix:/" + "a" * 120 + ":hc", "longer than 107 bytes"),
    ("22/:web", "port name is empty"),
]

REMOTE_GOOD: list[tuple[str, RemoteForwardSpec, str | None]] = [
    ("web:localhost:80", R("web", TCP, "localhost", 80), "web:localhost:80"),
    ("web:80", R("web", TCP, "localhost", 80), "web:localhost:80"),
    ("hosts:ssh/10.0.0.5:22", R("hosts", TCP, "10.0.0.5", 22, port_name="ssh"), None),
    ("hosts:dns/[fd00::53]:53/udp", R("hosts", UDP, "fd00::53", 53, port_name="dns"), None),
    ("hosts:[::1]:53/UDP", R("hosts", UDP, "::1", 53), "hosts:[::1]:53/udp"),
    ("hc:app/unix:/run/app.sock", R("hc", UNIX, None, path="/run/app.sock", port_name="app"), None),
    ("hc:unix:/run/app.sock", R("hc", UNIX, None, path="/run/app.sock"), None),
    ("a/b:n/80", R("a/b", TCP, "localhost", 80, port_name="n"), "a/b:n/localhost:80"),
    (
        "hc:db.internal.example:5432/tcp",
        R("hc", TCP, "db.internal.example", 5432),
        "hc:db.internal.example:5432",
    ),
]

REMOTE_BAD: list[tuple[str, str]] = [
    ("", "expected hybrid_connection:"),
    ("web", "expected hybrid_connection:"),
    ("web:", "expected hybrid_connection:"),
    (":localhost:80", "hybrid connection name is empty"),
    ("web:localhost:0", "outside 1-65535"),
    ("web:localhost:http", "not a number"),
    ("web:localhost:80/ssh", "unexpected '/'"),
    ("web:::1:80", "IPv6 addresses must be written in brackets"),
    ("web:a b/localhost:80", "forbidden character"),
    ("web:unix:run.sock", "must be absolute"),
    ("web:x/y/unix:/a", "unexpected '/'"),
    ("web:/localhost:80", "port name is empty"),
    ("web:-bad-:80", "neither an IP address nor a host name"),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), LOCAL_GOOD)
def test_local_spec_parses(text: str, expected: LocalForwardSpec, canonical: str) -> None:
    spec = parse_local_spec(text)
    assert spec == expected
    assert str(spec) == canonical
    assert parse_local_spec(str(spec)) == spec


@pytest.mark.parametrize(("text", "message"), LOCAL_BAD)
def test_local_spec_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_local_spec(text)


@pytest.mark.parametrize(("text", "expected", "canonical"), REMOTE_GOOD)
def test_remote_spec_parses(text: str, expected: RemoteForwardSpec, canonical: str | None) -> None:
    spec = parse_remote_spec(text)
    assert spec == expected
    assert str(spec) == (canonical or text)
    assert parse_remote_spec(str(spec)) == spec


@pytest.mark.parametrize(("text", "message"), REMOTE_BAD)
def test_remote_spec_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[")):
        parse_remote_spec(text)


def test_dataclass_validation_rejects_inconsistent_fields() -> None:
    with pytest.raises(ConfigurationError, match="Unix socket forward has a path"):
        LocalForwardSpec("hc", UNIX, port=5, path="/x")
    with pytest.raises(ConfigurationError, match="only Unix socket forwards have a path"):
        LocalForwardSpec("hc", TCP, port=5, path="/x")
    with pytest.raises(ConfigurationError, match="needs a host"):
        RemoteForwardSpec("hc", TCP, None, 5)
    with pytest.raises(ConfigurationError, match="Unix socket target"):
        RemoteForwardSpec("hc", UNIX, "localhost", path="/x")


def test_loopback_detection() -> None:
    assert is_loopback_host("127.0.0.1")
    assert is_loopback_host("127.3.2.1")
    assert is_loopback_host("::1")
    assert is_loopback_host("localhost")
    assert not is_loopback_host("*")
    assert not is_loopback_host("0.0.0.0")
    assert not is_loopback_host("10.0.0.1")
    assert not is_loopback_host("example.com")
    assert parse_local_spec("0.0.0.0:1:x").binds_non_loopback
    assert not parse_local_spec("1:x").binds_non_loopback
    assert not parse_local_spec("[::1]:1:x").binds_non_loopback


_SPEC_ALPHABET = st.sampled_from(list("0123456789:/[]#*.ab-_ udpUDPtcunix\x00é\ud800"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=_SPEC_ALPHABET, max_size=40)))
def test_fuzz_only_configuration_errors(text: str) -> None:
    for parse in (parse_local_spec, parse_remote_spec):
        try:
            spec = parse(text)
        except ConfigurationError:
            continue
        # Whatever parses must print back to itself.
        assert parse(str(spec)) == spec
