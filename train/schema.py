"""Parse plain data (from YAML) into frozen dataclasses, collecting every error with its dotted key.

Supports dataclasses, `list[X]`, `dict[str, X]`, `Literal[...]`, `X | None`, int/float/str/bool,
and `Annotated[X, Range(...)]` for numbers that must lie in a range (`AtLeast1`, `Positive`, ...).
Unknown keys, missing required keys, wrong types and out-of-range values are all reported, not
just the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str
    message: str


@dataclasses.dataclass(frozen=True)
class Range:
    """A number's allowed interval; `open_low`/`open_high` exclude that end."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value) -> str | None:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        if low_ok and high_ok:
            return None
        if self.high is None:
            return f"must be {'>' if self.open_low else '≥'} {self.low:g}, got {value!r}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}, got {value!r}"


AtLeast0 = Annotated[int, Range(0)]
AtLeast1 = Annotated[int, Range(1)]
Positive = Annotated[float, Range(0, open_low=True)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]  # 0 ≤ x ≤ 1
Probability = Annotated[float, Range(0, 1, open_high=True)]  # 0 ≤ x < 1 (dropout, Adam betas)


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
    if origin is Annotated:
        inner, *checks = get_args(tp)
        before = len(problems)
        result = parse(inner, value, key, problems)
        if len(problems) == before and result is not None:
            for check in checks:
                message = check.problem(result) if isinstance(check, Range) else None
                if message:
                    problems.append(Problem(key, message))
                    return None
        return result
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
        args = get_args(tp) or (Any,)
        if origin is tuple and Ellipsis not in args:  # a fixed-length tuple: one type per item
            if len(value) != len(args):
                problems.append(Problem(key, f"expected a list of {len(args)} values, got {len(value)}"))
                return None
            return tuple(
                parse(t, v, _join(key, i), problems) for i, (t, v) in enumerate(zip(args, value, strict=True))
            )
        items = [parse(args[0], v, _join(key, i), problems) for i, v in enumerate(value)]
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
    hints = typing.get_type_hints(cls, include_extras=True)
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
        has_default = (
            field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        )
        if name in value:
            before = len(problems)
            parsed = parse(hints[name], value[name], _join(key, name), problems)
            # A reported bad value falls back to its default, so that the rest of the object
            # (and the checks of combinations after parsing) can still be looked at.
            if len(problems) == before or not has_default:
                kwargs[name] = parsed
        elif not has_default:
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
