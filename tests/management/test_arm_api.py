"""Azure's management API (management/arm_api.py) driven by Microsoft's own Python client,
``azure-mgmt-relay`` from PyPI (2.x ``RelayAPIMgmtClient``; 1.x is checked where installed),
over TLS against a real aiohttp server on port 0 with a real SQLite store, and by raw httpx for
every refusal."""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.mgmt.relay import RelayAPIMgmtClient
from azure.mgmt.relay.models import (
    AuthorizationRule,
    AuthorizationRuleProperties,
    CheckNameAvailability,
    HybridConnection,
    HybridConnectionProperties,
    RegenerateAccessKeyParameters,
)

from hybridrelay.auth.sas import Rights, create_token
from hybridrelay.management.arm_api import ArmApi
from hybridrelay.store.layers import FileLayer
from hybridrelay.store.records import HybridConnectionRecord, RuleRecord
from hybridrelay.store.sqlite import SqliteStore
from tests.conftest import TlsFiles, eventually

pytestmark = pytest.mark.timeout(60)

ROOT = "RootManageSharedAccessKey"
ALL = Rights.LISTEN | Rights.SEND | Rights.MANAGE
SUB, RG, NS = "00000000-0000-0000-0000-000000000001", "rg", "contoso"
T = TypeVar("T")


class SasCredential:
    """A token credential whose access token is a SAS token (what the relay accepts)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


@dataclass
class Served:
    store: SqliteStore
    base_url: str
    root_key: str
    ca_file: str
    listeners: dict[str, int]
    clients: list[RelayAPIMgmtClient]

    def token(self, key_name: str = ROOT, key: str | None = None, path: str = "") -> str:
        return create_token(
            f"https://127.0.0.1/{path}",
            key_name,
            key or self.root_key,
            expiry=int(time.time()) + 600,
        )

    def client(self, token: str | None = None) -> RelayAPIMgmtClient:
        """A client, closed (with its pooled connections) when the server stops."""
        client = RelayAPIMgmtClient(
            SasCredential(token or self.token()),
            SUB,
            base_url=self.base_url,
            connection_verify=self.ca_file,
        )
        self.clients.append(client)
        return client


@asynccontextmanager
async def served(
    tmp_path: Path, tls_files: TlsFiles, file_layer: FileLayer | None = None
) -> AsyncIterator[Served]:
    store = await SqliteStore.open(tmp_path / "store.db", namespace=NS, initial_rules=[(ROOT, ALL)])
    listeners: dict[str, int] = {}

    async def listener_counts(names: Sequence[str]) -> dict[str, int]:
        return {name: listeners.get(name.lower(), 0) for name in names}

    api = ArmApi(
        store,
        file_layer or FileLayer(),
        listener_counts,
        "sb://127.0.0.1:9400/",
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    runner = web.AppRunner(api.application(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    (root,) = store.state.namespace.rules
    relay = Served(
        store, f"https://127.0.0.1:{port}", root.primary_key, tls_files.ca_file, listeners, []
    )
    try:
        yield relay
    finally:
        for client in relay.clients:
            await call(client.close)
        # The clients' sockets are closed; let the server see each close before it stops, so
        # no TLS shutdown is still under way when the test's event loop ends.
        server = runner.server
        assert server is not None
        await eventually(lambda: not server.connections)
        await runner.cleanup()
        await store.aclose()


def rights_rule(rights: list[str]) -> AuthorizationRule:
    return AuthorizationRule(properties=AuthorizationRuleProperties(rights=rights))


def props(resource: HybridConnection | AuthorizationRule) -> Any:
    """A resource's properties, which the 2.x models type as optional."""
    assert resource.properties is not None
    return resource.properties


def text(value: str | None) -> str:
    assert value is not None
    return value


async def call(function: Callable[[], T]) -> T:
    """The Azure client is synchronous (requests): run it off the event loop."""
    return await asyncio.wait_for(asyncio.to_thread(function), 30)


async def refusal(function: Callable[[], object]) -> tuple[int, str]:
    """Call the Azure client expecting an error: (status, message)."""

    def attempt() -> tuple[int, str] | None:
        try:
            function()
        except HttpResponseError as exc:
            return exc.status_code or 0, str(exc.message)
        return None

    outcome = await asyncio.wait_for(asyncio.to_thread(attempt), 30)
    # The error holds its connection in a reference cycle (exception, traceback, frames): the
    # socket closes only when the cycle is collected, so collect it now.
    gc.collect()
    assert outcome is not None, "the call succeeded"
    return outcome


async def test_hybrid_connections_and_rules_with_azure_mgmt_relay(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    async with served(tmp_path, tls_files) as relay:
        client = relay.client()
        hcs = client.hybrid_connections
        created = await call(
            lambda: hcs.create_or_update(
                RG,
                NS,
                "plant",
                HybridConnection(properties=HybridConnectionProperties(user_metadata="line 1")),
            )
        )
        assert created.name == "plant"
        assert props(created).requires_client_authorization is True
        assert props(created).user_metadata == "line 1"
        # A change takes effect in the store (the relay's source) as the call returns.
        assert relay.store.state.get("plant") is not None
        relay.listeners["plant"] = 2
        got = await call(lambda: hcs.get(RG, NS, "plant"))
        assert props(got).listener_count == 2
        updated = await call(
            lambda: hcs.create_or_update(
                RG,
                NS,
                "plant",
                HybridConnection(
                    properties=HybridConnectionProperties(requires_client_authorization=False)
                ),
            )
        )
        assert props(updated).requires_client_authorization is False
        assert props(updated).user_metadata == "line 1"
        assert props(updated).created_at == props(created).created_at
        await call(lambda: hcs.create_or_update(RG, NS, "team/a", HybridConnection()))
        names = await call(lambda: [hc.name for hc in hcs.list_by_namespace(RG, NS)])
        assert names == ["plant", "team/a"]

        rule = await call(
            lambda: hcs.create_or_update_authorization_rule(
                RG, NS, "plant", "edge", rights_rule(["Listen", "Send"])
            )
        )
        assert sorted(props(rule).rights) == ["Listen", "Send"]
        keys = await call(lambda: hcs.list_keys(RG, NS, "plant", "edge"))
        assert text(keys.primary_connection_string).endswith(";EntityPath=plant")
        assert text(keys.primary_key) in text(keys.primary_connection_string)
        rotated = await call(
            lambda: hcs.regenerate_keys(
                RG, NS, "plant", "edge", RegenerateAccessKeyParameters(key_type="SecondaryKey")
            )
        )
        assert rotated.primary_key == keys.primary_key
        assert rotated.secondary_key != keys.secondary_key
        rules = await call(lambda: [r.name for r in hcs.list_authorization_rules(RG, NS, "plant")])
        assert rules == ["edge"]
        await call(lambda: hcs.delete_authorization_rule(RG, NS, "plant", "edge"))
        await call(lambda: hcs.delete_authorization_rule(RG, NS, "plant", "edge"))  # 204
        await call(lambda: hcs.delete(RG, NS, "plant"))
        await call(lambda: hcs.delete(RG, NS, "plant"))  # absent: 204, no error
        assert (await refusal(lambda: hcs.get(RG, NS, "plant")))[0] == 404
        assert relay.store.state.get("plant") is None

        namespaces = client.namespaces
        ns_rule = await call(
            lambda: namespaces.create_or_update_authorization_rule(
                RG, NS, "ops", rights_rule(["Manage", "Listen", "Send"])
            )
        )
        assert sorted(props(ns_rule).rights) == ["Listen", "Manage", "Send"]
        ops_keys = await call(lambda: namespaces.list_keys(RG, NS, "ops"))
        assert "EntityPath" not in text(ops_keys.primary_connection_string)
        new = await call(
            lambda: namespaces.regenerate_keys(
                RG, NS, "ops", RegenerateAccessKeyParameters(key_type="PrimaryKey", key="k" * 44)
            )
        )
        assert new.primary_key == "k" * 44
        namespace = await call(lambda: namespaces.get(RG, NS))
        assert namespace.name == NS and namespace.provisioning_state == "Succeeded"
        available = await call(
            lambda: namespaces.check_name_availability(CheckNameAvailability(name=NS))
        )
        assert available.name_available is False


async def test_paging_follows_next_link(tmp_path: Path, tls_files: TlsFiles) -> None:
    async with served(tmp_path, tls_files) as relay:
        for index in range(105):
            await relay.store.put_hybrid_connection(f"hc-{index:03}")
        hcs = relay.client().hybrid_connections
        names = await call(lambda: [hc.name for hc in hcs.list_by_namespace(RG, NS)])
        assert names == [f"hc-{index:03}" for index in range(105)]


async def test_a_regenerated_key_refuses_old_tokens(tmp_path: Path, tls_files: TlsFiles) -> None:
    async with served(tmp_path, tls_files) as relay:
        old_token = relay.token()
        client = relay.client(old_token)
        await call(
            lambda: client.namespaces.regenerate_keys(
                RG, NS, ROOT, RegenerateAccessKeyParameters(key_type="PrimaryKey")
            )
        )
        assert (await refusal(lambda: client.namespaces.get(RG, NS)))[0] == 401
        (root,) = relay.store.state.namespace.rules
        fresh = relay.client(relay.token(key=root.primary_key))
        assert (await call(lambda: fresh.namespaces.get(RG, NS))).name == NS
        # The secondary key still signs (rotation: secondary first, then primary).
        secondary = relay.client(relay.token(key=root.secondary_key))
        assert (await call(lambda: secondary.namespaces.get(RG, NS))).name == NS


async def test_refusals(tmp_path: Path, tls_files: TlsFiles) -> None:
    async with served(tmp_path, tls_files) as relay:
        await relay.store.put_rule("sender", Rights.SEND)
        (sender,) = [r for r in relay.store.state.namespace.rules if r.name == "sender"]
        arm = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Relay/namespaces/{NS}"
        good = {"Authorization": f"Bearer {relay.token()}"}
        async with httpx.AsyncClient(
            base_url=relay.base_url, verify=ssl.create_default_context(cafile=relay.ca_file)
        ) as http:

            async def status(
                method: str, path: str, headers: dict[str, str], **kw: Any
            ) -> tuple[int, str]:
                response = await http.request(method, path, headers=headers, **kw)
                code = response.json()["error"]["code"] if response.content else ""
                return response.status_code, code

            version = "?api-version=2017-04-01"
            assert await status("GET", arm + version, {}) == (401, "AuthenticationFailed")
            bad = {"Authorization": "Bearer SharedAccessSignature sr=x&sig=y&se=1&skn=z"}
            assert await status("GET", arm + version, bad) == (401, "InvalidAuthenticationToken")
            send_only = {"Authorization": relay.token("sender", sender.primary_key)}
            assert await status("GET", arm + version, send_only) == (403, "AuthorizationFailed")
            entity_scoped = {"Authorization": f"Bearer {relay.token(path='plant')}"}
            assert await status("GET", arm + version, entity_scoped) == (403, "AuthorizationFailed")
            assert await status("GET", arm, good) == (400, "MissingApiVersionParameter")
            assert await status("POST", arm + version, good) == (405, "MethodNotAllowed")
            assert await status("GET", arm + "/queues" + version, good) == (404, "NotFound")
            other = arm.replace(NS, "fabrikam")
            assert await status("GET", other + version, good) == (404, "ResourceNotFound")
            assert await status("GET", other + "/hybridConnections" + version, good) == (
                404,
                "ParentResourceNotFound",
            )
            hc = arm + "/hybridConnections/a..b%2F..%2Fc" + version
            assert await status("PUT", hc, good, json={}) == (400, "BadRequest")
            hc = arm + "/hybridConnections/hc" + version
            assert await status("PUT", hc, good, content=b"{nope") == (
                400,
                "InvalidRequestContent",
            )
            huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
            assert (await status("PUT", hc, good, content=huge))[0] == 413
            rule = arm + "/hybridConnections/missing/authorizationRules/r" + version
            body = {"properties": {"rights": ["Send"]}}
            assert await status("PUT", rule, good, json=body) == (404, "ParentResourceNotFound")
            rule = arm + "/authorizationRules/r" + version
            assert await status("PUT", rule, good, json={"properties": {"rights": ["Manage"]}}) == (
                400,
                "BadRequest",
            )
            keys = arm + "/authorizationRules/nobody/listKeys" + version
            assert await status("POST", keys, good) == (404, "ResourceNotFound")
            assert await status("DELETE", arm + version, good) == (409, "Conflict")
            response = await http.get(
                arm + version, headers={**good, "x-ms-client-request-id": "c1"}
            )
            assert response.headers["x-ms-client-request-id"] == "c1"
            assert response.headers["x-ms-request-id"]
        client = relay.client().hybrid_connections
        refused = await refusal(
            lambda: client.create_or_update(RG, NS, "bad//name", HybridConnection())
        )
        assert refused[0] == 400


async def test_what_the_file_defines_is_read_only(tmp_path: Path, tls_files: TlsFiles) -> None:
    now = time.time()
    fixed = HybridConnectionRecord("fixed", True, now, now)
    file_rule = RuleRecord("file-rule", "p" * 44, "s" * 44, Rights.SEND, now, now)
    layer = FileLayer.of([file_rule], [fixed])
    async with served(tmp_path, tls_files, layer) as relay:
        client = relay.client()
        assert (await call(lambda: client.hybrid_connections.get(RG, NS, "fixed"))).name == "fixed"
        status, message = await refusal(
            lambda: client.hybrid_connections.create_or_update(RG, NS, "fixed", HybridConnection())
        )
        assert status == 400 and "configuration file" in message
        status, message = await refusal(
            lambda: client.namespaces.delete_authorization_rule(RG, NS, "file-rule")
        )
        assert status == 400 and "configuration file" in message
        rules = await call(
            lambda: [r.name for r in client.namespaces.list_authorization_rules(RG, NS)]
        )
        assert rules == ["file-rule", ROOT]


async def test_bounds_answer_409(tmp_path: Path, tls_files: TlsFiles) -> None:
    async with served(tmp_path, tls_files) as relay:
        rules = relay.client().namespaces
        for index in range(11):  # with the root rule, 12: Azure's bound
            await call(
                lambda index=index: rules.create_or_update_authorization_rule(  # type: ignore[misc]
                    RG, NS, f"rule-{index}", rights_rule(["Send"])
                )
            )
        status, message = await refusal(
            lambda: rules.create_or_update_authorization_rule(
                RG, NS, "one-too-many", rights_rule(["Send"])
            )
        )
        assert status == 409 and "12" in message
