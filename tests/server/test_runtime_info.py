"""E7: runtime information, as .NET's GetRuntimeInformationAsync asks for it (PROTOCOL.md 8.2)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import httpx

from tests.conftest import SEND_KEY, SEND_KEY_NAME, Relay
from tests.server.test_relay_websocket import open_listener, session

SB = "{http://schemas.microsoft.com/netservices/2010/10/servicebus/connect}"
ATOM = "{http://www.w3.org/2005/Atom}"
MARKERS = {"X-PROCESS-AT": "ServiceBus"}


async def test_runtime_information_reports_listeners(relay: Relay) -> None:
    url = relay.http_url + "/hc?api-version=2016-07"
    async with session() as s, httpx.AsyncClient(timeout=10) as http:
        auth = {"Authorization": relay.token("hc", SEND_KEY_NAME, SEND_KEY), **MARKERS}
        response = await http.get(url, headers=auth)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/atom+xml")
        entry = ET.fromstring(response.content)
        assert entry.tag == ATOM + "entry"
        description = entry.find(f"{ATOM}content/{SB}HybridConnectionDescription")
        assert description is not None
        assert [child.tag.removeprefix(SB) for child in description] == [
            "CreatedAt",
            "UpdatedAt",
            "RequiresClientAuthorization",
            "UserMetadata",
            "ListenerCount",
        ]
        assert description.findtext(f"{SB}ListenerCount") == "0"
        control = await open_listener(s, relay)
        response = await http.get(url, headers=auth)
        description = ET.fromstring(response.content).find(
            f"{ATOM}content/{SB}HybridConnectionDescription"
        )
        assert description is not None
        assert description.findtext(f"{SB}ListenerCount") == "1"
        assert description.findtext(f"{SB}RequiresClientAuthorization") == "true"
        await control.close()


async def test_runtime_information_errors_and_unknown_paths(relay: Relay) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        url = relay.http_url + "/hc?api-version=2016-07"
        refused = await http.get(url, headers=MARKERS)
        assert refused.status_code == 401
        error = ET.fromstring(refused.content)
        assert error.findtext("Code") == "401" and "TrackingId:" in (error.findtext("Detail") or "")
        # An unknown path: an empty Atom feed (how Azure says "not found"), but only to a caller
        # holding a valid namespace token.
        unknown = relay.http_url + "/nope?api-version=2016-07"
        assert (await http.get(unknown, headers=MARKERS)).status_code == 401
        feed = await http.get(unknown, headers={"Authorization": relay.token("nope"), **MARKERS})
        assert feed.status_code == 200 and ET.fromstring(feed.content).tag == ATOM + "feed"
        # Without X-PROCESS-AT it is an ordinary relayed HTTP request (no listener here: 502).
        relayed = await http.get(url, headers={"Authorization": relay.token("hc")})
        assert relayed.status_code == 502
