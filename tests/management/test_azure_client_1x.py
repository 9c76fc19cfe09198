"""The older ``azure-mgmt-relay`` 1.x client (``RelayAPI``) against a real relay over TLS.

1.x and 2.x cannot be installed side by side, so .ci/run installs 1.x into a directory of its
own (``pip install --target``) and names it in ``$HYBRIDRELAY_AZURE_MGMT_RELAY_1``; the client
runs in a subprocess with only that directory on its path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from hybridrelay.auth.sas import create_token
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, RelayFactory

pytestmark = pytest.mark.timeout(90)

CLIENT_1X = os.environ.get("HYBRIDRELAY_AZURE_MGMT_RELAY_1")
INSTALLED_1X = bool(CLIENT_1X) and Path(CLIENT_1X or ".", "azure", "mgmt", "relay").is_dir()
SCRIPT = Path(__file__).with_name("azure_relay_1x_client.py")


@pytest.mark.skipif(
    not CLIENT_1X, reason="set HYBRIDRELAY_AZURE_MGMT_RELAY_1 to a --target install of 1.x"
)
async def test_the_1x_client_creates_rotates_and_deletes(make_relay: RelayFactory) -> None:
    assert CLIENT_1X is not None and INSTALLED_1X, f"no azure-mgmt-relay 1.x in {CLIENT_1X}"
    async with make_relay(tls=True, management=True) as relay:
        assert relay.server.management_url is not None and relay.ca_file is not None
        token = create_token(
            "https://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
        )
        env = {**os.environ, "PYTHONPATH": CLIENT_1X}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-s",  # no user site: the 1.x directory alone provides azure.*
            str(SCRIPT),
            relay.server.management_url,
            relay.ca_file,
            token,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["version"].startswith("1.")
        assert result["created"] == "one-x" and result["metadata"] == "from 1.x"
        assert "one-x" in result["names"] and "one-x" not in result["after_delete"]
        assert result["primary_kept"] and result["secondary_changed"]
        assert relay.server.store.get("one-x") is None
