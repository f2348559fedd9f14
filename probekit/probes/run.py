"""``probe()``: what ``probekit probe`` runs. Caches in, a tidy results table out.

For every cache (one task of one model) and seed it fits a :class:`LayerwiseProbe` on all
layers and writes one row per layer, split (dev, test) and metric (``acc``,
``control_acc``, ``selectivity``, ``majority_acc``), in the vocabulary of
:mod:`probekit.results`. Each cache's features are read (and moved to the device) once,
whatever the number of seeds. With ``out`` the table is saved after every task and seed,
and a later run with the same settings skips what is already there.

Bad input is an error naming the cache and task (missing, incomplete or incompatible
caches, token-level caches, regression tasks, a split without rows, a single train class),
or, for NaN/inf features, a warning naming the task and layers, which are then left out
(every layer bad is an error).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probekit.backbone import resolve_device
from probekit.cache import LayerCache, find_caches
from probekit.distributed import balance, barrier, destroy_process_group, dist_info, init_process_group, rank_device
from probekit.errors import CacheError, ProbekitError
from probekit.io import remove_tree
from probekit.metrics import wilson
from probekit.probes.layerwise import LayerwiseProbe, layer_major, nonfinite_layers
from probekit.results import PARQUET, load_results, save_results, tidy

SPLITS = ("train", "dev", "test")
REPORTED = ("dev", "test")
PARTS = ".parts"
"""Under torchrun each rank saves the rows it computed in ``OUT/.parts/``; rank 0 merges them."""
FIT_KEY = ["cache_key", "probe", "seed", "layer", "split", "metric"]


def open_caches(caches: str | Path | LayerCache | Iterable[str | Path | LayerCache]) -> list[LayerCache]:
    """Open caches given as cache directories, folders of caches or ``LayerCache`` objects."""
    if isinstance(caches, (str, Path, LayerCache)):
        caches = [caches]
    out: dict[Any, LayerCache] = {}
    for c in caches:
        if isinstance(c, LayerCache):
            out.setdefault(c.manifest.get("key") or c.path.resolve(), c)
            continue
        found = find_caches(c)
        if not found:
            raise CacheError(f"no complete probekit cache in {c} (an interrupted extraction?); re-run probekit extract")
        for path in found:
            cache = LayerCache.open(path)
            out.setdefault(cache.manifest.get("key") or path.resolve(), cache)  # the same cache twice: once
    if not out:
        raise CacheError("no cache given; pass at least one cache directory (made by probekit extract)")
    return list(out.values())


def check_cache(cache: LayerCache) -> set[int]:
    """Raise for a cache the protocol cannot use; return the layers its manifest says hold NaN/inf."""
    task = f"{cache.task} ({cache.path})"
    if cache.pool == "tokens":
        raise CacheError(f"{task} is a token-level cache; probe sentence features (extract with --pool mean or cls)")
    if cache.manifest.get("task_type") == "regression":
        raise ProbekitError(f"{task} is a regression task; the SentEval probes are classifiers")
    for split in SPLITS:
        if split not in cache.splits or cache.manifest["splits"][split]["n"] == 0:
            raise ProbekitError(
                f"{task}: the {split} split has no rows; the protocol trains on train, selects on dev and reports test"
            )
    classes = np.unique(np.asarray(cache.labels("train")))
    if len(classes) < 2:
        raise ProbekitError(
            f"{task}: every train example has the same label ({classes[0]}); a probe needs at least two classes"
        )
    bad = set()
    for split in SPLITS:
        counts = cache.manifest["splits"][split].get("nonfinite_rows_per_layer") or []
        bad |= {i for i, c in enumerate(counts) if c}
    _usable_layers(cache, bad, warn=False)
    return bad


def _usable_layers(cache: LayerCache, bad: set[int], warn: bool = True) -> list[int]:
    good = [i for i in range(cache.n_layers) if i not in bad]
    if not good:
        raise ProbekitError(
            f"{cache.task} ({cache.path}): every layer has NaN/inf features; re-extract with "
            "--dtype float32 or --storage-dtype float32"
        )
    if bad and warn:
        warnings.warn(
            f"{cache.task}: layer(s) {sorted(bad)} have NaN/inf features (fp16 overflow?) and are "
            "left out; re-extract with --storage-dtype float32 to probe them",
            stacklevel=3,
        )
    return good


def load_features(cache: LayerCache, device: torch.device) -> dict[str, torch.Tensor]:
    """Every split as float32 [N, L, D] on ``device``, read once: on a GPU through ``cache.to``, on
    the CPU as a view of one contiguous [L, N, D] copy (the layout the batched products want)."""
    if device.type == "cpu":
        return {s: layer_major(cache.features(s), None, device).transpose(0, 1) for s in SPLITS}
    moved = cache.to(device)
    return {s: moved.features(s) for s in SPLITS}


def probe(
    caches: Any,
    kind: str = "linear",
    seeds: int | Sequence[int] = 1,
    device: str = "auto",
    grid: Sequence[float] | None = None,
    control: bool = True,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """Probe every layer of every cache (see the module docstring); the results table.

    ``seeds``: how many (seeds 0..N-1) or which. ``options`` go to the probe kind (``tol``,
    ``max_iter`` for ``linear``; ``nhid``, ``dropout``, ``batch_size``... for ``mlp``). With
    ``out``, rows of other caches, probes or seeds already in ``out`` are kept, and with
    ``resume`` a fit already there with the same settings is not redone.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ProbekitError("--seeds must be at least 1")
    info = dist_info()
    dev = resolve_device(rank_device(device, info))
    created = init_process_group(info, dev)
    try:
        return _probe(caches, kind, seed_list, dev, grid, control, out, resume, progress, info, options)
    finally:
        if created:
            destroy_process_group()


def _probe(
    caches: Any,
    kind: str,
    seed_list: list[int],
    dev: torch.device,
    grid: Sequence[float] | None,
    control: bool,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    info: Any,
    options: dict[str, Any],
) -> pd.DataFrame:
    opened = open_caches(caches)
    manifest_bad = {c.path: check_cache(c) for c in opened}
    template = LayerwiseProbe(kind, grid=grid, device=dev, control=control, **options)
    settings, step_name = template.settings(), template.estimator_.step_name
    settings_json = json.dumps(settings, sort_keys=True)

    previous = _previous(out) if out is not None else None
    units = [(c, seed) for c in opened for seed in seed_list]
    others = previous
    done: list[dict[str, Any]] = []
    todo = units
    if previous is not None:
        this_run = {(c.manifest["key"], kind, seed) for c, seed in units}
        mine = np.array([k in this_run for k in _keys(previous)], dtype=bool)
        others = previous[~mine]
        if resume:
            finished = previous[mine & (previous["settings"] == settings_json).to_numpy()]
            done_keys = set(_keys(finished))
            done = finished.to_dict("records")
            todo = [(c, s) for c, s in units if (c.manifest["key"], kind, s) not in done_keys]
    kept = [] if others is None else others.to_dict("records")
    if info.distributed:  # each rank takes a size-balanced share of the fits
        barrier()  # every rank has read OUT before any rank writes to it
        costs = [float(c.n_layers * c.hidden_size * sum(c.manifest["splits"][s]["n"] for s in SPLITS)) for c, _ in todo]
        todo = [todo[i] for i in balance(costs, info.world_size)[info.rank]]

    bar = tqdm(total=len(todo), unit="fit", disable=not progress or not info.is_main, dynamic_ncols=True)

    def step(it: int, running: int) -> None:
        bar.set_postfix_str(f"{step_name} {it}, {running} running", refresh=False)

    new: list[dict[str, Any]] = []
    loaded: Path | None = None
    feats: dict[str, torch.Tensor] = {}
    layers: list[int] = []
    for c, seed in todo:
        bar.set_description(f"{c.task} seed {seed}")
        if loaded != c.path:  # each cache's features are read once, one cache at a time
            feats = {}  # let the previous cache's features go first
            feats = load_features(c, dev)
            layers = _usable_layers(c, manifest_bad[c.path] | _scan(c, feats))
            loaded = c.path
        lp = LayerwiseProbe(kind, grid=grid, seed=seed, device=dev, control=control, **options)
        lp.fit(feats["train"], c.labels("train"), feats["dev"], c.labels("dev"), layers=layers, callback=step)
        if lp.estimator_.not_converged_:
            warnings.warn(
                f"{c.task} (seed {seed}): {lp.estimator_.not_converged_} {kind} probe fit(s) stopped at "
                f"the limit before converging; raise {lp.estimator_.limit_option}",
                stacklevel=2,
            )
        new.extend(result_rows(lp, c, feats, settings_json))
        bar.update(1)
        if out is not None and info.distributed:
            save_results(tidy(new), Path(out) / PARTS / f"r{info.rank}")
        elif out is not None:
            save_results(tidy(kept + done + new), out)
    bar.close()
    if not info.distributed:
        return tidy(done + new)
    barrier()
    merged = tidy(done + new)
    if info.is_main:
        parts = sorted((Path(out) / PARTS).glob(f"r*/{PARQUET}")) if out is not None else []
        frames = [merged] + [load_results(p) for p in parts if p.parent.name != f"r{info.rank}"]
        merged = _dedupe(pd.concat(frames, ignore_index=True))
        if out is not None:
            save_results(tidy(kept + merged.to_dict("records")), out)
            remove_tree(Path(out) / PARTS)
    barrier()
    return merged


def result_rows(
    lp: LayerwiseProbe, cache: LayerCache, feats: dict[str, Any], settings_json: str
) -> list[dict[str, Any]]:
    """The tidy rows of one fitted probe: layers x (dev, test) x metrics."""
    m = cache.manifest
    common = {
        "source": "probe",
        "model": cache.model,
        "model_fingerprint": m["model"].get("fingerprint"),
        "task": cache.task,
        "probe": lp.kind,
        "seed": lp.seed,
        "pool": cache.pool,
        "max_length": m.get("max_length"),
        "data_sha256": (m.get("data") or {}).get("sha256"),
        "settings": settings_json,
        "n_classes": len(lp.classes_),
        "reg_name": lp.estimator_.reg_name,
        "cache_key": m.get("key"),
    }
    rows = []
    for split in REPORTED:
        y = cache.labels(split)
        n = len(y)
        hits = lp.correct(feats[split], y, split)
        for i, layer in enumerate(lp.layers_):
            acc = hits["probe"][i] / n
            base = {**common, "layer": layer, "split": split, "n": n}
            rows.append(_metric(base, "acc", hits["probe"][i], n, lp.best_reg_[i]))
            if lp.control:
                rows.append(_metric(base, "control_acc", hits["control"][i], n, lp.control_reg_[i]))
                rows.append(
                    {
                        **base,
                        "metric": "selectivity",
                        "value": acc - hits["control"][i] / n,
                        "ci_low": None,
                        "ci_high": None,
                        "reg": None,
                    }
                )
            rows.append(_metric(base, "majority_acc", hits["majority"][i], n, None))
    return rows


def _metric(base: dict[str, Any], metric: str, correct: int, n: int, reg: float | None) -> dict[str, Any]:
    low, high = wilson(correct, n)
    return {
        **base,
        "metric": metric,
        "value": correct / n,
        "ci_low": float(low),
        "ci_high": float(high),
        "reg": None if reg is None else float(reg),
    }


def _scan(cache: LayerCache, feats: dict[str, torch.Tensor]) -> set[int]:
    """Layers whose loaded features hold NaN/inf (the manifest may predate an edit of the data)."""
    layers = list(range(cache.n_layers))
    return {i for s in SPLITS for i in nonfinite_layers(feats[s].transpose(0, 1), layers)}


def _previous(out: str | Path) -> pd.DataFrame | None:
    """Rows already in OUT, with those of ranks of an interrupted distributed run."""
    path = Path(out)
    files = [path / PARQUET] if (path / PARQUET).is_file() else []
    files += sorted((path / PARTS).glob(f"r*/{PARQUET}"))
    if not files:
        return None
    return _dedupe(load_results(files))


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per probe fit, layer, split and metric (the latest); other sources untouched."""
    if "cache_key" not in df.columns:
        return df
    is_probe = (df["source"] == "probe").to_numpy()
    probes = df[is_probe].drop_duplicates(FIT_KEY, keep="last")
    return tidy(pd.concat([df[~is_probe], probes], ignore_index=True).to_dict("records"))


def _keys(df: pd.DataFrame) -> list[tuple[Any, Any, Any]]:
    """(cache key, probe, seed) of each row: what identifies one fit."""
    if "cache_key" not in df.columns:
        return [(None, None, None)] * len(df)
    seeds = [None if pd.isna(s) else int(s) for s in df["seed"]]
    return list(zip(df["cache_key"], df["probe"], seeds, strict=True))
