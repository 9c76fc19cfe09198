"""The layering rules of docs/SDK.md and STYLE.md, checked on the source (AST, no imports).

* The protocol core (``protocol/``, ``auth/``) is pure: standard library and the core only,
  never an I/O module, so it stays testable and fuzzable without sockets or an event loop.
* The bridge is built on the public SDK: it may not reach into SDK internals, the relay
  server or the transport.
* The relay server and the SDK do not depend on each other.
* Only ``transport/`` reaches into aiohttp's private modules (``aiohttp._...``): what it relies
  on is listed in docs/DECISIONS.md D1 and pinned by the ``aiohttp`` version range.
* The transport is below the SDK, the relay and the bridge: it imports none of them; only the
  command line (``cli/``, ``__main__``) imports the command line.
* No import cycle anywhere in the package, counting imports inside functions and under
  ``TYPE_CHECKING``: a cycle hides a module that does two jobs (issue 12: ``server/app.py``,
  ``http_relay.py`` and ``ingress.py`` imported each other).
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_imports(name: str, path: Path) -> set[str]:
    """The package's modules that module ``name`` imports, wherever the import statement is
    (top level, function, ``if TYPE_CHECKING``), relative imports resolved; ``from m import x``
    counts as importing ``m.x`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    graph = {name: package_imports(name, path) for name, path in MODULES.items()}
    assert import_cycles(graph) == []


def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The check itself, on the shape issue 12 found: a module importing its importer from
    inside a function, and a relative import."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    http_relay = tmp_path / "http_relay.py"
    http_relay.write_text(
        "def handler():\n    from hybridrelay.server.app import RelayServer\n"
        "from . import broker\n",
        encoding="utf-8",
    )
    # Read as if it were server/http_relay.py.
    found = package_imports("hybridrelay.server.http_relay", http_relay)
    assert {"hybridrelay.server.app", "hybridrelay.server.broker"} <= found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("transport", ("hybridrelay.client", "hybridrelay.server", "hybridrelay.bridge")),
        ("server", ("hybridrelay.cli",)),
        ("client", ("hybridrelay.cli",)),
        ("bridge", ("hybridrelay.cli",)),
    ],
)
def test_lower_layers_do_not_import_higher_ones(folder: str, forbidden: tuple[str, ...]) -> None:
    for name, path in MODULES.items():
        if not name.startswith(f"hybridrelay.{folder}."):
            continue
        for imported in package_imports(name, path):
            assert not any(
                imported == top or imported.startswith(f"{top}.") for top in forbidden
            ), f"{name} imports {imported}"


def modules_of(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).glob("*.py"))


#: Libraries outside the standard library that the pure core may use: pure functions on bytes
#: and values, no I/O (orjson: the control messages' JSON, DECISIONS D17).
PURE_LIBRARIES = frozenset({"orjson"})


@pytest.mark.parametrize("path", modules_of("protocol", "auth"), ids=lambda p: p.name)
def test_the_protocol_core_is_pure(path: Path) -> None:
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "hybridrelay":
            assert name == "hybridrelay.exceptions" or name.startswith(
                ("hybridrelay.protocol", "hybridrelay.auth")
            ), f"{path.name} imports {name}"
        else:
            assert top in sys.stdlib_module_names or top in PURE_LIBRARIES, (
                f"{path.name} imports {name}"
            )
            assert top not in IO_MODULES, f"{path.name} imports the I/O module {name}"


BRIDGE_MAY_USE = (
    "hybridrelay.bridge",
    "hybridrelay.exceptions",
    # Metrics and the /metrics, /healthz, /readyz endpoint, shared with the relay's
    # management listener (they import neither the SDK's internals nor the server).
    "hybridrelay.observability",
    "hybridrelay.protocol",
    "hybridrelay.settings",
    # One-line descriptions of a socket that cannot be bound (pure, shared with the relay).
    "hybridrelay.socket_errors",
    # Keep-alive probes on accepted TCP connections (-L ports, shared with the relay's ingress).
    "hybridrelay.tcp_keepalive",
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
