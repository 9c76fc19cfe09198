"""SAS tokens (PROTOCOL.md section 3): pure, no clock, no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.auth.sas import (
    AuthorizationRule,
    Rights,
    authorize,
    create_token,
    parse_token,
    token_audience,
)
from hybridrelay.exceptions import TokenError

NOW = 1_700_000_000
ALL = Rights.LISTEN | Rights.SEND | Rights.MANAGE
RULES = (AuthorizationRule("root", "primary-key-text", "secondary-key-text", ALL),)


def test_reference_signature_from_protocol_md() -> None:
    token = create_token("http://127.0.0.1:8080/hyco", "k", "s", expiry=1795681940)
    assert token == (
        "SharedAccessSignature sr=http%3A%2F%2F127.0.0.1%3A8080%2Fhyco"
        "&sig=lsu9oV1YXBJZ5JEMBoMHDwDcgMWOp19DQl9y7XEgWyo%3D&se=1795681940&skn=k"
    )


def sign_raw(
    sr: str, se: int, key: str, *, fields: str = "sr,sig,se,skn", name: str = "root"
) -> str:
    sig = base64.b64encode(
        hmac.new(key.encode(), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    ).decode()
    values = {"sr": sr, "sig": quote(sig, safe=""), "se": str(se), "skn": name}
    return "SharedAccessSignature " + "&".join(f"{f}={values[f]}" for f in fields.split(","))


@pytest.mark.parametrize(
    "sr",
    [
        "http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco",  # Node listen URI form
        "http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco",  # Node https / Python helper
        "http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F",  # .NET
        "http%3A%2F%2Fcontoso.servicebus.windows.net%2F",  # namespace-wide
        "http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco",  # lower-case hex (old docs)
        "sb%3A%2F%2Fcontoso.servicebus.windows.net%2FHYCO",  # other scheme, other case
    ],
)
def test_every_audience_form_is_accepted(sr: str) -> None:
    token = sign_raw(sr, NOW + 60, "primary-key-text")
    decision = authorize(token, rules=RULES, entity_path="hyco", required=Rights.LISTEN, now=NOW)
    assert decision.allowed, decision
    hosted = authorize(
        token,
        rules=RULES,
        entity_path="hyco",
        required=Rights.LISTEN,
        now=NOW,
        namespace_host="contoso.servicebus.windows.net",
    )
    assert hosted.allowed


def test_a_suffix_token_covers_its_suffix_only() -> None:
    """Node signs the URL it dials, suffix included (PROTOCOL.md 3.5): such a token opens that
    suffix and below, never the bare entity (a listener's path) or a sibling suffix."""
    sr = "http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco%2Fsub"
    token = sign_raw(sr, NOW + 60, "primary-key-text")

    def status(suffix: str) -> int:
        return authorize(
            token, rules=RULES, entity_path="hyco", suffix=suffix, required=Rights.SEND, now=NOW
        ).status

    assert status("/sub") == 200
    assert status("/sub/deeper") == 200
    assert status("") == 403
    assert status("/other") == 403
    assert status("/sub/../other") == 403


def test_field_order_and_case_do_not_matter() -> None:
    sr = "http%3A%2F%2Fns%2Fhyco"
    for fields in ("sig,se,skn,sr", "skn,sr,se,sig"):
        token = sign_raw(sr, NOW + 60, "primary-key-text", fields=fields)
        assert authorize(
            token, rules=RULES, entity_path="hyco", required=Rights.SEND, now=NOW
        ).allowed
    upper = (
        sign_raw(sr, NOW + 60, "primary-key-text")
        .replace("sr=", "SR=")
        .replace("SharedAccessSignature", "sharedaccesssignature")
    )
    assert authorize(upper, rules=RULES, entity_path="hyco", required=Rights.SEND, now=NOW).allowed


def test_secondary_key_and_failures() -> None:
    sr = "http%3A%2F%2Fns%2Fhyco"
    ok = sign_raw(sr, NOW + 60, "secondary-key-text")
    assert authorize(ok, rules=RULES, entity_path="hyco", required=Rights.LISTEN, now=NOW).allowed

    def status(
        token: str | None,
        entity: str = "hyco",
        right: Rights = Rights.LISTEN,
        rules: tuple[AuthorizationRule, ...] = RULES,
        namespace_host: str | None = None,
        grace_seconds: float = 0.0,
    ) -> int:
        decision = authorize(
            token,
            rules=rules,
            entity_path=entity,
            required=right,
            now=NOW,
            namespace_host=namespace_host,
            grace_seconds=grace_seconds,
        )
        return decision.status

    assert status(None) == 401
    assert status("Bearer abc") == 401
    assert status(sign_raw(sr, NOW + 60, "wrong-key")) == 401
    assert status(sign_raw(sr, NOW - 1, "primary-key-text")) == 401
    assert status(sign_raw(sr, NOW - 1, "primary-key-text"), grace_seconds=10) == 200
    assert status(sign_raw(sr, NOW + 60, "primary-key-text", name="other")) == 401
    assert status(sign_raw(sr, NOW + 60, "primary-key-text"), entity="other") == 403
    assert status(sign_raw(sr, NOW + 60, "primary-key-text"), entity="hycox") == 403
    listen_only = (AuthorizationRule("root", "primary-key-text", None, Rights.LISTEN),)
    assert (
        status(sign_raw(sr, NOW + 60, "primary-key-text"), right=Rights.SEND, rules=listen_only)
        == 403
    )
    manage = (AuthorizationRule("root", "primary-key-text", None, Rights.MANAGE),)
    assert (
        status(sign_raw(sr, NOW + 60, "primary-key-text"), right=Rights.SEND, rules=manage) == 200
    )
    other_ns = sign_raw("http%3A%2F%2Fother%2Fhyco", NOW + 60, "primary-key-text")
    assert status(other_ns, namespace_host="ns") == 403


def test_reasons_and_reprs_never_contain_secrets() -> None:
    token = sign_raw("http%3A%2F%2Fns%2Fhyco", NOW + 60, "wrong-key")
    signature = token.split("sig=")[1].split("&")[0]
    decision = authorize(token, rules=RULES, entity_path="hyco", required=Rights.LISTEN, now=NOW)
    assert signature not in decision.reason and "key-text" not in decision.reason
    assert "key-text" not in repr(RULES[0])
    parsed = parse_token(token)
    assert str(parsed.signature) not in repr(parsed) and signature not in repr(parsed)


def test_parse_token_errors() -> None:
    for bad in (
        "",
        "SharedAccessSignature ",
        "SharedAccessSignature sr=a&sig=b&se=x&skn=k",
        "SharedAccessSignature sr=a&sig=%%%&se=1&skn=k",
        "Basic abc",
        "SharedAccessSignature sr=a&se=1&skn=k",
        "SharedAccessSignature " + "a" * 5000,
    ):
        with pytest.raises(TokenError):
            parse_token(bad)


def test_token_audience_and_rights() -> None:
    assert (
        token_audience("contoso.servicebus.windows.net", "hyco")
        == "http://contoso.servicebus.windows.net/hyco/"
    )
    assert token_audience("127.0.0.1:9400", "a/b") == "http://127.0.0.1/a/b/"
    assert token_audience("ns", "") == "http://ns/"
    assert Rights.parse(["listen", "Send"]) == Rights.LISTEN | Rights.SEND
    assert Rights.MANAGE.effective() == ALL
    with pytest.raises(ValueError, match="unknown right"):
        Rights.parse(["Read"])
    with pytest.raises(TokenError):
        create_token("http://x/", "", "key", expiry=1)


@given(st.text(max_size=300))
def test_parse_token_fuzz(text: str) -> None:
    try:
        parse_token(text)
    except TokenError:
        pass


@given(st.text(max_size=300), st.sampled_from([Rights.LISTEN, Rights.SEND, Rights.NONE]))
def test_authorize_fuzz_never_raises(text: str, right: Rights) -> None:
    decision = authorize(
        "SharedAccessSignature " + text, rules=RULES, entity_path="hyco", required=right, now=NOW
    )
    assert decision.status in (200, 401, 403)
    assert decision.status != 200  # nobody forges a signature by chance


def test_auth_cache_is_exact_about_expiry_and_rule_changes() -> None:
    from hybridrelay.auth.cache import AuthCache

    cache = AuthCache(max_entries=2)
    sr = "http%3A%2F%2Fns%2Fhyco"
    token = sign_raw(sr, NOW + 60, "primary-key-text")

    def check(rules: tuple[AuthorizationRule, ...] = RULES, now: float = NOW, **kw: str) -> int:
        return authorize(
            token,
            rules=rules,
            entity_path=kw.get("entity", "hyco"),
            required=Rights.LISTEN,
            now=now,
            verify=cache.verify,
        ).status

    assert check() == 200 and len(cache) == 1
    assert check() == 200 and len(cache) == 1  # served from the cache
    assert check(now=NOW + 61) == 401  # expiry is checked on every use
    assert check() == 200
    rotated = (AuthorizationRule("root", "new-primary-key", "primary-key-text", ALL),)
    assert check(rules=rotated) == 200  # still signed by the (now secondary) key
    revoked = (AuthorizationRule("root", "new-primary-key", None, ALL),)
    assert check(rules=revoked) == 401  # a changed rule set is never served from the cache
    listen_less = (AuthorizationRule("root", "primary-key-text", None, Rights.SEND),)
    assert check(rules=listen_less) == 403
    assert check(entity="other") == 403
    # The cache keeps the signature check only: scope is decided on every use.
    child = sign_raw("http%3A%2F%2Fns%2Fhyco%2Fchild", NOW + 60, "primary-key-text")
    for entity, suffix, expected in (
        ("hyco/child", "", 200),
        ("hyco", "", 403),
        ("hyco", "/child", 200),
    ):
        decision = authorize(
            child,
            rules=RULES,
            entity_path=entity,
            suffix=suffix,
            required=Rights.LISTEN,
            now=NOW,
            verify=cache.verify,
        )
        assert decision.status == expected, (entity, suffix)
    assert len(cache) <= 2  # bounded
    missing = authorize(
        None, rules=RULES, entity_path="hyco", required=Rights.LISTEN, now=NOW, verify=cache.verify
    )
    assert missing.status == 401 and len(cache) <= 2
