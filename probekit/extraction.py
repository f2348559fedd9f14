"""Extract every layer of a frozen encoder into on-disk caches: reusable, resumable,
and shardable across processes.

One process writes straight into the cache's arrays. Under ``torchrun`` (or
``accelerate launch``) each rank computes a length-balanced share of the *same* batch
plan into its own shard, and rank 0 assembles the cache once every shard is in, so
the result is identical to a single-process run. A killed process leaves its shard
incomplete; re-running resumes only what is missing.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from probekit._version import __version__
from probekit.backbone import COMPUTE_DTYPES, Backbone, dtype_name, load_backbone
from probekit.cache import (
    MANIFEST,
    STORAGE_DTYPES,
    ArraySpec,
    CacheWriter,
    LayerCache,
    cache_dir_name,
    cache_key,
    count_nonfinite,
    read_manifest,
    release_pages,
)
from probekit.config import Config, option
from probekit.data import Task, TaskData, load_task
from probekit.data.task import UNSEEN_LABELS
from probekit.distributed import (
    DistInfo,
    assign_batches,
    barrier,
    destroy_process_group,
    dist_info,
    init_process_group,
    rank_device,
)
from probekit.encoding import (  # re-exported: the extraction building blocks
    MAX_BATCH,
    POOLS,
    Placement,
    Runner,
    Timings,
    Tokenized,
    collate,
    default_max_tokens,
    encode,
    hidden_states,
    parse_batch_size,
    plan_batches,
    pool_layers,
    tokenize,
)
from probekit.errors import CacheError, ProbekitError, ProbekitWarning
from probekit.io import read_json, remove_tree
from probekit.paths import claim_output, slug

CHECKPOINT_SECONDS = float(os.environ.get("PROBEKIT_CHECKPOINT_SECONDS", 5.0))
SHARDS = ".shards"

__all__ = [
    "POOLS",
    "STORAGE_DTYPES",
    "ExtractConfig",
    "Placement",
    "Tokenized",
    "collate",
    "encode",
    "extract",
    "extract_task",
    "hidden_states",
    "plan_batches",
    "pool_layers",
    "tokenize",
]


@dataclass(frozen=True)
class ExtractConfig(Config):
    """The options of an extraction (``extract``, ``probekit extract``, a suite's extract step)."""

    component = "the extraction"

    pool: str = option(
        "mean", "How each layer is pooled: mean is mask-aware, tokens keeps every token.", choices=POOLS.names
    )
    max_length: int = option(128, "Truncate texts to this many tokens.", ge=2)
    batch_size: str = option("auto", "Texts per batch, or auto (token budget, halves on OOM).")
    dtype: str = option("auto", "Compute dtype: auto = float32 on CPU, bf16/fp16 on GPU.", choices=COMPUTE_DTYPES)
    storage_dtype: str = option("float16", "dtype of the cached arrays.", choices=STORAGE_DTYPES)
    include_special: bool = option(True, "Mean pooling over [CLS]/[SEP] too.", flag="--include-special")
    unseen_labels: str = option(
        "error", "dev/test rows with a label never seen in train: error, or drop them.", choices=UNSEEN_LABELS
    )

    def validate(self) -> None:
        bs = self.batch_size
        if bs is None or (isinstance(bs, int) and not isinstance(bs, bool)):  # 8 and "8" alike; None is auto
            object.__setattr__(self, "batch_size", "auto" if bs is None else str(bs))
        if isinstance(self.pool, str):
            object.__setattr__(self, "pool", POOLS.canonical(self.pool))  # "unknown pooling ..., did you mean"
        super().validate()

    def check(self) -> None:
        parse_batch_size(self.batch_size)

    @property
    def batch(self) -> int | None:
        """The batch size as a number (None: auto)."""
        return parse_batch_size(self.batch_size)

    @property
    def pooling(self) -> Any:
        return POOLS.get(self.pool)


@dataclass
class _ExtractionJob:
    """One task's extraction, prepared: texts tokenised and the batch plan fixed."""

    backbone: Backbone
    data: TaskData
    splits: dict[str, Any]
    toks: dict[str, Tokenized]
    plans: dict[str, list[np.ndarray]]
    pool: str
    include_special: bool
    storage: str
    plan: dict[str, Any]
    tag: str
    timings: Timings

    @property
    def token_level(self) -> bool:
        return POOLS.get(self.pool).token_level

    def placement(self, split: str, order: np.ndarray | None = None) -> Placement:
        n = len(self.splits[split])
        lengths = self.toks[split].lengths if self.token_level else None
        return Placement(np.arange(n) if order is None else order, lengths, n_total=n)

    def runner(self, split: str) -> Runner:
        return Runner(
            self.backbone, self.toks[split], self.pool, self.include_special, getattr(torch, self.storage), self.timings
        )


def cache_settings(
    backbone: Backbone, data: TaskData, config: ExtractConfig, reader_options: Mapping[str, Any]
) -> dict[str, Any]:
    """The settings that determine a cache's contents (its key is their fingerprint with :func:`cache_inputs`)."""
    return {
        "compute_dtype": dtype_name(backbone.dtype),
        "task": data.name,
        "reader_options": dict(reader_options),
        "pool": config.pool,
        "include_special": config.include_special if config.pooling.uses_special else None,
        "max_length": config.max_length,
        "storage_dtype": config.storage_dtype,
    }


def cache_inputs(backbone: Backbone, data: TaskData) -> dict[str, str]:
    """The fingerprints of what a cache is computed from: the weights, the tokenizer and the data bytes."""
    return {
        "model_fingerprint": backbone.fingerprint,
        "tokenizer_fingerprint": backbone.tokenizer_hash,
        "data_sha256": data.sha256,
    }


def extract_task(
    backbone: Backbone,
    data: TaskData,
    out: str | Path,
    pool: str = "mean",
    max_length: int = 128,
    batch_size: int | str | None = "auto",
    storage_dtype: str = "float16",
    include_special: bool = True,
    reader_options: dict[str, Any] | None = None,
    progress: bool = True,
    on_batch: Callable[[str, int], None] | None = None,
    dist: DistInfo | None = None,
    fresh: bool = False,
) -> LayerCache:
    """Extract one task into ``out/<model>/<task>-<pool>-<max_length>-<key>/``, reusing or
    resuming an earlier run with the same inputs.

    A finished cache is reused only once fully checked (sizes, label ids, SHA-256 of every file, NaN/inf
    counts against its manifest); a damaged one (a flipped byte) is extracted again, with a warning.

    An interrupted extraction of the same cache is resumed when it was made with the same batch
    plan and refused otherwise (a :class:`~probekit.errors.ResumeError` naming what differs);
    ``fresh`` removes it and starts over. ``on_batch(split, batch_no)`` is called after each batch
    is written (tests use it to simulate a crash). ``dist`` (default: from the launcher's
    environment) shards the work.
    """
    config = ExtractConfig(
        pool=pool,
        max_length=max_length,
        batch_size=batch_size,  # type: ignore[arg-type]  (validate() takes ints and None too)
        storage_dtype=storage_dtype,  # type: ignore[arg-type]
        include_special=include_special,
    )
    dist = dist or dist_info()
    settings = cache_settings(backbone, data, config, reader_options or {})
    inputs = cache_inputs(backbone, data)
    key = cache_key(settings, inputs)
    # names come from the command line or a suite file: never used unescaped as folder names
    final = Path(out) / slug(backbone.name) / cache_dir_name(slug(data.name), config.pool, config.max_length, key)
    damaged = False
    if _complete(final, key):
        try:
            return _trusted(final)
        except CacheError as e:
            what = str(e).split("; ")[0]  # the damage, without the advice to re-extract: done here
            warnings.warn(f"{what}; extracting it again", ProbekitWarning, stacklevel=2)
            damaged = True

    started = time.perf_counter()
    job = _prepare(backbone, data, config)
    on_batch = on_batch or _fault_from_env(dist)
    if not dist.distributed:
        _write_cache(job, final, settings, inputs, progress, on_batch, started, fresh)
    else:
        plan = "" if job.plan["batch_size"] is None else f"-bs{job.plan['batch_size']}"  # one folder per batch plan
        shard_root = final.with_name(final.name + SHARDS) / f"w{dist.world_size}{plan}"
        _write_shard(job, shard_root, settings, inputs, dist, progress, on_batch, fresh)
        barrier()
        if dist.is_main and (damaged or not _complete(final, key)):
            _merge_shards(job, final, settings, inputs, shard_root, dist.world_size, started, fresh)
        barrier()
    cache = LayerCache.open(final)
    if dist.is_main:
        _warn_nonfinite(cache)
    return cache


def _trusted(final: Path) -> LayerCache:
    """A finished cache about to be reused, checked fully: sizes and label ids (:meth:`LayerCache.open`),
    every file's SHA-256 against the manifest (as ``probekit cache verify``) and the NaN/inf counts. A
    damaged cache raises a ``CacheError``; :func:`extract_task` then writes it again."""
    cache = LayerCache.open(final, verify=True)
    cache.check_nonfinite()
    return cache


def _complete(final: Path, key: str) -> bool:
    if not (final / MANIFEST).is_file():
        return False
    try:
        return read_manifest(final).get("key") == key
    except CacheError:
        return False  # unreadable or old: rebuilt


def _prepare(backbone: Backbone, data: TaskData, config: ExtractConfig) -> _ExtractionJob:
    timings = Timings()
    t0 = time.perf_counter()
    splits = {name: split for name, split in data.splits.items() if len(split)}
    max_length = backbone.usable_length(config.max_length)
    toks = {name: tokenize(backbone.tokenizer, s.texts, s.text_pairs, max_length) for name, s in splits.items()}
    timings.tokenize = time.perf_counter() - t0
    bs = config.batch
    max_tokens = default_max_tokens(backbone.device)
    plans = {name: plan_batches(tok.lengths, bs, max_tokens) for name, tok in toks.items()}
    plan = {"batch_size": bs, "max_tokens": max_tokens, "max_batch": MAX_BATCH}
    tag = f"bs={bs}|max_tokens={max_tokens}|max_batch={MAX_BATCH}"
    return _ExtractionJob(
        backbone,
        data,
        splits,
        toks,
        plans,
        config.pool,
        config.include_special,
        config.storage_dtype,
        plan,
        tag,
        timings,
    )


def _run_batches(
    job: _ExtractionJob,
    writer: CacheWriter,
    work: dict[str, list[int]],
    places: dict[str, Placement],
    progress: bool,
    on_batch: Callable[[str, int], None] | None,
    desc: str,
) -> int:
    """Compute the batches ``work[split]`` (plan indices) not yet done and write them; return how many ran."""
    total = sum(len(places[s].order) for s in work)
    done = sum(int(sum(len(job.plans[s][b]) for b in work[s][: writer.done[s]])) for s in work)
    bar = tqdm(
        total=total, initial=done, unit="sent", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True
    )
    computed = 0
    for split, batch_ids in work.items():
        run, features = job.runner(split), writer.arrays[split]["features"]
        last = time.perf_counter()
        for j in range(writer.done[split], len(batch_ids)):
            idx = job.plans[split][batch_ids[j]]
            feats = run(idx)
            t0 = time.perf_counter()
            places[split].put(features, feats.numpy(), idx)
            writer.wrote(split, len(feats))
            if time.perf_counter() - last >= CHECKPOINT_SECONDS or j == len(batch_ids) - 1:
                writer.checkpoint(split, j + 1)
                last = time.perf_counter()
            job.timings.write += time.perf_counter() - t0
            computed += 1
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(split, batch_ids[j])
    bar.close()
    return computed


def _full_layout(job: _ExtractionJob) -> dict[str, dict[str, ArraySpec]]:
    layers, dim = job.backbone.n_layers, job.backbone.hidden_size
    layout: dict[str, dict[str, ArraySpec]] = {}
    for name, split in job.splits.items():
        tok = job.toks[name]
        spec = {
            "features": ArraySpec((job.placement(name).n_rows, layers, dim), job.storage),
            "labels": ArraySpec((len(split),), str(np.asarray(split.labels).dtype)),
        }
        if job.token_level:
            spec["offsets"] = ArraySpec((len(split) + 1,), "int64")
            spec["token_ids"] = ArraySpec((tok.n_tokens,), "int32")
        layout[name] = spec
    return layout


def _write_static(job: _ExtractionJob, writer: CacheWriter) -> None:
    """Labels (and, token-level, offsets and token ids): known before any forward pass."""
    for name, split in job.splits.items():
        arrays = writer.arrays[name]
        arrays["labels"][:] = split.labels
        if job.token_level:
            tok = job.toks[name]
            arrays["offsets"][:] = np.concatenate([[0], np.cumsum(tok.lengths)])
            arrays["token_ids"][:] = np.concatenate([np.asarray(x, dtype=np.int32) for x in tok.input_ids])


def _write_cache(
    job: _ExtractionJob,
    final: Path,
    settings: dict[str, Any],
    inputs: dict[str, str],
    progress: bool,
    on_batch: Callable[[str, int], None] | None,
    started: float,
    fresh: bool,
) -> None:
    with CacheWriter(final, settings, inputs, _full_layout(job), plan=job.plan, tag=job.tag, fresh=fresh) as writer:
        _write_static(job, writer)
        work = {s: list(range(len(job.plans[s]))) for s in job.splits}
        places = {s: job.placement(s) for s in job.splits}
        _run_batches(job, writer, work, places, progress, on_batch, f"{job.backbone.name} {job.data.name}")
        _finalize(job, writer, settings, inputs, started)


def _write_shard(
    job: _ExtractionJob,
    shard_root: Path,
    settings: dict[str, Any],
    inputs: dict[str, str],
    dist: DistInfo,
    progress: bool,
    on_batch: Callable[[str, int], None] | None,
    fresh: bool,
) -> None:
    """Compute this rank's share of the batch plan into ``shard_root/r<rank>``."""
    shard = shard_root / f"r{dist.rank}"
    if _complete_shard(shard, cache_key(settings, inputs), job.tag):
        return
    costs = [
        (s, b, float(len(idx) * job.toks[s].lengths[idx].max()))
        for s in job.splits
        for b, idx in enumerate(job.plans[s])
    ]
    mine = assign_batches(costs, dist.world_size)[dist.rank]
    work = {s: [b for split, b in mine if split == s] for s in job.splits}
    orders = {
        s: np.concatenate([job.plans[s][b] for b in work[s]]) if work[s] else np.zeros(0, np.int64) for s in job.splits
    }
    places = {s: job.placement(s, orders[s]) for s in job.splits}
    layers, dim = job.backbone.n_layers, job.backbone.hidden_size
    layout = {
        s: {
            "features": ArraySpec((places[s].n_rows, layers, dim), job.storage),
            "indices": ArraySpec((len(orders[s]),), "int64"),
        }
        for s in job.splits
    }
    with CacheWriter(shard, settings, inputs, layout, plan=job.plan, tag=job.tag, fresh=fresh) as writer:
        resumed_at = {s: writer.done[s] for s in job.splits}
        for s in job.splits:
            writer.arrays[s]["indices"][:] = orders[s]
        t0 = time.perf_counter()
        computed = _run_batches(
            job,
            writer,
            work,
            places,
            progress and dist.is_main,
            on_batch,
            f"{job.backbone.name} {job.data.name} [rank {dist.rank}/{dist.world_size}]",
        )
        writer.finalize(
            {
                "rank": dist.rank,
                "world_size": dist.world_size,
                "tag": job.tag,  # the batch plan: a shard of another plan holds other rows
                "splits": {
                    s: {"n": len(orders[s]), "batches": len(work[s]), "resumed_at_batch": resumed_at[s]}
                    for s in job.splits
                },
                "computed_batches": computed,
                "seconds": time.perf_counter() - t0,
                "timings": job.timings.as_dict(),
            },
            kind="shard",
        )


def _complete_shard(shard: Path, key: str, tag: str) -> bool:
    """A finished shard of this cache made from the same batch plan (another --batch-size shards differently)."""
    try:
        manifest = read_json(shard / MANIFEST)
    except (OSError, ValueError):
        return False
    return manifest.get("key") == key and manifest.get("tag") == tag


def _merge_shards(
    job: _ExtractionJob,
    final: Path,
    settings: dict[str, Any],
    inputs: dict[str, str],
    shard_root: Path,
    world_size: int,
    started: float,
    fresh: bool,
) -> None:
    """Rank 0: copy every shard's rows to their places in the cache, then finalize it."""
    key = cache_key(settings, inputs)
    shards = [shard_root / f"r{r}" for r in range(world_size)]
    for s in shards:
        if not _complete_shard(s, key, job.tag):
            raise CacheError(f"shard {s} is missing or incomplete after all ranks finished; re-run the extraction")
    for name in job.splits:
        rows = np.sort(np.concatenate([np.load(s / f"{name}.indices.npy") for s in shards]))
        if not np.array_equal(rows, np.arange(len(job.data.splits[name]))):
            raise CacheError(f"the shards under {shard_root} do not cover the {name} split; remove them and re-run")
    with CacheWriter(final, settings, inputs, _full_layout(job), plan=job.plan, tag=job.tag, fresh=fresh) as writer:
        _write_static(job, writer)
        for name in job.splits:
            place = job.placement(name)
            for shard in shards:
                order = np.load(shard / f"{name}.indices.npy")
                feats = np.load(shard / f"{name}.features.npy", mmap_mode="r")
                src = job.placement(name, order)
                for start in range(0, len(order), 4096):  # bounded memory
                    idx = order[start : start + 4096]
                    lo = int(src.offsets[start]) if src.offsets is not None else start
                    block = np.asarray(feats[lo : lo + src.rows(idx)])
                    place.put(writer.arrays[name]["features"], block, idx)
                    writer.wrote(name, len(block))
                    release_pages(feats)
        shard_info = [read_json(s / MANIFEST) for s in shards]
        _finalize(
            job,
            writer,
            settings,
            inputs,
            started,
            shards=[
                {k: info[k] for k in ("rank", "world_size", "splits", "computed_batches", "seconds")}
                for info in shard_info
            ],
        )
    remove_tree(shard_root.parent)


def _finalize(
    job: _ExtractionJob,
    writer: CacheWriter,
    settings: dict[str, Any],
    inputs: dict[str, str],
    started: float,
    shards: list[dict[str, Any]] | None = None,
) -> None:
    t0 = time.perf_counter()
    nonfinite = {s: count_nonfinite(writer.arrays[s]["features"]).tolist() for s in job.splits}
    manifest = _manifest(job, settings, inputs, nonfinite)
    if shards is not None:
        manifest["shards"] = shards
    manifest["memory"] = {"write_buffer_bytes": writer.buffer_bytes, "peak_pending_bytes": writer.peak_pending_bytes}
    job.timings.write += time.perf_counter() - t0
    manifest["timings"] = {**job.timings.as_dict(), "total": time.perf_counter() - started}
    writer.finalize(manifest)


def _warn_nonfinite(cache: LayerCache) -> None:
    for name, info in cache.manifest["splits"].items():
        counts = info.get("nonfinite_rows_per_layer", [])
        layers = [i for i, c in enumerate(counts) if c]
        if layers:
            warnings.warn(
                f"{cache.task}/{name}: non-finite features (inf/NaN) at layers {layers} "
                f"({max(counts)} rows at worst); use dtype float32 or storage_dtype float32 "
                "(--dtype / --storage-dtype)",
                ProbekitWarning,
                stacklevel=3,
            )


def _manifest(
    job: _ExtractionJob, settings: dict[str, Any], inputs: dict[str, str], nonfinite: dict[str, list[int]]
) -> dict[str, Any]:
    import transformers  # deferred: importing probekit.extraction must not pull in transformers

    max_length = settings["max_length"]
    data, backbone = job.data, job.backbone
    return {
        "task": data.name,
        "collection": data.task.collection,
        "task_type": "regression" if not data.label_names else "classification",
        "data": {"path": str(data.path), "sha256": data.sha256, "reader_options": settings["reader_options"]},
        "model": backbone.info(),
        "n_layers": backbone.n_layers,
        "hidden_size": backbone.hidden_size,
        "layer_names": ["embeddings"] + [f"layer{i}" for i in range(1, backbone.n_layers)],
        "pool": settings["pool"],
        "mean_includes_special_tokens": settings["include_special"],
        "max_length": max_length,
        "compute_dtype": settings["compute_dtype"],
        "storage_dtype": settings["storage_dtype"],
        "device": str(backbone.device),
        "batching": job.tag,
        "label_names": data.label_names,
        "n_classes": data.n_classes,
        "splits": {
            name: {
                "n": len(split),
                "n_tokens": job.toks[name].n_tokens if job.token_level else len(split),
                "truncated": job.toks[name].truncated(max_length),
                "nonfinite_rows_per_layer": nonfinite.get(name, []),
            }
            for name, split in job.splits.items()
        },
        "versions": {
            "probekit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": {**settings, **inputs},
        "fingerprint": {"settings": settings, "inputs": inputs},
    }


def _fault_from_env(dist: DistInfo) -> Callable[[str, int], None] | None:
    """Fault injection for tests: ``PROBEKIT_FAULT=RANK:N`` kills rank RANK after N batches."""
    spec = os.environ.get("PROBEKIT_FAULT")
    if not spec:
        return None
    rank, n = (int(x) for x in spec.split(":"))
    if rank != dist.rank:
        return None
    seen = [0]

    def on_batch(split: str, b: int) -> None:
        seen[0] += 1
        if seen[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_batch


def extract(
    model: str | Path | Backbone,
    tasks: Sequence[str | Path | Task | TaskData],
    out: str | Path,
    pool: str = "mean",
    max_length: int = 128,
    batch_size: int | str | None = "auto",
    device: str = "auto",
    dtype: str = "auto",
    storage_dtype: str = "float16",
    include_special: bool = True,
    data_dir: str | Path | None = None,
    unseen_labels: str = "error",
    trust_remote_code: bool = False,
    name: str | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> list[LayerCache]:
    """Extract every layer of ``model`` for each task into caches under ``out``.

    What ``probekit extract`` runs; the options are those of :class:`ExtractConfig`. Caches whose
    inputs are unchanged are reused; an interrupted extraction resumes (``fresh``: one made with
    another batch plan is removed and started over instead of refused). Under
    ``torchrun``/``accelerate launch`` the work is sharded over the processes (Gloo on CPU, NCCL on GPUs).
    """
    config = ExtractConfig(
        pool=pool,
        max_length=max_length,
        batch_size=batch_size,  # type: ignore[arg-type]  (validate() takes ints and None too)
        dtype=dtype,  # type: ignore[arg-type]
        storage_dtype=storage_dtype,  # type: ignore[arg-type]
        include_special=include_special,
        unseen_labels=unseen_labels,  # type: ignore[arg-type]
    )
    tasks = list(tasks)
    if not tasks:
        raise ProbekitError("no task given; pass at least one {task} (e.g. bigram_shift)", params=("task",))
    datas = [
        t if isinstance(t, TaskData) else load_task(t, data_dir, unseen_labels=config.unseen_labels) for t in tasks
    ]
    info = dist_info()
    if isinstance(model, Backbone):
        backbone = model
    else:
        backbone = load_backbone(
            model, device=rank_device(device, info), dtype=config.dtype, trust_remote_code=trust_remote_code, name=name
        )
    claim_output(out, "out", force=fresh, force_param="fresh")
    created = init_process_group(info, backbone.device)
    try:
        return [
            extract_task(
                backbone,
                data,
                out,
                pool=config.pool,
                max_length=config.max_length,
                batch_size=config.batch_size,
                storage_dtype=config.storage_dtype,
                include_special=config.include_special,
                reader_options={"unseen_labels": config.unseen_labels},
                progress=progress,
                dist=info,
                fresh=fresh,
            )
            for data in datas
        ]
    finally:
        if created:
            destroy_process_group()
