"""Off-ramp checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder: the resume stamp (:mod:`probekit.fingerprint`, what the training is made
from) and ``state/`` holding ``tensors.safetensors`` (the encoder, the off-ramps and the optimizer's
tensors, flattened to dotted names) and ``state.json`` (step, loss history, the optimizer's and the
scheduler's other values, torch's RNG state as a list of bytes). ``state/`` is replaced as a whole
(:func:`probekit.io.replace_dir`), so it is always one complete save. Loading never runs code: a file
that is not such a checkpoint is refused with one line, and so is a pickle left by older versions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from probekit.errors import ProbekitError
from probekit.io import read_json, remove_tree, replace_dir, write_json

STATE = "state"
TENSORS = "tensors.safetensors"
META = "state.json"
FORMAT = "probekit-offramp-checkpoint/1"
OLD_PICKLES = ("offramps.pt", "checkpoint-joint.pt", "checkpoint-deebert-stage1.pt")
"""What probekit 0.x wrote with ``torch.save`` (pickle) into an off-ramp output folder."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested state (dicts of tensors and plain values) into dotted-name tensors and a JSON tree
    in which each tensor is replaced by ``{"tensor": name}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj.detach().cpu().clone().contiguous()
            return {"tensor": name}
        if isinstance(obj, Mapping):
            return {"dict": [[_key(k), walk(v, f"{name}.{k}" if name else str(k))] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"list" if isinstance(obj, list) else "tuple": [walk(v, f"{name}.{i}") for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {name!r}")

    return tensors, walk(dict(tree), prefix)


def _key(k: Any) -> Any:
    """Dict keys keep their type (optimizer states are keyed by int)."""
    return {"int": k} if isinstance(k, int) else k


def unflatten(tensors: Mapping[str, torch.Tensor], tree: Any) -> Any:
    """The inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if "tensor" in tree:
            return tensors[tree["tensor"]]
        if "dict" in tree:
            return {(k["int"] if isinstance(k, dict) else k): unflatten(tensors, v) for k, v in tree["dict"]}
        if "list" in tree:
            return [unflatten(tensors, v) for v in tree["list"]]
        if "tuple" in tree:
            return tuple(unflatten(tensors, v) for v in tree["tuple"])
        raise ValueError(f"unknown entry {sorted(tree)}")
    return tree


def save(folder: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (nested dicts of tensors and JSON values) as ``folder/state`` in one swap."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE}.{os.getpid()}.tmp"
    remove_tree(tmp)
    tmp.mkdir()
    tensors, tree = flatten(state)
    save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
    write_json(tmp / META, {"format": FORMAT, "state": tree})
    replace_dir(tmp, folder / STATE)


def exists(folder: str | Path) -> bool:
    return (Path(folder) / STATE).is_dir()


def load(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a damaged one is a one-line :class:`ProbekitError`."""
    where = Path(folder) / STATE
    try:
        meta = read_json(where / META)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{META} is not a {FORMAT} file")
        tensors = load_file(str(where / TENSORS))
        state = unflatten(tensors, meta["state"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProbekitError(
            f"the checkpoint {where} is damaged ({detail}); remove it or rerun with {{fresh}} to start over",
            params=("fresh",),
        ) from None
    return state


def refuse_pickles(out: str | Path, fresh: bool = False) -> None:
    """Refuse an output folder holding a pickle checkpoint of an older version (it is never opened: loading
    a pickle can run any code); with ``fresh``, remove it unread."""
    for name in OLD_PICKLES:
        path = Path(out) / name
        if path.exists():
            if fresh:
                path.unlink()
                continue
            raise ProbekitError(
                f"{path} is a pickle checkpoint of an older probekit, which is no longer read (unpickling can run "
                "code); remove it or rerun with {fresh} to start over",
                params=("fresh",),
            )
