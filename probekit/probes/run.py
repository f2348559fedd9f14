"""``probe()``: what ``probekit probe`` runs. Caches in, a tidy results table out.

For every cache (one task of one model) and seed it fits a :class:`LayerwiseProbe` on all
layers and writes one row per layer, split (dev, test) and metric (``acc``,
``control_acc``, ``control_gap``, ``majority_acc``; the MDL probe's codelengths on ``train``), in the vocabulary of
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
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probekit.backbone import resolve_device
from probekit.cache import LayerCache, find_caches
from probekit.config import fields_of, split_options
from probekit.distributed import balance, barrier, destroy_process_group, dist_info, init_process_group, rank_device
from probekit.errors import CacheError, ConvergenceWarning, ParamError, ProbekitError, ProbekitWarning
from probekit.fingerprint import differences, fingerprint
from probekit.io import remove_tree
from probekit.paths import claim_output
from probekit.probes.base import PROBE_KINDS, ProbeKind
from probekit.probes.layerwise import LayerwiseProbe, layer_major, nonfinite_layers, resolve_kind
from probekit.probes.order import cache_order
from probekit.probes.predictions import FOLDER, file_name, from_probe, identity_of, save_predictions
from probekit.probes.protocols import PROTOCOLS, Protocol, make_protocol, protocol_of
from probekit.probes.tuned import TunedProbe
from probekit.results import PARQUET, load_results, save_results, tidy
from probekit.runs import Run

SPLITS = ("train", "dev", "test")
REPORTED = ("dev", "test")
PARTS = ".parts"
"""Under torchrun each rank saves the rows it computed in ``OUT/.parts/``; rank 0 merges them."""
FIT_KEY = ["cache_key", "probe", "protocol", "seed", "layer", "split", "metric"]


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
    """Raise for a cache the protocol cannot use (label ids out of range included) and warn about one whose
    NaN/inf counts differ from its manifest's (altered since it was written; the layers the loaded features
    show NaN/inf in are left out, see :func:`_scan`); return the layers its manifest says hold NaN/inf."""
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
    cache.check_labels()
    try:
        cache.check_nonfinite()
    except CacheError as e:
        warnings.warn(str(e), ProbekitWarning, stacklevel=3)
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
            "dtype float32 or storage_dtype float32"
        )
    if bad and warn:
        warnings.warn(
            f"{cache.task}: layer(s) {sorted(bad)} have NaN/inf features (fp16 overflow?) and are "
            "left out; re-extract with storage_dtype float32 to probe them",
            ProbekitWarning,
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
    kind: str | type[ProbeKind] | LayerwiseProbe | None = None,
    seeds: int | Sequence[int] = 1,
    device: str | None = None,
    grid: Sequence[float] | str | None = None,
    control: bool | None = None,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    protocol: str | Protocol | None = None,
    **options: Any,
) -> Run:
    """Probe every layer of every cache (see the module docstring); a :class:`~probekit.runs.Run`
    whose ``results`` is the tidy table.

    ``kind``: a probe kind's name (:data:`~probekit.probes.base.PROBE_KINDS`) or a
    :class:`LayerwiseProbe` used as a template (its kind, grid, device, control and options;
    arguments given here override them). ``seeds``: how many (seeds 0..N-1) or which. ``device``
    defaults to ``auto``, ``control`` to True. ``options`` go to the probe kind (``tol``,
    ``max_iter`` for ``linear``; ``nhid``, ``dropout``, ``batch_size``... for ``mlp``). With
    ``out``, rows of other caches, probes or seeds already in ``out`` are kept; with ``resume`` a
    fit already there with the same fingerprint (settings and cache key) is not redone, and one
    made with other settings is redone (with a warning naming them) and its rows replaced.

    ``protocol``: a preset of :data:`~probekit.probes.protocols.PROTOCOLS` (``senteval-sklearn``,
    ``senteval``, ``conneau2018``, ``jawahar2019``): it sets the kind and its options (``options``
    given here override them; the protocol's own, e.g. ``first_round_only``, go to it). Without one
    the kind defaults to ``linear`` (the ``senteval-sklearn`` protocol). ``kind="mdl"`` with a protocol:
    the MDL probe with the protocol's classifier (and its candidates) as the block probe; options of that
    classifier (``grid``, ``max_epoch``...) go to it, the MDL probe's own (``fractions``) to the MDL probe.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ParamError("seeds", "must be at least 1")
    template = probe_template(kind, device=device, grid=grid, control=control, protocol=protocol, **options)
    info = dist_info()
    dev = resolve_device(rank_device(str(template.device), info))
    created = init_process_group(info, dev)
    try:
        return _probe(caches, template, seed_list, dev, out, resume, progress, info)
    finally:
        if created:
            destroy_process_group()


def probe_template(
    kind: str | type[ProbeKind] | LayerwiseProbe | None = None,
    device: str | None = None,
    grid: Sequence[float] | str | None = None,
    control: bool | None = None,
    protocol: str | Protocol | None = None,
    **options: Any,
) -> LayerwiseProbe:
    """The validated probe every fit of :func:`probe` starts from (its arguments, same meaning), so a suite
    checks its [probe] table by the same rule before any model runs; a bad option is a ParamError naming it."""
    proto = None
    if protocol is not None:
        cls = type(protocol) if isinstance(protocol, Protocol) else PROTOCOLS.get(protocol)
        own, options = split_options(options, cls.Config)
        proto = make_protocol(protocol, **own)
        named = None if kind is None or isinstance(kind, LayerwiseProbe) else resolve_kind(kind)[0]
        if named not in (None, proto.kind, "mdl"):
            raise ParamError(
                "kind", f"the {proto.name} protocol trains the {proto.kind} probe (or mdl's); leave {{kind}} out"
            )
        kind = proto.kind if kind is None else kind
    given = {**options, **({"grid": grid} if grid is not None else {})}
    if proto is not None and proto.kind not in ("linear", "mdl") and _kind_name(kind) == "mdl":
        # the MDL probe training the protocol's classifier: that kind's options (--grid, --max-epoch...) go to it
        given, options = split_options(given, PROBE_KINDS.get(proto.kind).Config)
        grid = None
    template = _template("linear" if kind is None else kind, device, grid, control, options)
    template.protocol_ = proto  # type: ignore[attr-defined]
    template.user_options_ = given  # type: ignore[attr-defined]
    fit_settings(template)  # validates the kind and its options before any cache is opened
    return template


def _template(
    kind: str | type[ProbeKind] | LayerwiseProbe,
    device: str | None,
    grid: Sequence[float] | str | None,
    control: bool | None,
    options: dict[str, Any],
) -> LayerwiseProbe:
    """The probe whose parameters every fit uses (a copy: the caller's object is left alone)."""
    params = kind.get_params() if isinstance(kind, LayerwiseProbe) else {"kind": kind}
    given = {"device": device, "grid": grid, "control": control}
    params.update({k: v for k, v in given.items() if v is not None}, **options)
    params.setdefault("device", "auto")
    params.setdefault("control", True)
    params.pop("seed", None)
    return LayerwiseProbe(**params)


def _member(template: LayerwiseProbe, task: str | None, **params: Any) -> LayerwiseProbe:
    """The probe one fit uses: the template's, with the protocol's candidate options for ``task`` (several:
    a :class:`TunedProbe`); options the caller gave override the protocol's."""
    proto: Protocol | None = getattr(template, "protocol_", None)
    base = {**template.get_params(), **params}
    if proto is None:
        return LayerwiseProbe(**base)
    given = getattr(template, "user_options_", {})
    if _kind_name(base["kind"]) == "mdl" and proto.kind != "mdl":  # MDL's block probe is the protocol's
        block = proto.candidates(task)
        if proto.kind == "linear":  # the MDL probe's own options are the linear block probe's
            return LayerwiseProbe(**{**base, "block_probe": "linear", "block_options": tuple(block)})
        cands = tuple({**c, **given} for c in block)
        return LayerwiseProbe(**{**base, "block_probe": proto.kind, "block_options": cands})
    cands = [{**c, **given} for c in proto.candidates(task)]
    if len(cands) == 1:
        return LayerwiseProbe(**{**base, **cands[0]})
    return TunedProbe(cands, **base)


def _kind_name(kind: str | type[ProbeKind] | LayerwiseProbe) -> str:
    return resolve_kind(kind.kind if isinstance(kind, LayerwiseProbe) else kind)[0]


def fit_settings(template: LayerwiseProbe, task: str | None = None) -> dict[str, Any]:
    """What determines a fit's results (fingerprinted, recorded): the probe's settings and the protocol's."""
    proto: Protocol | None = getattr(template, "protocol_", None)
    settings = _member(template, task).settings()
    return settings if proto is None else {**settings, **proto.settings()}


def fit_fingerprint(settings: dict[str, Any], cache_key: Any) -> str:
    """What identifies one fit's result: its settings and the cache it read (seed and kind are in its key)."""
    return fingerprint(settings, {"cache": cache_key})


def _probe(
    caches: Any,
    template: LayerwiseProbe,
    seed_list: list[int],
    dev: torch.device,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    info: Any,
) -> Run:
    start = time.perf_counter()
    timings = {"load": 0.0, "fit": 0.0, "score": 0.0}
    opened = open_caches(caches)
    manifest_bad = {c.path: check_cache(c) for c in opened}
    proto: Protocol | None = getattr(template, "protocol_", None)
    if proto is not None:
        for c in opened:
            proto.check_pool(c.pool, f"{c.task} ({c.path})")
    settings = fit_settings(template)
    kind = settings["kind"]
    step_name = resolve_kind(template.kind)[1].step_name
    protocol = proto.name if proto is not None else protocol_of(kind)
    task_settings = {c.path: fit_settings(template, c.task) for c in opened}

    if out is not None:
        claim_output(out, "out", force=not resume, force_param="fresh")
    previous = _previous(out) if out is not None else None
    units = [(c, seed) for c in opened for seed in seed_list]
    others = previous
    done: list[dict[str, Any]] = []
    todo = units
    if previous is not None:
        this_run = {(c.manifest["key"], kind, seed, protocol) for c, seed in units}
        keys = _keys(previous)
        mine = np.array([k in this_run for k in keys], dtype=bool)
        others = previous[~mine]
        if resume:
            same = _same_fit(previous, settings, {c.manifest["key"]: task_settings[c.path] for c in opened})
            # a fit whose per-sentence predictions are missing (killed between the two writes, or made by an
            # earlier version) is redone, so every fit in OUT has them
            kept_fit = same & _has_predictions(previous, Path(out))
            done = previous[mine & kept_fit].to_dict("records")
            done_keys = set(_keys(previous[mine & kept_fit]))
            todo = [(c, s) for c, s in units if (c.manifest["key"], kind, s, protocol) not in done_keys]
            _warn_changed(previous[mine & ~same], settings)
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
    last: LayerwiseProbe | None = None
    for c, seed in todo:
        bar.set_description(f"{c.task} seed {seed}")
        if loaded != c.path:  # each cache's features are read once, one cache at a time
            t0 = time.perf_counter()
            feats = {}  # let the previous cache's features go first
            feats = load_features(c, dev)
            layers = _usable_layers(c, manifest_bad[c.path] | _scan(c, feats))
            loaded = c.path
            timings["load"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        lp = fit_one(template, c, feats, seed, dev, layers, callback=step)
        timings["fit"] += time.perf_counter() - t0
        if lp.not_converged_:
            _warn_not_converged(lp, c.task, seed)
        t0 = time.perf_counter()
        fit_rows = result_rows(lp, c, feats, json.dumps(task_settings[c.path], sort_keys=True), protocol)
        new.extend(fit_rows)
        preds = None if out is None else fit_predictions(lp, c, feats, fit_rows[0])
        timings["score"] += time.perf_counter() - t0
        last = lp
        bar.update(1)
        if out is not None and info.distributed:
            save_results(tidy(new), Path(out) / PARTS / f"r{info.rank}")
        elif out is not None:
            save_results(tidy(kept + done + new), out)
        if preds is not None and out is not None:  # after the results: OUT is marked as probekit's first
            save_predictions(out, preds)
    bar.close()
    paths = {} if out is None else {"out": Path(out), "results": Path(out) / PARQUET}
    details = {"settings": settings, "fitted": len(todo), "reused": len(units) - len(todo)}

    def finish(results: pd.DataFrame) -> Run:
        timings["total"] = time.perf_counter() - start
        return Run(results=results, paths=paths, timings=timings, estimator=last, details=details)

    if not info.distributed:
        return finish(tidy(done + new))
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
    return finish(merged)


def fit_one(
    template: LayerwiseProbe,
    cache: LayerCache,
    feats: dict[str, torch.Tensor],
    seed: int,
    device: str | torch.device,
    layers: Sequence[int],
    callback: Callable[[int, int], None] | None = None,
) -> LayerwiseProbe:
    """One fit of :func:`probe`: the template's probe for this cache's task (its protocol's candidates and
    SentEval's row order when the protocol has one) on ``layers`` of the loaded features."""
    lp = _member(template, cache.task, seed=seed, device=device)
    proto: Protocol | None = getattr(template, "protocol_", None)
    order = _order(cache) if proto is not None and proto.senteval_order else None
    train, dev = cache.labels("train"), cache.labels("dev")
    return lp.fit(feats["train"], train, feats["dev"], dev, layers=list(layers), callback=callback, order=order)


def _has_predictions(previous: pd.DataFrame, out: Path) -> np.ndarray:
    """Which rows of ``previous`` belong to a fit whose predictions file is in ``out``."""
    cols = ("model", "task", "probe", "seed", "cache_key", "protocol")
    if any(c not in previous.columns for c in cols):
        return np.zeros(len(previous), dtype=bool)
    found: dict[tuple[Any, ...], bool] = {}
    out_rows = []
    for values in zip(*(previous[c] for c in cols), strict=True):
        if values not in found:
            ident = identity_of(dict(zip(cols, values, strict=True)))
            found[values] = not pd.isna(ident["seed"]) and (out / FOLDER / file_name(ident)).is_file()
        out_rows.append(found[values])
    return np.array(out_rows, dtype=bool)


def _order(cache: LayerCache) -> np.ndarray | None:
    """SentEval's train order of a cache, or None (with a warning) when its data file cannot be read."""
    try:
        return cache_order(cache)
    except ProbekitError as e:
        warnings.warn(
            f"{cache.task}: {e}; training in the cache's row order (SentEval's protocol, not its exact mini-batches)",
            ProbekitWarning,
            stacklevel=4,
        )
        return None


def _same_fit(
    previous: pd.DataFrame, settings: dict[str, Any], per_cache: dict[Any, dict[str, Any]] | None = None
) -> np.ndarray:
    """Which rows of ``previous`` come from a fit with this run's fingerprint (their cache, these settings;
    ``per_cache``: the settings of a cache whose task changes them, as conneau2018's WordContent)."""
    if "cache_key" not in previous.columns:
        return np.zeros(len(previous), dtype=bool)
    same: dict[tuple[Any, Any], bool] = {}  # one fingerprint per distinct fit, not per row
    for pair in zip(previous["cache_key"], previous["settings"], strict=True):
        if pair not in same:
            key, recorded = pair
            mine = (per_cache or {}).get(key, settings)
            same[pair] = _recorded_fingerprint(recorded, key) == fit_fingerprint(mine, key)
    return np.array([same[p] for p in zip(previous["cache_key"], previous["settings"], strict=True)], dtype=bool)


def _recorded_fingerprint(recorded: Any, cache_key: Any) -> str | None:
    try:
        return fit_fingerprint(json.loads(recorded), cache_key)
    except (TypeError, ValueError):
        return None


def _warn_changed(stale: pd.DataFrame, settings: dict[str, Any]) -> None:
    """One warning naming the settings that differ from those of the fits about to be redone."""
    if stale.empty:
        return
    changed: list[str] = []
    for recorded in dict.fromkeys(stale["settings"]):
        try:
            old = json.loads(recorded)
        except (TypeError, ValueError):
            old = {}
        changed += [d for d in differences(old, settings) if d not in changed]
    fits = len(set(_keys(stale)))
    warnings.warn(
        f"{fits} {settings['kind']} probe fit(s) in the results were made with other settings "
        f"({', '.join(changed) or 'unknown'}); they are refitted and their rows replaced",
        ProbekitWarning,
        stacklevel=4,
    )


def _warn_not_converged(lp: LayerwiseProbe, task: str, seed: int) -> None:
    cls = type(lp.estimator_)
    param = lp.estimator_.limit_option
    what = f"{lp.not_converged_} {lp.kind_} probe fit(s) stopped at the limit before converging"
    if param:
        spec = next((f for f in fields_of(cls.Config) if f.name == param), None)
        flag = (spec.flag if spec is not None and spec.flag else None) or "--" + param.replace("_", "-")
        what += f"; raise {param} (on the command line: raise {flag})"
    warnings.warn(f"{task} (seed {seed}): {what}", ConvergenceWarning, stacklevel=4)


def result_rows(
    lp: LayerwiseProbe, cache: LayerCache, feats: dict[str, Any], settings_json: str, protocol: str | None = None
) -> list[dict[str, Any]]:
    """The tidy rows of one fitted probe: layers x (dev, test) x metrics, with the cache's columns."""
    m = cache.manifest
    columns = {
        "model": cache.model,
        "model_fingerprint": m["model"].get("fingerprint"),
        "task": cache.task,
        "pool": cache.pool,
        "max_length": m.get("max_length"),
        "data_sha256": (m.get("data") or {}).get("sha256"),
        "settings": settings_json,
        "n_classes": len(lp.classes_),
        "reg_name": lp.estimator_.reg_name,
        "cache_key": m.get("key"),
        "protocol": protocol if protocol is not None else protocol_of(lp.kind_),
    }
    rows = lp.train_rows(**columns)
    for split in REPORTED:
        rows += lp.rows(feats[split], cache.labels(split), split, **columns)
    return rows


def fit_predictions(lp: LayerwiseProbe, cache: LayerCache, feats: dict[str, Any], first: dict[str, Any]) -> Any:
    """Per-sentence correctness of one fit on the reported splits (:mod:`probekit.probes.predictions`)."""
    return from_probe(lp, identity_of(first), [(s, feats[s], cache.labels(s)) for s in REPORTED])


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


def _keys(df: pd.DataFrame) -> list[tuple[Any, Any, Any, Any]]:
    """(cache key, probe, seed, protocol) of each row: what identifies one fit."""
    if "cache_key" not in df.columns:
        return [(None, None, None, None)] * len(df)
    seeds = [None if pd.isna(s) else int(s) for s in df["seed"]]
    protocols = [None if not isinstance(p, str) else p for p in df["protocol"]]
    return list(zip(df["cache_key"], df["probe"], seeds, protocols, strict=True))
