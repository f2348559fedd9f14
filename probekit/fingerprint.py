"""The resume kernel: one fingerprint function and one rule for "reuse, resume or refuse".

Every artifact probekit writes (a feature cache, a probe fit, MLM heads, off-ramp checkpoints,
a fine-tuning run, a suite step) is identified by the :func:`fingerprint` of the settings that
determine it and the fingerprints of its inputs (canonical JSON, SHA-256). Its folder holds a
stamp (:data:`STAMP`, JSON: fingerprint, settings, inputs) written when the work starts, and
:func:`resume_rule` decides what a new run does with the folder:

- no stamp: ``"new"`` (start; :func:`write_stamp` first);
- same fingerprint: ``"reuse"`` (a finished artifact is reused, an unfinished one resumed);
- other fingerprint: refuse with one line naming the settings that differ and the folder to
  remove, or pass ``fresh`` (then ``"fresh"``: the caller removes what is there and starts over).

Nothing silently starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np

from probekit.errors import ResumeError
from probekit.io import read_json, write_json

STAMP = "fingerprint.json"
Decision = Literal["new", "reuse", "fresh"]


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(obj)
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal settings give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default, allow_nan=True)


def normalize(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples as lists, paths as strings), as the stamp stores it."""
    return json.loads(canonical_json(obj))


def fingerprint(settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the canonical JSON of ``settings`` and ``inputs`` (fingerprints of what was read)."""
    payload = {"settings": settings, "inputs": dict(inputs or {})}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON-like values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(name)
            else:
                out += differences(old[k], new[k], name)
        return out
    return [] if normalize(old) == normalize(new) else [prefix or "value"]


def _describe(old: Mapping[str, Any], new: Mapping[str, Any], names: list[str]) -> str:
    def get(d: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, Mapping) or part not in d:
                return "(absent)"
            d = d[part]
        return d

    shown = []
    for n in names[:4]:
        was, now = get(old, n), get(new, n)
        label = n.removeprefix("settings.")
        short = all(len(canonical_json(v)) <= 40 for v in (was, now))
        shown.append(f"{label} {canonical_json(was)} -> {canonical_json(now)}" if short else label)
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(shown) + more


def stamp_path(where: str | Path) -> Path:
    """The stamp file of ``where``: ``where`` itself when it is a ``.json`` path, else ``where/fingerprint.json``."""
    where = Path(where)
    return where if where.suffix == ".json" else where / STAMP


def read_stamp(where: str | Path) -> dict[str, Any] | None:
    """The stamp of ``where`` (a folder or a stamp file); None when there is none or it cannot be read."""
    path = stamp_path(where)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "fingerprint" in data else None


def write_stamp(
    where: str | Path,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> str:
    """Record what ``where`` (a folder or a stamp file) is made from, atomically, with any ``data`` the
    artifact wants to keep beside it; return the fingerprint."""
    record = stamp_record(settings, inputs)
    write_json(stamp_path(where), {**record, **({"data": normalize(dict(data))} if data else {})})
    return record["fingerprint"]


def stamp_record(settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a stamp holds: the fingerprint, and the settings and inputs it was computed from."""
    return {
        "fingerprint": fingerprint(settings, inputs),
        "settings": normalize(settings),
        "inputs": normalize(dict(inputs or {})),
    }


def matches(where: str | Path, settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> bool:
    """Whether the stamp of ``where`` exists and has the fingerprint of ``settings`` and ``inputs``."""
    stamp = read_stamp(where)
    return stamp is not None and stamp.get("fingerprint") == fingerprint(settings, inputs)


def check(
    stamp: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any] | None,
    *,
    where: str | Path,
    fresh: bool = False,
    what: str = "it",
) -> Decision:
    """The rule (see the module docstring) for an artifact whose recorded stamp is ``stamp``."""
    if stamp is None:
        return "new"
    if fresh:
        return "fresh"
    if stamp.get("fingerprint") == fingerprint(settings, inputs):
        return "reuse"
    old = {"settings": stamp.get("settings", {}), "inputs": stamp.get("inputs", {})}
    new = {"settings": normalize(settings), "inputs": normalize(dict(inputs or {}))}
    names = differences(old, new) or ["the fingerprint's version"]
    raise ResumeError(
        f"{where} holds {what} made with other settings ({_describe(old, new, names)}); "
        "remove it or rerun with {fresh} to start over",
        params=("fresh",),
    )


def resume_rule(
    where: str | Path,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
    *,
    fresh: bool = False,
    what: str = "results",
) -> Decision:
    """:func:`check` against the stamp of ``where`` (a folder or a stamp file)."""
    return check(read_stamp(where), settings, inputs, where=where, fresh=fresh, what=what)
