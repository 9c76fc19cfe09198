"""Run by tests/management/test_azure_client_1x.py in a subprocess whose path holds
``azure-mgmt-relay`` 1.x (the ``RelayAPI`` client), which cannot be installed beside 2.x.

Usage: ``python azure_relay_1x_client.py BASE_URL CA_FILE TOKEN``; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from azure.core.credentials import AccessToken
from azure.mgmt.relay import RelayAPI
from azure.mgmt.relay import __version__ as client_version
from azure.mgmt.relay.models import (
    AuthorizationRule,
    HybridConnection,
    RegenerateAccessKeyParameters,
)


class SasCredential:
    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


def main() -> None:
    base_url, ca_file, token = sys.argv[1:4]
    client = RelayAPI(SasCredential(token), "sub", base_url=base_url, connection_verify=ca_file)
    rg, ns = "rg", "hybridrelay"
    created = client.hybrid_connections.create_or_update(
        rg, ns, "one-x", HybridConnection(user_metadata="from 1.x")
    )
    client.namespaces.create_or_update_authorization_rule(
        rg, ns, "edge-1x", AuthorizationRule(rights=["Listen", "Send"])
    )
    keys = client.namespaces.list_keys(rg, ns, "edge-1x")
    rotated = client.namespaces.regenerate_keys(
        rg, ns, "edge-1x", RegenerateAccessKeyParameters(key_type="SecondaryKey")
    )
    names = [hc.name for hc in client.hybrid_connections.list_by_namespace(rg, ns)]
    client.hybrid_connections.delete(rg, ns, "one-x")
    after = [hc.name for hc in client.hybrid_connections.list_by_namespace(rg, ns)]
    client.close()
    sys.stdout.write(
        json.dumps(
            {
                "version": client_version,
                "created": created.name,
                "metadata": created.user_metadata,
                "names": names,
                "after_delete": after,
                "primary_kept": rotated.primary_key == keys.primary_key,
                "secondary_changed": rotated.secondary_key != keys.secondary_key,
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
