"""The address forms of ``store.cluster`` (store/redis_address.py): one server, Sentinel and Redis
Cluster; redis-py's own parser reads credentials and options; bad addresses are refused with a
message that names the fault and never the password."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from hybridrelay.store.redis_address import connect, parse_address, redacted_url
from tests.test_config_errors import one_line, run

SECRET = "s3cret-pw"


def test_one_server_is_redis_py_s_own_url() -> None:
    address = parse_address(f"redis://:{SECRET}@10.0.0.5:6380/2?socket_keepalive=yes")
    assert address.kind == "server"
    assert address.options["host"] == "10.0.0.5" and address.options["port"] == 6380
    assert address.options["db"] == 2 and address.options["password"] == SECRET
    assert address.options["socket_keepalive"] is True  # redis-py's typed query option
    assert SECRET not in repr(address) and SECRET not in address.redacted


def test_the_sentinel_form() -> None:
    address = parse_address(
        f"redis+sentinel://app:{SECRET}@s1:26379,s2,[::1]:26380/relaymaster/3"
        f"?sentinel_password=other-{SECRET}&socket_timeout=2"
    )
    assert address.kind == "sentinel"
    assert address.hosts == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert address.service == "relaymaster"
    assert address.options["db"] == 3
    assert address.options["username"] == "app" and address.options["password"] == SECRET
    assert address.options["socket_timeout"] == 2.0
    assert "host" not in address.options  # the master is whatever the sentinels say
    assert address.sentinel_options == {"password": f"other-{SECRET}"}
    assert SECRET not in repr(address) and SECRET not in address.redacted


def test_sentinel_over_tls_trusts_the_same_ca_for_sentinels_and_master() -> None:
    address = parse_address(
        f"rediss+sentinel://:{SECRET}@s1:26379/relaymaster?ssl_ca_certs=/etc/redis/ca.pem"
    )
    assert address.options["ssl_ca_certs"] == "/etc/redis/ca.pem"
    assert address.sentinel_options == {"ssl": True, "ssl_ca_certs": "/etc/redis/ca.pem"}
    assert "db" not in address.options or address.options["db"] == 0


def test_the_redis_cluster_form() -> None:
    address = parse_address(f"rediss+cluster://:{SECRET}@r1:7000,r2:7001?ssl_cert_reqs=none")
    assert address.kind == "cluster"
    assert address.hosts == (("r1", 7000), ("r2", 7001))
    assert address.options["password"] == SECRET
    assert address.options["ssl_cert_reqs"] == "none"


async def test_each_form_gets_the_client_that_fits_it() -> None:
    """No connection is made: the clients are only built."""
    for url, kind in (
        ("redis://127.0.0.1:1/0", aioredis.Redis),
        ("redis+sentinel://127.0.0.1:1/relaymaster", aioredis.Redis),
        ("redis+cluster://127.0.0.1:1", RedisCluster),
    ):
        link = connect(url)
        try:
            assert isinstance(link.client, kind), url
        finally:
            await link.aclose()


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("mongodb://h/0", "must be one of"),
        ("h:6379", "must be one of"),
        (f"redis+sentinel://:{SECRET}@/relaymaster", "at least one host:port"),
        (f"redis+sentinel://:{SECRET}@s1:26379", "/service or /service/db"),
        (f"redis+sentinel://:{SECRET}@s1:26379/a/1/x", "/service or /service/db"),
        (f"redis+sentinel://:{SECRET}@s1:99999/m", "is not host:port"),
        (f"redis+cluster://:{SECRET}@r1:7000/1", "one database"),
        (f"redis+cluster://:{SECRET}@r1:7000?sentinel_password=x", "redis+sentinel:// only"),
        (f"redis+sentinel://:{SECRET}@s1/m?socket_timeout=soon", "socket_timeout"),
    ],
    ids=[
        "scheme",
        "no-scheme",
        "no-host",
        "no-service",
        "long-path",
        "port",
        "cluster-db",
        "cluster-sentinel-option",
        "option-value",
    ],
)
def test_bad_addresses_are_refused_without_the_password(url: str, fault: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fault)) as caught:
        parse_address(url)
    assert SECRET not in str(caught.value)


def test_redacted_url_hides_every_password() -> None:
    url = f"redis+sentinel://app:{SECRET}@s1:26379/m?sentinel_password={SECRET}&db=1"
    assert redacted_url(url) == "redis+sentinel://app:***@s1:26379/m?sentinel_password=***&db=1"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("url", "fault"),
    [
        (f"redis+cluster://:{SECRET}@127.0.0.1:1/2", "a Redis Cluster has one database"),
        (f"redis+sentinel://:{SECRET}@127.0.0.1:1/relaymaster", "No master found"),
    ],
    ids=["bad", "unreachable"],
)
async def test_serve_names_the_fault_in_one_line(url: str, fault: str, tmp_path: Path) -> None:
    code, _, err = await run("serve", "--port", "0", "--data-dir", str(tmp_path), "--cluster", url)
    line = one_line(err)
    assert code != 0 and fault in line and SECRET not in err, err
