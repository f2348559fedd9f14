"""CLI options derived from config dataclasses: a component's options are declared once, in its config.

:func:`derive` adds one ``--option`` per field of the given configs to a command (the union over
components, e.g. every probe kind's options on ``probekit probe``). A derived option's default
is "not given" (each component keeps its own default, shown in the help); the command receives
the given values as ``options`` and hands them to the library, which validates them.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.config import MISSING, Config, FieldSpec, fields_of

Source = tuple[str, type[Config]]


def flag_of(spec: FieldSpec) -> str:
    return spec.flag or "--" + spec.name.replace("_", "-")


def _cli_type(spec: FieldSpec) -> Any | None:
    t = spec.type
    if spec.element is not None or spec.choices is not None:
        return str  # "a,b,c" or a registry name, checked by the config
    if typing.get_origin(t) is typing.Literal:
        return t
    if t in (int, float, str, bool, Path):
        return t
    return None  # tables (dicts) are for suite files only


def _default_text(spec: FieldSpec) -> str:
    d = spec.default
    if d is None or d is MISSING:
        return ""
    if isinstance(d, tuple):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in d)
    if isinstance(d, bool):
        return "on" if d else "off"
    return f"{d:g}" if isinstance(d, float) else str(d)


def _help(entries: list[tuple[str, FieldSpec]], labelled: bool) -> str:
    parts = []
    for label, spec in entries:
        text = spec.help.rstrip(".")
        allowed = spec.allowed() if spec.choices is not None else None
        if allowed:
            text += f" ({', '.join(allowed)})"
        d = _default_text(spec)
        text += f" (default: {d})" if d else ""
        parts.append(f"{label}: {text}" if labelled else text)
    uniq = list(dict.fromkeys(parts))
    return "; ".join(uniq) + "."


def option_specs(sources: Iterable[Source], exclude: Sequence[str] = ()) -> dict[str, list[tuple[str, FieldSpec]]]:
    """Field name -> [(component label, spec)] over ``sources`` (CLI fields only)."""
    out: dict[str, list[tuple[str, FieldSpec]]] = {}
    for label, cfg in sources:
        for spec in fields_of(cfg):
            if spec.cli and spec.name not in exclude and _cli_type(spec) is not None:
                out.setdefault(spec.name, []).append((label, spec))
    return out


def derive(
    sources: Callable[[], Iterable[Source]],
    exclude: Sequence[str] = (),
    labelled: bool = True,
    panel: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command gets one option per config field of ``sources()`` (read when the CLI is
    built, so plugins' components count) and receives the given ones as ``options: dict``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        taken = {p.name for p in own}
        specs = {k: v for k, v in option_specs(sources(), exclude).items() if k not in taken}
        added = []
        for name, entries in specs.items():
            spec = entries[0][1]
            tp = _cli_type(spec)
            flag = flag_of(spec)
            decl = f"{flag}/--no-{flag[2:]}" if tp is bool else flag
            info = typer.Option(decl, help=_help(entries, labelled), show_default=False, rich_help_panel=panel)
            added.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, info]
                )
            )

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            options = {k: kwargs.pop(k) for k in specs if k in kwargs}
            return fn(**kwargs, options={k: v for k, v in options.items() if v is not None})

        params = own + added
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # type: ignore[attr-defined]  (typer must read the new signature)
        return wrapper

    return deco


def flags_of(command: Any) -> dict[str, str]:
    """Parameter name -> its first flag, for a click command (how the CLI renders library errors)."""
    out = {}
    for p in getattr(command, "params", []):
        opts = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if opts:
            out[p.name] = opts[0]
        elif getattr(p, "name", None):
            out[p.name] = p.name.upper()
    return out
