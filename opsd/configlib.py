"""Typed configs from YAML: the generic machinery, with no knowledge of any opsd section.

    load_yaml(path)  ->  apply_overrides(data, ["a.b=1", ...])  ->  from_dict(Cls, data)

Every error is a :class:`ConfigError` naming the full dotted key. Fields, ``validate()``, ``check`` and
``RETIRED_KEYS``: docs/ARCHITECTURE.md ("Configs and data").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from opsd.atomic import write_text_atomic

from opsd.errors import UserInputError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "FieldDoc",
    "apply_overrides",
    "check",
    "describe",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_yaml",
    "save_yaml",
    "to_dict",
    "validate_all",
]


class ConfigError(UserInputError):
    """A config value that cannot be used, with the dotted key it belongs to (a ValueError; the CLI prints it as
    one line, see opsd.errors).

    ``key`` is relative to the section that raised it until ``from_dict`` / ``validate_all`` prefix the section's
    path; ``""`` means the error is about the input as a whole (a file, an override string). ``source`` is where
    the value came from (a file name, an override), when known.
    """

    def __init__(self, key: str, message: str, *, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source)
        # A wrapped error (PromptError, ...) may already start with its own full key: do not repeat it.
        if self.key and not self.message.startswith((self.key + " ", self.key + ".")):
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)

    def __reduce__(self):  # picklable across Ray, keyword included
        return (_rebuild_error, (self.key, self.message, self.source))

    def under(self, path: str) -> ConfigError:
        """The same error with ``path`` (a section's dotted key) put in front of its key."""
        return ConfigError(_join(path, self.key), self.message, source=self.source)

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.message, source=source)


def _rebuild_error(key: str, message: str, source: str | None) -> ConfigError:
    return ConfigError(key, message, source=source)


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition``: the one-liner sections use in ``validate()``."""
    if not condition:
        raise ConfigError(key, message)


def _join(path: str, key: str) -> str:
    if not path:
        return key
    if not key:
        return path
    if key.startswith("["):  # a list item: "target_modules[2]"
        return path + key
    return f"{path}.{key}"


# --------------------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float and refuses duplicate keys.

    YAML 1.1 (PyYAML) needs a dot and a signed exponent for a float, so ``lr: 1e-5`` would be the *string*
    "1e-5"; YAML 1.2 and every user expect a number. A repeated key would silently keep the last value.
    """

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (prompt templates) as ``|`` blocks, readable in a run dir."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with opsd's loader (``1e-5`` is a float, duplicate keys are errors)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError("", _yaml_error_text(e), source=source) from None


def _yaml_error_text(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = f"{context}: {problem}" if context else problem
    return f"{where}invalid YAML ({what})"


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into plain data. An empty file is an empty mapping."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("", "config file not found", source=path) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError("", f"cannot read config file ({e})", source=path) from None
    data = parse_yaml(text, source=path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping of sections, got {_kind(data)}", source=path)
    return data


def dump_yaml(data: Any) -> str:
    """Plain data (see :func:`to_dict`) as YAML text, keys in field order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def save_yaml(data: Any, path: str | os.PathLike[str], header: str = "") -> None:
    """Write YAML atomically: a temp file in the same folder, fsynced, then renamed over ``path``."""
    write_text_atomic(path, header + dump_yaml(data))


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied, in order.

    Values are YAML scalars or flow values: ``learner.optim.lr=2e-4``, ``learner.lora.target_modules=[q_proj,v_proj]``,
    ``rollout.max_model_len=null``, ``data.columns={problem: question}``. An empty value (``key=``) is the empty
    string. A value replaces whatever was there, a whole section included. Missing sections are created; keys that
    do not exist are left for :func:`from_dict` to reject with a suggestion.
    """
    result = _copy_tree(data)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError("", f"override {item!r} must look like key=value (e.g. learner.optim.lr=2e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError("", f"override {item!r} has an empty key or an empty part in {key!r}")
        raw = raw.strip()
        value: Any = "" if raw == "" else parse_yaml(raw, source=f"override {item!r}")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    ".".join(parts[: i + 1]),
                    f"is a value, not a section: cannot set {key!r}",
                    source=f"override {item!r}",
                )
            node = child
        node[parts[-1]] = value
    return result


def _copy_tree(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy_tree(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy_tree(v) for v in data]
    return data


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build the dataclass ``cls`` (and its nested sections) from plain data, then validate it.

    ``path`` is the dotted key of ``cls`` inside a larger config (for error messages). Keys that are absent take
    the field's default; a section given as ``null`` (an empty YAML section) is all defaults.
    """
    obj = _build(cls, data, path, root=cls, root_path=path)
    validate_all(obj, path)
    return obj


def validate_all(obj: Any, path: str = "") -> None:
    """Run ``validate()`` on every section of ``obj``, nested sections first, prefixing keys with their path.

    ``ConfigError`` keys are relative to the section; any other ``ValueError`` a section raises (e.g. a
    ``PromptError``) becomes a ``ConfigError`` on the section's key with the same message.
    """
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_all(value, _join(path, f.name))
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigError as e:
        raise e.under(path) from None
    except ValueError as e:
        raise ConfigError(path, str(e)) from e


def _build(cls: type, data: Any, path: str, root: type, root_path: str) -> Any:
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        names = ", ".join(f.name for f in _fields(cls))
        raise ConfigError(path, f"expected a section (a mapping with keys {names}), got {_show(data)}")
    fields = {f.name: f for f in _fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {_show(key)}")
        if key not in fields:
            full = _join(path, key)
            retired = getattr(cls, "RETIRED_KEYS", {}).get(key)
            if retired:  # a key of an earlier version: say what replaced it
                raise ConfigError(full, f"is no longer a key: {retired}")
            raise ConfigError(full, f"unknown key{_suggest(key, full, list(fields), root, root_path)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, root, root_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = f.metadata.get("doc")
            raise ConfigError(key, "required key missing" + (f" ({doc})" if doc else ""))
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str, root: type, root_path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if _is_section(tp):
        return _build(tp, value, key, root, root_path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        for arg in candidates:
            try:
                return _convert(arg, value, key, root, root_path)
            except ConfigError as e:
                if e.key != key and len(candidates) == 1:  # a deeper key (list item, section field) says more
                    raise
        raise ConfigError(key, f"expected {type_text(tp)}, got {_show(value)}{_hint(args, value)}")
    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed_text = ", ".join(repr(a) for a in args)
        raise ConfigError(key, f"must be one of {allowed_text}; got {_show(value)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {value!r}")
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected str, got {_show(value)}{_hint((str,), value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        (item_tp,) = args
        return [_convert(item_tp, v, f"{key}[{i}]", root, root_path) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {type_text(tp)} ({len(args)} items), got {_show(value)}")
            item_types = list(args)
        return tuple(_convert(t, v, f"{key}[{i}]", root, root_path) for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        key_tp, value_tp = args
        return {
            _convert(key_tp, k, f"{key} (key {k!r})", root, root_path): _convert(
                value_tp, v, _join(key, str(k)), root, root_path
            )
            for k, v in value.items()
        }
    raise TypeError(f"configlib: unsupported field type {tp!r} for {key!r}")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(key, f"expected {type_text(tp)}, got {_show(value)}")


def _hint(allowed: tuple[Any, ...], value: Any) -> str:
    """A fix for the two type errors YAML makes easy: unquoted text that parses as something else, and None."""
    if value == "None" and type(None) in allowed:
        return "; write null for None"
    if str in allowed and value is not None and not isinstance(value, str):
        return "; quote the value to pass it as text"
    return ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A value as an error message shows it: the value and its type, shortened."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _suggest(name: str, full: str, siblings: list[str], root: type, root_path: str) -> str:
    """'; did you mean ...?' for an unknown key: a close sibling, else a key of that name elsewhere, else a close
    dotted key anywhere in the config (``lr`` -> ``learner.optim.lr``)."""
    parent = full[: -len(name)]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent + close[0]!r}?"
    everything = [_join(root_path, k) for k in _all_keys(root)]
    relative = full[len(root_path) + 1 :] if root_path else full
    same_tail = [k for k in everything if k.endswith("." + relative) or k == relative]
    if not same_tail:
        same_tail = difflib.get_close_matches(full, everything, n=1, cutoff=0.75)
    if same_tail:
        return "; did you mean " + " or ".join(repr(k) for k in same_tail[:3]) + "?"
    return ""


@functools.lru_cache(maxsize=None)
def _all_keys(cls: type) -> tuple[str, ...]:
    """Every dotted key of ``cls``, sections and leaves."""
    keys: list[str] = []
    hints = _hints(cls)
    for f in _fields(cls):
        keys.append(f.name)
        if _is_section(hints[f.name]):
            keys.extend(f"{f.name}.{k}" for k in _all_keys(hints[f.name]))
    return tuple(keys)


# --------------------------------------------------------------------------------------------------------------
# Back to plain data, and documentation
# --------------------------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A config as plain YAML-safe data (dicts, lists, scalars): tuples become lists. ``from_dict`` inverts it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class FieldDoc:
    """One leaf of a config, as the generated config reference shows it."""

    key: str  # dotted key, e.g. "learner.lora.rank"
    type: str  # e.g. "int | None", "'full' | 'topk_tail'"
    default: str  # YAML text of the default, or "required"
    doc: str


def describe(cls: type, path: str = "") -> list[FieldDoc]:
    """Every leaf key of the config class ``cls`` (nested sections walked, in field order) with type, default, doc."""
    docs: list[FieldDoc] = []
    hints = _hints(cls)
    for f in _fields(cls):
        key = _join(path, f.name)
        tp = hints[f.name]
        if _is_section(tp):
            docs.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = _yaml_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _yaml_text(f.default_factory())
        else:
            default = "required"
        docs.append(FieldDoc(key=key, type=type_text(tp), default=default, doc=str(f.metadata.get("doc", ""))))
    return docs


def _yaml_text(value: Any) -> str:
    """A default as one line of YAML (a multi-line string becomes a double-quoted one with \\n escapes)."""
    plain = to_dict(value)
    text = yaml.safe_dump(plain, default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    if "\n" in text:
        text = json.dumps(plain, ensure_ascii=False)  # JSON strings are valid YAML double-quoted scalars
    return text


def type_text(tp: Any) -> str:
    """A field annotation as users read it: ``int | None``, ``list[str]``, ``'cosine' | 'linear'``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{type_text(args[0])}, ...]"
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)
