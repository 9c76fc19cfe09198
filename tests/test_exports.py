"""The public API is exactly what docs/SDK.md documents (issue 12, section 6).

``hybridrelay`` and ``hybridrelay.client`` each list their public names in ``__all__``. Every
one of them must import, carry a docstring and be documented in docs/SDK.md; no other public
name may sit in either namespace, and nothing private or transport-level may be exported
unless SDK.md documents it as part of the API (``attach()``'s argument and result).
"""

from __future__ import annotations
import __future__

import ast
import importlib
import inspect
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDK_DOC = ROOT / "docs" / "SDK.md"
PUBLIC_MODULES = ("hybridrelay", "hybridrelay.client")
#: Defined in ``hybridrelay.transport`` but public: ``HybridConnectionStream.attach`` takes a
#: ``StreamSink`` and returns a ``SpliceSocket``, and docs/SDK.md documents both.
DOCUMENTED_TRANSPORT_NAMES = frozenset({"StreamSink", "SpliceSocket"})
#: Package metadata, not API objects: no docstring of their own.
METADATA_NAMES = frozenset({"__version__"})


def public_names(module_name: str) -> list[str]:
    names: list[str] = importlib.import_module(module_name).__all__
    return names


def exported() -> list[tuple[str, str]]:
    return [(module, name) for module in PUBLIC_MODULES for name in public_names(module)]


EXPORTED = exported()
EXPORTED_IDS = [f"{module}.{name}" for module, name in EXPORTED]


def alias_docstring(name: str, obj: object) -> str | None:
    """The attribute docstring (a string right after the assignment) of a module-level alias
    such as ``RequestHandler = Callable[...]``, found in whichever loaded hybridrelay module
    assigns ``name`` to this very object."""
    for module in list(sys.modules.values()):
        if not module.__name__.startswith("hybridrelay.") or vars(module).get(name) is not obj:
            continue
        source = getattr(module, "__file__", None)
        if source is None:
            continue
        body = ast.parse(Path(source).read_text(encoding="utf-8")).body
        for statement, following in zip(body, body[1:], strict=False):
            targets = (
                statement.targets
                if isinstance(statement, ast.Assign)
                else [statement.target]
                if isinstance(statement, ast.AnnAssign)
                else []
            )
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                return following.value.value
    return None


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_sorted_and_complete(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = public_names(module_name)
    assert names == sorted(names), "keep __all__ sorted"
    assert len(names) == len(set(names)), "a name is listed twice"
    # Every public attribute (submodules and the __future__ import aside) is in __all__.
    visible = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType | __future__._Feature)
    }
    assert visible == set(names) - METADATA_NAMES


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_star_import_gives_exactly_all(module_name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(public_names(module_name))


def test_the_top_level_is_the_sdk_plus_the_exception_tree() -> None:
    import hybridrelay
    import hybridrelay.client
    import hybridrelay.exceptions

    expected = (
        set(hybridrelay.client.__all__) | set(hybridrelay.exceptions.__all__) | METADATA_NAMES
    )
    assert set(hybridrelay.__all__) == expected
    for name in hybridrelay.client.__all__:
        assert getattr(hybridrelay, name) is getattr(hybridrelay.client, name), name


def test_version_is_the_packages() -> None:
    import hybridrelay

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert hybridrelay.__version__ == project["version"]


@pytest.mark.parametrize(("module_name", "name"), EXPORTED, ids=EXPORTED_IDS)
def test_every_public_name_imports_and_has_a_docstring(module_name: str, name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import {name}", namespace)
    obj = namespace[name]
    if name in METADATA_NAMES:
        return
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = obj.__doc__  # a class's own: __doc__ is not inherited
    else:
        doc = alias_docstring(name, obj)
    assert doc and doc.strip(), f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize(("module_name", "name"), EXPORTED, ids=EXPORTED_IDS)
def test_every_public_name_is_in_the_sdk_doc(module_name: str, name: str) -> None:
    text = SDK_DOC.read_text(encoding="utf-8")
    assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text), f"docs/SDK.md lacks {name}"


@pytest.mark.parametrize(("module_name", "name"), EXPORTED, ids=EXPORTED_IDS)
def test_nothing_private_leaks(module_name: str, name: str) -> None:
    if name in METADATA_NAMES:
        return
    assert not name.startswith("_"), f"{module_name} exports the private name {name}"
    obj = getattr(importlib.import_module(module_name), name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # a type alias: its parts are checked where they are exported themselves
    home = obj.__module__
    assert home.startswith("hybridrelay"), f"{name} is re-exported from {home}"
    assert not any(part.startswith("_") for part in home.split(".")), f"{name} lives in {home}"
    layer = home.split(".")[1] if "." in home else ""
    if layer == "transport":
        assert name in DOCUMENTED_TRANSPORT_NAMES, f"transport class {name} is exported"
    assert layer not in {"server", "bridge", "cli"}, f"{name} comes from the program {home}"
