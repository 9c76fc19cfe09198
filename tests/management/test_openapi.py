"""The management listener against its own OpenAPI document, with schemathesis: for generated
requests on every route (ARM's and the runtime routes), no answer is a 5xx and every answer
matches its documented schema.

A real relay serves it on a real socket (plain http on loopback: schemathesis' calls carry the token
themselves) in a thread with its own event loop, because schemathesis drives the calls
synchronously.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from hybridrelay.auth.sas import Rights, create_token
from hybridrelay.server import RelayServer
from hybridrelay.server.config import ManagementSettings, RelayConfig, ServerSettings
from hybridrelay.store.sqlite import SqliteStore

ROOT = "RootManageSharedAccessKey"


class ServedInThread:
    """A relay with its management listener on 127.0.0.1:0, in a thread of its own, until
    ``stop``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.base_url = ""
        self.token = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="management-api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("the management API did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(20)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() or seen as a dead thread
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        store = await SqliteStore.open(
            self._directory / "store.db",
            namespace="contoso",
            initial_rules=[(ROOT, Rights.LISTEN | Rights.SEND | Rights.MANAGE)],
        )
        config = RelayConfig(
            server=ServerSettings(port=0, plaintext=True),
            management=ManagementSettings(port=0),
            namespace_name="contoso",
        )
        relay = RelayServer(config, store=store)
        await relay.start()
        (root,) = store.state.namespace.rules
        assert relay.management_url is not None
        self.base_url = relay.management_url
        self.token = create_token(
            "http://127.0.0.1/", ROOT, root.primary_key, expiry=int(time.time()) + 3600
        )
        self._stopped = asyncio.Event()
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await relay.aclose()
            await store.aclose()


@pytest.fixture(scope="module")
def management(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedInThread]:
    served = ServedInThread(tmp_path_factory.mktemp("openapi"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def api_schema(management: ServedInThread) -> schemathesis.BaseSchema:
    # Loaded from the served document: what a client sees is what is checked.
    # The dashboard's event stream never ends (it is read by the dashboard's own tests).
    return schemathesis.openapi.from_url(f"{management.base_url}/openapi.json").exclude(
        path="/dashboard/events"
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(300)
@schema.parametrize()
# In CI the examples are derived from the test's name (derandomize): the same run each time, so
# a red CI means a change broke something; run locally for new examples each time.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=bool(os.environ.get("CI")),
)
def test_every_route_matches_its_schema(
    case: schemathesis.Case[Any], management: ServedInThread
) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {management.token}"}, timeout=10)


def test_the_document_is_served(management: ServedInThread) -> None:
    import httpx

    response = httpx.get(f"{management.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
