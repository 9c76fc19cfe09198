"""A real browser through the relay (issue 14): headless Chromium (Debian's ``chromium``,
driven by Playwright as tests/management/test_dashboard.py does) loads a page of the Starlette
app through the relay's HTTP endpoint, behind ``serve-app`` and behind ``bridge -H``; the page
opens a WebSocket (``/hc/ws``, subprotocol ``echo.v1``) and an ``EventSource``
(``/hc/forever``) to the same app, and messages flow on both.

The browser authenticates the way a browser can: the ``sb-hc-token`` cookie (PROTOCOL.md
3.4), set once for the relay's origin; the page, the WebSocket and the EventSource all carry it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.management.test_dashboard import CHROMIUM
from tests.webapps.harness import ENTITY
from tests.webapps.test_webapps import TOPOLOGIES, web_app

#: Playwright's waits, ms.
WAIT_MS = 15_000


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("HYBRIDRELAY_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
async def test_a_browser_page_with_a_websocket_and_an_event_source(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None, "HYBRIDRELAY_REQUIRE_BROWSER is set but chromium is missing"
    async with async_playwright() as playwright:
        # One browser for both topologies (its start is most of this test's time).
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            for topology in TOPOLOGIES:
                directory = tmp_path / topology
                directory.mkdir()
                async with web_app(directory, topology) as (relay, _, _http):
                    context = await browser.new_context()
                    await context.add_cookies(
                        [
                            {
                                "name": "sb-hc-token",
                                "value": quote(relay.token(), safe=""),
                                "url": relay.http_url,
                            }
                        ]
                    )
                    page = await context.new_page()
                    response = await page.goto(f"{relay.http_url}/{ENTITY}/page")
                    assert response is not None and response.status == 200, topology
                    for n in (1, 2, 3):
                        await expect(page.locator("#ws")).to_contain_text(
                            f"browser says {n}", timeout=WAIT_MS
                        )
                    await expect(page.locator("#sse")).to_contain_text("tick 3", timeout=WAIT_MS)
                    assert await page.evaluate("window.protocolChosen()") == "echo.v1"
                    assert "error" not in await page.locator("#ws").inner_text()
                    await context.close()
        finally:
            await browser.close()
