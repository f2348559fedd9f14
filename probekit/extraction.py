"""Run a frozen encoder once over a dataset and keep every hidden layer.

Speed comes from SentEval's trick: sort sentences by length, pad each batch only to
its longest sentence, then put the results back in the original order. The batch
plan is a pure function of the token lengths and the batch settings, so a resumed or
sharded run computes exactly the same batches as an uninterrupted one.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from probekit.backbone import Backbone, dtype_name, load_backbone
from probekit.cache import ArraySpec, CacheWriter, LayerCache, cache_dir_name, cache_key, read_manifest
from probekit.data import Task, TaskData, load_task
from probekit.errors import CacheError, ProbekitError

POOLS = ("mean", "cls", "tokens")
STORAGE_DTYPES = ("float16", "float32")
CPU_MAX_TOKENS = 8192
GPU_MAX_TOKENS = 65536
MAX_BATCH = 512
CHECKPOINT_SECONDS = 5.0


@dataclass
class Tokenized:
    """Unpadded token ids of a list of texts (one array per text)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    special: list[list[int]]
    lengths: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def truncated(self, max_length: int) -> int:
        """How many texts reached ``max_length`` (and were most likely cut)."""
        return int((self.lengths >= max_length).sum())


@dataclass
class Timings:
    """Seconds spent per stage; the benchmark reads them to report extraction overhead."""

    tokenize: float = 0.0
    forward: float = 0.0
    pool: float = 0.0
    write: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"tokenize": self.tokenize, "forward": self.forward, "pool": self.pool, "write": self.write}


def tokenize(tokenizer: Any, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
             max_length: int = 128) -> Tokenized:
    """Tokenise without padding, truncating to ``max_length`` tokens (specials included)."""
    if max_length < 2:
        raise ProbekitError(f"--max-length must be at least 2, got {max_length}")
    enc = tokenizer(
        list(texts),
        list(text_pairs) if text_pairs is not None else None,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_special_tokens_mask=True,
        return_attention_mask=False,
    )
    ids = enc["input_ids"]
    types = enc.get("token_type_ids") if "token_type_ids" in tokenizer.model_input_names else None
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return Tokenized(ids, types, enc["special_tokens_mask"], lengths)


def plan_batches(lengths: np.ndarray, batch_size: int | None = None,
                 max_tokens: int = CPU_MAX_TOKENS, max_batch: int = MAX_BATCH) -> list[np.ndarray]:
    """Longest-first batches of original indices.

    A fixed ``batch_size`` gives batches of that many texts; otherwise each batch holds
    as many texts as fit in ``max_tokens`` padded tokens (at most ``max_batch``), so short
    sentences travel in big batches and long ones in small ones.
    """
    order = np.argsort(-lengths, kind="stable")
    batches = []
    i, n = 0, len(order)
    while i < n:
        size = batch_size or max(1, min(max_batch, max_tokens // max(1, int(lengths[order[i]]))))
        batches.append(order[i : i + size])
        i += size
    return batches


def collate(tok: Tokenized, idx: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad the texts ``idx`` to their longest member and move them to ``device``."""
    lengths = tok.lengths[idx]
    width = int(lengths.max())
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    special = np.ones((len(idx), width), dtype=bool)
    types = np.zeros((len(idx), width), dtype=np.int64) if tok.token_type_ids is not None else None
    for row, i in enumerate(idx):
        n = lengths[row]
        ids[row, :n] = tok.input_ids[i]
        special[row, :n] = tok.special[i]
        if types is not None:
            types[row, :n] = tok.token_type_ids[i]
    mask = np.arange(width)[None, :] < lengths[:, None]
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "special_tokens_mask": torch.from_numpy(special),
    }
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def hidden_states(backbone: Backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One frozen forward pass returning all L+1 hidden states (layer 0 = embeddings)."""
    inputs = {k: v for k, v in batch.items() if k in backbone.input_names}
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    if hs is None or len(hs) != backbone.n_layers:
        raise ProbekitError(
            f"{backbone.name}: expected {backbone.n_layers} hidden states, got {0 if hs is None else len(hs)}"
        )
    return hs


def pool_layers(hs: Sequence[torch.Tensor], attention_mask: torch.Tensor, special_mask: torch.Tensor,
                pool: str, include_special: bool = True) -> torch.Tensor:
    """Pool each layer in float32: [B, L+1, D] for mean/cls, [T, L+1, D] real tokens for tokens."""
    if pool == "cls":
        return torch.stack([h[:, 0].float() for h in hs], dim=1)
    real = attention_mask.bool()
    if pool == "tokens":
        return torch.stack([h[real].float() for h in hs], dim=1)
    if pool != "mean":
        raise ProbekitError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    keep = real if include_special else real & ~special_mask
    weight = keep.unsqueeze(-1).float()
    denom = weight.sum(1).clamp(min=1.0)
    return torch.stack([(h.float() * weight).sum(1) / denom for h in hs], dim=1)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class _Runner:
    """Runs planned batches, halving a batch that does not fit in memory."""

    def __init__(self, backbone: Backbone, tok: Tokenized, pool: str, include_special: bool,
                 storage: torch.dtype, timings: Timings) -> None:
        self.backbone, self.tok, self.pool = backbone, tok, pool
        self.include_special, self.storage, self.timings = include_special, storage, timings
        self.pad_id = int(backbone.tokenizer.pad_token_id)
        self.sync = backbone.device.type == "cuda"

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        try:
            return self._run(idx)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or len(idx) == 1:
                raise
        if self.sync:
            torch.cuda.empty_cache()
        half = len(idx) // 2
        return torch.cat([self(idx[:half]), self(idx[half:])])

    def _run(self, idx: np.ndarray) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = collate(self.tok, idx, self.pad_id, self.backbone.device)
        hs = hidden_states(self.backbone, batch)
        if self.sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        pooled = pool_layers(hs, batch["attention_mask"], batch["special_tokens_mask"], self.pool,
                             self.include_special)
        out = pooled.to("cpu", self.storage)
        t2 = time.perf_counter()
        self.timings.forward += t1 - t0
        self.timings.pool += t2 - t1
        return out


def default_max_tokens(device: torch.device) -> int:
    return GPU_MAX_TOKENS if device.type == "cuda" else CPU_MAX_TOKENS


def _parse_batch_size(batch_size: int | str | None) -> int | None:
    if batch_size in (None, "auto"):
        return None
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise ProbekitError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}") from None
    if value < 1:
        raise ProbekitError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    return value


def encode(backbone: Backbone, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
           pool: str = "mean", max_length: int = 128, batch_size: int | str | None = "auto",
           include_special: bool = True, progress: bool = False) -> np.ndarray:
    """Features of ``texts`` in their original order, in memory: [N, L+1, D] float32.

    For notebooks and small jobs; ``extract`` is the cached, resumable version.
    Token-level pooling returns the real tokens of all texts concatenated ([T, L+1, D]).
    """
    tok = tokenize(backbone.tokenizer, texts, text_pairs, max_length)
    batches = plan_batches(tok.lengths, _parse_batch_size(batch_size), default_max_tokens(backbone.device))
    run = _Runner(backbone, tok, pool, include_special, torch.float32, Timings())
    if pool == "tokens":
        offsets = np.concatenate([[0], np.cumsum(tok.lengths)])
        out = np.empty((tok.n_tokens, backbone.n_layers, backbone.hidden_size), np.float32)
    else:
        out = np.empty((len(texts), backbone.n_layers, backbone.hidden_size), np.float32)
    for idx in tqdm(batches, disable=not progress, unit="batch"):
        feats = run(idx).numpy()
        if pool == "tokens":
            _scatter_tokens(out, feats, idx, tok.lengths, offsets)
        else:
            out[idx] = feats
    return out


def _scatter_tokens(out: np.ndarray, feats: np.ndarray, idx: np.ndarray, lengths: np.ndarray,
                    offsets: np.ndarray) -> None:
    pos = 0
    for i in idx:
        n = int(lengths[i])
        out[offsets[i] : offsets[i] + n] = feats[pos : pos + n]
        pos += n


# ---------------------------------------------------------------- cached extraction


def cache_settings(backbone: Backbone, data: TaskData, pool: str, max_length: int, storage_dtype: str,
                   include_special: bool, reader_options: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines a cache's contents: its key is a hash of this."""
    return {
        "model_fingerprint": backbone.fingerprint,
        "tokenizer_fingerprint": backbone.tokenizer_hash,
        "compute_dtype": dtype_name(backbone.dtype),
        "task": data.name,
        "data_sha256": data.sha256,
        "reader_options": reader_options,
        "pool": pool,
        "include_special": include_special if pool == "mean" else None,
        "max_length": max_length,
        "storage_dtype": storage_dtype,
    }


def extract_task(backbone: Backbone, data: TaskData, out: str | Path, pool: str = "mean",
                 max_length: int = 128, batch_size: int | str | None = "auto",
                 storage_dtype: str = "float16", include_special: bool = True,
                 reader_options: dict[str, Any] | None = None, progress: bool = True,
                 on_batch: Callable[[str, int], None] | None = None) -> LayerCache:
    """Extract one task into ``out/<model>/<task>-<pool>-<max_length>-<key>/``, reusing or
    resuming an earlier run with the same inputs.

    ``on_batch(split, batch_no)`` is called after each batch is written (tests use it to
    simulate a crash).
    """
    if pool not in POOLS:
        raise ProbekitError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ProbekitError(f"unknown storage dtype {storage_dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    reader_options = reader_options or {}
    settings = cache_settings(backbone, data, pool, max_length, storage_dtype, include_special, reader_options)
    key = cache_key(settings)
    final = Path(out) / backbone.name / cache_dir_name(data.name, pool, max_length, key)
    if (final / "manifest.json").is_file():
        try:
            if read_manifest(final).get("key") == key:
                return LayerCache.open(final)
        except CacheError:
            pass  # unreadable or old: rebuild it below

    timings = Timings()
    started = time.perf_counter()
    t0 = time.perf_counter()
    splits = {name: split for name, split in data.splits.items() if len(split)}
    toks = {name: tokenize(backbone.tokenizer, s.texts, s.text_pairs, max_length) for name, s in splits.items()}
    timings.tokenize = time.perf_counter() - t0
    bs = _parse_batch_size(batch_size)
    max_tokens = default_max_tokens(backbone.device)
    plans = {name: plan_batches(tok.lengths, bs, max_tokens) for name, tok in toks.items()}
    layout = _layout(backbone, splits, toks, pool, storage_dtype)
    storage = getattr(torch, storage_dtype)
    plan_tag = f"bs={bs}|max_tokens={max_tokens}|max_batch={MAX_BATCH}"

    nonfinite: dict[str, list[int]] = {}
    with CacheWriter(final, key, layout, tag=plan_tag) as writer:
        total = sum(len(s) for s in splits.values())
        done = sum(int(sum(len(b) for b in plans[s][: writer.done[s]])) for s in splits)
        bar = tqdm(total=total, initial=done, unit="sent", unit_scale=True, desc=f"{backbone.name} {data.name}",
                   disable=not progress, dynamic_ncols=True, leave=True)
        for name, split in splits.items():
            tok, arrays = toks[name], writer.arrays[name]
            t0 = time.perf_counter()
            arrays["labels"][:] = split.labels
            offsets = None
            if pool == "tokens":
                offsets = np.concatenate([[0], np.cumsum(tok.lengths)])
                arrays["offsets"][:] = offsets
                arrays["token_ids"][:] = np.concatenate([np.asarray(x, dtype=np.int32) for x in tok.input_ids])
            timings.write += time.perf_counter() - t0
            run = _Runner(backbone, tok, pool, include_special, storage, timings)
            bad = np.zeros(backbone.n_layers, dtype=np.int64)
            last_checkpoint = time.perf_counter()
            start = writer.done[name]
            for b in range(start, len(plans[name])):
                idx = plans[name][b]
                feats = run(idx)
                t0 = time.perf_counter()
                bad += (~torch.isfinite(feats)).any(dim=-1).sum(dim=0).numpy()
                feats_np = feats.numpy()
                if offsets is not None:
                    _scatter_tokens(arrays["features"], feats_np, idx, tok.lengths, offsets)
                else:
                    arrays["features"][idx] = feats_np
                if time.perf_counter() - last_checkpoint > CHECKPOINT_SECONDS or b == len(plans[name]) - 1:
                    writer.checkpoint(name, b + 1)
                    last_checkpoint = time.perf_counter()
                timings.write += time.perf_counter() - t0
                bar.update(len(idx))
                if on_batch is not None:
                    on_batch(name, b)
            if start:
                bad = _count_nonfinite(arrays["features"])  # batches of the earlier run were not counted
            nonfinite[name] = bad.tolist()
        bar.close()
        t0 = time.perf_counter()
        manifest = _manifest(backbone, data, settings, splits, toks, max_length, plan_tag, nonfinite)
        manifest["timings"] = {**timings.as_dict(), "total": time.perf_counter() - started}
        path = writer.finalize(manifest)
        timings.write += time.perf_counter() - t0
    for name, counts in nonfinite.items():
        layers = [i for i, c in enumerate(counts) if c]
        if layers:
            warnings.warn(
                f"{data.name}/{name}: non-finite features (inf/NaN) at layers {layers} "
                f"({max(counts)} rows at worst); use --dtype float32 or --storage-dtype float32",
                stacklevel=2,
            )
    return LayerCache.open(path)


def _count_nonfinite(features: np.ndarray) -> np.ndarray:
    bad = np.zeros(features.shape[1], dtype=np.int64)
    for start in range(0, len(features), 4096):
        block = np.asarray(features[start : start + 4096])
        bad += (~np.isfinite(block)).any(axis=-1).sum(axis=0)
    return bad


def _layout(backbone: Backbone, splits: dict[str, Any], toks: dict[str, Tokenized], pool: str,
            storage_dtype: str) -> dict[str, dict[str, ArraySpec]]:
    layers, dim = backbone.n_layers, backbone.hidden_size
    layout: dict[str, dict[str, ArraySpec]] = {}
    for name, split in splits.items():
        tok = toks[name]
        rows = tok.n_tokens if pool == "tokens" else len(split)
        spec = {
            "features": ArraySpec((rows, layers, dim), storage_dtype),
            "labels": ArraySpec((len(split),), str(np.asarray(split.labels).dtype)),
        }
        if pool == "tokens":
            spec["offsets"] = ArraySpec((len(split) + 1,), "int64")
            spec["token_ids"] = ArraySpec((tok.n_tokens,), "int32")
        layout[name] = spec
    return layout


def _manifest(backbone: Backbone, data: TaskData, settings: dict[str, Any], splits: dict[str, Any],
              toks: dict[str, Tokenized], max_length: int, plan_tag: str,
              nonfinite: dict[str, list[int]]) -> dict[str, Any]:
    import transformers

    import probekit

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
        "batching": plan_tag,
        "label_names": data.label_names,
        "n_classes": data.n_classes,
        "splits": {
            name: {
                "n": len(split),
                "n_tokens": toks[name].n_tokens if settings["pool"] == "tokens" else len(split),
                "truncated": toks[name].truncated(max_length),
                "nonfinite_rows_per_layer": nonfinite.get(name, []),
            }
            for name, split in splits.items()
        },
        "versions": {
            "probekit": probekit.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


def extract(model: str | Path | Backbone, tasks: Sequence[str | Path | Task], out: str | Path,
            pool: str = "mean", max_length: int = 128, batch_size: int | str | None = "auto",
            device: str = "auto", dtype: str = "auto", storage_dtype: str = "float16",
            include_special: bool = True, data_dir: str | Path | None = None, unseen_labels: str = "error",
            trust_remote_code: bool = False, name: str | None = None, progress: bool = True) -> list[LayerCache]:
    """Extract every layer of ``model`` for each task into caches under ``out``.

    What ``probekit extract`` runs. Caches whose inputs are unchanged are reused; an
    interrupted extraction resumes.
    """
    tasks = list(tasks)
    if not tasks:
        raise ProbekitError("no task given; pass at least one --task (e.g. --task bigram_shift)")
    datas = [load_task(t, data_dir, unseen_labels=unseen_labels) if not isinstance(t, TaskData) else t
             for t in tasks]
    backbone = model if isinstance(model, Backbone) else load_backbone(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, name=name)
    return [
        extract_task(backbone, data, out, pool=pool, max_length=max_length, batch_size=batch_size,
                     storage_dtype=storage_dtype, include_special=include_special,
                     reader_options={"unseen_labels": unseen_labels}, progress=progress)
        for data in datas
    ]
