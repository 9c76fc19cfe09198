"""Microsoft's ``azure-mgmt-relay`` (2.x ``RelayAPIMgmtClient``) against a real relay over
TLS: what it creates, rotates and deletes takes effect on the relay's live listeners.
"""

from __future__ import annotations

import time

import pytest
from azure.mgmt.relay import RelayAPIMgmtClient
from azure.mgmt.relay.models import (
    AuthorizationRule,
    AuthorizationRuleProperties,
    HybridConnection,
    RegenerateAccessKeyParameters,
)

from hybridrelay.auth.sas import create_token
from hybridrelay.client import HybridConnectionListener, SharedAccessKeyTokenProvider
from hybridrelay.exceptions import RelayError
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, RelayFactory, eventually
from tests.management.test_arm_api import SasCredential, call

pytestmark = pytest.mark.timeout(90)

SUB, RG, NS = "00000000-0000-0000-0000-000000000001", "rg", "hybridrelay"


async def test_the_azure_client_drives_a_live_relay(make_relay: RelayFactory) -> None:
    async with make_relay(tls=True, management=True) as relay:
        assert relay.server.management_url is not None
        assert relay.server.management_url.startswith("https://")
        token = create_token(
            "https://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
        )
        client = RelayAPIMgmtClient(
            SasCredential(token),
            SUB,
            base_url=relay.server.management_url,
            connection_verify=relay.ca_file,
        )
        try:
            hcs = client.hybrid_connections
            await call(lambda: hcs.create_or_update(RG, NS, "site-7", HybridConnection()))
            await call(
                lambda: client.namespaces.create_or_update_authorization_rule(
                    RG,
                    NS,
                    "edge",
                    AuthorizationRule(
                        properties=AuthorizationRuleProperties(rights=["Listen", "Send"])
                    ),
                )
            )
            keys = await call(lambda: client.namespaces.list_keys(RG, NS, "edge"))
            assert keys.primary_connection_string is not None
            # The key listKeys gives opens a listener on the new entity at once.
            listener = HybridConnectionListener(
                relay.base_url,
                "site-7",
                SharedAccessKeyTokenProvider("edge", keys.primary_key or ""),
                ca_file=relay.ca_file,
            )
            async with listener:
                await eventually(lambda: relay.server.broker.listener_count("site-7") == 1)
                got = await call(lambda: hcs.get(RG, NS, "site-7"))
                assert got.properties is not None and got.properties.listener_count == 1
                # Regenerating the primary key refuses a new listener signed with the old one.
                rotated = await call(
                    lambda: client.namespaces.regenerate_keys(
                        RG, NS, "edge", RegenerateAccessKeyParameters(key_type="PrimaryKey")
                    )
                )
                assert rotated.primary_key != keys.primary_key
                stale = HybridConnectionListener(
                    relay.base_url,
                    "site-7",
                    SharedAccessKeyTokenProvider("edge", keys.primary_key or ""),
                    ca_file=relay.ca_file,
                )
                with pytest.raises(RelayError):
                    await stale.open()
                await stale.aclose()
                # Deleting the entity closes its listener.
                await call(lambda: hcs.delete(RG, NS, "site-7"))
                await eventually(lambda: relay.server.broker.listener_count("site-7") == 0)
                assert relay.server.store.get("site-7") is None
        finally:
            await call(client.close)
