"""Texts in, every layer's pooled features out: tokenising, batching, the frozen
forward pass and pooling.

Speed comes from SentEval's trick: sort texts by length, pad each batch only to its
longest text, then put the results back in the original order. The batch plan is a
pure function of the token lengths and the batch settings, so a resumed or sharded
extraction computes exactly the same batches as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from probekit.backbone import Backbone
from probekit.data.tokens import Ragged, Tokenized
from probekit.errors import ParamError, ProbekitError
from probekit.registry import Registry

CPU_MAX_TOKENS = 8192
GPU_MAX_TOKENS = 65536
MAX_BATCH = 512
TOKENIZE_CHUNK = 4096

PoolFn = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""``(hidden_states, attention_mask, special_tokens_mask, include_special) -> pooled`` (float32)."""


@dataclass(frozen=True)
class Pooling:
    """A pooling method: how every layer's token states become features.

    ``token_level``: one row per real token ([T, L+1, D]) instead of one per text ([B, L+1, D]);
    ``uses_special``: whether ``include_special`` changes the result (recorded in the cache key only then).
    """

    fn: PoolFn
    token_level: bool = False
    uses_special: bool = False

    def __call__(
        self,
        hs: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        special_mask: torch.Tensor,
        include_special: bool,
    ) -> torch.Tensor:
        return self.fn(hs, attention_mask, special_mask, include_special)


def _mean(hs: Sequence[torch.Tensor], mask: torch.Tensor, special: torch.Tensor, include_special: bool) -> torch.Tensor:
    real = mask.bool()
    keep = real if include_special else real & ~special
    weight = keep.unsqueeze(-1).float()
    denom = weight.sum(1).clamp(min=1.0)
    return torch.stack([(h.float() * weight).sum(1) / denom for h in hs], dim=1)


def _cls(hs: Sequence[torch.Tensor], mask: torch.Tensor, special: torch.Tensor, include_special: bool) -> torch.Tensor:
    return torch.stack([h[:, 0].float() for h in hs], dim=1)


def _tokens(
    hs: Sequence[torch.Tensor], mask: torch.Tensor, special: torch.Tensor, include_special: bool
) -> torch.Tensor:
    real = mask.bool()
    return torch.stack([h[real].float() for h in hs], dim=1)


POOLS: Registry[Pooling] = Registry("pooling", "pool")
"""Pooling methods by name: what ``extract(pool=...)`` and ``probekit extract --pool`` accept."""
POOLS.register("mean", Pooling(_mean, uses_special=True), help="Mask-aware mean over the tokens of each text.")
POOLS.register("cls", Pooling(_cls), help="The first token's state ([CLS]).")
POOLS.register("tokens", Pooling(_tokens, token_level=True), help="Every real token's state (token-level cache).")


@dataclass
class Timings:
    """Seconds spent per stage; the benchmark reads them to report extraction overhead."""

    tokenize: float = 0.0
    forward: float = 0.0
    pool: float = 0.0
    write: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"tokenize": self.tokenize, "forward": self.forward, "pool": self.pool, "write": self.write}


def tokenize(
    tokenizer: Any, texts: Sequence[str], text_pairs: Sequence[str] | None = None, max_length: int = 128
) -> Tokenized:
    """Tokenise without padding, truncating to ``max_length`` tokens (specials included).

    In chunks of :data:`TOKENIZE_CHUNK` texts, each stored compactly (:class:`~probekit.data.tokens.Ragged`)
    before the next: one call over 100k texts would hold every text's tokenizer output at once (about
    5 KB a text)."""
    if max_length < 2:
        raise ParamError("max_length", f"must be at least 2, got {max_length}")
    use_types = "token_type_ids" in tokenizer.model_input_names
    ids, types, special = [], [], []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        stop = start + TOKENIZE_CHUNK
        enc = tokenizer(
            list(texts[start:stop]),
            list(text_pairs[start:stop]) if text_pairs is not None else None,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_special_tokens_mask=True,
            return_attention_mask=False,
        )
        ids.append(Ragged.from_rows(enc["input_ids"], np.int32))
        special.append(Ragged.from_rows(enc["special_tokens_mask"], np.int8))
        if use_types and enc.get("token_type_ids") is not None:
            types.append(Ragged.from_rows(enc["token_type_ids"], np.int32))
        del enc
    input_ids = Ragged.concat(ids)
    lengths = np.diff(input_ids.offsets)
    return Tokenized(input_ids, Ragged.concat(types) if types else None, Ragged.concat(special), lengths)


def plan_batches(
    lengths: np.ndarray, batch_size: int | None = None, max_tokens: int = CPU_MAX_TOKENS, max_batch: int = MAX_BATCH
) -> list[np.ndarray]:
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


def hidden_states(
    backbone: Backbone, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """One frozen forward pass returning all L+1 hidden states (layer 0 = embeddings).

    With ``inputs_embeds`` the model reads those word embeddings instead of ``input_ids``
    (positions and token types are still added). ``no_grad`` rather than inference mode,
    so trainable probes (the MLM heads) can use the states as inputs.
    """
    inputs = {k: v for k, v in batch.items() if k in backbone.input_names}
    if inputs_embeds is not None:
        inputs.pop("input_ids")
        inputs["inputs_embeds"] = inputs_embeds
    with torch.no_grad():
        out = backbone.model(**inputs, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    if hs is None or len(hs) != backbone.n_layers:
        raise ProbekitError(
            f"{backbone.name}: expected {backbone.n_layers} hidden states, got {0 if hs is None else len(hs)}"
        )
    return hs


def pool_layers(
    hs: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    special_mask: torch.Tensor,
    pool: str,
    include_special: bool = True,
) -> torch.Tensor:
    """Pool each layer in float32 with the registered method ``pool`` (see :data:`POOLS`): [B, L+1, D]
    per text, or [T, L+1, D] real tokens for a token-level method."""
    return POOLS.get(pool)(hs, attention_mask, special_mask, include_special)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class Runner:
    """Runs planned batches, halving a batch that does not fit in memory."""

    def __init__(
        self,
        backbone: Backbone,
        tok: Tokenized,
        pool: str,
        include_special: bool,
        storage: torch.dtype,
        timings: Timings,
    ) -> None:
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
        pooled = pool_layers(hs, batch["attention_mask"], batch["special_tokens_mask"], self.pool, self.include_special)
        out = pooled.to("cpu", self.storage)
        t2 = time.perf_counter()
        self.timings.forward += t1 - t0
        self.timings.pool += t2 - t1
        return out


def default_max_tokens(device: torch.device) -> int:
    return GPU_MAX_TOKENS if device.type == "cuda" else CPU_MAX_TOKENS


def parse_batch_size(batch_size: int | str | None) -> int | None:
    if batch_size in (None, "auto"):
        return None
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise ParamError("batch_size", f"must be a positive integer or 'auto', got {batch_size!r}") from None
    if value < 1:
        raise ParamError("batch_size", f"must be a positive integer or 'auto', got {batch_size!r}")
    return value


def encode(
    backbone: Backbone,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    pool: str = "mean",
    max_length: int = 128,
    batch_size: int | str | None = "auto",
    include_special: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Features of ``texts`` in their original order, in memory: [N, L+1, D] float32.

    For notebooks and small jobs; ``extract`` is the cached, resumable version.
    Token-level pooling returns the real tokens of all texts concatenated ([T, L+1, D]).
    """
    tok = tokenize(backbone.tokenizer, texts, text_pairs, backbone.usable_length(max_length))
    batches = plan_batches(tok.lengths, parse_batch_size(batch_size), default_max_tokens(backbone.device))
    run = Runner(backbone, tok, pool, include_special, torch.float32, Timings())
    place = Placement(np.arange(len(texts)), tok.lengths if POOLS.get(pool).token_level else None)
    out = np.empty((place.n_rows, backbone.n_layers, backbone.hidden_size), np.float32)
    for idx in tqdm(batches, disable=not progress, unit="batch"):
        place.put(out, run(idx).numpy(), idx)
    return out


class Placement:
    """Where each text's features go in an output array.

    ``order`` lists the texts (original indices) the array holds, in its row order: all of
    them for a cache, a rank's share for a shard. Pooled features take one row per text;
    token-level features (``lengths`` given) take ``lengths[i]`` consecutive rows.
    """

    def __init__(self, order: np.ndarray, lengths: np.ndarray | None = None, n_total: int | None = None) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        n_total = int(n_total if n_total is not None else (self.order.max() + 1 if len(self.order) else 0))
        self.pos = np.full(n_total, -1, dtype=np.int64)
        self.pos[self.order] = np.arange(len(self.order))
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths[self.order])]) if lengths is not None else None

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1]) if self.offsets is not None else len(self.order)

    def put(self, out: np.ndarray, feats: np.ndarray, idx: np.ndarray) -> None:
        """Write the features of texts ``idx`` (rows of ``feats`` in ``idx`` order) into ``out``."""
        if self.offsets is None:
            out[self.pos[idx]] = feats
            return
        row = 0
        for i in idx:
            start, n = int(self.offsets[self.pos[i]]), int(self.lengths[i])
            out[start : start + n] = feats[row : row + n]
            row += n

    def rows(self, idx: np.ndarray) -> int:
        """How many rows the texts ``idx`` take."""
        return len(idx) if self.lengths is None else int(self.lengths[idx].sum())
