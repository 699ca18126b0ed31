"""Parse plain data (from YAML) into frozen dataclasses, collecting every error with its dotted key.

Supports dataclasses, `list[X]`, `dict[str, X]`, `Literal[...]`, `X | None`, int/float/str/bool.
Unknown keys, missing required keys and wrong types are all reported, not just the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, get_args, get_origin


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str
    message: str


def _join(prefix: str, key) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def parse(tp, value: Any, key: str, problems: list[Problem]):
    """Convert `value` to type `tp`; on failure append Problems and return None."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:
            return parse(real[0], value, key, problems)
        for option in real:
            trial: list[Problem] = []
            result = parse(option, value, key, trial)
            if not trial:
                return result
        problems.append(Problem(key, f"expected {' or '.join(_type_name(o) for o in real)}, got {value!r}"))
        return None
    if origin is Literal:
        if value not in get_args(tp):
            near = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(Problem(key, f"must be one of {_type_name(tp)}, got {value!r}{hint}"))
            return None
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            problems.append(Problem(key, f"expected a list, got {type(value).__name__}"))
            return None
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [parse(item_tp, v, _join(key, i), problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(key, f"expected a mapping, got {type(value).__name__}"))
            return None
        _, value_tp = get_args(tp) or (str, Any)
        return {k: parse(value_tp, v, _join(key, k), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, key, problems)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        problems.append(Problem(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}"))
        return None
    return value


def parse_dataclass(cls, value: Any, key: str, problems: list[Problem], skip: tuple[str, ...] = ()):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(Problem(key or "<top>", f"expected a mapping, got {type(value).__name__}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields and name not in skip:
            near = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(Problem(_join(key, name), f"unknown key{hint}; allowed: {', '.join(fields)}"))
    kwargs = {}
    for name, field in fields.items():
        if name in skip:
            continue
        if name in value:
            kwargs[name] = parse(hints[name], value[name], _join(key, name), problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(Problem(_join(key, name), "required key is missing"))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # e.g. a None left by a reported problem
        if not problems:
            problems.append(Problem(key or "<top>", str(err)))
        return None


def to_plain(obj):
    """Dataclasses → plain dicts/lists, for writing the resolved recipe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
