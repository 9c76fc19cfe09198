"""The management listener's application: Azure's management API (``arm_api.py``), the
runtime routes (``runtime_api.py``), metrics and health (``observability/endpoint.py``), the
OpenAPI document of them all, and the dashboard (``dashboard.py``).

It is served on its own port (``management:`` in the relay's configuration), because on the
data port every path is an entity path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from hybridrelay.management.arm_api import MAX_BODY, ArmApi
from hybridrelay.management.runtime_api import RuntimeApi

__all__ = ["management_application"]


def management_application(
    arm: ArmApi, runtime: RuntimeApi, extra: Sequence[web.RouteDef] = ()
) -> web.Application:
    """The routes of ``arm`` and ``runtime``, ``extra`` (health, metrics, the dashboard), and
    ARM's 404 for anything else (after authorization, so the routes are not probed freely)."""
    app = web.Application(client_max_size=MAX_BODY)
    routes = [*extra, web.get("/openapi.json", arm.openapi)]
    app.add_routes(
        [
            *routes,
            *_method_not_allowed(routes),
            *runtime.routes(),
            *arm.routes(),
            web.route("*", r"/{tail:[\s\S]*}", arm.handle),
        ]
    )
    return app


def _method_not_allowed(routes: Sequence[web.RouteDef]) -> list[web.RouteDef]:
    """A 405 with ``Allow`` for every other method of each path (without it, the catch-all
    would answer 404 for a path that exists)."""
    allowed: dict[str, set[str]] = {}
    for route in routes:
        allowed.setdefault(route.path, set()).add(route.method)
        if route.method == "GET":
            allowed[route.path].add("HEAD")

    def refuse(methods: set[str]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                status=405,
                text="method not allowed\n",
                headers={"Allow": ", ".join(sorted(methods))},
            )

        return handler

    return [web.route("*", path, refuse(methods)) for path, methods in allowed.items()]
