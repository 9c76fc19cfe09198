"""The layering rules of docs/SDK.md and STYLE.md, checked on the source (AST, no imports).

* The protocol core (``protocol/``, ``auth/``) is pure: standard library and the core only,
  never an I/O module, so it stays testable and fuzzable without sockets or an event loop.
* The bridge is built on the public SDK: it may not reach into SDK internals, the relay
  server or the transport.
* The relay server and the SDK do not depend on each other.
* Only ``transport/`` reaches into aiohttp's private modules (``aiohttp._...``): what it relies
  on is listed in docs/DECISIONS.md D1 and pinned by the ``aiohttp`` version range.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "hybridrelay"
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "threading", "subprocess", "aiohttp"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_of(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules_of("protocol", "auth"), ids=lambda p: p.name)
def test_the_protocol_core_is_pure(path: Path) -> None:
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "hybridrelay":
            assert name == "hybridrelay.exceptions" or name.startswith(
                ("hybridrelay.protocol", "hybridrelay.auth")
            ), f"{path.name} imports {name}"
        else:
            assert top in sys.stdlib_module_names, f"{path.name} imports {name}"
            assert top not in IO_MODULES, f"{path.name} imports the I/O module {name}"


BRIDGE_MAY_USE = (
    "hybridrelay.bridge",
    "hybridrelay.exceptions",
    "hybridrelay.protocol",
    "hybridrelay.settings",
)
# The SDK's public surface: the package itself and its documented backoff helpers.
SDK_PUBLIC = {"hybridrelay.client", "hybridrelay.client.backoff"}


@pytest.mark.parametrize("path", modules_of("bridge"), ids=lambda p: p.name)
def test_the_bridge_uses_only_the_public_sdk(path: Path) -> None:
    for name in imported_modules(path):
        if not name.startswith("hybridrelay"):
            continue
        assert name in SDK_PUBLIC or name.startswith(BRIDGE_MAY_USE), (
            f"bridge/{path.name} imports {name}: if the bridge needs an SDK internal, the SDK "
            "is missing something"
        )


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [("server", ("hybridrelay.client", "hybridrelay.bridge")), ("client", ("hybridrelay.server",))],
)
def test_relay_and_sdk_are_independent(folder: str, forbidden: tuple[str, ...]) -> None:
    for path in modules_of(folder):
        for name in imported_modules(path):
            assert not name.startswith(forbidden), f"{folder}/{path.name} imports {name}"


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(PACKAGE.rglob("*.py")) if p.parent.name != "transport"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_only_the_transport_touches_aiohttp_internals(path: Path) -> None:
    private = {name for name in imported_modules(path) if name.startswith("aiohttp._")}
    assert not private, f"{path.relative_to(PACKAGE)} imports {private}: keep it in transport/"
