"""``hybridrelay admin``: a relay's hybrid connections, rules, keys, listeners and relayed
connections, over its management API (docs/MANAGEMENT.md, "The admin command").

It speaks HTTP with the standard library only (``urllib.request``; https verified, against
``--ca-file`` when given; redirects not followed, so the token goes nowhere else; every request
bounded by ``--timeout``) to the ARM routes
(``/subscriptions/.../providers/Microsoft.Relay/namespaces/{ns}/...``, the namespace found with
the subscription-wide list) and the ``/runtime`` routes. People get aligned tables, scripts
``--json`` (the API's JSON; a list for list commands).

Where it connects and with what, first found wins:

* the URL: ``--url``, ``$HYBRIDRELAY_MANAGEMENT_URL``, else the management address the embedded
  default relay (``hybridrelay serve`` without ``--config``) wrote in its data directory;
* the credential, a Manage token on the namespace: ``--token``, ``-x CONNECTION_STRING`` (its
  key signs a ten-minute token), ``$HYBRIDRELAY_MANAGEMENT_TOKEN``,
  ``$HYBRIDRELAY_CONNECTION_STRING``, else, when the URL is the embedded relay's, the root key
  its data directory's store holds.

Tokens and keys are never printed, except the keys ``keys show`` and ``keys
connection-string`` are asked for (``keys regenerate`` says which key changed, not the key).
Exit codes: :data:`EXIT_OK`, :data:`EXIT_API`, :data:`EXIT_USAGE`, :data:`EXIT_UNREACHABLE`
(:data:`EXIT_CODES` says when); every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

from hybridrelay import __version__
from hybridrelay.auth.sas import Rights, create_token, token_audience
from hybridrelay.cli.credentials import (
    FILE_OPTION,
    key_on_command_line_warning,
    read_connection_string_file,
)
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV, ConnectionString

__all__ = [
    "EXIT_API",
    "EXIT_CODES",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "MANAGEMENT_TOKEN_ENV",
    "MANAGEMENT_URL_ENV",
    "add_admin_arguments",
    "run_admin",
]

MANAGEMENT_URL_ENV = "HYBRIDRELAY_MANAGEMENT_URL"
MANAGEMENT_TOKEN_ENV = "HYBRIDRELAY_MANAGEMENT_TOKEN"
API_VERSION = "2021-11-01"
#: Any subscription and resource group are accepted (and echoed in ids).
_SUBSCRIPTION = "hybridrelay"
_RESOURCE_GROUP = "hybridrelay"
#: The lifetime of a token signed with a connection string's or the data directory's key.
_TOKEN_TTL = 600
_DEFAULT_TIMEOUT = 30.0
#: The largest answer read (a page of 100 hybrid connections is a few tens of kB).
_MAX_ANSWER = 16 * 1024 * 1024

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  success
  {EXIT_API}  the API refused or failed (its status, code and message on one line, e.g.
     "404 ResourceNotFound: No hybrid connection 'x'."), or create found the name taken
  {EXIT_USAGE}  usage or configuration error (bad flags; no URL or credential: the line names
     the flag and the environment variable to set)
  {EXIT_UNREACHABLE}  the relay cannot be reached (connection refused, TLS failure, timeout: the
     line names the URL and the cause)
"""

_ENVIRONMENT = f"""\
where and with what (first found wins):
  URL         --url, ${MANAGEMENT_URL_ENV}, else the embedded default relay's (what
              `hybridrelay serve` wrote in its data directory: --data-dir,
              $HYBRIDRELAY_DATA_DIR, else ~/.local/share/hybridrelay)
  credential  --token, -x, ${MANAGEMENT_TOKEN_ENV}, ${CONNECTION_STRING_ENV}, else
              the embedded relay's root key (when the URL is the embedded relay's)
"""

_EXAMPLES = """\
examples:
  hybridrelay admin hc create plant/line-1 --metadata "line 1 telemetry"
  hybridrelay admin rules create sensors --rights Listen,Send --hc plant/line-1
  hybridrelay admin keys connection-string sensors --hc plant/line-1
  hybridrelay admin keys regenerate sensors secondary --hc plant/line-1
  hybridrelay admin listeners close --hc plant/line-1
  hybridrelay admin hc list --json
"""


class AdminError(Exception):
    """An error that ends the command: its exit code and its one line."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class _OneLineParser(argparse.ArgumentParser):
    """A group's or action's parser whose usage errors are one line (and exit 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("hybridrelay admin").strip()
        self.exit(
            EXIT_USAGE, f"hybridrelay admin: {where}{': ' if where else ''}{message} (see --help)\n"
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # An unknown argument is refused here, in one line, rather than handed up to the
        # `hybridrelay` parser (whose refusal is its whole usage).
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


# -- the parser ---------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """The connection and output options. They are accepted before the group (``admin --json
    hc list``) and after the action (``admin hc list --json``); after the action they default
    to SUPPRESS, so that they do not overwrite what was given before the group."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after else {}
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--url",
        metavar="URL",
        help=f"the relay's management URL, http(s)://host:port (default: ${MANAGEMENT_URL_ENV}, "
        "else the embedded default relay's)",
        **unset,
    )
    credential = group.add_mutually_exclusive_group()
    credential.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"a Manage SAS token on the namespace (default: ${MANAGEMENT_TOKEN_ENV})",
        **unset,
    )
    credential.add_argument(
        "--connection-string",
        "-x",
        dest="connection_string",
        metavar="CS",
        help="a connection string of a namespace rule with Manage; its key signs a "
        f"ten-minute token (default: ${CONNECTION_STRING_ENV})",
        **unset,
    )
    credential.add_argument(
        FILE_OPTION,
        dest="connection_string_file",
        metavar="PATH",
        help="read that connection string from a file (mode 0600): ps shows -x to every user",
        **unset,
    )
    group.add_argument(
        "--ca-file", metavar="PEM", help="CA certificates to verify an https URL with", **unset
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"bound on each request (default {_DEFAULT_TIMEOUT:g})",
        **unset,
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the embedded default relay's data directory (default: $HYBRIDRELAY_DATA_DIR, "
        "else ~/.local/share/hybridrelay)",
        **unset,
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON (a list for list commands) instead of a table",
        **unset,
    )


Handler = Callable[["Context", argparse.Namespace], None]


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybridrelay admin``'s options, groups and actions on ``parser`` (the caller sets
    ``func`` to :func:`run_admin`)."""
    parser.description = (
        "Manage a relay over its management API (docs/MANAGEMENT.md): hybrid connections, "
        "authorization rules (namespace and hybrid connection), keys, and the listeners and "
        "relayed connections online."
    )
    parser.epilog = _ENVIRONMENT + "\n" + EXIT_CODES + "\n" + _EXAMPLES
    if type(parser) is argparse.ArgumentParser:  # `hybridrelay`'s subparser: one-line errors too
        parser.__class__ = _OneLineParser
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_common(parser, after=False)
    parser.set_defaults(admin_group=None, admin_action=None)
    groups = parser.add_subparsers(dest="admin_group", metavar="GROUP", parser_class=_OneLineParser)

    def group(name: str, help_text: str, aliases: Sequence[str]) -> Any:
        command = groups.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        command.set_defaults(admin_group=name)
        return command.add_subparsers(dest="admin_action", metavar="ACTION", required=True)

    def action(
        actions: Any,
        name: str,
        help_text: str,
        handler: Handler,
        aliases: Sequence[str] = (),
    ) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = actions.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=aliases,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(command, after=True)
        command.set_defaults(admin_handler=handler)
        return command

    def hc_option(command: argparse.ArgumentParser, what: str) -> None:
        command.add_argument(
            "--hc",
            "--hybrid-connection",
            dest="hc",
            metavar="NAME",
            help=what,
        )

    of_hc = "a rule of this hybrid connection (default: of the namespace)"

    hc = group("hc", "hybrid connections", ["hybrid-connection", "hybrid-connections"])
    action(hc, "list", "list the hybrid connections", _hc_list, aliases=["ls"])
    command = action(hc, "show", "show one hybrid connection", _hc_show, aliases=["get"])
    command.add_argument("name", metavar="NAME")
    command = action(hc, "create", "create a hybrid connection", _hc_create)
    command.add_argument("name", metavar="NAME", help="segments separated by '/'")
    command.add_argument(
        "--no-client-authorization",
        dest="client_authorization",
        action="store_false",
        help="senders need no token (default: they need one with Send)",
    )
    command.add_argument("--metadata", metavar="TEXT", help="user metadata (up to 1024 chars)")
    command = action(hc, "update", "change a hybrid connection", _hc_update, aliases=["set"])
    command.add_argument("name", metavar="NAME")
    authorization = command.add_mutually_exclusive_group()
    authorization.add_argument(
        "--client-authorization",
        dest="client_authorization",
        action="store_const",
        const=True,
        help="senders need a token with Send",
    )
    authorization.add_argument(
        "--no-client-authorization",
        dest="client_authorization",
        action="store_const",
        const=False,
        help="senders need no token",
    )
    command.add_argument("--metadata", metavar="TEXT", help='user metadata ("" clears it)')
    command = action(hc, "delete", "delete a hybrid connection", _hc_delete, aliases=["rm"])
    command.add_argument("name", metavar="NAME")

    rules = group("rules", "authorization rules", ["rule", "authorization-rules"])
    command = action(rules, "list", "list the authorization rules", _rules_list, aliases=["ls"])
    hc_option(command, "the rules of this hybrid connection (default: the namespace's)")
    for name, help_text, handler, aliases in (
        ("create", "create an authorization rule (with new random keys)", _rules_create, []),
        ("update", "change a rule's rights (its keys are kept)", _rules_update, ["set"]),
    ):
        command = action(rules, name, help_text, handler, aliases=aliases)
        command.add_argument("rule", metavar="NAME")
        command.add_argument(
            "--rights",
            required=True,
            metavar="RIGHTS",
            help="comma-separated Listen, Send, Manage (Manage needs Listen and Send)",
        )
        hc_option(command, of_hc)
    command = action(rules, "delete", "delete an authorization rule", _rules_delete, ["rm"])
    command.add_argument("rule", metavar="NAME")
    hc_option(command, of_hc)

    keys = group("keys", "a rule's keys and connection strings", ["key"])
    command = action(
        keys, "show", "print a rule's keys and connection strings", _keys_show, ["list"]
    )
    command.add_argument("rule", metavar="RULE")
    hc_option(command, of_hc)
    command = action(
        keys, "regenerate", "replace a rule's primary or secondary key", _keys_regenerate, ["renew"]
    )
    command.add_argument("rule", metavar="RULE")
    command.add_argument("which", choices=["primary", "secondary"], metavar="primary|secondary")
    hc_option(command, of_hc)
    command = action(
        keys, "connection-string", "print a rule's connection string", _keys_connection_string
    )
    command.add_argument("rule", metavar="RULE")
    command.add_argument("--secondary", action="store_true", help="with the secondary key")
    hc_option(command, of_hc)

    for kind, item in (("listeners", "ID"), ("connections", "TRACKING_ID")):
        what = "listeners online" if kind == "listeners" else "relayed connections open now"
        actions = group(kind, what, [kind[:-1]])
        command = action(actions, "list", f"list the {what}", _runtime_list, aliases=["ls"])
        hc_option(command, f"the {kind} of this hybrid connection (default: all)")
        command = action(
            actions,
            "close",
            f"close one ({item}) or every one of a hybrid connection (--hc NAME), with 1008",
            _runtime_close,
        )
        command.add_argument("id", nargs="?", metavar=item)
        hc_option(command, f"close every one of this hybrid connection's {kind}")


# -- running ------------------------------------------------------------------------------------


def run_admin(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code (an error is printed as one line)."""
    try:
        if args.admin_group is None or args.admin_action is None:
            raise AdminError(
                EXIT_USAGE,
                "name a group and an action, e.g. `hybridrelay admin hc list` (see --help)",
            )
        _check_usage(args)  # before the URL and credential are looked for
        context = _connect(args)
        handler: Handler = args.admin_handler
        handler(context, args)
        return EXIT_OK
    except AdminError as exc:
        _fail(exc.message)
        return exc.exit_code
    except RelayError as exc:  # e.g. a token that cannot be made
        _fail(str(exc))
        return EXIT_USAGE


def _check_usage(args: argparse.Namespace) -> None:
    """The usage errors that need no relay: exit 2 even with no URL or credential given."""
    if args.admin_group in ("listeners", "connections") and args.admin_action == "close":
        _close_target(args.admin_group, args)
    elif args.admin_group == "rules" and args.admin_action in ("create", "update"):
        _rights(args.rights)
    elif args.admin_group == "hc" and args.admin_action in ("update", "set"):
        _hc_changes(args)


def _fail(message: str) -> None:
    print(f"hybridrelay admin: {' '.join(message.split())}", file=sys.stderr)


@dataclass
class Credential:
    """How requests are authorized (never in a message) and where it came from."""

    authorization: str = field(repr=False)
    source: str


def _connect(args: argparse.Namespace) -> Context:
    from hybridrelay.cli.embedded import default_data_dir, read_endpoints

    data_dir: Path = getattr(args, "data_dir", None) or default_data_dir()
    embedded = read_endpoints(data_dir)
    embedded_url = (embedded.management or "").rstrip("/") if embedded else ""
    url = (getattr(args, "url", None) or os.environ.get(MANAGEMENT_URL_ENV) or "").strip()
    url = (url or embedded_url).rstrip("/")
    if not url:
        raise AdminError(
            EXIT_USAGE,
            f"no management URL: pass --url URL or set ${MANAGEMENT_URL_ENV} (no embedded relay "
            f"wrote its address in {data_dir}: start one with `hybridrelay serve`)",
        )
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError:
        parts = urlsplit("invalid:")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise AdminError(
            EXIT_USAGE,
            f"--url / ${MANAGEMENT_URL_ENV}: {url!r} is not an http(s)://host[:port] URL",
        )
    credential = _credential(args, url, embedded_url, data_dir)
    timeout = getattr(args, "timeout", None) or _DEFAULT_TIMEOUT
    if timeout <= 0:
        raise AdminError(EXIT_USAGE, "--timeout must be positive")
    api = Api(url, credential, _ssl_context(getattr(args, "ca_file", None)), timeout)
    return Context(api, json_output=bool(getattr(args, "json", False)))


def _credential(
    args: argparse.Namespace, url: str, embedded_url: str, data_dir: Path
) -> Credential:
    token = getattr(args, "token", None)
    connection_string = getattr(args, "connection_string", None)
    if token and connection_string:
        raise AdminError(EXIT_USAGE, "--token and -x/--connection-string: give one of them")
    if token:
        return _token_credential(token, "--token")
    if connection_string:
        if warning := key_on_command_line_warning(connection_string):
            print(f"hybridrelay admin: warning: {warning}", file=sys.stderr)
        return _connection_string_credential(connection_string, "-x")
    if path := getattr(args, "connection_string_file", None):
        try:
            text, warning = read_connection_string_file(path)
        except ConfigurationError as exc:
            raise AdminError(EXIT_USAGE, str(exc)) from None
        if warning is not None:
            print(f"hybridrelay admin: warning: {warning}", file=sys.stderr)
        return _connection_string_credential(text, f"{FILE_OPTION} {path}")
    if token := os.environ.get(MANAGEMENT_TOKEN_ENV, "").strip():
        return _token_credential(token, f"${MANAGEMENT_TOKEN_ENV}")
    if connection_string := os.environ.get(CONNECTION_STRING_ENV, "").strip():
        return _connection_string_credential(connection_string, f"${CONNECTION_STRING_ENV}")
    if embedded_url and url == embedded_url:
        key_name, key = _embedded_root_key(data_dir)
        hostname = urlsplit(url).hostname or "localhost"
        return _signed(token_audience(hostname), key_name, key, f"the root key in {data_dir}")
    raise AdminError(
        EXIT_USAGE,
        "no credential: pass --token TOKEN or -x CONNECTION_STRING, or set "
        f"${MANAGEMENT_TOKEN_ENV} or ${CONNECTION_STRING_ENV} (a Manage token on the namespace "
        "or a connection string of a namespace rule with Manage)",
    )


def _token_credential(token: str, source: str) -> Credential:
    token = token.strip()
    if token.lower().startswith(("sharedaccesssignature ", "bearer ")):
        return Credential(token, source)
    return Credential(f"Bearer {token}", source)


def _connection_string_credential(text: str, source: str) -> Credential:
    try:
        cs = ConnectionString.parse(text)
    except RelayError as exc:
        raise AdminError(EXIT_USAGE, f"{source}: {exc}") from None
    if cs.token:
        return _token_credential(cs.token, source)
    if not cs.key_name or not cs.key:
        raise AdminError(EXIT_USAGE, f"{source}: no SharedAccessKeyName/SharedAccessKey")
    return _signed(token_audience(cs.host), cs.key_name, cs.key, source)


def _signed(audience: str, key_name: str, key: str, source: str) -> Credential:
    token = create_token(audience, key_name, key, expiry=int(time.time()) + _TOKEN_TTL)
    return Credential(token, source)


def _embedded_root_key(data_dir: Path) -> tuple[str, str]:
    from hybridrelay.cli.embedded import ROOT_RULE, STORE_FILE, read_key

    if not (data_dir / STORE_FILE).exists():
        raise AdminError(
            EXIT_USAGE,
            f"no credential: {data_dir} has no store; pass --token TOKEN or -x "
            f"CONNECTION_STRING, or set ${MANAGEMENT_TOKEN_ENV} or ${CONNECTION_STRING_ENV}",
        )
    return ROOT_RULE, read_key(data_dir)


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AdminError(EXIT_USAGE, f"--ca-file {ca_file}: {reason}") from None


# -- HTTP ---------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (exit 1), not followed: the token is not sent elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Api:
    """The management API at ``url``: one request at a time, each bounded by ``timeout``."""

    url: str
    credential: Credential
    context: ssl.SSLContext
    timeout: float
    _namespace: str | None = None

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        """``(status, JSON)`` of a 2xx answer (JSON None when it has no body), else
        :class:`AdminError`: 1 for the API's refusal, 3 when the relay cannot be reached."""
        target = self.url + path + (f"?{urlencode(query)}" if query else "")
        return self._call(method, target, body)

    def _call(self, method: str, target: str, body: Any) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(target, data=data, method=method)
        request.add_header("Authorization", self.credential.authorization)
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", f"hybridrelay-admin/{__version__}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=self.context)
        )
        try:
            with opener.open(request, timeout=self.timeout) as answer:
                status = int(answer.status)
                raw = answer.read(_MAX_ANSWER)
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        if not raw.strip():
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            raise AdminError(
                EXIT_API, f"{status}: the answer of {self.url} is not JSON (not the API?)"
            ) from None

    def _refusal(self, exc: urllib.error.HTTPError) -> AdminError:
        try:
            with exc:
                raw = exc.read(_MAX_ANSWER)
            error = json.loads(raw)["error"]
            code, message = str(error["code"]), str(error["message"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            return AdminError(EXIT_API, f"{exc.code} {exc.reason} (from {self.url})")
        if exc.code == 401:
            message = f"{message.rstrip('.')}. (the credential from {self.credential.source})"
        return AdminError(EXIT_API, f"{exc.code} {code}: {message}")

    def _unreachable(self, cause: object) -> AdminError:
        return AdminError(EXIT_UNREACHABLE, f"cannot reach {self.url}: {_cause(cause, self)}")

    # -- the namespace's ARM routes -------------------------------------------------------------

    def namespace(self) -> str:
        """The relay's namespace name (the subscription-wide list has exactly it)."""
        if self._namespace is None:
            path = f"/subscriptions/{_SUBSCRIPTION}/providers/Microsoft.Relay/namespaces"
            _, body = self.call("GET", path, query={"api-version": API_VERSION})
            try:
                self._namespace = str(body["value"][0]["name"])
            except (KeyError, IndexError, TypeError):
                raise AdminError(
                    EXIT_API, f"{self.url} lists no namespace (not the API?)"
                ) from None
        return self._namespace

    def arm_path(self, *segments: str) -> str:
        """The ARM path of the namespace's ``segments`` (each percent-encoded whole, so a name
        with ``/`` stays one segment)."""
        base = (
            f"/subscriptions/{_SUBSCRIPTION}/resourceGroups/{_RESOURCE_GROUP}"
            f"/providers/Microsoft.Relay/namespaces/{quote(self.namespace(), safe='')}"
        )
        return base + "".join("/" + quote(segment, safe="") for segment in segments)

    def arm(self, method: str, *segments: str, body: Any = None) -> tuple[int, Any]:
        return self.call(
            method, self.arm_path(*segments), query={"api-version": API_VERSION}, body=body
        )

    def arm_list(self, *segments: str) -> list[Any]:
        """Every item of a list, following ``nextLink`` (on this URL only)."""
        _, body = self.arm("GET", *segments)
        items: list[Any] = []
        while True:
            items.extend(_field(body, "value", list))
            link = body.get("nextLink")
            if not link:
                return items
            here, there = urlsplit(self.url), urlsplit(str(link))
            if (there.scheme, there.netloc) != (here.scheme, here.netloc):
                raise AdminError(EXIT_API, f"the list's nextLink leaves {self.url}; not followed")
            _, body = self._call("GET", str(link), None)


def _cause(cause: object, api: Api) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate is not trusted ({cause.verify_message}); give its CA with "
            "--ca-file"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    if isinstance(cause, TimeoutError):
        return f"no answer within {api.timeout:g} s (--timeout)"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the relay running, with a management port?)"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host ({cause.strerror})"
    if isinstance(cause, http.client.RemoteDisconnected):
        return "the connection closed without an answer (https to a plain port?)"
    if isinstance(cause, http.client.HTTPException):
        return f"not an HTTP answer ({type(cause).__name__}; http to a TLS port?)"
    if isinstance(cause, OSError):
        return cause.strerror or str(cause) or type(cause).__name__
    return str(cause)


def _field(body: Any, name: str, kind: type) -> Any:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind):
        raise AdminError(EXIT_API, f"the answer has no {name!r} (not the API?)")
    return value


# -- output -------------------------------------------------------------------------------------


@dataclass
class Context:
    api: Api
    json_output: bool

    def emit(self, document: Any, text: Callable[[], str]) -> None:
        """``document`` as JSON with ``--json``, else ``text()`` for people."""
        print(json.dumps(document, indent=2) if self.json_output else text())


def _cell(value: Any) -> str:
    """Text for a terminal: the relay's strings cannot move the cursor or colour it."""
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else "?" for c in str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns, three spaces apart (the header alone for no rows)."""
    cells = [list(headers), *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}   {_cell(value)}".rstrip() for name, value in pairs)


def _time(text: Any) -> str:
    """An ISO time for people: ``2024-05-01 12:00:00`` (UTC)."""
    if not isinstance(text, str):
        return "-"
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return text
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _properties(item: Any) -> dict[str, Any]:
    properties = item.get("properties") if isinstance(item, dict) else None
    return properties if isinstance(properties, dict) else {}


def _get(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else None


def _yes(flag: Any) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _scope(args: argparse.Namespace) -> str:
    return f"hybrid connection {args.hc!r}" if args.hc else "the namespace"


def _rule_segments(args: argparse.Namespace, *tail: str) -> tuple[str, ...]:
    parent = ("hybridConnections", args.hc) if args.hc else ()
    return (*parent, "authorizationRules", *tail)


def _rights(text: str) -> list[str]:
    try:
        rights = Rights.parse([part for part in text.replace(" ", "").split(",") if part])
    except ValueError as exc:
        raise AdminError(EXIT_USAGE, f"--rights {text!r}: {exc}") from None
    if not rights:
        raise AdminError(EXIT_USAGE, "--rights: name at least one of Listen, Send, Manage")
    return rights.names()


def _exists(api: Api, *segments: str) -> bool:
    try:
        api.arm("GET", *segments)
    except AdminError as exc:
        if exc.exit_code == EXIT_API and exc.message.startswith("404 ResourceNotFound"):
            return False
        raise
    return True


def _deleted(context: Context, status: int, what: str) -> None:
    deleted = status != 204  # the API answers 204 when there was nothing to delete
    context.emit(
        {"deleted": deleted},
        lambda: f"deleted {what}" if deleted else f"no {what}: nothing deleted",
    )


# -- hc -----------------------------------------------------------------------------------------


def _hc_row(item: Any) -> list[Any]:
    properties = _properties(item)
    return [
        _get(item, "name"),
        properties.get("listenerCount"),
        _yes(properties.get("requiresClientAuthorization")),
        _time(properties.get("createdAt")),
    ]


def _hc_list(context: Context, args: argparse.Namespace) -> None:
    items = context.api.arm_list("hybridConnections")
    context.emit(
        items,
        lambda: table(
            ["NAME", "LISTENERS", "CLIENT AUTH", "CREATED"], [_hc_row(item) for item in items]
        ),
    )


def _hc_text(item: Any) -> str:
    properties = _properties(item)
    return _pairs(
        [
            ("name", _get(item, "name")),
            ("listeners", properties.get("listenerCount")),
            ("client authorization", _yes(properties.get("requiresClientAuthorization"))),
            ("created", _time(properties.get("createdAt"))),
            ("updated", _time(properties.get("updatedAt"))),
            ("metadata", properties.get("userMetadata")),
            ("id", _get(item, "id")),
        ]
    )


def _hc_show(context: Context, args: argparse.Namespace) -> None:
    _, item = context.api.arm("GET", "hybridConnections", args.name)
    context.emit(item, lambda: _hc_text(item))


def _hc_create(context: Context, args: argparse.Namespace) -> None:
    if _exists(context.api, "hybridConnections", args.name):
        raise AdminError(
            EXIT_API,
            f"the hybrid connection {args.name!r} exists already (change it with "
            "`hybridrelay admin hc update`)",
        )
    properties: dict[str, Any] = {"requiresClientAuthorization": args.client_authorization}
    if args.metadata is not None:
        properties["userMetadata"] = args.metadata
    _put_hc(context, args, properties, "created")


def _hc_changes(args: argparse.Namespace) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if args.client_authorization is not None:
        properties["requiresClientAuthorization"] = args.client_authorization
    if args.metadata is not None:
        properties["userMetadata"] = args.metadata
    if not properties:
        raise AdminError(
            EXIT_USAGE,
            "hc update: nothing to change: give --client-authorization, "
            "--no-client-authorization or --metadata TEXT",
        )
    return properties


def _hc_update(context: Context, args: argparse.Namespace) -> None:
    properties = _hc_changes(args)
    context.api.arm("GET", "hybridConnections", args.name)  # a 404 rather than a create
    _put_hc(context, args, properties, "updated")


def _put_hc(
    context: Context, args: argparse.Namespace, properties: dict[str, Any], verb: str
) -> None:
    body = {"properties": properties}
    _, item = context.api.arm("PUT", "hybridConnections", args.name, body=body)
    context.emit(item, lambda: f"{verb} hybrid connection {args.name!r}\n{_hc_text(item)}")


def _hc_delete(context: Context, args: argparse.Namespace) -> None:
    status, _ = context.api.arm("DELETE", "hybridConnections", args.name)
    _deleted(context, status, f"hybrid connection {args.name!r}")


# -- rules --------------------------------------------------------------------------------------


def _rule_rights(item: Any) -> str:
    rights = _properties(item).get("rights")
    return ", ".join(str(r) for r in rights) if isinstance(rights, list) else "-"


def _rules_list(context: Context, args: argparse.Namespace) -> None:
    items = context.api.arm_list(*_rule_segments(args))
    context.emit(
        items,
        lambda: table(
            ["NAME", "RIGHTS"], [[_get(item, "name"), _rule_rights(item)] for item in items]
        ),
    )


def _put_rule(context: Context, args: argparse.Namespace, verb: str) -> None:
    body = {"properties": {"rights": _rights(args.rights)}}
    _, item = context.api.arm("PUT", *_rule_segments(args, args.rule), body=body)
    context.emit(
        item, lambda: f"{verb} rule {args.rule!r} ({_rule_rights(item)}) of {_scope(args)}"
    )


def _rules_create(context: Context, args: argparse.Namespace) -> None:
    _rights(args.rights)  # a usage error before any request
    if _exists(context.api, *_rule_segments(args, args.rule)):
        raise AdminError(
            EXIT_API,
            f"the rule {args.rule!r} of {_scope(args)} exists already (change its rights with "
            "`hybridrelay admin rules update`)",
        )
    _put_rule(context, args, "created")


def _rules_update(context: Context, args: argparse.Namespace) -> None:
    _rights(args.rights)
    context.api.arm("GET", *_rule_segments(args, args.rule))  # a 404 rather than a create
    _put_rule(context, args, "updated")


def _rules_delete(context: Context, args: argparse.Namespace) -> None:
    status, _ = context.api.arm("DELETE", *_rule_segments(args, args.rule))
    _deleted(context, status, f"rule {args.rule!r} of {_scope(args)}")


# -- keys ---------------------------------------------------------------------------------------


def _list_keys(context: Context, args: argparse.Namespace) -> dict[str, Any]:
    _, body = context.api.arm("POST", *_rule_segments(args, args.rule, "listKeys"), body={})
    if not isinstance(body, dict):
        raise AdminError(EXIT_API, "the listKeys answer is not an object (not the API?)")
    return body


def _keys_show(context: Context, args: argparse.Namespace) -> None:
    body = _list_keys(context, args)
    context.emit(
        body,
        lambda: _pairs(
            [
                ("rule", body.get("keyName")),
                ("primary key", body.get("primaryKey")),
                ("secondary key", body.get("secondaryKey") or None),
                ("primary connection string", body.get("primaryConnectionString")),
                ("secondary connection string", body.get("secondaryConnectionString") or None),
            ]
        ),
    )


def _keys_regenerate(context: Context, args: argparse.Namespace) -> None:
    key_type = "PrimaryKey" if args.which == "primary" else "SecondaryKey"
    _, body = context.api.arm(
        "POST", *_rule_segments(args, args.rule, "regenerateKeys"), body={"keyType": key_type}
    )
    # Not the new key: ask for it with `keys show` or `keys connection-string`.
    name = _get(body, "keyName") or args.rule
    hc = f" --hc {args.hc}" if args.hc else " --hc NAME"
    context.emit(
        {"keyName": name, "regenerated": key_type},
        lambda: (
            f"regenerated the {args.which} key of rule {name!r} of {_scope(args)}: new "
            "tokens signed with the old key are refused; listeners connected with it stay until "
            f"closed (`hybridrelay admin listeners close{hc}`)"
        ),
    )


def _keys_connection_string(context: Context, args: argparse.Namespace) -> None:
    body = _list_keys(context, args)
    name = "secondaryConnectionString" if args.secondary else "primaryConnectionString"
    text = body.get(name)
    if not text:
        raise AdminError(EXIT_API, f"the rule {args.rule!r} has no {name}")
    context.emit({"connectionString": text}, lambda: str(text))


# -- listeners and connections ------------------------------------------------------------------


def _close_target(collection: str, args: argparse.Namespace) -> tuple[str, dict[str, str] | None]:
    """The path and query of a close: one by its id, or every one of ``--hc``."""
    if bool(args.id) == bool(args.hc):
        raise AdminError(
            EXIT_USAGE,
            f"{collection} close: name one ID, or give --hc NAME for every one of a hybrid "
            "connection (not both)",
        )
    if args.id:
        return f"/runtime/{collection}/{quote(args.id, safe='')}", None
    return f"/runtime/{collection}", {"hybridConnection": args.hc}


def _runtime_close(context: Context, args: argparse.Namespace) -> None:
    """``listeners close`` and ``connections close`` (the group names the collection)."""
    collection = args.admin_group
    path, query = _close_target(collection, args)
    _, body = context.api.call("DELETE", path, query=query)
    closed = _field(body, "closed", int)
    noun = collection[:-1] if closed == 1 else collection
    context.emit(body, lambda: f"closed {closed} {noun}")


#: The columns of ``listeners list`` and ``connections list``: (header, the item's key);
#: times are shown as :func:`_time` shows them.
_RUNTIME_COLUMNS = {
    "listeners": (
        ("ID", "id"),
        ("HYBRID CONNECTION", "hybridConnection"),
        ("REMOTE ADDRESS", "remoteAddress"),
        ("CONNECTED", "connectedAt"),
        ("TOKEN EXPIRES", "tokenExpiresAt"),
    ),
    "connections": (
        ("TRACKING ID", "trackingId"),
        ("HYBRID CONNECTION", "hybridConnection"),
        ("KIND", "kind"),
        ("SENDER", "senderAddress"),
        ("LISTENER", "listenerAddress"),
        ("SINCE", "since"),
        ("TO LISTENER", "bytesToListener"),
        ("TO SENDER", "bytesToSender"),
    ),
}
_TIMES = frozenset({"connectedAt", "tokenExpiresAt", "since"})


def _runtime_list(context: Context, args: argparse.Namespace) -> None:
    """``listeners list`` and ``connections list`` (the group names the collection)."""
    collection = args.admin_group
    query = {"hybridConnection": args.hc} if args.hc else None
    _, body = context.api.call("GET", f"/runtime/{collection}", query=query)
    items: list[Any] = _field(body, "value", list)
    columns = _RUNTIME_COLUMNS[collection]

    def cell(item: Any, key: str) -> Any:
        return _time(_get(item, key)) if key in _TIMES else _get(item, key)

    context.emit(
        items,
        lambda: table(
            [header for header, _ in columns],
            [[cell(item, key) for _, key in columns] for item in items],
        ),
    )
