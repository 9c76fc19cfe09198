"""``hybridrelay admin``: a running relay's namespace and live state, over its management API
(docs/MANAGEMENT.md, "The admin command").

The relay and the credential come from ``--url`` and ``--token``/``-x``, else
``$HYBRIDRELAY_MANAGEMENT_URL`` and ``$HYBRIDRELAY_MANAGEMENT_TOKEN`` or
``$HYBRIDRELAY_CONNECTION_STRING`` (whose key signs a ten-minute token), else the embedded
default relay of this machine (its data directory names the management URL and holds the root
key). Plain HTTP on the standard library: every request has a timeout, https is verified
(``--ca-file`` adds a CA).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from hybridrelay.auth.sas import create_token, token_audience
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV, ConnectionString

__all__ = ["EXIT_API", "EXIT_UNREACHABLE", "EXIT_USAGE", "add_admin_arguments", "run_admin"]

URL_ENV = "HYBRIDRELAY_MANAGEMENT_URL"
TOKEN_ENV = "HYBRIDRELAY_MANAGEMENT_TOKEN"
API_VERSION = "2021-11-01"
#: Any subscription and resource group are accepted by the relay (and echoed in ids).
_SCOPE = "/subscriptions/hybridrelay/resourceGroups/hybridrelay/providers/Microsoft.Relay"
TIMEOUT = 30.0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_EPILOG = f"""\
credentials: --url and --token (or -x CONNECTION_STRING), else ${URL_ENV} and ${TOKEN_ENV}
(or ${CONNECTION_STRING_ENV}), else the embedded default relay of this machine.

exit status: 0 done; {EXIT_API} the relay refused or failed the request (its status and error
on one line); {EXIT_USAGE} a usage or configuration error; {EXIT_UNREACHABLE} the relay could
not be reached (connection refused, TLS, timeout)."""


class AdminError(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- the command line ---------------------------------------------------------------------------


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Manage a running relay over its management API."
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--url", help=f"the management listener (default ${URL_ENV})")
    credential = parser.add_mutually_exclusive_group()
    credential.add_argument(
        "--token", help=f"a SAS token with Manage on the namespace (default ${TOKEN_ENV})"
    )
    credential.add_argument(
        "-x",
        "--connection-string",
        metavar="CS",
        help=f"a connection string of a Manage rule (default ${CONNECTION_STRING_ENV})",
    )
    parser.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify https with")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")

    hc = groups.add_parser("hc", help="hybrid connections").add_subparsers(
        dest="action", required=True
    )
    hc.add_parser("list", help="list them")
    hc.add_parser("show", help="one, with its listener count").add_argument("name")
    for action in ("create", "update"):
        sub = hc.add_parser(action, help=f"{action} one")
        sub.add_argument("name")
        sub.add_argument(
            "--client-authorization",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="senders need a token with Send (default on create: yes)",
        )
        sub.add_argument("--metadata", help="free text kept with it")
    hc.add_parser("delete", help="delete one (its listeners are closed)").add_argument("name")

    rules = groups.add_parser("rules", help="SAS rules").add_subparsers(
        dest="action", required=True
    )
    rules.add_parser("list", help="list them").add_argument("--hc", help="of a hybrid connection")
    create = rules.add_parser("create", help="create one with new keys, or change its rights")
    create.add_argument("name")
    create.add_argument("--rights", required=True, help="Listen,Send,Manage (comma-separated)")
    create.add_argument("--hc", help="a rule of this hybrid connection (default: the namespace)")
    delete = rules.add_parser("delete", help="delete one")
    delete.add_argument("name")
    delete.add_argument("--hc", help="of a hybrid connection")

    keys = groups.add_parser("keys", help="a rule's keys").add_subparsers(
        dest="action", required=True
    )
    show = keys.add_parser("show", help="print the keys")
    regenerate = keys.add_parser("regenerate", help="replace the primary or secondary key")
    strings = keys.add_parser("connection-string", help="print a connection string")
    for sub in (show, regenerate, strings):
        sub.add_argument("rule")
        sub.add_argument("--hc", help="a rule of this hybrid connection")
    regenerate.add_argument("which", choices=("primary", "secondary"))
    strings.add_argument("--secondary", action="store_true", help="with the secondary key")

    for group, what, item in (
        ("listeners", "listeners online", "ID"),
        ("connections", "relayed connections", "TRACKING_ID"),
    ):
        sub_parsers = groups.add_parser(group, help=what).add_subparsers(
            dest="action", required=True
        )
        sub_parsers.add_parser("list", help=f"list the {what}").add_argument(
            "--hc", help="of one hybrid connection"
        )
        close = sub_parsers.add_parser("close", help="close one, or all of --hc")
        close.add_argument("id", nargs="?", metavar=item)
        close.add_argument("--hc", help="every one of this hybrid connection")


def run_admin(args: argparse.Namespace) -> int:
    try:
        client = _client(args)
        result = _ACTIONS[(args.group, args.action)](client, args)
    except AdminError as exc:
        print(f"hybridrelay admin: {exc}", file=sys.stderr)
        return exc.status
    except ConfigurationError as exc:
        print(f"hybridrelay admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print(result, as_json=args.json)
    return 0


# -- the client -----------------------------------------------------------------------------


class Client:
    """The management API at ``url`` with ``token``."""

    def __init__(self, url: str, token: str, context: ssl.SSLContext | None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._context = context
        self._namespace: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"<Client {self.url}>"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": self._token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self._context) as answer:
                text = answer.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            raise AdminError(_api_error(exc), EXIT_API) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"cannot reach the relay at {self.url}: {reason}", EXIT_UNREACHABLE
            ) from None
        return json.loads(text) if text else None

    def arm(self, method: str, path: str, body: Any = None) -> Any:
        return self.call(method, f"{self.namespace_path()}{path}?api-version={API_VERSION}", body)

    def namespace_path(self) -> str:
        if self._namespace is None:
            listing = self.call(
                "GET",
                f"/subscriptions/hybridrelay/providers/Microsoft.Relay/namespaces"
                f"?api-version={API_VERSION}",
            )
            self._namespace = str(listing["value"][0]["name"])
        return f"{_SCOPE}/namespaces/{quote(self._namespace, safe='')}"


def _api_error(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read().decode("utf-8"))["error"]
        return f"{exc.code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{exc.code} {exc.reason}"


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get(URL_ENV)
    token = args.token or (None if args.connection_string else os.environ.get(TOKEN_ENV))
    connection_string = args.connection_string or (
        None if token else os.environ.get(CONNECTION_STRING_ENV)
    )
    if token is None and connection_string:
        token = _signed(ConnectionString.parse(connection_string))
    if url is None or token is None:
        url, token = _embedded(url, token)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigurationError(f"--url: {url!r} is not an http(s):// URL")
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=args.ca_file)
    return Client(url, token, context)


def _signed(cs: ConnectionString) -> str:
    if cs.token:
        return cs.token
    if not cs.key_name or not cs.key:
        raise ConfigurationError("the connection string has no SharedAccessKeyName/Key")
    return create_token(
        token_audience(cs.host, ""), cs.key_name, cs.key, expiry=int(time.time()) + 600
    )


def _embedded(url: str | None, token: str | None) -> tuple[str, str]:
    """The embedded default relay of this machine: its management URL and root key."""
    import asyncio

    from hybridrelay.cli.embedded import (
        STORE_FILE,
        default_data_dir,
        open_store,
        read_endpoints,
        root_rule,
    )

    missing = f"no relay given: pass --url and --token (or -x), or set ${URL_ENV} and ${TOKEN_ENV}"
    data_dir = default_data_dir()
    endpoints = read_endpoints(data_dir)
    if endpoints is None or not (data_dir / STORE_FILE).exists():
        raise ConfigurationError(missing)
    url = url or endpoints.management
    if url is None:
        raise ConfigurationError(missing)
    if token is None:

        async def root_token() -> str:
            store = await open_store(data_dir)
            try:
                rule = root_rule(store)
            finally:
                await store.aclose()
            host = urlsplit(endpoints.relay).hostname or "localhost"
            return create_token(
                token_audience(host, ""), rule.name, rule.primary_key, expiry=int(time.time()) + 600
            )

        token = asyncio.run(root_token())
    return url, token


# -- actions ------------------------------------------------------------------------------------


def _hc_path(name: str) -> str:
    return f"/hybridConnections/{quote(name.strip('/'), safe='')}"


def _rule_path(name: str, hc: str | None) -> str:
    return (_hc_path(hc) if hc else "") + f"/authorizationRules/{quote(name, safe='')}"


def _value(listing: Any) -> list[Any]:
    return list(listing.get("value", [])) if isinstance(listing, dict) else []


def _all_pages(client: Client, path: str) -> list[Any]:
    page = client.arm("GET", path)
    items = _value(page)
    while isinstance(page, dict) and page.get("nextLink"):
        link = urlsplit(page["nextLink"])
        page = client.call("GET", link.path + (f"?{link.query}" if link.query else ""))
        items += _value(page)
    return items


def _hc_list(client: Client, args: argparse.Namespace) -> Any:
    items = _all_pages(client, "/hybridConnections")
    return Table(
        ["NAME", "LISTENERS", "CLIENT AUTH", "CREATED"],
        [
            [
                hc["name"],
                hc["properties"].get("listenerCount", 0),
                "yes" if hc["properties"].get("requiresClientAuthorization") else "no",
                hc["properties"].get("createdAt", ""),
            ]
            for hc in items
        ],
        items,
    )


def _hc_show(client: Client, args: argparse.Namespace) -> Any:
    hc = client.arm("GET", _hc_path(args.name))
    return Record(hc, {"name": hc["name"], **hc.get("properties", {})})


def _hc_put(client: Client, args: argparse.Namespace) -> Any:
    properties: dict[str, Any] = {}
    if args.client_authorization is not None:
        properties["requiresClientAuthorization"] = args.client_authorization
    if args.metadata is not None:
        properties["userMetadata"] = args.metadata
    if args.action == "update":
        client.arm("GET", _hc_path(args.name))  # 404 rather than a create
    hc = client.arm("PUT", _hc_path(args.name), {"properties": properties})
    return Record(hc, {"name": hc["name"], **hc.get("properties", {})})


def _hc_delete(client: Client, args: argparse.Namespace) -> Any:
    client.arm("DELETE", _hc_path(args.name))
    return Record({"deleted": args.name}, {"deleted": args.name})


def _rules_list(client: Client, args: argparse.Namespace) -> Any:
    prefix = _hc_path(args.hc) if args.hc else ""
    items = _all_pages(client, f"{prefix}/authorizationRules")
    return Table(
        ["NAME", "RIGHTS"],
        [[rule["name"], ",".join(rule["properties"]["rights"])] for rule in items],
        items,
    )


def _rules_create(client: Client, args: argparse.Namespace) -> Any:
    rights = [part.strip().capitalize() for part in args.rights.split(",") if part.strip()]
    rule = client.arm("PUT", _rule_path(args.name, args.hc), {"properties": {"rights": rights}})
    return Record(rule, {"name": rule["name"], "rights": ",".join(rule["properties"]["rights"])})


def _rules_delete(client: Client, args: argparse.Namespace) -> Any:
    client.arm("DELETE", _rule_path(args.name, args.hc))
    return Record({"deleted": args.name}, {"deleted": args.name})


def _keys_show(client: Client, args: argparse.Namespace) -> Any:
    keys = client.arm("POST", _rule_path(args.rule, args.hc) + "/listKeys")
    return Record(keys, keys)


def _keys_regenerate(client: Client, args: argparse.Namespace) -> Any:
    key_type = "PrimaryKey" if args.which == "primary" else "SecondaryKey"
    keys = client.arm(
        "POST", _rule_path(args.rule, args.hc) + "/regenerateKeys", {"keyType": key_type}
    )
    return Record(keys, keys)


def _keys_connection_string(client: Client, args: argparse.Namespace) -> Any:
    keys = client.arm("POST", _rule_path(args.rule, args.hc) + "/listKeys")
    text = keys["secondaryConnectionString" if args.secondary else "primaryConnectionString"]
    if not text:
        raise AdminError(f"rule {args.rule!r} has no secondary key", EXIT_API)
    return Text(text)


def _runtime_query(args: argparse.Namespace) -> str:
    return f"?hybridConnection={quote(args.hc, safe='')}" if args.hc else ""


def _listeners_list(client: Client, args: argparse.Namespace) -> Any:
    items = _value(client.call("GET", "/runtime/listeners" + _runtime_query(args)))
    return Table(
        ["ID", "HYBRID CONNECTION", "FROM", "SINCE", "TOKEN EXPIRES"],
        [
            [
                i["id"],
                i["hybridConnection"],
                i["remoteAddress"],
                i["connectedAt"],
                i.get("tokenExpiresAt", ""),
            ]
            for i in items
        ],
        items,
    )


def _connections_list(client: Client, args: argparse.Namespace) -> Any:
    items = _value(client.call("GET", "/runtime/connections" + _runtime_query(args)))
    return Table(
        [
            "TRACKING ID",
            "HYBRID CONNECTION",
            "KIND",
            "SENDER",
            "LISTENER",
            "SINCE",
            "TO LISTENER",
            "TO SENDER",
        ],
        [
            [
                i["trackingId"],
                i["hybridConnection"],
                i["kind"],
                i.get("senderAddress") or "",
                i.get("listenerAddress") or "",
                i["since"],
                i.get("bytesToListener", 0),
                i.get("bytesToSender", 0),
            ]
            for i in items
        ],
        items,
    )


def _close(client: Client, args: argparse.Namespace) -> Any:
    if (args.id is None) == (args.hc is None):
        raise ConfigurationError(f"{args.group} close: give an id or --hc NAME (one of them)")
    path = f"/runtime/{args.group}"
    path += f"/{quote(args.id, safe='')}" if args.id else _runtime_query(args)
    answer = client.call("DELETE", path)
    return Record(answer, {"closed": answer.get("closed", 0)})


_ACTIONS = {
    ("hc", "list"): _hc_list,
    ("hc", "show"): _hc_show,
    ("hc", "create"): _hc_put,
    ("hc", "update"): _hc_put,
    ("hc", "delete"): _hc_delete,
    ("rules", "list"): _rules_list,
    ("rules", "create"): _rules_create,
    ("rules", "delete"): _rules_delete,
    ("keys", "show"): _keys_show,
    ("keys", "regenerate"): _keys_regenerate,
    ("keys", "connection-string"): _keys_connection_string,
    ("listeners", "list"): _listeners_list,
    ("listeners", "close"): _close,
    ("connections", "list"): _connections_list,
    ("connections", "close"): _close,
}


# -- output -------------------------------------------------------------------------------------


class Table:
    """Rows for people; ``raw`` (the API's items) for ``--json``."""

    def __init__(self, header: Sequence[str], rows: Sequence[Sequence[Any]], raw: Any) -> None:
        self.header = list(header)
        self.rows = [[str(cell) for cell in row] for row in rows]
        self.raw = raw


class Record:
    """One object: ``fields`` as ``key: value`` lines for people, ``raw`` for ``--json``."""

    def __init__(self, raw: Any, fields: dict[str, Any]) -> None:
        self.raw = raw
        self.fields = fields


class Text:
    def __init__(self, text: str) -> None:
        self.raw = self.text = text


def _print(result: Table | Record | Text, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.raw, indent=2))
        return
    if isinstance(result, Text):
        print(result.text)
    elif isinstance(result, Record):
        width = max((len(str(key)) for key in result.fields), default=0)
        for key, value in result.fields.items():
            print(f"{key:<{width}}  {value}")
    else:
        widths = [
            max(len(text) for text in column)
            for column in zip(result.header, *result.rows, strict=False)
        ]
        for row in (result.header, *result.rows):
            print(
                "  ".join(
                    text.ljust(width) for text, width in zip(row, widths, strict=True)
                ).rstrip()
            )
