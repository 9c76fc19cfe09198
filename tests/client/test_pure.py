"""Pure parts of the SDK: backoff, token providers, TLS contexts, endpoints, proxies, config."""

from __future__ import annotations

import random
import ssl
import time
from collections import Counter
from itertools import islice

import pytest

from hybridrelay.auth.sas import AuthorizationRule, Rights, authorize, parse_token, token_audience
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
)
from hybridrelay.client._connect import _split_proxy, env_proxy_for
from hybridrelay.client.backoff import (
    FIRST_RETRY_SPREAD,
    RECONNECT_DELAYS,
    RetryKind,
    capped_delay,
    classify_error,
    endpoint_round,
    reconnect_delays,
)
from hybridrelay.client.listener import AcceptContext
from hybridrelay.client.tls import build_ssl_context
from hybridrelay.exceptions import (
    AuthorizationError,
    ConfigurationError,
    EndpointNotFoundError,
    RelayConnectionError,
    RelayHttpError,
    RelayTimeoutError,
    StreamClosedError,
    TokenError,
)
from tests.conftest import TlsFiles

# -- backoff ---------------------------------------------------------------------------------


def test_delays_follow_schedule_within_jitter_and_stay_capped() -> None:
    delays = list(islice(reconnect_delays(random.Random(1)), 50))
    expected = list(RECONNECT_DELAYS) + [30.0] * (50 - len(RECONNECT_DELAYS))
    for delay, base in zip(delays[1:], expected[1:], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    # The immediate retry is spread too, so a dead node's listeners do not all come at once.
    assert 0.0 <= delays[0] < FIRST_RETRY_SPREAD
    firsts = {next(reconnect_delays(random.Random(seed))) for seed in range(20)}
    assert len(firsts) == 20
    assert next(reconnect_delays(random.Random(1), jitter=0.0)) == 0.0
    assert next(reconnect_delays(random.Random(1), schedule=(0.0, 0.05))) <= 0.05
    assert max(delays) <= 36.0
    # Jitter is real: the capped delays are not all equal.
    assert len({round(d, 6) for d in delays[6:]}) > 1


def test_delays_are_deterministic_with_a_seed() -> None:
    first = list(islice(reconnect_delays(random.Random(7)), 10))
    second = list(islice(reconnect_delays(random.Random(7)), 10))
    assert first == second


def test_a_reconnect_round_tries_the_others_at_random_then_the_lost_one() -> None:
    rng = random.Random(5)
    assert endpoint_round(0, 1, rng) == [0]
    rounds = [endpoint_round(2, 5, rng) for _ in range(2000)]
    assert all(sorted(r[:-1]) == [0, 1, 3, 4] and r[-1] == 2 for r in rounds)
    firsts = Counter(r[0] for r in rounds)
    assert min(firsts.values()) > 400  # the first one tried is about uniform: 500 each


def test_capped_delay_and_bad_arguments() -> None:
    assert 24.0 <= capped_delay(random.Random(3)) <= 36.0
    with pytest.raises(ValueError):
        next(reconnect_delays(schedule=()))
    with pytest.raises(ValueError):
        next(reconnect_delays(jitter=1.5))


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RelayConnectionError("x"), RetryKind.BACKOFF),
        (RelayTimeoutError("x"), RetryKind.BACKOFF),
        (RelayHttpError(500, "x"), RetryKind.BACKOFF),
        (AuthorizationError(401, "x"), RetryKind.CAPPED),
        (EndpointNotFoundError(404, "x"), RetryKind.CAPPED),
        (TokenError("x"), RetryKind.CAPPED),
        (RuntimeError("x"), RetryKind.CAPPED),
        (ConfigurationError("x"), RetryKind.FATAL),
        (StreamClosedError("x"), RetryKind.FATAL),
        (KeyboardInterrupt(), RetryKind.FATAL),
    ],
)
def test_classify_error(error: BaseException, kind: RetryKind) -> None:
    assert classify_error(error) is kind


# -- token providers -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_key_provider_signs_tokens_the_relay_accepts() -> None:
    provider = SharedAccessKeyTokenProvider("rule", "secret-key")
    audience = token_audience("relay.example:443", "hc")
    token = await provider.get_token(audience, 3600)
    rule = AuthorizationRule("rule", "secret-key", rights=Rights.LISTEN)
    decision = authorize(
        token, rules=[rule], entity_path="hc", required=Rights.LISTEN, now=time.time()
    )
    assert decision.allowed
    assert 3590 <= parse_token(token).expiry - time.time() <= 3601
    assert "secret-key" not in repr(provider)


async def test_key_provider_caches_and_refreshes_near_expiry() -> None:
    clock = FakeClock(1_000_000.0)
    provider = SharedAccessKeyTokenProvider("rule", "key", clock=clock)
    first = await provider.get_token("http://h/hc/", 3600)
    clock.now += 3000  # 600 s left: more than 5 min, reused
    assert await provider.get_token("http://h/hc/", 3600) == first
    clock.now += 400  # 200 s left: refreshed
    second = await provider.get_token("http://h/hc/", 3600)
    assert second != first
    assert parse_token(second).expiry == int(clock.now + 3600)
    # Another audience gets its own token.
    other = await provider.get_token("http://h/other/", 3600)
    assert parse_token(other).audience == "http://h/other/"


async def test_key_provider_short_ttl_is_still_cached_briefly() -> None:
    clock = FakeClock(1_000_000.0)
    provider = SharedAccessKeyTokenProvider("rule", "key", clock=clock)
    first = await provider.get_token("http://h/hc/", 10)
    clock.now += 4  # 6 s of 10 left: reused
    assert await provider.get_token("http://h/hc/", 10) == first
    clock.now += 2  # 4 s left < half the ttl: refreshed
    assert await provider.get_token("http://h/hc/", 10) != first


async def test_provider_argument_checks() -> None:
    with pytest.raises(TokenError):
        SharedAccessKeyTokenProvider("", "key")
    with pytest.raises(TokenError):
        SharedAccessKeyTokenProvider("name", "")
    with pytest.raises(TokenError):
        await SharedAccessKeyTokenProvider("name", "key").get_token("http://h/", 0)
    with pytest.raises(TokenError):
        SharedAccessSignatureTokenProvider("not a token")


async def test_signature_provider_hands_out_its_token() -> None:
    token = "SharedAccessSignature sr=http%3A%2F%2Fh%2Fhc&sig=AAAA&se=1&skn=k"
    provider = SharedAccessSignatureTokenProvider(token)
    assert await provider.get_token("http://h/hc/", 60) == token
    assert "AAAA" not in repr(provider)


# -- TLS -------------------------------------------------------------------------------------


def test_default_context_verifies() -> None:
    context = build_ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_ca_file_context_trusts_only_that_ca(tls_files: TlsFiles) -> None:
    context = build_ssl_context(ca_file=tls_files.ca_file)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


def test_ssl_cert_file_is_honoured(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", tls_files.ca_file)
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    context = build_ssl_context()
    subjects = [str(cert.get("subject")) for cert in context.get_ca_certs()]
    assert len(subjects) == 1


def test_tls_argument_errors(tls_files: TlsFiles, tmp_path: object) -> None:
    with pytest.raises(ConfigurationError):
        build_ssl_context(ssl_context=ssl.create_default_context(), ca_file=tls_files.ca_file)
    with pytest.raises(ConfigurationError):
        build_ssl_context(ca_file="/nonexistent/ca.pem")
    given = ssl.create_default_context()
    assert build_ssl_context(ssl_context=given) is given


# -- endpoints, proxies, addresses -----------------------------------------------------------


def test_env_proxy_maps_wss_to_https_and_honours_no_proxy() -> None:
    proxies = {"https": "http://proxy:3128", "http": "http://plain:8080", "no": "localhost,.corp"}
    assert env_proxy_for("wss://ns.example.net/$hc/x", proxies) == "http://proxy:3128"
    assert env_proxy_for("ws://ns.example.net/$hc/x", proxies) == "http://plain:8080"
    assert env_proxy_for("wss://relay.corp:443/$hc/x", proxies) is None
    assert env_proxy_for("wss://corp/$hc/x", proxies) is None
    assert env_proxy_for("wss://localhost/$hc/x", proxies) is None
    assert env_proxy_for("wss://notcorp.net/$hc/x", proxies) == "http://proxy:3128"
    assert env_proxy_for("wss://h/", {"https": "http://p:1", "no": "*"}) is None
    assert env_proxy_for("wss://h/", {"wss": "http://w:1", "https": "http://p:1"}) == "http://w:1"
    assert env_proxy_for("wss://h/", {}) is None


def test_proxy_userinfo_becomes_proxy_authorization() -> None:
    proxy = _split_proxy("http://us%40er:p%3Ass@proxy:3128")
    assert (proxy.host, proxy.port) == ("proxy", 3128)
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="
    assert _split_proxy("http://proxy:3128").authorization is None
    with pytest.raises(ConfigurationError):
        _split_proxy("socks5://proxy:1080")


def test_accept_context_reject_validation_and_repr() -> None:
    ctx = AcceptContext(
        id="1",
        address="wss://r/$hc/hc?sb-hc-action=accept&secret=s3cr3t",
        connect_headers={"sec-websocket-protocol": "a, b"},
        remote_endpoint=None,
        path="",
        query="",
    )
    assert "s3cr3t" not in repr(ctx)
    assert ctx.offered_subprotocols == ["a", "b"]
    with pytest.raises(ValueError):
        ctx.reject(200)
    with pytest.raises(ValueError):
        ctx.reject(400, "line\r\nbreak")
    assert ctx.rejection is None
    ctx.reject()
    assert ctx.rejection == (400, "Rejected by user code")


# -- connection strings ----------------------------------------------------------------------

CS = "Endpoint=sb://ns.example.net/;SharedAccessKeyName=rule;SharedAccessKey=k3y"


def test_listener_from_connection_string() -> None:
    listener = HybridConnectionListener.from_connection_string(CS + ";EntityPath=hc")
    assert listener.entity_path == "hc"
    assert "k3y" not in repr(listener)
    assert "ns.example.net" in repr(listener)
    other = HybridConnectionListener.from_connection_string(CS, "a/b", max_pending=2)
    assert other.entity_path == "a/b"


def test_client_from_connection_string() -> None:
    client = HybridConnectionClient.from_connection_string(CS, "hc")
    assert "k3y" not in repr(client)
    token = "SharedAccessSignature sr=http%3A%2F%2Fh%2Fhc&sig=AAAA&se=1&skn=k"
    HybridConnectionClient.from_connection_string(
        f"Endpoint=sb://ns/;SharedAccessSignature={token};EntityPath=hc"
    )


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        (CS, None),  # no entity anywhere
        (CS + ";EntityPath=hc", "other"),  # two different ones
        ("Endpoint=ftp://x/;EntityPath=hc", None),
        ("SharedAccessKeyName=rule;SharedAccessKey=k", "hc"),
    ],
)
def test_connection_string_errors(text: str, entity: str | None) -> None:
    with pytest.raises(ConfigurationError):
        HybridConnectionListener.from_connection_string(text, entity)
