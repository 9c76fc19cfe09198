"""``hybridrelay admin`` as real subprocesses against a real relay's management listener: the
relay runs in the test's event loop (``make_relay(management=True)``), or as a ``hybridrelay
serve`` subprocess for the embedded default."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hybridrelay import HybridConnectionClient, HybridConnectionListener
from hybridrelay.auth.sas import create_token
from hybridrelay.protocol.connection_string import ConnectionString
from tests.client.ws_peers import refused_port
from tests.conftest import (
    LISTEN_KEY,
    LISTEN_KEY_NAME,
    ROOT_KEY,
    ROOT_KEY_NAME,
    Relay,
    RelayFactory,
    eventually,
)
from tests.test_cli import CLI, stop

ADMIN_VARIABLES = (
    "HYBRIDRELAY_MANAGEMENT_URL",
    "HYBRIDRELAY_MANAGEMENT_TOKEN",
    "HYBRIDRELAY_CONNECTION_STRING",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the test's HYBRIDRELAY_DATA_DIR) without any admin
    variable the developer's shell may have set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ADMIN_VARIABLES}
    return {**env, **extra}


def root_token(ttl: int = 600) -> str:
    return create_token("http://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + ttl)


def relay_env(relay: Relay, token: str | None = None) -> dict[str, str]:
    assert relay.server.management_url is not None
    return clean_env(
        HYBRIDRELAY_MANAGEMENT_URL=relay.server.management_url,
        HYBRIDRELAY_MANAGEMENT_TOKEN=token or root_token(),
    )


async def admin(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "admin",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    # -x with a key warns (issue 15: ps shows it); the rest of stderr is what is checked.
    text = "".join(
        line
        for line in err.decode().splitlines(True)
        if "SharedAccessKey on the command line" not in line
    )
    return process.returncode, out.decode(), text


async def ok(env: dict[str, str], *args: str) -> str:
    code, out, err = await admin(env, *args)
    assert (code, err) == (0, ""), (args, code, err)
    return out


async def ok_json(env: dict[str, str], *args: str) -> object:
    return json.loads(await ok(env, *args, "--json"))


async def fails(env: dict[str, str], exit_code: int, *args: str) -> str:
    """The command exits with ``exit_code``, prints nothing on stdout and one line on stderr;
    that line."""
    code, out, err = await admin(env, *args)
    assert (code, out) == (exit_code, ""), (args, code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("hybridrelay admin: "), err
    return err


async def listeners_come_online(relay: Relay, *connection_strings: str) -> None:
    """Listeners with these connection strings (with EntityPath) all come online; they are
    closed together (each close may wait for the relay's answer)."""
    names = [ConnectionString.parse(text).entity_path or "" for text in connection_strings]
    listeners = [HybridConnectionListener.from_connection_string(t) for t in connection_strings]
    try:
        for listener in listeners:
            await listener.open()
        await eventually(lambda: all(relay.server.broker.listener_count(n) == 1 for n in names))
    finally:
        await asyncio.gather(*(listener.aclose() for listener in listeners))


def rows(table: str) -> list[list[str]]:
    """A table's lines split on its column gaps (three spaces or more)."""
    import re

    return [re.split(r" {3,}", line) for line in table.splitlines()]


@pytest.mark.timeout(60)
async def test_hybrid_connections(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = relay_env(relay)
        created = await ok(env, "hc", "create", "plant/line-1", "--metadata", "line one")
        assert created.startswith("created hybrid connection 'plant/line-1'")
        taken = await fails(env, 1, "hc", "create", "plant/line-1")
        assert "exists already" in taken

        table = rows(await ok(env, "hc", "list"))
        assert table[0] == ["NAME", "LISTENERS", "CLIENT AUTH", "CREATED"]
        assert table[1:] == [
            [name, "0", auth, created_at]
            for (name, _, auth, created_at) in table[1:]
            if name in ("a/b", "anon", "hc", "plant/line-1")
        ]
        assert {row[0]: row[2] for row in table[1:]} == {
            "a/b": "yes",
            "anon": "no",
            "hc": "yes",
            "plant/line-1": "yes",
        }
        # --json before the group or after the action: the API's objects, as a list.
        listed = await ok_json(env, "hc", "list")
        assert listed == json.loads(await ok(env, "--json", "hc", "list"))
        assert isinstance(listed, list)
        assert {hc["name"] for hc in listed} == {"a/b", "anon", "hc", "plant/line-1"}

        await ok(env, "hc", "update", "plant/line-1", "--no-client-authorization")
        shown = await ok_json(env, "hc", "show", "plant/line-1")
        assert isinstance(shown, dict)
        assert shown["properties"]["requiresClientAuthorization"] is False
        assert shown["properties"]["userMetadata"] == "line one"  # kept
        text = await ok(env, "hc", "show", "plant/line-1")
        assert ["client authorization", "no"] in rows(text)
        assert ["metadata", "line one"] in rows(text)

        assert "404 ResourceNotFound" in await fails(
            env, 1, "hc", "update", "nope", "--metadata", "x"
        )
        assert "nothing to change" in await fails(env, 2, "hc", "update", "plant/line-1")
        # A hybrid connection of the configuration file is read-only through the API.
        assert "400 ReadOnlyResource" in await fails(
            env, 1, "hc", "update", "hc", "--metadata", "x"
        )

        assert await ok(env, "hc", "delete", "plant/line-1") == (
            "deleted hybrid connection 'plant/line-1'\n"
        )
        assert relay.server.store.get("plant/line-1") is None
        assert await ok_json(env, "hc", "delete", "plant/line-1") == {"deleted": False}
        missing = await fails(env, 1, "hc", "show", "plant/line-1")
        assert (
            missing
            == "hybridrelay admin: 404 ResourceNotFound: No hybrid connection 'plant/line-1'.\n"
        )


@pytest.mark.timeout(60)
async def test_rules_at_both_levels(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = relay_env(relay)
        # Rules of a hybrid connection the API made (the file's are read-only).
        await ok(env, "hc", "create", "plant/line-1")
        assert "created rule 'edge' (Listen, Send) of the namespace" in await ok(
            env, "rules", "create", "edge", "--rights", "Listen,Send"
        )
        assert "exists already" in await fails(
            env, 1, "rules", "create", "edge", "--rights", "Send"
        )
        await ok(env, "rules", "create", "plc", "--rights", "send", "--hc", "plant/line-1")
        namespace_rules = rows(await ok(env, "rules", "list"))
        assert namespace_rules[0] == ["NAME", "RIGHTS"]
        assert [ROOT_KEY_NAME, "Listen, Send, Manage"] in namespace_rules
        assert ["edge", "Listen, Send"] in namespace_rules
        entity_rules = await ok_json(env, "rules", "list", "--hc", "plant/line-1")
        assert isinstance(entity_rules, list)
        assert [(r["name"], r["properties"]["rights"]) for r in entity_rules] == [("plc", ["Send"])]
        await ok(env, "rules", "update", "plc", "--rights", "Listen,Send", "--hc", "plant/line-1")
        entity_rules = await ok_json(env, "rules", "list", "--hc", "plant/line-1")
        assert isinstance(entity_rules, list)
        assert entity_rules[0]["properties"]["rights"] == ["Listen", "Send"]
        assert "--rights" in await fails(env, 2, "rules", "create", "x", "--rights", "Listen,Fly")
        manage_alone = await fails(env, 1, "rules", "create", "m", "--rights", "Manage")
        assert "400 BadRequest" in manage_alone and "requires 'Listen' and 'Send'" in manage_alone
        assert "404" in await fails(env, 1, "rules", "update", "nope", "--rights", "Send")

        assert "deleted rule 'plc' of hybrid connection 'plant/line-1'" in await ok(
            env, "rules", "delete", "plc", "--hc", "plant/line-1"
        )
        assert await ok_json(env, "rules", "list", "--hc", "plant/line-1") == []
        assert await ok(env, "rules", "list", "--hc", "plant/line-1") == "NAME   RIGHTS\n"
        await ok(env, "rules", "delete", "edge")
        assert "edge" not in await ok(env, "rules", "list")
        assert "no rule 'edge'" in await ok(env, "rules", "delete", "edge")


@pytest.mark.timeout(60)
async def test_keys_regenerate_and_connection_strings(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = relay_env(relay)
        await ok(env, "hc", "create", "plant/line-1")
        await ok(env, "rules", "create", "edge", "--rights", "Listen,Send")
        await ok(env, "rules", "create", "plc", "--rights", "Listen", "--hc", "plant/line-1")
        # Keys: each regeneration changes that key only, and prints no key.
        before = await ok_json(env, "keys", "show", "edge")
        assert isinstance(before, dict)
        text = await ok(env, "keys", "regenerate", "edge", "secondary")
        assert "regenerated the secondary key of rule 'edge'" in text
        middle = await ok_json(env, "keys", "show", "edge")
        assert isinstance(middle, dict)
        assert middle["secondaryKey"] != before["secondaryKey"]
        assert middle["primaryKey"] == before["primaryKey"]
        regenerated = await ok_json(env, "keys", "regenerate", "edge", "primary")
        assert regenerated == {"keyName": "edge", "regenerated": "PrimaryKey"}
        after = await ok_json(env, "keys", "show", "edge")
        assert isinstance(after, dict)
        assert after["primaryKey"] != middle["primaryKey"]
        assert after["secondaryKey"] == middle["secondaryKey"]
        for key in (before["primaryKey"], middle["primaryKey"], after["primaryKey"]):
            assert key not in text and key not in json.dumps(regenerated)
        shown = rows(await ok(env, "keys", "show", "edge"))
        assert ["primary key", after["primaryKey"]] in shown
        assert ["secondary connection string", after["secondaryConnectionString"]] in shown
        # A rule of the configuration file cannot be changed through the API.
        assert "400 ReadOnlyResource" in await fails(
            env, 1, "keys", "regenerate", ROOT_KEY_NAME, "primary"
        )

        # Connection strings parse and work: listeners come online with them.
        primary = (await ok(env, "keys", "connection-string", "edge")).strip()
        parsed = ConnectionString.parse(primary)
        assert (parsed.key_name, parsed.key) == ("edge", after["primaryKey"])
        secondary = await ok_json(env, "keys", "connection-string", "edge", "--secondary")
        assert secondary == {"connectionString": after["secondaryConnectionString"]}
        entity = (await ok(env, "keys", "connection-string", "plc", "--hc", "plant/line-1")).strip()
        assert ConnectionString.parse(entity).entity_path == "plant/line-1"
        await listeners_come_online(relay, primary + ";EntityPath=hc", entity)


@pytest.mark.timeout(60)
async def test_listeners_and_connections(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        env = relay_env(relay)
        assert await ok_json(env, "listeners", "list") == []
        assert await ok(env, "connections", "list") == (
            "TRACKING ID   HYBRID CONNECTION   KIND   SENDER   LISTENER   SINCE   TO LISTENER"
            "   TO SENDER\n"
        )
        listener = HybridConnectionListener.from_connection_string(relay.connection_string("hc"))
        client = HybridConnectionClient.from_connection_string(relay.connection_string("hc"))
        async with listener:
            await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
            listed = await ok_json(env, "listeners", "list", "--hc", "hc")
            assert isinstance(listed, list) and len(listed) == 1
            assert listed[0]["hybridConnection"] == "hc"
            assert listed[0]["remoteAddress"] == "127.0.0.1"
            table = rows(await ok(env, "listeners", "list"))
            assert table[0] == [
                "ID",
                "HYBRID CONNECTION",
                "REMOTE ADDRESS",
                "CONNECTED",
                "TOKEN EXPIRES",
            ]
            assert [row[:3] for row in table[1:]] == [[listed[0]["id"], "hc", "127.0.0.1"]]
            assert await ok_json(env, "listeners", "list", "--hc", "anon") == []
            hc_rows = rows(await ok(env, "hc", "list"))
            assert ["hc", "1"] == next(row for row in hc_rows if row[0] == "hc")[:2]

            # A relayed connection is listed, then closed.
            stream = await client.create_connection()
            accepted = await listener.accept_connection()
            assert accepted is not None
            await stream.write(b"ping")
            assert await accepted.read() == b"ping"
            connections = await ok_json(env, "connections", "list", "--hc", "hc")
            assert isinstance(connections, list) and len(connections) == 1
            assert connections[0]["kind"] == "websocket"
            tracking_id = connections[0]["trackingId"]
            table = rows(await ok(env, "connections", "list"))
            assert table[1][:3] == [tracking_id, "hc", "websocket"]
            assert await ok_json(env, "connections", "close", tracking_id) == {"closed": 1}
            assert await stream.read() == b""  # the relay closed both legs
            await asyncio.gather(stream.aclose(), accepted.aclose())
            assert "404 NotFound" in await fails(env, 1, "connections", "close", tracking_id)
            assert await ok(env, "connections", "close", "--hc", "hc") == "closed 0 connections\n"

            # Closing the listener: its control channel goes (the SDK reconnects, on a new
            # channel with the same listener id).
            before = set(map(id, relay.server.broker.channels()))
            assert await ok(env, "listeners", "close", listed[0]["id"]) == "closed 1 listener\n"
            await eventually(lambda: not before & set(map(id, relay.server.broker.channels())))
            assert "404 NotFound" in await fails(env, 1, "listeners", "close", "no-such-id")
            closed = await ok_json(env, "listeners", "close", "--hc", "hc")
            assert isinstance(closed, dict) and closed["closed"] in (0, 1)
        await client.aclose()
        assert "name one ID" in await fails(env, 2, "listeners", "close")
        assert "not both" in await fails(env, 2, "connections", "close", "x", "--hc", "hc")


@pytest.mark.timeout(60)
async def test_credentials_and_exit_codes(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        url = relay.server.management_url
        assert url is not None
        # A connection string's key signs the token (-x, or the variable).
        root = relay.connection_string()
        assert "hc" in await ok(clean_env(), "--url", url, "-x", root, "hc", "list")
        assert "hc" in await ok(
            clean_env(HYBRIDRELAY_CONNECTION_STRING=root), "--url", url, "hc", "ls"
        )
        # Wrong token: 401, one line, naming where the credential came from, not the token.
        wrong = create_token(
            "http://127.0.0.1/", ROOT_KEY_NAME, "not-the-key", expiry=int(time.time()) + 600
        )
        err = await fails(relay_env(relay, token=wrong), 1, "hc", "list")
        assert err.startswith("hybridrelay admin: 401 InvalidAuthenticationToken: ")
        assert "$HYBRIDRELAY_MANAGEMENT_TOKEN" in err and wrong not in err
        assert "401" in await fails(
            clean_env(), 1, "--url", url, "--token", "garbage", "hc", "list"
        )
        # A rule without Manage: 403.
        listen = relay.connection_string(key_name=LISTEN_KEY_NAME, key=LISTEN_KEY)
        assert "403 AuthorizationFailed" in await fails(
            clean_env(), 1, "--url", url, "-x", listen, "hc", "list"
        )

        # Usage and configuration errors: 2, the line names what to set.
        err = await fails(clean_env(), 2, "hc", "list")  # no URL, no embedded relay here
        assert "--url" in err and "$HYBRIDRELAY_MANAGEMENT_URL" in err
        err = await fails(clean_env(), 2, "--url", url, "hc", "list")  # no credential
        assert "--token" in err and "$HYBRIDRELAY_MANAGEMENT_TOKEN" in err and "-x" in err
        assert "not an http(s)" in await fails(
            clean_env(), 2, "--url", "ftp://x", "--token", "t", "hc", "list"
        )
        assert "required: NAME" in await fails(relay_env(relay), 2, "hc", "create")
        assert "invalid choice" in await fails(
            relay_env(relay), 2, "keys", "regenerate", "r", "third"
        )
        assert "SharedAccessKey" in await fails(
            clean_env(), 2, "--url", url, "-x", "Endpoint=sb://h/", "hc", "list"
        )
        assert "--ca-file" in await fails(
            relay_env(relay), 2, "--ca-file", "/nonexistent.pem", "hc", "list"
        )

    # The relay cannot be reached: 3, the line names the URL and the cause.
    with refused_port() as port:
        unreachable = clean_env(
            HYBRIDRELAY_MANAGEMENT_URL=f"http://127.0.0.1:{port}",
            HYBRIDRELAY_MANAGEMENT_TOKEN=root_token(),
        )
        err = await fails(unreachable, 3, "hc", "list")
        assert f"cannot reach http://127.0.0.1:{port}: connection refused" in err


@pytest.mark.timeout(60)
async def test_usage_errors_are_one_line_before_any_url_or_credential() -> None:
    """Unknown arguments anywhere under ``admin`` and the checks that need no relay exit 2 with
    one line, even with no URL or credential configured (those errors would come later)."""
    cases = {
        ("--bogus", "hc", "list"): "hybridrelay admin: unrecognized arguments: --bogus",
        ("hc", "list", "--bogus"): "hybridrelay admin: hc list: unrecognized arguments: --bogus",
        ("hc", "show", "a", "b"): "hybridrelay admin: hc show: unrecognized arguments: b",
        ("hc", "nope"): "hybridrelay admin: hc: argument ACTION: invalid choice: 'nope'",
        ("listeners", "close"): "hybridrelay admin: listeners close: name one ID, or give --hc",
        ("connections", "close", "t", "--hc", "h"): "hybridrelay admin: connections close:",
        ("hc", "update", "x"): "hybridrelay admin: hc update: nothing to change",
        ("rules", "create", "r", "--rights", "Foo"): "hybridrelay admin: --rights 'Foo'",
        (): "hybridrelay admin: name a group and an action",
    }
    errors = await asyncio.gather(*(fails(clean_env(), 2, *args) for args in cases))
    for (args, expected), err in zip(cases.items(), errors, strict=True):
        assert err.startswith(expected), (args, err)


@pytest.mark.timeout(60)
async def test_a_relay_that_does_not_answer_times_out() -> None:
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        env = clean_env(HYBRIDRELAY_MANAGEMENT_TOKEN=root_token())
        err = await fails(
            env, 3, "--url", f"http://127.0.0.1:{port}", "--timeout", "0.5", "hc", "list"
        )
        assert f"cannot reach http://127.0.0.1:{port}: no answer within 0.5 s" in err
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(60)
async def test_https_is_verified(make_relay: RelayFactory) -> None:
    async with make_relay(tls=True, management=True) as relay:
        url = relay.server.management_url
        assert url is not None and url.startswith("https://") and relay.ca_file is not None
        env = relay_env(relay)
        err = await fails(env, 3, "hc", "list")
        assert f"cannot reach {url}: TLS: the certificate is not trusted" in err
        assert "--ca-file" in err
        assert "hc" in await ok(env, "--ca-file", relay.ca_file, "hc", "list")


@asynccontextmanager
async def embedded_relay(env: dict[str, str]) -> AsyncIterator[str]:
    """``hybridrelay serve`` (the embedded default) in a subprocess; its management URL once it
    wrote its endpoint file (the line after the file is written)."""
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    management = ""
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "serve exited before it was ready"
                if line.startswith("management "):
                    management = line.split(" on ", 1)[1].split(";", 1)[0]
                if line.startswith("Embedded default"):
                    break
        assert management.startswith("http://127.0.0.1:")
        yield management
    finally:
        assert await stop(process) == 0


@pytest.mark.timeout(60)
async def test_the_embedded_default_needs_no_flags(private_data_dir: Path) -> None:
    env = clean_env()
    assert env["HYBRIDRELAY_DATA_DIR"] == str(private_data_dir)
    async with embedded_relay(env) as management:
        created = await ok(env, "hc", "create", "made-by-admin")
        assert "made-by-admin" in created
        assert rows(await ok(env, "hc", "list"))[1][:3] == ["made-by-admin", "0", "yes"]
        # The same with the URL named: the data directory's key still signs.
        assert await ok_json(env, "--url", management, "rules", "list") != []
        # Rotate the root rule's keys, secondary first: admin keeps working (it signs with the
        # key the store holds now), and connection-string prints the new key.
        before = await ok_json(env, "keys", "show", "RootManageSharedAccessKey")
        assert isinstance(before, dict)
        await ok(env, "keys", "regenerate", "RootManageSharedAccessKey", "secondary")
        await ok(env, "keys", "regenerate", "RootManageSharedAccessKey", "primary")
        after = await ok_json(env, "keys", "show", "RootManageSharedAccessKey")
        assert isinstance(after, dict)
        assert after["primaryKey"] != before["primaryKey"]
        assert after["secondaryKey"] != before["secondaryKey"]
        process = await asyncio.create_subprocess_exec(
            *CLI, "connection-string", stdout=asyncio.subprocess.PIPE, env=env
        )
        out, _ = await process.communicate()
        assert ConnectionString.parse(out.decode().strip()).key == after["primaryKey"]
        # Another relay's URL without a credential is not signed with this machine's key.
        with refused_port() as port:
            err = await fails(env, 2, "--url", f"http://127.0.0.1:{port}", "hc", "list")
            assert "no credential" in err
