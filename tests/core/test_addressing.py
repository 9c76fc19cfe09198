"""Rendezvous, accept and reject URLs (protocol/addressing.py, PROTOCOL.md 5.2-5.4, 6.2)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.addressing import (
    UNDESCRIBED_REJECTION,
    AcceptParams,
    build_relay_url,
    parse_accept_params,
    parse_endpoint,
    protocol_params,
    reject_url,
    rendezvous_url,
    split_rendezvous_address,
    target_suffix,
)


@pytest.mark.parametrize(
    ("endpoint", "base", "host"),
    [
        ("sb://ns.example.net/", "wss://ns.example.net", "ns.example.net"),
        ("sb://ns.example.net:8443", "wss://ns.example.net:8443", "ns.example.net:8443"),
        ("wss://127.0.0.1:9400/", "wss://127.0.0.1:9400", "127.0.0.1:9400"),
        ("ws://127.0.0.1:9400", "ws://127.0.0.1:9400", "127.0.0.1:9400"),
        ("https://u:p@h:1/x", "wss://h:1", "h:1"),
        ("http://h", "ws://h", "h"),
    ],
)
def test_parse_endpoint(endpoint: str, base: str, host: str) -> None:
    parsed = parse_endpoint(endpoint)
    assert (parsed.base_url, parsed.host) == (base, host)
    assert parsed.secure is base.startswith("wss:")


@pytest.mark.parametrize("endpoint", ["ftp://h", "sb://", "h:1", "sb://h:notaport"])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("address", "entity", "path", "query"),
    [
        ("wss://r/$hc/hc?sb-hc-action=accept&sb-hc-id=1", "hc", "", ""),
        ("wss://r/$hc/hc/sub/x?a=1&sb-hc-action=accept&sb-hc-id=1", "hc", "/sub/x", "a=1"),
        ("wss://r/$hc/a/b/c%20d?q=%20&sb-hc-id=1", "a/b", "/c%20d", "q=%20"),
    ],
)
def test_split_rendezvous_address(address: str, entity: str, path: str, query: str) -> None:
    assert split_rendezvous_address(address, entity) == (path, query)


def test_the_relays_rendezvous_url_is_what_the_listener_takes_apart() -> None:
    url = rendezvous_url(
        "wss://relay:9400",
        "a/b c",
        action="accept",
        connection_id="id 1",
        secret="s/+=",
        suffix="/x/y%20z",
        app_query="q=1&r",
    )
    assert url == (
        "wss://relay:9400/$hc/a/b%20c/x/y%20z"
        "?q=1&r&sb-hc-action=accept&sb-hc-id=id%201&sb-hc-rendezvous=s%2F%2B%3D"
    )
    assert split_rendezvous_address(url, "a/b c") == ("/x/y%20z", "q=1&r")
    params = parse_accept_params(protocol_params(urlsplit(url).query))
    assert params == AcceptParams(connection_id="id 1", secret="s/+=")
    assert not params.rejects


def test_reject_url() -> None:
    url = reject_url("wss://r/$hc/hc?sb-hc-action=accept&sb-hc-id=1", 403, "No & no, 100%")
    assert url == (
        "wss://r/$hc/hc?sb-hc-action=accept&sb-hc-id=1"
        "&sb-hc-statusCode=403&sb-hc-statusDescription=No%20%26%20no%2C%20100%25"
    )
    params = parse_accept_params(protocol_params(urlsplit(url).query))
    assert (params.rejects, params.status_code, params.status_description) == (
        True,
        403,
        "No & no, 100%",
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("100", None),
        ("101", None),  # a bare 101 would leave the sender with neither a socket nor an error
        ("200", None),
        ("399", None),
        ("400", 400),
        ("404", 404),
        ("599", 599),
        ("600", None),
        ("999", None),
        ("99", None),
        ("1000", None),
        ("0404", None),
        (" 404", None),
        ("+404", None),
        ("4_04", None),
        ("٤٠٤", None),  # Arabic-Indic digits: int() would take them
        ("", None),
        ("abc", None),
    ],
)
def test_status_code_validation(status: str, code: int | None) -> None:
    params = parse_accept_params({"sb-hc-statusCode": status, "sb-hc-id": "1"})
    assert params.rejects
    assert params.status_code == code
    assert params.status_description == UNDESCRIBED_REJECTION


def test_missing_parameters_and_an_empty_description() -> None:
    params = parse_accept_params({"sb-hc-statusDescription": ""})
    assert params == AcceptParams(connection_id="", secret="")
    assert parse_accept_params({"sb-hc-statusCode": "500", "sb-hc-statusDescription": ""}) == (
        AcceptParams(connection_id="", rejects=True, status_code=500)
    )


def test_repr_hides_the_secret() -> None:
    params = parse_accept_params({"sb-hc-rendezvous": "s3cr3t", "sb-hc-id": "1"})
    assert "s3cr3t" not in repr(params)
    assert "'1'" in repr(params)


@given(
    st.integers(400, 599),
    # Lone surrogates are not text a listener can send (they have no UTF-8 form).
    st.text(
        st.characters(min_codepoint=32, exclude_characters="\x7f", exclude_categories=["Cs"]),
        min_size=1,
    ),
    st.text("abcXYZ019-_. ", min_size=1, max_size=20),
)
def test_a_rejection_reaches_the_relay_as_sent(status: int, description: str, cid: str) -> None:
    address = rendezvous_url(
        "wss://r", "hc", action="accept", connection_id=cid, secret="s", app_query="a=1"
    )
    params = parse_accept_params(
        protocol_params(urlsplit(reject_url(address, status, description)).query)
    )
    assert params == AcceptParams(
        connection_id=cid,
        secret="s",
        rejects=True,
        status_code=status,
        status_description=description,
    )


@given(st.dictionaries(st.sampled_from(["sb-hc-statusCode", "sb-hc-id", "x"]), st.text()))
def test_parse_accept_params_fuzz(params: dict[str, str]) -> None:
    parsed = parse_accept_params(params)
    assert parsed.rejects == ("sb-hc-statusCode" in params)
    assert parsed.status_code is None or 400 <= parsed.status_code <= 599
    if parsed.status_code is not None:
        assert str(parsed.status_code) == params["sb-hc-statusCode"]


@pytest.mark.parametrize(
    ("path", "entity", "suffix"),
    [
        ("/hc", "hc", ""),
        ("/HC/", "hc", "/"),
        ("/hc/a/b%2Fc", "hc", "/a/b%2Fc"),
        ("/a/b/c", "/a/b/", "/c"),
        ("/hcx/y", "hc", "/hcx/y"),  # another name that merely starts the same
        ("", "hc", ""),
    ],
)
def test_target_suffix(path: str, entity: str, suffix: str) -> None:
    assert target_suffix(path, entity) == suffix


@given(
    st.text("abAB-/", min_size=1, max_size=8).filter(lambda e: e.strip("/")),
    st.text("abAB-/%2F", max_size=12),
)
def test_target_suffix_fuzz(entity: str, rest: str) -> None:
    name = entity.strip("/")
    suffix = "/" + rest if rest else ""
    assert target_suffix("/" + name.upper() + suffix, entity) == suffix


@pytest.mark.timeout(60)
@given(
    base=st.sampled_from(["wss://relay.example", "wss://127.0.0.1:9400/", "ws://[::1]:80"]),
    entity=st.text(min_size=1, max_size=12),
    action=st.sampled_from(["request", "accept"]),
    connection_id=st.text(max_size=40),
    secret=st.text(max_size=40),
)
def test_a_rendezvous_address_from_its_cached_prefix_is_build_relay_url_s(
    base: str, entity: str, action: str, connection_id: str, secret: str
) -> None:
    """The address of an HTTP request (no suffix, no app query) is made from a prefix cached
    per base, entity and action: the same text as built in full, quoting included."""
    assert rendezvous_url(
        base, entity, action=action, connection_id=connection_id, secret=secret
    ) == build_relay_url(
        base,
        entity,
        action=action,
        params={"sb-hc-id": connection_id, "sb-hc-rendezvous": secret},
    )
