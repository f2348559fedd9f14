"""Per-sentence correctness of every fitted probe, stored next to the results so analyses can resample.

The paired tests of :mod:`probekit.stats` (the drop from the peak to the last layer, fine-tuned
minus pre-trained) resample *sentences*, so they need to know which sentence each layer got
right, not only how many. ``probekit probe --out OUT`` writes one compressed NumPy archive per
fit, ``OUT/predictions/<model>__<task>__<probe>__seed<k>__<cache key>.npz`` (no pickle: plain
arrays and strings, read with ``allow_pickle=False``), holding ``layers`` [L] and, per reported
split, ``<split>_correct`` [L, M] packed bits (:func:`numpy.packbits` along the sentences) and
``<split>_n`` (M), plus the fit's identity (model, task, probe, pool, seed, cache key, data
SHA-256). 1,000 test sentences x 13 layers take about 1.7 kB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probekit.errors import ProbekitError
from probekit.io import atomic_path
from probekit.paths import slug
from probekit.probes.protocols import curve_probe

FOLDER = "predictions"
IDENTITY = ("model", "task", "probe", "pool", "seed", "cache_key", "data_sha256")


@dataclass
class Predictions:
    """One fit's per-sentence correctness: ``correct[split]`` is a bool array [layers, sentences]."""

    model: str
    task: str
    probe: str
    pool: str | None
    seed: int
    cache_key: str | None
    data_sha256: str | None
    layers: list[int]
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    def accuracy(self, split: str = "test") -> np.ndarray:
        return self.correct[split].mean(1)


def identity_of(fit: dict[str, Any]) -> dict[str, Any]:
    """The predictions identity of a fit from one of its results rows: the curve's name as ``probe`` (its
    protocol's, see :func:`~probekit.probes.protocols.curve_probe`), so two protocols of one kind keep a file each."""
    identity = {k: fit.get(k) for k in IDENTITY}
    identity["probe"] = curve_probe(fit.get("probe"), fit.get("protocol"))
    return identity


def file_name(identity: dict[str, Any]) -> str:
    """``<model>__<task>__<probe>__seed<k>__<cache key>.npz`` (names slugged)."""
    key = identity.get("cache_key")
    key = "nokey" if key is None or (isinstance(key, float) and key != key) else str(key)[:16]
    parts = [identity["model"], identity["task"], identity["probe"], f"seed{int(identity['seed'])}", key]
    return "__".join(slug(str(p)) for p in parts) + ".npz"


def save_predictions(out: str | Path, pred: Predictions) -> Path:
    """Write one fit's archive atomically under ``out/predictions/``; return its path."""
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    identity = {k: getattr(pred, k) for k in IDENTITY}
    arrays: dict[str, np.ndarray] = {"layers": np.asarray(pred.layers, dtype=np.int64)}
    for k, v in identity.items():
        arrays[f"id_{k}"] = np.asarray("" if v is None else str(v))
    for split, correct in pred.correct.items():
        c = np.asarray(correct, dtype=bool)
        arrays[f"{split}_correct"] = np.packbits(c, axis=1)
        arrays[f"{split}_n"] = np.asarray(c.shape[1], dtype=np.int64)
    path = folder / file_name(identity)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def _read(path: Path) -> Predictions:
    try:
        with np.load(path, allow_pickle=False) as z:
            ident = {k: str(z[f"id_{k}"]) or None for k in IDENTITY}
            splits = [k[: -len("_correct")] for k in z.files if k.endswith("_correct")]
            correct = {s: np.unpackbits(z[f"{s}_correct"], axis=1, count=int(z[f"{s}_n"])).astype(bool) for s in splits}
            layers = [int(i) for i in z["layers"]]
    except (OSError, ValueError, KeyError) as e:
        raise ProbekitError(f"could not read predictions {path}: {e}") from None
    return Predictions(
        model=str(ident["model"]),
        task=str(ident["task"]),
        probe=str(ident["probe"]),
        pool=ident["pool"],
        seed=int(ident["seed"] or 0),
        cache_key=ident["cache_key"],
        data_sha256=ident["data_sha256"],
        layers=layers,
        correct=correct,
    )


def load_predictions(paths: str | Path | Iterable[str | Path]) -> list[Predictions]:
    """Every fit's predictions under results folders (their ``predictions/`` subfolders, searched
    recursively) or given as ``.npz`` files; none found is an empty list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".npz":
            files.append(p)
        elif p.is_dir():
            files += sorted(p.glob(f"**/{FOLDER}/*.npz"))
    return [_read(f) for f in dict.fromkeys(files)]


def from_probe(lp: Any, identity: dict[str, Any], splits: Sequence[tuple[str, Any, Any]]) -> Predictions:
    """The predictions of a fitted :class:`~probekit.probes.layerwise.LayerwiseProbe` on ``(split, X, y)``."""
    correct = {split: lp.correct_each(X, y, split) for split, X, y in splits}
    return Predictions(**{k: identity.get(k) for k in IDENTITY}, layers=list(lp.layers_), correct=correct)
