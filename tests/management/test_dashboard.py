"""The dashboard (docs/DASHBOARD.md): its routes with aiohttp's client, and the whole page in
a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``): sign in, a listener appears when an edge agent starts and goes offline
when it stops, a hybrid connection is created through the page, and a screenshot is saved
(``HYBRIDRELAY_UPDATE_SCREENSHOT=1`` writes it to docs/dashboard.png).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hybridrelay.auth.sas import Rights, create_token
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
)
from hybridrelay.exceptions import AuthorizationError
from hybridrelay.management import dashboard as dashboard_module
from hybridrelay.management.dashboard import COOKIE, SESSION_IDLE, Dashboard
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


def fake_clock(start: float) -> tuple[list[float], Callable[[], float]]:
    now = [start]
    return now, lambda: now[0]


@asynccontextmanager
async def dashboard_with_clock(
    relay: Relay, clock: Callable[[], float]
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    """A Dashboard over the relay's own parts, with an injected clock, on a server of its own."""
    server = relay.server
    assert server.arm is not None and server.store.store is not None
    dashboard = Dashboard(
        state=lambda: server.store.state,
        runtime=server.runtime,
        store=server.store.store,
        token_refusal=server.arm.manage_token_refusal,
        totals=server.observer.totals,
        recent_errors=lambda: server.observer.recent_errors,
        secure=False,
        clock=clock,
    )
    app = web.Application()
    app.add_routes(dashboard.routes())
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        async with browser_session() as session:
            yield test_server, session
    finally:
        await dashboard.aclose()
        await test_server.close()


async def test_a_session_expires_when_idle(make_relay: RelayFactory) -> None:
    now, clock = fake_clock(1_000_000.0)
    async with (
        make_relay(management=True) as relay,
        dashboard_with_clock(relay, clock) as (server, session),
    ):
        url = str(server.make_url("/dashboard"))
        async with session.post(
            url + "/login", data={"key_name": ROOT_KEY_NAME, "key": ROOT_KEY}
        ) as response:
            assert response.status == 200 and "csrf-token" in await response.text()
        now[0] += SESSION_IDLE - 60  # a request just before the idle limit keeps it
        async with session.get(url) as response:
            assert "csrf-token" in await response.text()
        now[0] += SESSION_IDLE - 60
        async with session.get(url + "/events") as response:
            assert response.status == 200
            assert (await asyncio.wait_for(response.content.readline(), 10)).startswith(b"data:")
        # The open stream is no activity of the operator's: idle past the limit, it is over.
        now[0] += 120
        async with session.get(url + "/events") as response:
            assert response.status == 401
        async with session.get(url) as response:
            page = await response.text()
            assert 'action="/dashboard/login"' in page and "csrf-token" not in page


async def test_a_session_ends_with_its_token_and_with_a_key_change(
    make_relay: RelayFactory,
) -> None:
    now, clock = fake_clock(time.time())
    async with (
        make_relay(management=True) as relay,
        dashboard_with_clock(relay, clock) as (server, session),
    ):
        url = str(server.make_url("/dashboard"))
        # A token sign-in lasts as long as the token.
        token = create_token("http://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(now[0]) + 600)
        async with session.post(url + "/login", data={"token": token}) as response:
            assert "csrf-token" in await response.text()
        now[0] += 601
        async with session.get(url + "/events") as response:
            assert response.status == 401
        # A key sign-in ends when a key of its rule is regenerated.
        store = relay.server.store.store
        assert store is not None
        rule, _ = await store.put_rule("ops", Rights.MANAGE)
        async with session.post(
            url + "/login", data={"key_name": "ops", "key": rule.primary_key}
        ) as response:
            assert "csrf-token" in await response.text()
        async with session.get(url + "/events") as response:
            assert response.status == 200
        await store.regenerate_key("ops", "secondary")
        async with session.get(url + "/events") as response:
            assert response.status == 401
        # A rule without Manage cannot sign in at all.
        listen, _ = await store.put_rule("listen-only", Rights.LISTEN)
        async with session.post(
            url + "/login", data={"key_name": "listen-only", "key": listen.primary_key}
        ) as response:
            assert response.status == 401
            assert listen.primary_key not in await response.text()


async def test_streams_are_bounded_and_end_with_the_relay(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_module, "MAX_STREAMS", 1)
    async with make_relay(management=True) as relay, browser_session() as session:
        assert await sign_in(session, relay) == 303
        events = dashboard_url(relay) + "/events"
        first = await session.get(events)
        assert first.status == 200
        async with session.get(events) as second:
            assert second.status == 503
        first.close()  # the client goes away: its stream ends at its next write, freeing a place
        async with asyncio.timeout(10):
            while (stream := await session.get(events)).status != 200:
                stream.close()
                await asyncio.sleep(0.05)
        assert (await stream.content.readline()).startswith(b"data: {")
        await relay.server.aclose()  # the relay stops: the stream ends
        async with asyncio.timeout(10):
            async for _ in stream.content:
                pass
        stream.close()


@asynccontextmanager
async def traffic(relay: Relay) -> AsyncIterator[None]:
    """An agent on ``hc`` that reads whatever it is sent, a long transfer at a varying rate and
    a short connection now and then (for the chart and the connections table)."""
    listener = HybridConnectionListener.from_connection_string(relay.connection_string("hc"))
    client = HybridConnectionClient.from_connection_string(relay.connection_string("hc"))
    await listener.open()
    readers: set[asyncio.Task[None]] = set()

    async def drain(stream: HybridConnectionStream) -> None:
        async with stream:
            while await stream.read():
                pass

    async def accept() -> None:
        while (stream := await listener.accept_connection()) is not None:
            task = asyncio.create_task(drain(stream))
            readers.add(task)
            task.add_done_callback(readers.discard)

    async def pump() -> None:
        long = await client.create_connection()
        for step in itertools.count():
            await long.write(b"x" * (8192 * (1 + step % 25)))
            if step % 8 == 0:
                short = await client.create_connection()
                await short.write(b"hello")
                await short.aclose()
            await asyncio.sleep(0.1)  # pacing of the traffic, not a wait for the page

    tasks = [asyncio.create_task(accept()), asyncio.create_task(pump())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await listener.aclose()
        for task in list(readers):
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("HYBRIDRELAY_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
async def test_the_dashboard_in_a_real_browser(make_relay: RelayFactory, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None, "HYBRIDRELAY_REQUIRE_BROWSER is set but chromium is missing"
    wait = 15_000
    async with make_relay(management=True) as relay, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            await page.goto(dashboard_url(relay))
            # A wrong key: the form again, with a message and without the key.
            await page.fill("#key", "wrong-key-0123456789abcdef")
            await page.click("#sign-in")
            await expect(page.locator("p.error")).to_contain_text("Sign-in refused")
            assert "wrong-key-0123456789abcdef" not in await page.content()
            await page.fill("#key", ROOT_KEY)
            await page.click("#sign-in")
            await expect(page.locator("#status")).to_contain_text("live", timeout=wait)
            (cookie,) = [c for c in await context.cookies() if c["name"] == COOKIE]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert cookie["path"] == "/dashboard"
            assert ROOT_KEY not in await page.content()

            hc_row = page.locator('#hybrid-connections tr[data-name="hc"]')
            online = hc_row.locator(".badge.online")
            offline = hc_row.locator(".badge.offline")
            await expect(online).to_have_count(0)
            # An edge agent comes online: the page shows it, with where it connects from ...
            agent = HybridConnectionListener.from_connection_string(relay.connection_string("hc"))
            await agent.open()
            await expect(online).to_have_count(1, timeout=wait)
            await expect(online).to_contain_text("127.0.0.1")
            await expect(page.locator("#count-listeners")).to_have_text("1")
            # ... and it stops: it leaves the online list and shows as offline.
            await agent.aclose()
            await expect(online).to_have_count(0, timeout=wait)
            await expect(offline).to_have_count(1, timeout=wait)
            await expect(offline).to_contain_text("127.0.0.1")

            # Another agent with traffic (a long transfer and short connections), and a
            # refused sender.
            async with traffic(relay):
                await expect(online).to_have_count(1, timeout=wait)
                await expect(page.locator("#connections tbody tr td").nth(1)).to_have_text(
                    "hc", timeout=wait
                )
                intruder = HybridConnectionClient.from_connection_string(
                    relay.connection_string("hc", key="not-the-key-0123456789abcdef=")
                )
                with pytest.raises(AuthorizationError):
                    await intruder.create_connection()
                await intruder.aclose()
                await expect(page.locator("#errors tbody tr td").nth(2)).to_have_text(
                    "hc", timeout=wait
                )

                # Through the page's form: a name that exists is refused, with the reason ...
                await page.fill("#new-hc-name", "hc")
                await page.click("#create-hc-button")
                await expect(page.locator("#create-result")).to_contain_text("exists already")
                # ... and a new one is created, in the store and on the page.
                await page.fill("#new-hc-name", "plant/line-1")
                await page.uncheck("#new-hc-auth")
                await page.click("#create-hc-button")
                await expect(page.locator("#create-result")).to_contain_text("created plant/line-1")
                created = page.locator('#hybrid-connections tr[data-name="plant/line-1"]')
                await expect(created).to_have_count(1, timeout=wait)
                await expect(created).to_contain_text("anonymous")
                record = relay.server.store.state.get("plant/line-1")
                assert record is not None and not record.requires_client_authorization

                # A few rate samples on the chart, then the picture.
                await expect(page.locator("#chart")).to_have_attribute(
                    "data-samples", re.compile(r"^(?:[6-9]|\d{2,})$"), timeout=30_000
                )
                await expect(page.locator("#rate-bytes")).to_contain_text("now")
                await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("HYBRIDRELAY_UPDATE_SCREENSHOT"):
                shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)

            # A request without the page's CSRF token is refused, even with the cookie.
            answer = await context.request.post(
                dashboard_url(relay) + "/api/hybrid-connections", data={"name": "forged"}
            )
            assert answer.status == 403
            assert relay.server.store.state.get("forged") is None
            # Signing out: the sign-in form again, and the stream is refused.
            await page.click("#sign-out")
            await expect(page.locator("#sign-in")).to_be_visible(timeout=wait)
            answer = await context.request.get(dashboard_url(relay) + "/events")
            assert answer.status == 401
        finally:
            await browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
