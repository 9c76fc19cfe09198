"""The dashboard (docs/DASHBOARD.md): its routes with aiohttp's client, and the whole page in
a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``): sign in, a listener appears when an edge agent starts and goes offline
when it stops, a hybrid connection is created through the page, and a screenshot is saved
(``HYBRIDRELAY_UPDATE_SCREENSHOT=1`` writes it to docs/dashboard.png).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from hybridrelay.client import HybridConnectionClient, HybridConnectionListener
from hybridrelay.management.dashboard import COOKIE
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, RelayFactory

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def browser_session() -> aiohttp.ClientSession:
    # unsafe: keep cookies of an IP-address host (the relay is on 127.0.0.1), as browsers do.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def dashboard_url(relay: Relay) -> str:
    assert relay.server.management_url is not None
    return relay.server.management_url + "/dashboard"


async def sign_in(session: aiohttp.ClientSession, relay: Relay, key: str = ROOT_KEY) -> int:
    async with session.post(
        dashboard_url(relay) + "/login",
        data={"key_name": ROOT_KEY_NAME, "key": key},
        allow_redirects=False,
    ) as response:
        return response.status


async def csrf_of(session: aiohttp.ClientSession, relay: Relay) -> str:
    async with session.get(dashboard_url(relay)) as response:
        text = await response.text()
    marker = 'name="csrf-token" content="'
    assert marker in text
    return text.split(marker, 1)[1].split('"', 1)[0]


async def test_without_a_session_only_the_sign_in_page_answers(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay, browser_session() as session:
        async with session.get(dashboard_url(relay)) as response:
            assert response.status == 200
            page = await response.text()
            assert 'action="/dashboard/login"' in page and "csrf-token" not in page
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-store"
        async with session.get(dashboard_url(relay) + "/events") as response:
            assert response.status == 401
        async with session.post(
            dashboard_url(relay) + "/api/hybrid-connections", json={"name": "x"}
        ) as response:
            assert response.status == 401


async def test_a_wrong_key_is_refused_and_sign_ins_are_rate_limited(
    make_relay: RelayFactory,
) -> None:
    async with make_relay(management=True) as relay, browser_session() as session:
        statuses = [
            await sign_in(session, relay, key="wrong-key-0123456789abcdef") for _ in range(12)
        ]
        assert statuses[0] == 401 and statuses[-1] == 429
        assert COOKIE not in {c.key for c in session.cookie_jar}


async def test_the_session_cookie_and_csrf(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay, browser_session() as session:
        async with session.post(
            dashboard_url(relay) + "/login",
            data={"key_name": ROOT_KEY_NAME, "key": ROOT_KEY},
            allow_redirects=False,
        ) as response:
            assert response.status == 303
            cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
        assert ROOT_KEY not in cookie
        csrf = await csrf_of(session, relay)
        url = dashboard_url(relay) + "/api/hybrid-connections"
        async with session.post(url, json={"name": "no-csrf"}) as response:
            assert response.status == 403
        async with session.post(
            url, json={"name": "no-csrf"}, headers={"X-CSRF-Token": "forged"}
        ) as response:
            assert response.status == 403
        assert relay.server.store.get("no-csrf") is None
        async with session.post(
            url, json={"name": "with/csrf"}, headers={"X-CSRF-Token": csrf}
        ) as response:
            assert response.status == 201
        assert relay.server.store.get("with/csrf") is not None
        async with session.post(
            url, json={"name": "../bad"}, headers={"X-CSRF-Token": csrf}
        ) as response:
            assert response.status == 400
        # A sign-in posted from another site is refused.
        async with session.post(
            dashboard_url(relay) + "/login",
            data={"key_name": ROOT_KEY_NAME, "key": ROOT_KEY},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            allow_redirects=False,
        ) as response:
            assert response.status == 403
        # Signing out ends the session.
        async with session.post(
            dashboard_url(relay) + "/logout", headers={"X-CSRF-Token": csrf}
        ) as response:
            assert response.status == 200
        async with session.get(dashboard_url(relay) + "/events") as response:
            assert response.status == 401


async def test_the_event_stream_carries_snapshots(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay, browser_session() as session:
        assert await sign_in(session, relay) == 303
        async with session.get(dashboard_url(relay) + "/events") as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            line = await asyncio.wait_for(response.content.readline(), 10)
        assert line.startswith(b"data: {")
        assert b'"hybridConnections"' in line and b'"name":"hc"' in line


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("HYBRIDRELAY_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
async def test_the_dashboard_in_a_real_browser(make_relay: RelayFactory, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None, "HYBRIDRELAY_REQUIRE_BROWSER is set but chromium is missing"
    async with make_relay(management=True) as relay, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            await page.goto(dashboard_url(relay))
            await page.fill("#key", ROOT_KEY)
            await page.click("#sign-in")
            await expect(page.locator("#status")).to_contain_text("live", timeout=15_000)
            (cookie,) = [c for c in await context.cookies() if c["name"] == COOKIE]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            hc_row = page.locator('#hybrid-connections tr[data-name="hc"]')
            online = hc_row.locator(".badge.online")
            await expect(online).to_have_count(0)
            # An edge agent comes online: the page shows it, with where it connects from.
            listener = HybridConnectionListener.from_connection_string(
                relay.connection_string("hc")
            )
            await listener.open()
            await expect(online).to_have_count(1, timeout=15_000)
            await expect(online).to_contain_text("127.0.0.1")
            # Some traffic for the chart and the connections table.
            client = HybridConnectionClient.from_connection_string(relay.connection_string("hc"))
            stream = await client.create_connection()
            accepted = await listener.accept_connection()
            assert accepted is not None
            await stream.write(b"x" * 200_000)
            await expect(page.locator("#connections tbody tr td").first).to_contain_text(
                "-", timeout=15_000
            )
            await page.fill("#new-hc-name", "plant/line-1")
            await page.click("#create-hc-button")
            await expect(page.locator("#create-result")).to_contain_text("created plant/line-1")
            await expect(
                page.locator('#hybrid-connections tr[data-name="plant/line-1"]')
            ).to_have_count(1, timeout=15_000)
            assert relay.server.store.get("plant/line-1") is not None
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("HYBRIDRELAY_UPDATE_SCREENSHOT"):
                shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)
            await asyncio.gather(stream.aclose(), accepted.aclose())
            await client.aclose()
            # The agent stops: it leaves the online list and shows as offline.
            await listener.aclose()
            await expect(online).to_have_count(0, timeout=15_000)
            await expect(hc_row.locator(".badge.offline")).to_have_count(1, timeout=15_000)
            # A request without the page's CSRF token is refused, even with the cookie.
            answer = await context.request.post(
                dashboard_url(relay) + "/api/hybrid-connections", data={"name": "forged"}
            )
            assert answer.status == 403
        finally:
            await browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
