"""The management listener's application: Azure's management API (``arm_api.py``), the
runtime routes (``runtime_api.py``), metrics and health (``observability/endpoint.py``), the
OpenAPI document of them all, and the dashboard (``dashboard.py``).

It is served on its own port (``management:`` in the relay's configuration), because on the
data port every path is an entity path.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from hybridrelay.management.arm_api import MAX_BODY, ArmApi
from hybridrelay.management.runtime_api import RuntimeApi

__all__ = ["management_application"]


def management_application(
    arm: ArmApi, runtime: RuntimeApi, extra: Sequence[web.AbstractRouteDef] = ()
) -> web.Application:
    """The routes of ``arm`` and ``runtime``, ``extra`` (health, metrics, the dashboard), and
    ARM's 404 for anything else (after authorization, so the routes are not probed freely)."""
    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes(
        [
            *extra,
            web.get("/openapi.json", arm.openapi),
            *runtime.routes(),
            *arm.routes(),
            web.route("*", r"/{tail:[\s\S]*}", arm.handle),
        ]
    )
    return app
