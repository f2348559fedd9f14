"""Config dataclasses: a component's options written once.

Every component (a probe kind, an exit policy, a fine-tuning variant, a suite step...) keeps
its options in a dataclass deriving from :class:`Config`, each field declared with
:func:`option` (type, default, one-line help, accepted values). Everything else is derived
from those fields and never written again: validation with a message naming the parameter
and the accepted range (:meth:`Config.validate`), the settings recorded with results and
fingerprinted for resuming (:meth:`Config.to_dict`), the suite TOML schema
(:meth:`Config.from_mapping`, :meth:`Config.to_toml`) and the CLI options
(:mod:`probekit.cli.options`).

    @dataclass(frozen=True)
    class LinearConfig(Config):
        max_iter: int = option(1000, "L-BFGS iteration limit.", ge=1)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Self

from probekit.errors import ParamError

MISSING: Any = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default, one-line ``help`` and accepted values.

    ``choices``: accepted strings (or a function returning them, e.g. a registry's ``names``);
    ``ge``/``gt``/``le``/``lt``: bounds of a number (of each element of a tuple); ``flag``: the
    CLI flag when it is not ``--field-name``; ``cli=False``: not a CLI option (set by the runner).
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "cli": cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """One config field, resolved: what the CLI, the TOML schema and validation read."""

    name: str
    type: Any  # the base type: int, float, bool, str, Path, dict, a Literal, or tuple[X, ...]
    optional: bool
    default: Any
    help: str
    choices: Sequence[str] | Callable[[], Sequence[str]] | None
    bounds: dict[str, float]
    flag: str | None
    cli: bool

    @property
    def element(self) -> Any:
        """The element type of a ``tuple[X, ...]`` field, else None."""
        return typing.get_args(self.type)[0] if typing.get_origin(self.type) is tuple else None

    def allowed(self) -> list[str] | None:
        if typing.get_origin(self.type) is Literal:
            return [str(a) for a in typing.get_args(self.type)]
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def describe_type(self) -> str:
        if typing.get_origin(self.type) in (typing.Union, types.UnionType):
            return " or ".join(
                dataclasses.replace(self, type=a, optional=False).describe_type()
                for a in typing.get_args(self.type)
                if a is not type(None)
            )
        t = self.element or self.type
        allowed = self.allowed()
        name = " | ".join(repr(a) for a in allowed) if allowed else getattr(t, "__name__", str(t))
        return f"list of {name}" if self.element is not None else name


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, type(None) in typing.get_args(tp)
    return tp, False


@cache
def fields_of(cls: type) -> tuple[FieldSpec, ...]:
    """The resolved fields of a config dataclass (cached)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        base, optional = _split_optional(hints[f.name])
        meta = f.metadata
        default = (
            f.default
            if f.default is not MISSING
            else (
                f.default_factory() if f.default_factory is not MISSING else MISSING  # type: ignore[misc]
            )
        )
        bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
        out.append(
            FieldSpec(
                f.name,
                base,
                optional,
                default,
                meta.get("help", ""),
                meta.get("choices"),
                bounds,
                meta.get("flag"),
                meta.get("cli", True),
            )
        )
    return tuple(out)


_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _range_text(bounds: Mapping[str, float]) -> str:
    if len(bounds) == 1:  # one-sided: ">= 1"
        ((k, v),) = bounds.items()
        return f"{_SIGNS[k]} {v:g}"
    lo = f"[{bounds['ge']:g}" if "ge" in bounds else f"({bounds['gt']:g}" if "gt" in bounds else "(-inf"
    hi = f"{bounds['le']:g}]" if "le" in bounds else f"{bounds['lt']:g})" if "lt" in bounds else "inf)"
    return f"in {lo}, {hi}"


def _check_bounds(spec: FieldSpec, v: float) -> None:
    b = spec.bounds
    ok = (
        ("ge" not in b or v >= b["ge"])
        and ("gt" not in b or v > b["gt"])
        and ("le" not in b or v <= b["le"])
        and ("lt" not in b or v < b["lt"])
    )
    if not ok:
        raise ParamError(spec.name, f"must be {_range_text(b)}, got {v:g}")


def coerce(spec: FieldSpec, value: Any) -> Any:
    """``value`` as the field's type (TOML and CLI values: ints for floats, lists or "a,b" for tuples,
    str for Path), checked against its choices and bounds; a :class:`ParamError` otherwise."""
    if value is None:
        if spec.optional:
            return None
        raise ParamError(spec.name, f"is required ({spec.describe_type()})")
    if typing.get_origin(spec.type) in (typing.Union, types.UnionType):  # e.g. int | tuple[int, ...]
        for alt in typing.get_args(spec.type):
            if alt is type(None):
                continue
            shape = typing.get_origin(alt) or alt
            shape = (list, tuple) if shape is tuple else shape
            try:
                return coerce(dataclasses.replace(spec, type=alt, optional=False), value)
            except ParamError:
                if isinstance(value, shape) and not isinstance(value, bool):
                    raise  # the value has this alternative's shape: its own message says what is wrong
        raise ParamError(spec.name, f"must be {spec.describe_type()}, got {value!r}")
    if spec.element is not None:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ParamError(spec.name, f"must be a {spec.describe_type()}, got {value!r}")
        elem = dataclasses.replace(spec, type=spec.element, optional=False)
        return tuple(coerce(elem, x.strip() if isinstance(x, str) and isinstance(value, str) else x) for x in items)
    t = spec.type
    allowed = spec.allowed()
    if allowed is not None:
        if not isinstance(value, str):
            raise ParamError(spec.name, f"must be one of {', '.join(allowed)}, got {value!r}")
        if value not in allowed:
            canon = {a.lower().replace("_", "-"): a for a in allowed}
            key = value.lower().replace("_", "-")
            if key not in canon:
                raise ParamError(spec.name, f"must be one of {', '.join(allowed)}, got {value!r}")
            value = canon[key]
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise ParamError(spec.name, f"must be true or false, got {value!r}")
        return value
    if t in (int, float):
        if isinstance(value, str):
            try:
                value = t(value)
            except ValueError:
                raise ParamError(spec.name, f"must be a number ({t.__name__}), got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (t is int and not isinstance(value, int)):
            raise ParamError(spec.name, f"must be {'an integer' if t is int else 'a number'}, got {value!r}")
        value = t(value)
        _check_bounds(spec, value)
        return value
    if t is str:
        if not isinstance(value, str):
            raise ParamError(spec.name, f"must be a string, got {value!r}")
        return value
    if t is Path:
        if not isinstance(value, (str, Path)):
            raise ParamError(spec.name, f"must be a path, got {value!r}")
        return Path(value)
    if t is dict or typing.get_origin(t) is dict:
        if not isinstance(value, Mapping):
            raise ParamError(spec.name, f"must be a table, got {value!r}")
        args = typing.get_args(t)
        if len(args) == 2:  # dict[str, X]: check the values
            elem = dataclasses.replace(spec, type=args[1], optional=False)
            return {str(k): coerce(elem, v) for k, v in value.items()}
        return dict(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Config:
    """Base of every component's options (subclasses are frozen dataclasses; see the module docstring)."""

    component: typing.ClassVar[str] = ""
    """What the options belong to, in messages ("the linear probe")."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce and check every field (types, choices, bounds), then :meth:`check`."""
        for spec in fields_of(type(self)):
            object.__setattr__(self, spec.name, coerce(spec, getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields (override; raise :class:`ParamError`)."""

    @classmethod
    def label(cls) -> str:
        return cls.component or cls.__name__

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields_of(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None = None, **overrides: Any) -> Self:
        """Build from a mapping (a TOML table, CLI values); an unknown key is a :class:`ParamError`."""
        values = {**(data or {}), **overrides}
        known = cls.field_names()
        for key in values:
            if key not in known:
                raise ParamError(key, f"is not an option of {cls.label()}; its options: {', '.join(known) or 'none'}")
        for spec in fields_of(cls):
            if spec.default is MISSING and spec.name not in values:
                raise ParamError(spec.name, f"is required by {cls.label()} ({spec.describe_type()})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (recorded in results, fingerprinted)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields_of(type(self))}

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_toml(self, table: str | None = None) -> str:
        """The options as a TOML table (None values left out: TOML has no null)."""
        lines = [f"[{table}]"] if table else []
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, int) else json.dumps(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def split_options(options: Mapping[str, Any], config: type[Config]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into those of ``config`` and the rest."""
    names = set(config.field_names())
    return {k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names}
