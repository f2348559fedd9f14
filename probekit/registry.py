"""``Registry[T]``: the one way probekit names its components.

Probe kinds, exit policies, off-ramp training methods, fine-tuning variants, pooling
methods, data readers and fetchers, report sections and suite steps each live in a
``Registry``: register under a name (with aliases), get by name (case-insensitive, ``_`` and
``-`` alike) with a "did you mean" on a typo, list in registration order. A plugin adds a
component by registering it in the same registry (see :mod:`probekit.plugins`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from probekit.errors import ParamError

T = TypeVar("T")


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    aliases: tuple[str, ...]
    help: str


class Registry(Generic[T]):
    """Named components of one kind. ``kind`` names them in messages ("probe kind"); ``param`` is the
    parameter that selects one (``kind``, ``policy``, ...), named in the error for an unknown name."""

    def __init__(self, kind: str, param: str, normalize: Callable[[str], str] = _normal) -> None:
        self.kind = kind
        self.param = param
        self._normal = normalize
        self._entries: dict[str, Entry[T]] = {}
        self._lookup: dict[str, str] = {}

    @overload
    def register(
        self, name: str, obj: None = None, *, aliases: tuple[str, ...] = (), help: str = "", replace: bool = False
    ) -> Callable[[T], T]: ...
    @overload
    def register(
        self, name: str, obj: T, *, aliases: tuple[str, ...] = (), help: str = "", replace: bool = False
    ) -> T: ...
    def register(
        self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = (), help: str = "", replace: bool = False
    ) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name`` (and ``aliases``); used bare or as a decorator."""

        def add(o: T) -> T:
            keys = [self._normal(name), *(self._normal(a) for a in aliases)]
            for k in keys:
                owner = self._lookup.get(k)
                if owner is not None and owner != name and not replace:
                    raise ValueError(f"{self.kind} name {k!r} is already taken by {owner!r}")
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (help or (getattr(o, "__doc__", None) or "")).strip().splitlines()
            self._entries[name] = Entry(name, o, tuple(aliases), doc[0] if doc else "")
            for k in keys:
                self._lookup[k] = name
            return o

        return add if obj is None else add(obj)

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (an alias, another case), or a :class:`ParamError`."""
        key = self._normal(str(name))
        if key in self._lookup:
            return self._lookup[key]
        close = difflib.get_close_matches(key, list(self._lookup), n=1, cutoff=0.6)
        hint = f" (did you mean {self._lookup[close[0]]!r}?)" if close else ""
        raise ParamError(self.param, f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)].obj

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(e.name, e.obj) for e in self._entries.values()]

    def help(self, name: str) -> str:
        return self.entry(name).help

    def unregister(self, name: str) -> None:
        """Remove a component (tests that register a temporary one clean up with this)."""
        canonical = self.canonical(name)
        del self._entries[canonical]
        self._lookup = {k: v for k, v in self._lookup.items() if v != canonical}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normal(name) in self._lookup

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
