"""The JSON control messages of Hybrid Connections (PROTOCOL.md 4.2, 5.2, 6.2, 6.4, 4.6).

Each message is one WebSocket text message holding a JSON object with exactly one top-level
member: ``accept`` and ``request`` (relay -> listener), ``response`` and ``renewToken``
(listener -> relay). Parsing is strict about types and lenient where Microsoft's clients are
sloppy (``statusCode`` as a number or a string; unknown members are ignored).

Pure: no I/O. Parse errors raise :class:`~hybridrelay.exceptions.ProtocolError`, never anything
else, whatever the input.

The JSON is read and written by orjson where it is installed (a dependency; several times
faster than the stdlib's, and every relayed HTTP request costs the relay and the listener one
message each way, docs/DECISIONS.md D17), else by the stdlib's ``json``. Both give the same
documents: orjson writes non-ASCII text (and DEL) as it is where the stdlib writes ``\\u``
escapes (the same JSON), and what orjson refuses (a lone surrogate to write; NaN or lone surrogate
escapes to read) goes to the stdlib. One difference remains: orjson reads an integer beyond
64 bits as a float, so such a ``remoteEndpoint`` port is refused (the stdlib took it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hybridrelay.exceptions import ProtocolError

try:
    import orjson
except ImportError:  # pragma: no cover - the stdlib's json does the same, slower
    orjson = None  # type: ignore[assignment]

__all__ = [
    "MAX_CONTROL_MESSAGE",
    "Accept",
    "ControlMessage",
    "RemoteEndpoint",
    "RenewToken",
    "Request",
    "Response",
    "encode_message",
    "encode_request",
    "encode_response",
    "header_text",
    "parse_message",
]

#: A .NET listener reads control commands into a 64 KiB buffer (PROTOCOL.md 4.2).
MAX_CONTROL_MESSAGE = 64 * 1024


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    address: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port}


@dataclass(frozen=True, slots=True)
class Accept:
    """Relay -> listener: a sender is waiting; open a rendezvous to ``address``."""

    address: str
    id: str
    connect_headers: dict[str, str] = field(default_factory=dict)
    remote_endpoint: RemoteEndpoint | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """Relay -> listener: an HTTP request.

    The *address-only* form (``method is None``) asks the listener to open the rendezvous at
    ``address``, where the full request follows.
    """

    address: str
    id: str
    request_target: str | None = None
    method: str | None = None
    request_headers: dict[str, str] | None = None
    remote_endpoint: RemoteEndpoint | None = None
    body: bool | None = None

    @property
    def address_only(self) -> bool:
        return self.method is None


@dataclass(frozen=True, slots=True)
class Response:
    """Listener -> relay: the response to ``request_id``; a binary body follows iff ``body``."""

    request_id: str
    status_code: int
    status_description: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    body: bool = False
    #: hybridrelay's extension (PROTOCOL.md 6.4): every value of the headers that
    #: ``responseHeaders`` cannot repeat (``Set-Cookie``), as (name, value) pairs in order;
    #: sent as ``repeatedResponseHeaders`` only when not empty (Azure's clients ignore it).
    repeated_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RenewToken:
    """Listener -> relay: a fresh token for the control channel."""

    token: str = field(repr=False)


ControlMessage = Accept | Request | Response | RenewToken


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"missing string field {key!r}")
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string")
    return value


def _headers(obj: dict[str, Any], key: str) -> dict[str, str] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"field {key!r} must be an object")
    try:
        # The common message, every value a string (the names of a JSON object always are):
        # checked by one join in C, the same dict as the loop below makes (one per relayed
        # request on each side, where the loop showed in the relay's profile).
        "".join(value.values())
    except TypeError:
        pass
    else:
        return dict(value)
    headers: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, list):  # tolerate array values; HTTP joins repeats with ", "
            item = ", ".join(str(v) for v in item)
        if not isinstance(item, str | int | float):
            raise ProtocolError(f"header {name!r} in {key!r} must be a string")
        headers[str(name)] = str(item)
    return headers


def _endpoint(obj: dict[str, Any]) -> RemoteEndpoint | None:
    value = obj.get("remoteEndpoint")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("field 'remoteEndpoint' must be an object")
    address, port = value.get("address"), value.get("port")
    if not isinstance(address, str) or not isinstance(port, int) or isinstance(port, bool):
        raise ProtocolError("field 'remoteEndpoint' needs a string address and an integer port")
    return RemoteEndpoint(address, port)


def _bool(obj: dict[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be a boolean")
    return value


def _status(value: Any) -> int:
    # Node and .NET send a number, the doc example a string (PROTOCOL.md 6.4): accept both.
    if isinstance(value, bool):
        raise ProtocolError("field 'statusCode' must be a number")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or not 100 <= value <= 999:
        raise ProtocolError("field 'statusCode' must be an HTTP status code")
    return value


def parse_message(text: str | bytes) -> ControlMessage | None:
    """Parse one control message.

    Returns None for a well-formed JSON object whose member is unknown (listeners and relays
    ignore those, PROTOCOL.md 4.2). Raises :class:`ProtocolError` for anything malformed.
    """
    if len(text) > 4 * MAX_CONTROL_MESSAGE:
        raise ProtocolError("control message is too large")
    try:
        document = _loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("control message is not valid JSON") from exc
    if not isinstance(document, dict) or not document:
        raise ProtocolError("control message must be a JSON object with one member")
    for kind, body in document.items():
        parser = _PARSERS.get(kind)
        if parser is None:
            continue
        if not isinstance(body, dict):
            raise ProtocolError(f"member {kind!r} must be an object")
        return parser(body)
    return None


def _parse_accept(body: dict[str, Any]) -> Accept:
    return Accept(
        address=_str(body, "address") or "",
        id=_str(body, "id") or "",
        connect_headers=_headers(body, "connectHeaders") or {},
        remote_endpoint=_endpoint(body),
    )


def _parse_request(body: dict[str, Any]) -> Request:
    return Request(
        address=_str(body, "address") or "",
        id=_str(body, "id") or "",
        request_target=_str(body, "requestTarget", required=False),
        method=_str(body, "method", required=False),
        request_headers=_headers(body, "requestHeaders"),
        remote_endpoint=_endpoint(body),
        body=_bool(body, "body"),
    )


def _parse_response(body: dict[str, Any]) -> Response:
    request_id = body.get("requestId")
    status = body.get("statusCode")
    description = body.get("statusDescription")
    headers = body.get("responseHeaders")
    flag = body.get("body", False)
    # The common response (one per relayed request, read by the relay): recognized by a few
    # type checks and one join in C, and made into the same Response as the checked parse
    # below makes of it (a test compares). ``headers`` is the parsed document's own dict.
    if (
        type(request_id) is str
        and type(status) is int
        and 100 <= status <= 999
        and (description is None or type(description) is str)
        and type(headers) is dict
        and type(flag) is bool
        and "repeatedResponseHeaders" not in body
    ):
        try:
            "".join(headers.values())
        except TypeError:
            pass
        else:
            return Response(request_id, status, description, headers, flag)
    return _parse_response_checked(body)


def _parse_response_checked(body: dict[str, Any]) -> Response:
    return Response(
        request_id=_str(body, "requestId") or "",
        status_code=_status(body.get("statusCode")),
        status_description=_str(body, "statusDescription", required=False),
        response_headers=_headers(body, "responseHeaders") or {},
        body=bool(_bool(body, "body")),
        repeated_headers=_pairs(body, "repeatedResponseHeaders"),
    )


def _pairs(obj: dict[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)
        for item in value
    ):
        raise ProtocolError(f"field {key!r} must be a list of [name, value] string pairs")
    return tuple((name, item) for name, item in value)


def _parse_renew(body: dict[str, Any]) -> RenewToken:
    return RenewToken(token=_str(body, "token") or "")


_PARSERS: dict[str, Callable[[dict[str, Any]], ControlMessage]] = {
    "accept": _parse_accept,
    "request": _parse_request,
    "response": _parse_response,
    "renewToken": _parse_renew,
}


def header_text(text: str) -> str:
    """A header name or value as a listener is told it: valid UTF-8 as it is, other bytes read
    as ISO-8859-1 (RFC 9110 5.5's obs-text), so that the JSON carries no lone surrogates.

    HTTP servers (aiohttp among them) decode header bytes as UTF-8 with ``surrogateescape``:
    a byte that is not UTF-8 becomes a lone surrogate, which ``json.dumps`` writes as a
    ``\\udcXX`` escape that strict JSON parsers refuse and others turn into garbage.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: the original bytes were not UTF-8
        return text.encode("utf-8", "surrogateescape").decode("latin-1")
    return text


def _wire_headers(headers: dict[str, str]) -> dict[str, str]:
    # Two joins and two checks in C: the common all-ASCII head costs no loop in Python.
    if "".join(headers).isascii() and "".join(headers.values()).isascii():
        return headers
    return {header_text(name): header_text(value) for name, value in headers.items()}


#: The protocol's compact JSON from the stdlib. One encoder for the process: ``json.dumps``
#: with any argument builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _dumps(document: dict[str, Any]) -> str:
    """``document`` as compact JSON (see the module: orjson, else the stdlib)."""
    if orjson is not None:
        try:
            return orjson.dumps(document).decode()
        except TypeError:  # a lone surrogate: orjson writes UTF-8 only, the stdlib escapes it
            pass
    return _COMPACT.encode(document)


def _loads(text: str | bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(text)
        except ValueError:  # not JSON, or JSON only the stdlib takes: it decides
            pass
    return json.loads(text)


def encode_message(message: ControlMessage) -> str:
    """Serialise a message to the exact JSON the protocol uses (compact, one member)."""
    body: dict[str, Any]
    if isinstance(message, Accept):
        body = {
            "address": message.address,
            "id": message.id,
            "connectHeaders": _wire_headers(message.connect_headers),
        }
        if message.remote_endpoint is not None:
            body["remoteEndpoint"] = message.remote_endpoint.to_json()
        return _dumps({"accept": body})
    if isinstance(message, Request):
        # The address-only form MUST omit method and body (PROTOCOL.md 6.2).
        if message.method is None:
            return _dumps({"request": {"address": message.address, "id": message.id}})
        return encode_request(
            message.address,
            message.id,
            message.request_target,
            message.method,
            message.request_headers,
            message.remote_endpoint,
            body=bool(message.body),
        )
    if isinstance(message, Response):
        return encode_response(
            message.request_id,
            message.status_code,
            message.status_description,
            message.response_headers,
            body=message.body,
            repeated_headers=message.repeated_headers,
        )
    return _dumps({"renewToken": {"token": message.token}})


def encode_response(
    request_id: str,
    status_code: int,
    status_description: str | None,
    response_headers: dict[str, str],
    *,
    body: bool,
    repeated_headers: tuple[tuple[str, str], ...] = (),
) -> str:
    """``encode_message(Response(...))`` without building the :class:`Response`: a listener
    writes one per relayed request, and a frozen dataclass' ``__init__`` (a
    ``object.__setattr__`` per field) cost more than the JSON itself (~2.5 against ~0.5 us)."""
    document: dict[str, Any] = {"requestId": request_id, "statusCode": status_code}
    if status_description is not None:
        document["statusDescription"] = status_description
    document["responseHeaders"] = response_headers
    if repeated_headers:
        document["repeatedResponseHeaders"] = [list(pair) for pair in repeated_headers]
    document["body"] = body
    return _dumps({"response": document})


def encode_request(
    address: str,
    request_id: str,
    request_target: str | None,
    method: str,
    request_headers: dict[str, str] | None,
    remote_endpoint: RemoteEndpoint | None,
    *,
    body: bool,
) -> str:
    """``encode_message(Request(...))`` of a full request (not address-only) without building
    the :class:`Request`: the relay writes one per relayed request, and a frozen dataclass'
    ``__init__`` (an ``object.__setattr__`` per field) showed in its profile as it did in the
    listener's (:func:`encode_response`)."""
    document: dict[str, Any] = {
        "address": address,
        "id": request_id,
        "requestTarget": request_target or "/",
        "method": method,
    }
    if remote_endpoint is not None:
        document["remoteEndpoint"] = remote_endpoint.to_json()
    document["requestHeaders"] = _wire_headers(request_headers or {})
    document["body"] = body
    return _dumps({"request": document})
