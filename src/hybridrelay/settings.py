"""The configuration model's machinery: frozen dataclasses whose fields carry their rules.

Each program's configuration (the relay's :class:`~hybridrelay.server.config.RelayConfig`, the
bridge's :class:`~hybridrelay.bridge.config.BridgeConfig`) is a tree of frozen dataclasses.
A field made with :func:`setting` carries a :class:`Setting`: its help text, bounds, choices,
YAML key and command-line flags. From that one description come

* the checks on construction (:func:`check_fields`, called from ``__post_init__``), so a
  configuration built in code is held to the same bounds as one read from a file;
* the one YAML reader (:func:`load_yaml`, :func:`from_document`): unknown keys are errors that
  name the key's path (``hybrid_connections[2].name``);
* the command-line options (:func:`add_arguments`, :func:`given_arguments`), so an option is
  described once;
* the Markdown reference (:func:`reference`, ``python -m hybridrelay.cli.config_reference``).

A configuration is a value: change it with :func:`dataclasses.replace`, never in place, so
the relay can be handed a new one while it runs.

Secrets (fields with ``secret=True``) are left out of ``repr`` and never quoted in an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import logging
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hybridrelay.exceptions import ConfigurationError

__all__ = [
    "LOG_LEVEL",
    "LOG_LEVELS",
    "Extra",
    "Setting",
    "add_arguments",
    "add_setting_argument",
    "apply",
    "check_value",
    "check_fields",
    "from_document",
    "given_arguments",
    "load_yaml",
    "located",
    "read_document",
    "reference",
    "setting",
    "walk",
]

T = TypeVar("T")

#: The log levels every command accepts (``--log-level``, the bridge's ``log_level:``).
LOG_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a configuration field means, and how it is written in YAML and on the command line.

    Attributes:
        help: one sentence for ``--help`` and the reference.
        key: its YAML key (default: the field name); ``""`` keeps it out of YAML.
        section: the YAML mapping the key sits in, when the file groups fields the model keeps
            flat (the relay's ``namespace:``).
        low, high: inclusive bounds of a number.
        choices: the allowed strings.
        flags: command-line flags (``("-a", "--keep-alive-interval")``); none: file only.
        metavar: the value's name in ``--help``.
        secret: kept out of ``repr`` and error messages.
        parse: converts the YAML value (``parse(value, path)``) when the type alone cannot.
        from_text: converts one command-line string (``-L 8080:web``) when the type alone
            cannot; a tuple field with flags is repeatable and adds to the file's entries.
        kind: the value's type as the reference names it, when the annotation does not say.
        entry: the model a list's items are read as, when the field holds something else
            (``parse`` then gets the tuple of entries: ``authorization_rules``).
    """

    help: str
    key: str | None = None
    section: str | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    secret: bool = False
    parse: Callable[[Any, str], Any] | None = None
    from_text: Callable[[str], Any] | None = None
    kind: str | None = None
    entry: type[Any] | None = None


@dataclasses.dataclass(frozen=True)
class Extra:
    """A YAML key of a model class that is not one of its fields: the class' ``from_yaml``
    hook turns it into field values (the relay's ``listen: "[host:]port"``)."""

    help: str
    kind: str = "string"
    #: Its command-line flags, which the program adds itself (the bridge's ``-x``).
    flags: tuple[str, ...] = ()


_MISSING: Any = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    help: str,
    key: str | None = None,
    section: str | None = None,
    low: float | None = None,
    high: float | None = None,
    choices: Sequence[str] = (),
    flags: Sequence[str] = (),
    metavar: str | None = None,
    secret: bool = False,
    parse: Callable[[Any, str], Any] | None = None,
    from_text: Callable[[str], Any] | None = None,
    kind: str | None = None,
    entry: type[Any] | None = None,
) -> Any:
    """A dataclass field with its :class:`Setting` (see there for the arguments)."""
    meta = Setting(
        help=help,
        key=key,
        section=section,
        low=low,
        high=high,
        choices=tuple(choices),
        flags=tuple(flags),
        metavar=metavar,
        secret=secret,
        parse=parse,
        from_text=from_text,
        kind=kind,
        entry=entry,
    )
    metadata = {"setting": meta}
    if default_factory is not None:
        return dataclasses.field(
            default_factory=default_factory, metadata=metadata, repr=not secret
        )
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


#: The shared ``--log-level`` option (serve and serve-app; the bridge's ``log_level`` field).
LOG_LEVEL = Setting(
    help="how much the process logs",
    choices=tuple(LOG_LEVELS),
    flags=("--log-level",),
)


def _setting_of(f: dataclasses.Field[Any]) -> Setting | None:
    meta = f.metadata.get("setting")
    return meta if isinstance(meta, Setting) else None


#: Resolved annotations per model class (a class's annotations never change; models are
#: built on every configuration change, and the relay builds entities at run time).
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    # The annotations are strings (from __future__ import annotations), resolved in the
    # class's module.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _tuple_item(tp: Any) -> Any | None:
    """``tuple[X, ...]`` -> X; anything else -> None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _bounds_text(meta: Setting, *, integer: bool = True) -> str:
    if meta.low is not None and meta.high is not None:
        if not integer:
            return f"of at least {_number(meta.low)} and at most {_number(meta.high)}"
        return f"from {_number(meta.low)} to {_number(meta.high)}"
    if meta.low is not None:
        return f"of at least {_number(meta.low)}"
    if meta.high is not None:
        return f"of at most {_number(meta.high)}"
    return ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _runtime_types(tp: Any) -> tuple[type, ...]:
    """What ``isinstance`` can check of an annotation (a class, a union of classes)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(tp) for t in _runtime_types(arg))
    origin = typing.get_origin(tp) or tp
    return (origin,) if isinstance(origin, type) else ()


def check_value(tp: Any, meta: Setting | None, value: Any, where: str) -> Any:
    """``value`` checked against the field's type and rules; returns it (ints as floats where
    the field is a float, lists as tuples).

    Raises:
        ConfigurationError: naming ``where``; a secret's value is never quoted.
    """
    inner, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigurationError(f"{where}: required")
    bounds = _bounds_text(meta) if meta is not None else ""
    low = meta.low if meta is not None else None
    high = meta.high if meta is not None else None
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}: expected true or false")
        return value
    if inner is int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise ConfigurationError(f"{where}: expected an integer {bounds}".rstrip())
        return value
    if inner is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low is None or value >= low)
            or not (high is None or value <= high)
            or value != value  # NaN
        ):
            bounds = _bounds_text(meta, integer=False) if meta is not None else ""
            raise ConfigurationError(f"{where}: expected a number {bounds}".rstrip())
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigurationError(f"{where}: expected a string")
        if meta is not None and meta.choices and value not in meta.choices:
            shown = "the given value" if meta.secret else repr(value)
            raise ConfigurationError(f"{where}: {shown} is not one of {', '.join(meta.choices)}")
        return value
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        if not isinstance(value, inner):
            raise ConfigurationError(f"{where}: expected a {inner.__name__}")
        return value
    item = _tuple_item(inner)
    if item is not None:
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            raise ConfigurationError(f"{where}: expected a list")
        kinds = _runtime_types(item)
        if kinds and not all(isinstance(v, kinds) for v in value):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigurationError(f"{where}: expected a list of {names}")
        return value
    if isinstance(inner, type) and not isinstance(value, inner):
        raise ConfigurationError(f"{where}: expected a {inner.__name__}")
    return value


def check_fields(instance: Any) -> None:
    """Check every :func:`setting` field of a frozen dataclass instance; call it from
    ``__post_init__``. Floats given as ints become floats, lists tuples.

    Raises:
        ConfigurationError: the first field that breaks its rules, by name.
    """
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        meta = _setting_of(f)
        if meta is None:
            continue
        value = getattr(instance, f.name)
        checked = check_value(hints[f.name], meta, value, f.name)
        if checked is not value:
            object.__setattr__(instance, f.name, checked)


def located(where: str, exc: ConfigurationError) -> ConfigurationError:
    """``exc`` prefixed with ``where`` (once)."""
    text = str(exc)
    if not where or text.startswith(where):
        return exc
    return ConfigurationError(f"{where}.{text}" if _names_a_key(text) else f"{where}: {text}")


def _names_a_key(text: str) -> bool:
    head = text.split(":", 1)[0]
    return bool(head) and " " not in head and ":" in text


# -- YAML --------------------------------------------------------------------------------------


def read_document(path: str | Path, *, what: str = "config file") -> Any:
    """The parsed YAML of ``path`` (``{}`` for an empty file).

    Raises:
        ConfigurationError: the file cannot be read or is not YAML.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigurationError(f"cannot read {what} {path}: {reason}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{what} {path}{_yaml_problem(exc)}") from None
    return {} if document is None else document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``, line 12: <problem>`` of a YAML error, on one line: PyYAML's own text spans several
    lines and names ``"<unicode string>"`` instead of the file."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    text = "invalid YAML: " + (" ".join(str(problem).split()) if problem else "unreadable")
    context = getattr(exc, "context", None)
    if context and problem and context != problem:
        text += f" ({' '.join(str(context).split())})"
    return f"{where}: {text}"


def load_yaml(cls: type[T], path: str | Path, *, what: str = "config file") -> T:
    """Read ``path`` into a ``cls``; errors name the file and the key's path.

    Raises:
        ConfigurationError: unreadable, not YAML, or breaks the model's rules.
    """
    document = read_document(path, what=what)
    try:
        return from_document(cls, document)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'KEY'?)`` for the nearest known key, when one is near enough."""
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _yaml_key(f: dataclasses.Field[Any], meta: Setting) -> str:
    return f.name if meta.key is None else meta.key


def from_document(cls: type[T], document: Any, path: str = "") -> T:
    """Build a ``cls`` from a parsed YAML value at ``path``.

    A mapping's keys are the fields' YAML keys (and the class's ``YAML_EXTRAS``, which its
    ``from_yaml(values, path)`` hook turns into fields); a class with a ``from_text``
    classmethod also accepts a string (a forward's spec). Fields without a :class:`Setting`
    are not read.

    Raises:
        ConfigurationError: the first mistake, naming its path.
    """
    if document is None:
        document = {}
    from_text = getattr(cls, "from_text", None)
    if isinstance(document, str) and from_text is not None:
        try:
            result: T = from_text(document)
        except ConfigurationError as exc:
            raise located(path, exc) from None
        return result
    if not isinstance(document, Mapping):
        raise ConfigurationError(f"{path or 'the document'}: expected a mapping")
    sections: dict[str, Mapping[str, Any]] = {}
    used: dict[str, set[str]] = {"": set()}
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = _setting_of(f)
        if meta is None or meta.key == "":
            continue
        container: Mapping[str, Any] = document
        where = path
        if meta.section is not None:
            used[""].add(meta.section)
            where = _key(path, meta.section)
            if meta.section not in sections:
                raw = document.get(meta.section)
                if raw is None:
                    raw = {}
                if not isinstance(raw, Mapping):
                    raise ConfigurationError(f"{where}: expected a mapping")
                sections[meta.section] = raw
                used[meta.section] = set()
            container = sections[meta.section]
        key = _yaml_key(f, meta)
        used["" if meta.section is None else meta.section].add(key)
        if key not in container or container[key] is None:
            continue  # the field's default (or the from_yaml hook's value)
        values[f.name] = _convert(hints[f.name], meta, container[key], _key(where, key))
    extras: Mapping[str, Extra] = getattr(cls, "YAML_EXTRAS", {})
    raw_extras = {k: document[k] for k in extras if document.get(k) is not None}
    used[""].update(extras)
    for section, keys in used.items():
        mapping = document if not section else sections.get(section, {})
        unknown = sorted(str(k) for k in mapping if k not in keys)
        if unknown:
            where = _key(path, section) if section else path
            names = ", ".join(_key(where, k) + _did_you_mean(k, keys) for k in unknown)
            raise ConfigurationError(f"unknown key(s): {names}")
    hook = getattr(cls, "from_yaml", None)
    try:
        if hook is not None:
            values = hook(values, raw_extras, path)
        missing = [
            _key(path, _yaml_key(f, m) if m.section is None else f"{m.section}.{_yaml_key(f, m)}")
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if (m := _setting_of(f)) is not None
            and f.name not in values
            and f.default is _MISSING
            and f.default_factory is _MISSING
        ]
        if missing:
            raise ConfigurationError(f"{missing[0]}: required")
        return cls(**values)
    except ConfigurationError as exc:
        raise located(path, exc) from None


def _convert(tp: Any, meta: Setting, value: Any, where: str) -> Any:
    if meta.entry is not None:
        value = _convert_type(tuple[meta.entry, ...], None, value, where)  # type: ignore[name-defined]
    if meta.parse is not None:
        try:
            return meta.parse(value, where)
        except ConfigurationError as exc:
            raise located(where, exc) from None
    return _convert_type(tp, meta, value, where)


def _convert_type(tp: Any, meta: Setting | None, value: Any, where: str) -> Any:
    inner, _ = _optional(tp)
    if _is_model(inner):
        return from_document(inner, value, where)
    item = _tuple_item(inner)
    if item is not None:
        if not isinstance(value, list):
            raise ConfigurationError(f"{where}: expected a list")
        return tuple(_convert_type(item, None, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        if not isinstance(value, str):
            raise ConfigurationError(f"{where}: expected a string")
        try:
            return inner(value.lower())
        except ValueError:
            names = ", ".join(str(m.value) for m in inner)
            raise ConfigurationError(f"{where}: {value!r} is not one of {names}") from None
    return check_value(tp, meta, value, where)


# -- the command line --------------------------------------------------------------------------


def walk(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every :func:`setting` field of ``cls`` and its nested models: (dotted name, field,
    resolved type), depth first in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = _setting_of(f)
        if meta is None:
            continue
        name = f"{prefix}{f.name}"
        yield name, f, hints[f.name]
        inner, _ = _optional(hints[f.name])
        if _is_model(inner):
            yield from walk(inner, name + ".")


def _default_text(f: dataclasses.Field[Any]) -> str | None:
    if f.default is not _MISSING and f.default not in (None, (), ""):
        value = f.default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return _number(value)
        return str(value)
    return None


def _text_converter(tp: Any, meta: Setting, flag: str) -> Callable[[str], Any]:
    inner, _ = _optional(tp)

    def convert(text: str) -> Any:
        try:
            if meta.from_text is not None:
                return meta.from_text(text)
            value: Any = text
            if inner is int:
                value = int(text)
            elif inner is float:
                value = float(text)
            return check_value(tp, meta, value, flag)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

    return convert


def add_setting_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    meta: Setting,
    tp: Any,
    dest: str,
    *,
    default: Any = None,
    default_text: str | None = None,
) -> None:
    """Add one :class:`Setting`'s flags to ``parser``, with ``dest``; values are checked as
    the model checks them. A tuple field's flag is repeatable (``action="append"``)."""
    inner, _ = _optional(tp)
    help_text = meta.help
    if default_text:
        help_text += f" (default {default_text})"
    kwargs: dict[str, Any] = {"dest": dest, "help": help_text, "default": default}
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif meta.choices:
        kwargs["choices"] = list(meta.choices)
    else:
        kwargs["metavar"] = meta.metavar or dest.rpartition(".")[2].upper()
        if _tuple_item(inner) is not None:
            # Kept as text: given_arguments converts it, so a bad spec is a
            # ConfigurationError the command reports like any other, not a usage error.
            kwargs["action"] = "append"
        else:
            kwargs["type"] = _text_converter(tp, meta, meta.flags[-1])
    parser.add_argument(*meta.flags, **kwargs)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Any],
    *,
    only: Callable[[str], bool] = lambda name: True,
) -> None:
    """Add the flags of every :func:`setting` of ``cls`` (nested models included) that has
    some; ``dest`` is the dotted field name (``server.port``), the default None ("not
    given"), so the file's value stays unless the flag is given."""
    for name, f, tp in walk(cls):
        meta = _setting_of(f)
        if meta is None or not meta.flags or not only(name):
            continue
        add_setting_argument(parser, meta, tp, name, default_text=_default_text(f))


def given_arguments(args: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    """The options of :func:`add_arguments` that were given: dotted field name -> value
    (a repeatable option's values as a tuple, each converted by the setting's ``from_text``).

    Raises:
        ConfigurationError: a repeatable option's value is malformed.
    """
    given: dict[str, Any] = {}
    for name, f, _ in walk(cls):
        meta = _setting_of(f)
        if meta is None or not meta.flags:
            continue
        value = getattr(args, name, None)
        if value is None or value == []:
            continue
        if isinstance(value, list):
            convert = meta.from_text or (lambda text: text)
            value = tuple(convert(text) for text in value)
        given[name] = value
    return given


def apply(config: T, given: Mapping[str, Any]) -> T:
    """``config`` with the command line's values (from :func:`given_arguments`): scalars
    replace the file's, repeatable options add to the file's entries."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in given.items():
        head, dot, rest = name.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, tuple):
            changes[name] = getattr(config, name) + value
        else:
            changes[name] = value
    for head, values in nested.items():
        changes[head] = apply(getattr(config, head), values)
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


# -- the reference -----------------------------------------------------------------------------


def _kind(tp: Any, meta: Setting) -> str:
    if meta.kind:
        return meta.kind
    inner, optional = _optional(tp)
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if inner in names:
        text = names[inner]
    elif _tuple_item(inner) is not None:
        item = _tuple_item(inner)
        text = f"list of {'mappings' if _is_model(item) else 'values'}"
    elif _is_model(inner):
        text = "mapping"
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        text = " \\| ".join(str(m.value) for m in inner)
    else:
        text = getattr(inner, "__name__", str(inner))
    if meta.choices:
        text = " \\| ".join(meta.choices)
    return text


def _rule_text(meta: Setting) -> str:
    low = None if meta.low is None else _number(meta.low)
    high = None if meta.high is None else _number(meta.high)
    if low is not None and high is not None:
        return f"{low}–{high}"
    if low is not None:
        return f"≥ {low}"
    return "" if high is None else f"≤ {high}"


def _flags_text(flags: Sequence[str]) -> str:
    return ", ".join(f"`{flag}`" for flag in flags)


def reference(cls: type[Any], path: str = "", *, heading: str = "###") -> list[str]:
    """The Markdown reference of ``cls``'s YAML keys and flags: one table per mapping, the
    nested ones after it."""
    lines = [
        "| key | type | default | rule | flag | meaning |",
        "|---|---|---|---|---|---|",
    ]
    later: list[tuple[str, type[Any]]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = _setting_of(f)
        if meta is None or meta.key == "":
            continue
        key = _yaml_key(f, meta)
        if meta.section is not None:
            key = f"{meta.section}.{key}"
        full = _key(path, key)
        tp = hints[f.name]
        inner, _ = _optional(tp)
        item = _tuple_item(inner)
        if _is_model(inner) and meta.parse is None:
            later.append((full, inner))
        elif item is not None and _is_model(item) and meta.parse is None:
            later.append((f"{full}[]", item))
        elif meta.entry is not None:
            later.append((f"{full}[]", meta.entry))
        default = _default_text(f)
        hooked = meta.parse is not None and hasattr(cls, "from_yaml")  # or given in parts
        if f.default is _MISSING and f.default_factory is _MISSING and not hooked:
            default_cell = "required"
        else:
            default_cell = f"`{default}`" if default else ""
        lines.append(
            f"| `{full}` | {_kind(tp, meta)} | {default_cell} | "
            f"{_rule_text(meta)} | {_flags_text(meta.flags)} | {meta.help} |"
        )
    for extra_key, extra in getattr(cls, "YAML_EXTRAS", {}).items():
        lines.append(
            f"| `{_key(path, extra_key)}` | {extra.kind} |  |  | {_flags_text(extra.flags)} | "
            f"{extra.help} |"
        )
    for sub_path, sub in later:
        lines += ["", f"{heading} `{sub_path}`", ""]
        doc = (sub.__doc__ or "").strip().split("\n\n")[0]
        if doc:
            lines += [" ".join(doc.replace("``", "`").split()), ""]
        lines += reference(sub, sub_path, heading=heading)
    return lines
