"""params.yaml: one file read by every stage command.

Each stage owns a frozen dataclass (in its `stages/` module) whose defaults are the
bundled tiny configuration. `section()` turns the raw mapping under one key into
that dataclass, checking types, unknown keys and the dataclass's own `validate()`,
so bad values fail before any work with the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.config import ConfigError

T = TypeVar("T")


# Every top-level section a command reads (a misspelt one would otherwise be ignored).
SECTIONS = (
    "execution",
    "generator",
    "clip",
    "e4e",
    "world",
    "world_train",
    "world_gan",
    "world_e4e",
    "world_judge",
    "world_evaluate",
    "ingest",
    "import_official",
    "encode_clip",
    "encode_s",
    "sample",
    "relevance",
    "train",
    "edit",
    "render",
    "evaluate",
)


class ParamError(ValueError):
    """A bad params file or value; the message names the key."""


def load_params(path: str | Path) -> dict[str, Any]:
    """The params file as a mapping ({} when it does not exist); one-line ParamError else."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamError(_yaml_error_line(p, exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamError(f"{p}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ParamError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def check_sections(params: dict[str, Any], where: str) -> None:
    """Refuse top-level sections no command reads, naming the known ones."""
    unknown = [k for k in params if k not in SECTIONS]
    if unknown:
        raise ParamError(
            f"{where}: unknown params section {str(unknown[0])!r}; known sections: "
            + ", ".join(SECTIONS)
        )


def _yaml_error_line(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    return f"{where}: not valid YAML ({what})"


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` (value parsed as YAML) -> ("a.b", value)."""
    if "=" not in text:
        raise ParamError(f"override {text!r}: expected KEY=VALUE, e.g. train.iterations=100")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamError(f"override {text!r}: the value is not valid YAML ({problem})") from None


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of params with dotted keys set (flags override the file)."""
    out = _deepcopy(params)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamError(f"{dotted}: {part} is not a mapping in params")
        node[parts[-1]] = value
    return out


def section(params: dict[str, Any], name: str, cls: type[T]) -> T:
    """Validate `params[name]` into the dataclass `cls` (missing keys take defaults)."""
    raw = params.get(name, {}) or {}
    try:
        return _build(cls, raw, name)
    except ConfigError as exc:
        own = exc.key == name or exc.key.startswith(name + ".")
        key = exc.key if own else f"{name}.{exc.key}"
        raise ParamError(f"{key}: got {exc.value!r}, expected {exc.expected}") from None


def to_dict(obj: Any) -> Any:
    """A config dataclass back to plain data (for provenance attrs and metrics)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --- internals ---------------------------------------------------------------


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _build(cls: type[T], raw: Any, key: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(key, raw, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}", raw[unknown[0]], f"one of the keys {sorted(fields)}"
        )
    kwargs = {name: _convert(hints[name], raw[name], f"{key}.{name}") for name in raw}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(exc.expected)
        raise ConfigError(key, value, " or ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(key, value, "one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list of {args[0].__name__ if args else 'values'}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    return value
