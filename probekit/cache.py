"""The every-layer feature cache: on-disk layout, atomic/resumable writing, and the
``LayerCache`` object that hands features out by split and layer.

A cache directory holds one task's features from one model::

    manifest.json              what made it (model fingerprint, data sha256, pooling...)
    train.features.npy         [N, L+1, D] (pooled) or [T, L+1, D] (token-level)
    train.labels.npy           [N]
    train.offsets.npy          [N+1]  token-level only: sentence i is rows offsets[i]:offsets[i+1]
    train.token_ids.npy        [T]    token-level only
    dev.* test.*

The directory is written as ``<name>.partial`` and renamed into place when complete;
only a directory with a manifest is ever read as a cache. Reuse and resume follow
:mod:`probekit.fingerprint`: the cache key is the fingerprint of the settings that determine
the contents and of the inputs (weights, tokenizer, data); a ``.partial`` holds a stamp of the
same settings plus the batch plan, and is resumed only under the same fingerprint (another one
is refused with one line naming what differs, or removed with ``fresh``).
"""

from __future__ import annotations

import contextlib
import mmap
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from probekit.cpu import bound_heap, trim_heap
from probekit.errors import CacheError, ProbekitWarning
from probekit.fingerprint import STAMP, check, fingerprint, read_stamp, write_stamp
from probekit.io import lock_file, read_json, remove_tree, replace_dir, sha256_file, write_json

FORMAT = "probekit-cache"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
PARTIAL = ".partial"
SPLIT_ORDER = ("train", "dev", "test")
StorageDType = Literal["float16", "float32"]
"""The dtypes a cache stores its features in."""
STORAGE_DTYPES: tuple[str, ...] = typing.get_args(StorageDType)
WRITE_BUFFER_BYTES = 64 * 2**20
"""At most about this many bytes of written features stay mapped in the writer's memory before their pages are
released to the page cache (:func:`release_pages`): extraction memory does not grow with the number of texts."""
PAGE = mmap.PAGESIZE


def release_pages(arr: Any) -> bool:
    """Unmap a shared memory map's resident pages from this process (``madvise(MADV_DONTNEED)``); its data stays
    in the file and the page cache and is read back on the next access. Without it every page a reader or writer
    ever touched counts in the process's resident memory (RSS) until the map is closed. True if released."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or mm.closed or getattr(arr, "mode", "c") == "c" or not hasattr(mmap, "MADV_DONTNEED"):
        return False  # not a map, or a private (copy-on-write) one, whose changes DONTNEED would discard
    mm.madvise(mmap.MADV_DONTNEED)
    return True


def cache_key(settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> str:
    """Hex key of everything that determines a cache's contents: the :func:`~probekit.fingerprint.fingerprint`
    of its settings (with the cache format and version) and of its inputs."""
    return fingerprint({"format": FORMAT, "version": VERSION, **settings}, inputs)


def cache_dir_name(task: str, pool: str, max_length: int, key: str) -> str:
    return f"{task}-{pool}-{max_length}-{key[:12]}"


# ---------------------------------------------------------------- reading


class LayerCache:
    """One task's cached hidden states: ``cache["train"]`` is [N, L+1, D],
    ``cache["train", 3]`` is layer 3 ([N, D]), ``cache.labels("test")`` the labels.

    Arrays are memory-mapped NumPy arrays after :meth:`open`, or torch tensors after
    :meth:`to`, which moves every split and layer to a device in one call.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.manifest = manifest
        self.arrays = arrays

    # construction
    @classmethod
    def open(cls, path: str | Path, verify: bool = False, mmap: bool = True) -> LayerCache:
        """Open a complete cache; ``verify=True`` also checks every file's SHA-256."""
        path = Path(path)
        manifest = read_manifest(path)
        arrays: dict[str, dict[str, Any]] = {}
        order = {s: i for i, s in enumerate(SPLIT_ORDER)}
        for split, info in sorted(manifest["splits"].items(), key=lambda kv: order.get(kv[0], len(order))):
            arrays[split] = {}
            for kind, fname in info["files"].items():
                fpath = path / fname
                if not fpath.is_file():
                    raise CacheError(f"cache {path} is incomplete: {fname} is missing; re-run probekit extract")
                if verify and sha256_file(fpath) != manifest["checksums"][fname]:
                    raise CacheError(f"cache {path}: {fname} does not match its checksum; delete the cache and re-run")
                try:
                    arr = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
                except ValueError as e:
                    raise CacheError(f"cache {path}: {fname} is not a readable array ({e})") from None
                arrays[split][kind] = arr
            n = info["n"]
            if len(arrays[split]["labels"]) != n:
                raise CacheError(f"cache {path}: {split} has {len(arrays[split]['labels'])} labels, manifest says {n}")
            want = (info.get("n_tokens", n), manifest["n_layers"], manifest["hidden_size"])
            if tuple(arrays[split]["features"].shape) != want:
                raise CacheError(
                    f"cache {path}: {split} features have shape {arrays[split]['features'].shape}, "
                    f"manifest says {want}; delete the cache and re-run"
                )
        cache = cls(path, manifest, arrays)
        cache.check_labels()
        return cache

    def check_labels(self) -> None:
        """A classification cache's label ids lie in ``0..n_classes-1`` (read cheaply: one small array per
        split); a label id out of range would be probed as a class of its own, a silently wrong number."""
        k = self.manifest.get("n_classes")
        if self.manifest.get("task_type") == "regression" or not isinstance(k, int):
            return
        for split in self.splits:
            labels = np.asarray(self.labels(split))
            if not len(labels):
                continue
            lo, hi = labels.min(), labels.max()
            if lo < 0 or hi >= k:
                raise CacheError(
                    f"cache {self.path}: {split}.labels.npy holds label id {hi if hi >= k else lo}, but the task "
                    f"has {k} classes (ids 0..{k - 1}); the cache is corrupt: delete it and re-run probekit extract"
                )

    def check_nonfinite(self) -> None:
        """Each split's rows with NaN/inf per layer match the counts its manifest recorded when it was written:
        a changed count means the features were altered since (a flipped byte, a partial copy)."""
        for split in self.splits:
            want = self.manifest["splits"][split].get("nonfinite_rows_per_layer")
            if want is None:
                continue
            feats = self.features(split)
            if isinstance(feats, torch.Tensor):
                feats = feats.detach().cpu().numpy()
            got = count_nonfinite(feats).tolist()
            if got != list(want):
                raise CacheError(
                    f"cache {self.path}: {split}.features.npy has NaN/inf rows per layer {got}, its manifest "
                    f"recorded {list(want)}; the cache is corrupt: delete it and re-run probekit extract"
                )

    def to(self, device: str | torch.device, dtype: torch.dtype | None = torch.float32) -> LayerCache:
        """A copy with every array as a torch tensor on ``device`` (features cast to ``dtype``)."""
        moved: dict[str, dict[str, Any]] = {}
        for split, arrs in self.arrays.items():
            moved[split] = {}
            for kind, arr in arrs.items():
                # np.array reads the memory map once into a writable array torch can wrap
                t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr))
                release_pages(arr)
                if kind == "features" and dtype is not None:
                    t = t.to(device=device, dtype=dtype)
                else:
                    t = t.to(device=device)
                moved[split][kind] = t
        return LayerCache(self.path, self.manifest, moved)

    # access
    def __getitem__(self, key: str | tuple[str, int]) -> Any:
        if isinstance(key, tuple):
            split, layer = key
            return self.layer(layer, split)
        return self.features(key)

    def features(self, split: str) -> Any:
        """All layers of a split: [N, L+1, D] (or [T, L+1, D] for token-level caches)."""
        return self._get(split, "features")

    def labels(self, split: str) -> Any:
        return self._get(split, "labels")

    def offsets(self, split: str) -> Any:
        """Token-level caches: sentence i's tokens are rows ``offsets[i]:offsets[i+1]``."""
        return self._get(split, "offsets")

    def layer(self, layer: int, split: str = "train") -> Any:
        """One layer of one split ([N, D]); negative layers count from the top."""
        n = self.n_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range: this cache has layers 0..{n - 1} (0 = embeddings)")
        return self.features(split)[:, layer]

    def _get(self, split: str, kind: str) -> Any:
        if split not in self.arrays:
            raise KeyError(f"no split {split!r} in cache {self.path.name}; splits: {self.splits}")
        if kind not in self.arrays[split]:
            raise KeyError(f"cache {self.path.name} has no {kind!r} array (pooling {self.pool!r})")
        return self.arrays[split][kind]

    # metadata
    @property
    def splits(self) -> list[str]:
        return list(self.arrays)

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def pool(self) -> str:
        return str(self.manifest["pool"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.get("label_names", []))

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n_layers))

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.manifest['splits'][s]['n']}" for s in self.splits)
        return (
            f"LayerCache(task={self.task!r}, model={self.model!r}, pool={self.pool!r}, "
            f"layers={self.n_layers}, dim={self.hidden_size}, {counts})"
        )


def count_nonfinite(features: np.ndarray) -> np.ndarray:
    """Rows per layer holding inf/NaN (e.g. float16 overflow), read in blocks of 4096 rows."""
    bad = np.zeros(features.shape[1], dtype=np.int64)
    for start in range(0, len(features), 4096):
        block = np.asarray(features[start : start + 4096])
        bad += (~np.isfinite(block)).any(axis=-1).sum(axis=0)
        release_pages(features)  # a memory map read once is not kept resident (see release_pages)
    return bad


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache, or a ``CacheError`` saying what is wrong."""
    path = Path(path)
    if path.name.endswith(PARTIAL) or (path.parent / (path.name + PARTIAL)).exists():
        raise CacheError(f"cache {path} is incomplete (an extraction was interrupted); re-run probekit extract")
    if not path.exists():
        raise CacheError(f"cache {path} does not exist; create it with probekit extract")
    if not (path / MANIFEST).is_file():
        raise CacheError(f"{path} is not a probekit cache (no {MANIFEST})")
    try:
        manifest = read_json(path / MANIFEST)
    except ValueError as e:
        raise CacheError(f"cache {path}: {MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path / MANIFEST} is not a probekit cache manifest")
    if manifest.get("version") != VERSION:
        raise CacheError(
            f"cache {path} was written by an incompatible probekit (cache version {manifest.get('version')}, "
            f"this probekit reads version {VERSION}); delete it and re-run probekit extract"
        )
    return manifest


def find_caches(paths: str | Path | list[str | Path]) -> list[Path]:
    """Complete caches at or below each path (a cache dir, or a folder of them, two levels deep)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CacheError(f"cache directory {p} does not exist")
        if (p / MANIFEST).is_file():
            found.append(p)
            continue
        hits = sorted({m.parent for pattern in ("*/" + MANIFEST, "*/*/" + MANIFEST) for m in p.glob(pattern)})
        found.extend(h for h in hits if not h.name.endswith(PARTIAL))
        if not hits:
            partial = list(p.glob("*" + PARTIAL)) + list(p.glob("*/*" + PARTIAL))
            extra = f" ({len(partial)} interrupted extraction(s) found; re-run probekit extract)" if partial else ""
            raise CacheError(f"no probekit cache found in {p}{extra}")
    return found


def list_caches(root: str | Path) -> list[dict[str, Any]]:
    """One summary row per cache below ``root``: what ``probekit cache ls`` shows."""
    rows = []
    for p in find_caches(root):
        m = read_manifest(p)
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        rows.append(
            {
                "path": str(p),
                "task": m["task"],
                "model": m["model"]["name"],
                "pool": m["pool"],
                "max_length": m["max_length"],
                "layers": m["n_layers"],
                "dim": m["hidden_size"],
                "n": sum(s["n"] for s in m["splits"].values()),
                "dtype": m["storage_dtype"],
                "size_mb": round(size / 2**20, 1),
                "created": m.get("created", ""),
            }
        )
    return rows


def remove_cache(path: str | Path) -> None:
    """Delete a cache directory (refusing anything that is not one)."""
    path = Path(path)
    if not ((path / MANIFEST).is_file() or path.name.endswith(PARTIAL)):
        raise CacheError(f"{path} is not a probekit cache; refusing to delete it")
    remove_tree(path)


# ---------------------------------------------------------------- writing


@dataclass
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


class CacheWriter:
    """Writes a cache into ``<final>.partial`` and renames it into place when complete.

    Arrays are preallocated ``.npy`` memory maps; after each block of batches the maps
    are flushed and ``progress.json`` records how many batches of each split are done,
    so a killed extraction resumes where it stopped and ends with identical arrays.
    A lock file keeps two processes from writing the same cache.

    ``settings`` and ``inputs`` are what the cache key is made of (:func:`cache_key`); ``plan``
    describes the batch plan (batch size, token budget): a partial is resumed only when its stamp
    has the same fingerprint of both, is refused otherwise (:func:`probekit.fingerprint.check`),
    and is removed and started over only with ``fresh``.

    Memory: callers report the rows they wrote (:meth:`wrote`); once about ``buffer_bytes`` (default
    :data:`WRITE_BUFFER_BYTES`) are mapped since the last release, the maps' pages are released, so the
    writer never holds all features in memory. ``peak_pending_bytes`` records the most it held.
    """

    def __init__(
        self,
        final: Path,
        settings: Mapping[str, Any],
        inputs: Mapping[str, Any],
        layout: Mapping[str, Mapping[str, ArraySpec]],
        plan: Mapping[str, Any] | None = None,
        tag: str = "",
        fresh: bool = False,
        buffer_bytes: int | None = None,
    ) -> None:
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + PARTIAL)
        self.key = cache_key(settings, inputs)
        self.resume_settings = {"format": FORMAT, "version": VERSION, **settings, **(plan or {})}
        self.inputs = dict(inputs)
        self.tag = tag
        """The batch plan as text (recorded in manifests; a shard of another plan holds other rows)."""
        self.fresh = fresh
        self.layout = layout
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.done: dict[str, int] = {}
        self._lock: contextlib.ExitStack | None = None
        self.buffer_bytes = WRITE_BUFFER_BYTES if buffer_bytes is None else int(buffer_bytes)
        self.pending_bytes = 0
        """An upper bound of the bytes of the maps resident since their pages were last released."""
        self.peak_pending_bytes = 0

    def __enter__(self) -> CacheWriter:
        bound_heap()  # the batches' buffers must not fragment the heap over a long extraction
        self.final.parent.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        stack.enter_context(lock_file(self.final.with_name(self.final.name + ".lock"), self.final))
        self._lock = stack
        try:
            self._open_partial()
        except BaseException:
            self.__exit__()  # a refused resume releases the lock
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.arrays.clear()  # drop the memory maps (they flush on close)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def resumed(self) -> bool:
        return any(self.done.values())

    def _open_partial(self) -> None:
        stamp = read_stamp(self.partial) if self.partial.is_dir() else None
        if stamp is None and self.partial.exists():
            warnings.warn(
                f"{self.partial}: an interrupted extraction with no fingerprint (stopped before its first "
                "checkpoint, or written by an older probekit) is started over",
                ProbekitWarning,
                stacklevel=4,
            )
        decision = check(
            stamp,
            self.resume_settings,
            self.inputs,
            where=self.partial,
            fresh=self.fresh,
            what="an interrupted extraction",
        )
        if decision == "reuse":
            try:
                state = read_json(self.partial / PROGRESS)
                self.arrays = {
                    split: {kind: np.load(self.partial / f"{split}.{kind}.npy", mmap_mode="r+") for kind in kinds}
                    for split, kinds in self.layout.items()
                }
                self.done = {s: int(state["done"].get(s, 0)) for s in self.layout}
                return
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.arrays = {}
                raise CacheError(
                    f"{self.partial}: the interrupted extraction's files cannot be read ({type(e).__name__}); "
                    "remove it or rerun with {fresh} to start over",
                    params=("fresh",),
                ) from None
        remove_tree(self.partial)
        self.partial.mkdir(parents=True)
        self.arrays = {
            split: {
                kind: np.lib.format.open_memmap(
                    self.partial / f"{split}.{kind}.npy", mode="w+", dtype=spec.dtype, shape=spec.shape
                )
                for kind, spec in kinds.items()
            }
            for split, kinds in self.layout.items()
        }
        self.done = {s: 0 for s in self.layout}
        self._write_progress()
        write_stamp(self.partial, self.resume_settings, self.inputs)  # last: a stamped partial is resumable

    def wrote(self, split: str, rows: int) -> None:
        """Count ``rows`` feature rows just written to ``split`` (anywhere in the array: each row may touch one
        page more than its size), releasing every map's pages once ``buffer_bytes`` are reached."""
        shape = self.layout[split]["features"].shape
        row_bytes = int(np.prod(shape[1:])) * np.dtype(self.layout[split]["features"].dtype).itemsize
        self.pending_bytes += rows * (row_bytes + 2 * PAGE)
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)
        if self.pending_bytes >= self.buffer_bytes:
            self.release()

    def release(self) -> None:
        """Release the pages of every map (written data stays in the file; see :func:`release_pages`)."""
        for arrs in self.arrays.values():
            for arr in arrs.values():
                release_pages(arr)
        trim_heap()
        self.pending_bytes = 0

    def checkpoint(self, split: str, batches_done: int) -> None:
        """Flush the arrays, then record that the first ``batches_done`` batches of ``split`` are written."""
        for arr in self.arrays[split].values():
            arr.flush()
        self.release()
        self.done[split] = batches_done
        self._write_progress()

    def _write_progress(self) -> None:
        write_json(self.partial / PROGRESS, {"key": self.key, "tag": self.tag, "version": VERSION, "done": self.done})

    def finalize(self, manifest: dict[str, Any], kind: str = FORMAT) -> Path:
        """Checksum the arrays, write the manifest and move the cache (or shard) into place."""
        for arrs in self.arrays.values():
            for arr in arrs.values():
                arr.flush()
        self.arrays.clear()
        files = {f"{s}.{k}.npy" for s, kinds in self.layout.items() for k in kinds}
        manifest = {
            **manifest,
            "format": kind,
            "version": VERSION,
            "key": self.key,
            "checksums": {f: sha256_file(self.partial / f) for f in sorted(files)},
        }
        for split, kinds in self.layout.items():
            manifest["splits"][split]["files"] = {k: f"{split}.{k}.npy" for k in kinds}
        (self.partial / STAMP).unlink(missing_ok=True)  # first: a partial without its stamp is never resumed
        (self.partial / PROGRESS).unlink(missing_ok=True)
        write_json(self.partial / MANIFEST, manifest)
        return replace_dir(self.partial, self.final)
