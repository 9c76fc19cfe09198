"""``hybridrelay admin`` as real subprocesses against a real relay's management listener."""

from __future__ import annotations

import json
import os
import time

import pytest

from hybridrelay.auth.sas import create_token
from hybridrelay.client import HybridConnectionListener
from hybridrelay.protocol.connection_string import ConnectionString
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, RelayFactory, eventually
from tests.test_cli import run, start_serve, stop

pytestmark = pytest.mark.timeout(90)


def admin_env(relay: Relay, token: str | None = None) -> dict[str, str]:
    assert relay.server.management_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDRELAY_MANAGEMENT")}
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    env["HYBRIDRELAY_MANAGEMENT_URL"] = relay.server.management_url
    env["HYBRIDRELAY_MANAGEMENT_TOKEN"] = token or create_token(
        "http://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
    )
    return env


async def admin(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await run("admin", *args, env=env)


async def ok(env: dict[str, str], *args: str) -> str:
    code, out, err = await admin(env, *args)
    assert code == 0, err
    return out


async def test_hybrid_connections_rules_and_keys(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = admin_env(relay)
        created = await ok(env, "hc", "create", "plant/line-1", "--metadata", "line one")
        assert "plant/line-1" in created
        table = await ok(env, "hc", "list")
        assert table.splitlines()[0].split()[:2] == ["NAME", "LISTENERS"]
        assert any(line.startswith("plant/line-1") for line in table.splitlines())
        listed = json.loads(await ok(env, "--json", "hc", "list"))
        assert {hc["name"] for hc in listed} >= {"plant/line-1", "hc"}
        await ok(env, "hc", "update", "plant/line-1", "--no-client-authorization")
        shown = json.loads(await ok(env, "--json", "hc", "show", "plant/line-1"))
        assert shown["properties"]["requiresClientAuthorization"] is False
        assert shown["properties"]["userMetadata"] == "line one"
        code, _, err = await admin(env, "hc", "update", "missing")
        assert code == 1 and err.count("\n") == 1 and "404" in err

        # Rules at both levels.
        await ok(env, "rules", "create", "edge", "--rights", "Listen,Send")
        await ok(env, "rules", "create", "plc", "--rights", "send", "--hc", "plant/line-1")
        assert "edge" in await ok(env, "rules", "list")
        entity_rules = json.loads(await ok(env, "--json", "rules", "list", "--hc", "plant/line-1"))
        assert [(r["name"], r["properties"]["rights"]) for r in entity_rules] == [("plc", ["Send"])]
        await ok(env, "rules", "delete", "plc", "--hc", "plant/line-1")
        assert json.loads(await ok(env, "--json", "rules", "list", "--hc", "plant/line-1")) == []

        # Keys: regenerate changes one key; the connection string works.
        before = json.loads(await ok(env, "--json", "keys", "show", "edge"))
        after = json.loads(await ok(env, "--json", "keys", "regenerate", "edge", "primary"))
        assert after["primaryKey"] != before["primaryKey"]
        assert after["secondaryKey"] == before["secondaryKey"]
        text = (await ok(env, "keys", "connection-string", "edge")).strip()
        parsed = ConnectionString.parse(text)
        assert parsed.key == after["primaryKey"] and parsed.key_name == "edge"
        listener = HybridConnectionListener.from_connection_string(text + ";EntityPath=hc")
        async with listener:
            await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
        await ok(env, "hc", "delete", "plant/line-1")
        assert relay.server.store.get("plant/line-1") is None


async def test_listeners_and_connections(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = admin_env(relay)
        listener = HybridConnectionListener.from_connection_string(relay.connection_string("hc"))
        async with listener:
            await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
            listed = json.loads(await ok(env, "--json", "listeners", "list", "--hc", "hc"))
            assert len(listed) == 1 and listed[0]["remoteAddress"] == "127.0.0.1"
            assert "127.0.0.1" in await ok(env, "listeners", "list")
            closed = json.loads(await ok(env, "--json", "listeners", "close", listed[0]["id"]))
            assert closed == {"closed": 1}
            assert json.loads(await ok(env, "--json", "connections", "list")) == []
            assert "closed" in await ok(env, "connections", "close", "--hc", "hc")
            code, _, err = await admin(env, "listeners", "close")
            assert code == 2 and "an id or --hc" in err


async def test_exit_codes_and_one_line_errors(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        bad = admin_env(relay, token="SharedAccessSignature sr=x&sig=y&se=9999999999&skn=z")
        code, out, err = await admin(bad, "hc", "list")
        assert code == 1 and out == "" and err.count("\n") == 1 and "401" in err
        unreachable = {**admin_env(relay), "HYBRIDRELAY_MANAGEMENT_URL": "http://127.0.0.1:1"}
        code, _, err = await admin(unreachable, "hc", "list")
        assert code == 3 and "cannot reach the relay at http://127.0.0.1:1" in err
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDRELAY_MANAGEMENT")}
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    code, _, err = await admin(env, "hc", "list")  # no relay given, no embedded relay here
    assert code == 2 and "HYBRIDRELAY_MANAGEMENT_URL" in err and err.count("\n") == 1


async def test_the_embedded_default_needs_no_flags() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDRELAY_MANAGEMENT")}
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    process, _ = await start_serve(env=env)
    try:
        await ok(env, "hc", "create", "made-by-admin")
        assert "made-by-admin" in await ok(env, "hc", "list")
        # The root key the store holds now is what connection-string prints.
        keys = json.loads(
            await ok(env, "--json", "keys", "regenerate", "RootManageSharedAccessKey", "primary")
        )
        code, out, _ = await run("connection-string", env=env)
        assert code == 0 and keys["primaryKey"] in out
    finally:
        assert await stop(process) == 0
