"""The dashboard on the management listener (docs/DASHBOARD.md).

A page and a stream of snapshots: hybrid connections with their listeners online and recently
offline (and where they connect from), the relayed connections, throughput and connection rate
over the last ten minutes, and the recent errors. It refreshes by server-sent events, and needs
no build step (``static/`` holds plain HTML, CSS and JavaScript).

Security:

* Signing in takes a Manage key (rule name and key, from which the relay signs a token) or a
  Manage token, checked like every management request; failures are rate-limited per remote
  address. The session id is random, kept server-side in a bounded table with an idle expiry,
  and travels in a cookie that is ``HttpOnly; SameSite=Strict; Path=/dashboard`` (and
  ``Secure`` over TLS). Keys and tokens are never stored, logged or echoed.
* Every state-changing request but the sign-in needs the session's CSRF token in the
  ``X-CSRF-Token`` header (a form post cannot set a header); the sign-in itself must come from
  the same origin (``Origin`` / ``Sec-Fetch-Site``).
* Pages are ``no-store`` with a Content-Security-Policy that allows only the relay's own
  scripts and styles (no inline script).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import html
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from hybridrelay.auth.sas import Rights, create_token, parse_token, token_audience
from hybridrelay.exceptions import TokenError
from hybridrelay.management.arm_api import ListenerCount
from hybridrelay.management.runtime_api import RuntimeView
from hybridrelay.protocol.arm import validate_hybrid_connection_name
from hybridrelay.store.base import Store, StoreError, StoreUnavailableError
from hybridrelay.store.records import NamespaceState

__all__ = ["Dashboard", "RecentErrorView"]

logger = logging.getLogger(__name__)

COOKIE = "hybridrelay_session"
#: Sessions kept at once (the oldest is signed out past it), and their idle lifetime.
MAX_SESSIONS = 1000
SESSION_IDLE = 8 * 3600.0
#: Concurrent event streams, and how often each gets a snapshot.
MAX_STREAMS = 32
SNAPSHOT_INTERVAL = 1.0
#: Rate samples: one every SAMPLE_INTERVAL seconds, ten minutes of them.
SAMPLE_INTERVAL = 2.0
SAMPLES = 300
#: Listeners remembered after they went offline.
OFFLINE_KEPT = 100
#: Failed sign-ins allowed per remote address per window, and the addresses remembered.
SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW = 300.0
SIGN_IN_SOURCES = 10_000
#: A write to an event stream must be taken by the browser within this time.
WRITE_TIMEOUT = 10.0
#: The lifetime of the token the relay signs with a key given to the sign-in form.
KEY_TOKEN_LIFETIME = 600

_STATIC = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: ``(at, kind, entity, status, reason, remote)`` of a recent error.
RecentErrorView = Callable[[], Sequence[Any]]
#: Relayed bytes and accepted connections (WebSocket, ingress and HTTP) since the start.
Totals = Callable[[], tuple[float, float]]


@dataclass
class _Session:
    csrf: str
    last_seen: float
    #: The rule signed in with, and a digest of its keys then: a session ends when the rule
    #: goes, loses Manage or has a key regenerated.
    rule: str
    keys: str
    #: When a signed-in token expires (the session ends with it); None for a key sign-in.
    expires_at: float | None = None


@dataclass
class _Offline:
    listener_id: str
    hybrid_connection: str
    remote_address: str
    since: float


@dataclass
class _Sampler:
    samples: collections.deque[dict[str, float]] = field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES)
    )
    last: tuple[float, float, float] | None = None


def _asset(name: str) -> str:
    return (resources.files("hybridrelay.management") / "static" / name).read_text("utf-8")


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    response = web.json_response(body, status=status)
    response.headers.update(_HEADERS)
    return response


class Dashboard:
    """The dashboard's routes (see the module docstring)."""

    def __init__(
        self,
        *,
        state: Callable[[], NamespaceState],
        runtime: RuntimeView,
        store: Store,
        token_refusal: Callable[[str], str | None],
        totals: Totals,
        recent_errors: RecentErrorView,
        secure: bool,
        clock: Callable[[], float] = time.time,
        listener_totals: ListenerCount | None = None,
    ) -> None:
        self._state = state
        #: Listeners on every node of a cluster, per hybrid connection (the list of listeners
        #: shown is this node's).
        self._listener_totals = listener_totals
        self._runtime = runtime
        self._store = store
        self._token_refusal = token_refusal
        self._totals = totals
        self._recent_errors = recent_errors
        self._secure = secure
        self._clock = clock
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self._streams = 0
        self._sampler = _Sampler()
        self._seen: dict[tuple[str, str], tuple[str, str]] = {}
        self._offline: collections.deque[_Offline] = collections.deque(maxlen=OFFLINE_KEPT)
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/dashboard", self.page),
            web.get("/dashboard/static/{name}", self.static),
            web.post("/dashboard/login", self.login),
            web.post("/dashboard/logout", self.logout),
            web.get("/dashboard/events", self.events),
            web.post("/dashboard/api/hybrid-connections", self.create_hybrid_connection),
        ]

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling the rates (the task is the dashboard's; :meth:`aclose` ends it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample_forever())

    async def aclose(self) -> None:
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def sample(self) -> None:
        """Take one rate sample and note listeners that went offline."""
        now = self._clock()
        moved, accepted = self._totals()
        moved += sum(c.bytes_to_listener + c.bytes_to_sender for c in self._runtime.connections())
        last = self._sampler.last
        if last is not None and now > last[0]:
            elapsed = now - last[0]
            self._sampler.samples.append(
                {
                    "t": now,
                    "bytesPerSecond": max(0.0, (moved - last[1]) / elapsed),
                    "connectionsPerSecond": max(0.0, (accepted - last[2]) / elapsed),
                }
            )
        self._sampler.last = (now, moved, accepted)
        self._note_listeners(now)

    def _note_listeners(self, now: float) -> None:
        current = {
            (info.listener_id, info.hybrid_connection.lower()): (
                info.hybrid_connection,
                info.remote_address,
            )
            for info in self._runtime.listeners()
        }
        for key, (hc, remote) in self._seen.items():
            if key not in current:
                self._offline.appendleft(_Offline(key[0], hc, remote, now))
        if current.keys() - self._seen.keys():  # one that came back is not offline any more
            kept = [
                gone
                for gone in self._offline
                if (gone.listener_id, gone.hybrid_connection.lower()) not in current
            ]
            self._offline = collections.deque(kept, maxlen=OFFLINE_KEPT)
        self._seen = current

    # -- sessions ----------------------------------------------------------------------------

    def _session(self, request: web.Request, *, touch: bool = True) -> _Session | None:
        """The request's session, if it is still valid (``touch``: it counts as activity)."""
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self._clock()
        if (
            now - session.last_seen > SESSION_IDLE
            or (session.expires_at is not None and now >= session.expires_at)
            or self._rule_keys(session.rule) != session.keys
        ):
            del self._sessions[sid]
            return None
        if touch:
            session.last_seen = now
            self._sessions.move_to_end(sid)
        return session

    def _rule_keys(self, name: str) -> str | None:
        """A digest of the keys of the namespace rule ``name`` if it grants Manage, else None."""
        for rule in self._state().namespace.rules:
            if rule.name == name and not rule.entity:
                if Rights.MANAGE not in rule.rights.effective():
                    return None
                both = f"{rule.primary_key}\0{rule.secondary_key}".encode()
                return hashlib.sha256(both).hexdigest()
        return None

    def _refused_change(self, request: web.Request) -> web.Response | None:
        """The answer to a state-changing request without a session or its CSRF token."""
        session = self._session(request)
        if session is None:
            return _json({"error": "sign in first"}, 401)
        if not self._csrf_ok(request, session):
            return _json({"error": "CSRF token missing or wrong"}, 403)
        return None

    def _csrf_ok(self, request: web.Request, session: _Session) -> bool:
        given = request.headers.get("X-CSRF-Token", "")
        return secrets.compare_digest(given.encode(), session.csrf.encode())

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        # Browsers send Sec-Fetch-Site; the page's no-referrer policy makes their Origin
        # "null", so the Origin is checked only when there is no Sec-Fetch-Site.
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:
            return site in ("same-origin", "none")
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return origin.split("://", 1)[-1] == request.host

    def _blocked(self, remote: str) -> bool:
        count, since = self._failures.get(remote, (0, 0.0))
        return count >= SIGN_IN_FAILURES and self._clock() - since < SIGN_IN_WINDOW

    def _failed(self, remote: str) -> None:
        now = self._clock()
        count, since = self._failures.get(remote, (0, now))
        if now - since >= SIGN_IN_WINDOW:
            count, since = 0, now
        self._failures[remote] = (count + 1, since)
        self._failures.move_to_end(remote)
        while len(self._failures) > SIGN_IN_SOURCES:
            self._failures.popitem(last=False)

    # -- pages -------------------------------------------------------------------------------

    def _html(self, text: str, status: int = 200) -> web.Response:
        response = web.Response(text=text, status=status, content_type="text/html")
        response.headers.update(_HEADERS)
        return response

    def _login_page(self, message: str = "", status: int = 200) -> web.Response:
        notice = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        return self._html(_asset("login.html").replace("{{message}}", notice), status)

    async def page(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return self._login_page()
        return self._html(_asset("dashboard.html").replace("{{csrf}}", session.csrf))

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        content_type = _STATIC.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        response = web.Response(text=_asset(name), content_type=content_type)
        response.headers.update(_HEADERS)
        return response

    async def login(self, request: web.Request) -> web.Response:
        remote = request.remote or ""
        if not self._same_origin(request):
            return self._login_page("Sign in from the dashboard's own page.", 403)
        if self._blocked(remote):
            return self._login_page("Too many failed sign-ins; wait a few minutes.", 429)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        name = str(form.get("key_name", "")).strip()
        key = str(form.get("key", "")).strip()
        expires_at: float | None = None
        if token:
            with contextlib.suppress(TokenError):
                parsed = parse_token(token)
                name, expires_at = parsed.key_name, float(parsed.expiry)
        elif name and key:
            # Signed for the relay's own check: real time, whatever clock the sessions use.
            expiry = int(time.time()) + KEY_TOKEN_LIFETIME
            token = create_token(token_audience(request.host), name, key, expiry=expiry)
        refusal = self._token_refusal(token) if token else "no key or token given"
        keys = self._rule_keys(name) if refusal is None else None
        if refusal is not None or keys is None:
            self._failed(remote)
            logger.warning("dashboard: sign-in refused from %s: %s", remote, refusal or "no rule")
            return self._login_page("Sign-in refused: the key or token does not grant Manage.", 401)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = _Session(
            secrets.token_urlsafe(32), self._clock(), name, keys, expires_at
        )
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        logger.info("dashboard: %s signed in from %s", name, remote)
        response = web.Response(status=303, headers={"Location": "/dashboard"})
        response.set_cookie(
            COOKIE,
            sid,
            httponly=True,
            samesite="Strict",
            secure=self._secure,
            path="/dashboard",
            max_age=int(SESSION_IDLE),
        )
        response.headers.update(_HEADERS)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        if (refusal := self._refused_change(request)) is not None:
            return refusal
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = _json({"signedOut": True})
        response.del_cookie(COOKIE, path="/dashboard")
        return response

    # -- data --------------------------------------------------------------------------------

    def snapshot(self, totals: Mapping[str, int] | None = None) -> dict[str, Any]:
        """What the page shows, now; ``totals``: listeners on every node, by name (else this
        node's)."""
        now = self._clock()
        self._note_listeners(now)  # between two samples too: a short visit is not missed
        listeners: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for info in self._runtime.listeners():
            listeners[info.hybrid_connection.lower()].append(info.body())
        offline: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for gone in self._offline:
            offline[gone.hybrid_connection.lower()].append(
                {"id": gone.listener_id, "remoteAddress": gone.remote_address, "since": gone.since}
            )
        entities = [
            {
                "name": record.name,
                "requiresClientAuthorization": record.requires_client_authorization,
                "listeners": listeners.get(record.name.lower(), []),
                "listenerCount": (totals or {}).get(
                    record.name, len(listeners.get(record.name.lower(), []))
                ),
                "offline": offline.get(record.name.lower(), []),
            }
            for record in self._state().sorted_hybrid_connections()
        ]
        errors = [
            {
                "at": e.at,
                "kind": e.kind,
                "hybridConnection": e.entity,
                "status": e.status,
                "reason": e.reason,
                "remote": e.remote,
            }
            for e in list(self._recent_errors())[-50:]
        ]
        return {
            "time": now,
            "hybridConnections": entities,
            "connections": [info.body() for info in self._runtime.connections()],
            "rates": list(self._sampler.samples),
            "errors": errors[::-1],
        }

    async def events(self, request: web.Request) -> web.StreamResponse:
        # The stream does not count as activity: a page left open is signed out when the
        # session has been idle for SESSION_IDLE (the page then shows the sign-in form).
        if self._session(request, touch=False) is None:
            return _json({"error": "sign in first"}, 401)
        if self._streams >= MAX_STREAMS:
            return _json({"error": "too many dashboards open"}, 503)
        self._streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **_HEADERS})
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await response.prepare(request)
            while not self._closing.is_set():
                if self._session(request, touch=False) is None:  # signed out or expired
                    break
                totals = None
                if self._listener_totals is not None:
                    names = [r.name for r in self._state().sorted_hybrid_connections()]
                    totals = await self._listener_totals(names)  # a cluster: one Redis read
                data = json.dumps(self.snapshot(totals), separators=(",", ":"))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await response.write(f"data: {data}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SNAPSHOT_INTERVAL):
                        await self._closing.wait()
            async with asyncio.timeout(WRITE_TIMEOUT):
                await response.write_eof()
        except (ConnectionError, TimeoutError):
            # Gone, or not reading: drop the connection (what was prepared is answered).
            if request.transport is not None:
                request.transport.abort()
        finally:
            self._streams -= 1
        return response

    async def create_hybrid_connection(self, request: web.Request) -> web.Response:
        if (refusal := self._refused_change(request)) is not None:
            return refusal
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "expected a JSON body"}, 400)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return _json({"error": 'expected {"name": ...}'}, 400)
        name = body["name"].strip("/")
        invalid = validate_hybrid_connection_name(name)
        if invalid is not None:
            return _json({"error": invalid}, 400)
        requires = body.get("requiresClientAuthorization", True)
        if not isinstance(requires, bool):
            return _json({"error": "requiresClientAuthorization must be true or false"}, 400)
        if self._state().get(name) is not None:
            return _json({"error": f"{name!r} exists already"}, 409)
        try:
            record, _ = await self._store.put_hybrid_connection(
                name, requires_client_authorization=requires
            )
        except StoreUnavailableError as exc:
            return _json({"error": str(exc)}, 503)
        except StoreError as exc:
            return _json({"error": str(exc)}, 409)
        return _json({"name": record.name}, 201)
