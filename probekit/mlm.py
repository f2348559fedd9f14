"""MLM-head probes with embedding dropout ("The Convexity of BERT", Mohebbi & Modarressi).

For every layer l = 0..L of a frozen encoder, a head shaped like BERT's MLM head
(dense D->D, GELU, LayerNorm, then the encoder's own frozen input word-embedding matrix
as the decoder plus a trainable output bias) learns to predict the input token at
positions whose input was corrupted by *embedding dropout* (Zhou et al., 2019): each
real token is chosen with probability ``mask_ratio``, and each dimension of a chosen
token's input word embedding is dropped with probability ``dropout_ratio`` (kept ones
are scaled by 1/(1 - dropout_ratio), as ``torch.nn.Dropout`` does; at ratio 1 the
embedding is exactly zero, like an all-masked token). Evaluation needs no masking: at
every real token of held-out text, how often does layer l's head name the token itself?
Lower accuracy = less like the static input embeddings = more contextual.

All heads learn from one frozen forward pass per batch: the hidden states of every layer
come from the same pass, and the heads are one batched module (dense weights
[K, D, D], LayerNorm [K, D], output bias [K, V]) sharing the embedding matrix, which is
never copied. The vocabulary projection runs in chunks (a streaming log-sum-exp for the
loss, with a hand-written backward that recomputes each chunk; a streaming top-k for
evaluation), so memory stays bounded whatever the vocabulary size.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probekit.backbone import Backbone, load_backbone
from probekit.data.corpus import read_corpus, split_passages, window_passages
from probekit.encoding import Tokenized, collate, hidden_states, plan_batches
from probekit.errors import ProbekitError
from probekit.io import atomic_path, sha256_json, write_json
from probekit.metrics import wilson
from probekit.results import save_results, tidy

DEFAULT_MASK_RATIO = 0.15
DEFAULT_DROPOUT_RATIO = 0.3
"""The best of 0.3 / 0.6 / 1.0 in a small sweep on MiniLM (README, MLM-head probes); the paper tuned it per model."""
REFERENCE_CORRUPTION = (0.15, 1.0)
"""The masked task every sweep setting is also scored on: 15% of tokens, fully dropped."""
LOGITS_BUDGET = 1 << 24
"""Most elements of one [heads, positions, vocabulary chunk] block of logits (64 MiB in float32);
logits within it are computed in one block and kept for the backward pass."""
CPU_KEEP = 1 << 22
CPU_BLOCK = 1 << 20
"""Training on a CPU, logits are kept whole only up to ``CPU_KEEP`` elements (16 MiB) and otherwise
run in cache-sized blocks of ``CPU_BLOCK`` (4 MiB): for 7 heads about 1.5x faster than 64 MiB blocks
on this repository's machine, recomputation included. A GPU prefers few large blocks."""
TOPK = 5
EVAL_ROWS = 2048
"""Token positions scored per block in evaluation."""


# ---------------------------------------------------------------- embedding dropout


def _generator(seed: int, *stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def embedding_dropout(
    embeds: torch.Tensor,
    candidates: torch.Tensor,
    mask_ratio: float,
    dropout_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt input word embeddings ``[B, T, D]``; return them and the chosen positions ``[B, T]``.

    Each ``candidates`` position (real, non-special tokens) is chosen with probability
    ``mask_ratio``; each dimension of a chosen embedding is zeroed with probability
    ``dropout_ratio`` and the rest scaled by 1/(1 - dropout_ratio). Other positions are
    untouched. Random numbers are drawn on the CPU from ``generator``, so a run is the
    same on every device.
    """
    if not 0 <= mask_ratio <= 1 or not 0 <= dropout_ratio <= 1:
        raise ProbekitError(f"mask_ratio and dropout_ratio must lie in [0, 1], got {mask_ratio}, {dropout_ratio}")
    draw = torch.rand(candidates.shape, generator=generator)
    chosen = (draw < mask_ratio).to(candidates.device) & candidates.bool()
    n = int(chosen.sum())
    if dropout_ratio == 0 or n == 0:
        return embeds, chosen
    keep = torch.rand((n, embeds.shape[-1]), generator=generator) >= dropout_ratio
    scale = 0.0 if dropout_ratio >= 1 else 1.0 / (1.0 - dropout_ratio)
    out = embeds.clone()
    out[chosen] = embeds[chosen] * (keep.to(embeds.device, embeds.dtype) * scale)
    return out, chosen


# ---------------------------------------------------------------- the heads


class MLMHeads(torch.nn.Module):
    """K independent BERT-style MLM heads as one batched module (the decoder matrix is passed in)."""

    def __init__(
        self, n_heads: int, hidden: int, vocab_size: int, eps: float = 1e-12, init_std: float = 0.02, seed: int = 0
    ) -> None:
        super().__init__()
        g = _generator(seed, 0xE4D5)
        self.eps = eps
        self.dense_weight = torch.nn.Parameter(torch.randn(n_heads, hidden, hidden, generator=g) * init_std)
        self.dense_bias = torch.nn.Parameter(torch.zeros(n_heads, hidden))
        self.norm_weight = torch.nn.Parameter(torch.ones(n_heads, hidden))
        self.norm_bias = torch.nn.Parameter(torch.zeros(n_heads, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(n_heads, vocab_size))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """dense, GELU, LayerNorm of each head's hidden states: ``[K, N, D] -> [K, N, D]``."""
        x = torch.baddbmm(self.dense_bias.unsqueeze(1), h, self.dense_weight.transpose(1, 2))
        x = F.layer_norm(F.gelu(x), x.shape[-1:], eps=self.eps)
        return x * self.norm_weight.unsqueeze(1) + self.norm_bias.unsqueeze(1)

    def loss(self, h: torch.Tensor, decoder: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each head at predicting ``targets`` ``[N]``: a ``[K]`` tensor."""
        return tied_cross_entropy(self.transform(h), self.bias, decoder, targets)

    @torch.no_grad()
    def topk(self, h: torch.Tensor, decoder: torch.Tensor, k: int = TOPK) -> torch.Tensor:
        """Token ids of each head's ``k`` best predictions, best first: ``[K, N, k]``."""
        return streaming_topk(self.transform(h), self.bias, decoder, k)


def vocab_chunk(n_heads: int, n_rows: int, vocab_size: int, device: torch.device | None = None) -> int:
    """Vocabulary columns per block: all of them when the logits fit in the budget (``LOGITS_BUDGET``;
    ``CPU_KEEP`` on a CPU ``device``), else blocks within it (``CPU_BLOCK`` on a CPU)."""
    cells = max(1, n_heads * n_rows)
    cpu = device is not None and device.type == "cpu"
    if cells * vocab_size <= (min(LOGITS_BUDGET, CPU_KEEP) if cpu else LOGITS_BUDGET):
        return vocab_size
    budget = min(LOGITS_BUDGET, CPU_BLOCK) if cpu else LOGITS_BUDGET
    return int(min(vocab_size, max(256, budget // cells)))


def _logits(t: torch.Tensor, bias: torch.Tensor, decoder: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return torch.matmul(t, decoder[start:stop].T) + bias[:, start:stop].unsqueeze(1)


class _TiedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over a tied vocabulary projection, never holding all [K, N, V] logits."""

    @staticmethod
    def forward(
        ctx: Any, t: torch.Tensor, bias: torch.Tensor, decoder: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        k, n, _ = t.shape
        v = decoder.shape[0]
        chunk = vocab_chunk(k, n, v, t.device)
        run_max = torch.full((k, n), -math.inf, device=t.device, dtype=t.dtype)
        run_sum = torch.zeros((k, n), device=t.device, dtype=t.dtype)
        logits = t.new_empty(0)
        for start in range(0, v, chunk):
            logits = _logits(t, bias, decoder, start, start + chunk)
            new_max = torch.maximum(run_max, logits.amax(-1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max.unsqueeze(-1)).sum(-1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        target_logit = (t * decoder[targets]).sum(-1) + bias[:, targets]
        # one chunk holds all the logits (within the budget): keep them rather than recompute them
        kept = logits if chunk >= v else t.new_empty(0)
        ctx.save_for_backward(t, bias, decoder, targets, lse, kept)
        ctx.chunk = chunk
        return (lse - target_logit).mean(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        t, bias, decoder, targets, lse, kept = ctx.saved_tensors
        k, n, _ = t.shape
        scale = (grad / n).view(k, 1, 1)
        grad_t = torch.zeros_like(t)
        grad_bias = torch.zeros_like(bias)
        rows = torch.arange(n, device=t.device)
        for start in range(0, decoder.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, decoder.shape[0])
            logits = kept if kept.numel() else _logits(t, bias, decoder, start, stop)
            p = torch.exp(logits - lse.unsqueeze(-1))
            inside = (targets >= start) & (targets < stop)
            p[:, rows[inside], targets[inside] - start] -= 1.0
            p *= scale
            grad_t += torch.matmul(p, decoder[start:stop])
            grad_bias[:, start:stop] = p.sum(1)
        return grad_t, grad_bias, None, None


def tied_cross_entropy(
    t: torch.Tensor, bias: torch.Tensor, decoder: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per-head mean cross-entropy of logits ``t @ decoder.T + bias`` (``[K, N, D]``, ``[K, V]``,
    ``[V, D]``) against ``targets`` ``[N]``, computed in vocabulary chunks; ``decoder`` gets no gradient."""
    return _TiedCrossEntropy.apply(t, bias, decoder.detach(), targets)


def streaming_topk(t: torch.Tensor, bias: torch.Tensor, decoder: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Indices of the ``k`` largest logits of ``t @ decoder.T + bias``, merged over vocabulary chunks."""
    heads, n, _ = t.shape
    v = decoder.shape[0]
    k = min(k, v)
    chunk = max(k, vocab_chunk(heads, n, v))
    best_val = torch.full((heads, n, 0), -math.inf, device=t.device, dtype=t.dtype)
    best_idx = torch.zeros((heads, n, 0), device=t.device, dtype=torch.long)
    for start in range(0, v, chunk):
        logits = _logits(t, bias, decoder, start, start + chunk)
        val, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
        val, pos = torch.cat([best_val, val], -1).topk(min(k, best_val.shape[-1] + val.shape[-1]), dim=-1)
        best_idx = torch.cat([best_idx, idx + start], -1).gather(-1, pos)
        best_val = val
    return best_idx


# ---------------------------------------------------------------- the probe


def _windows(backbone: Backbone, texts: Sequence[str] | Tokenized, max_length: int) -> Tokenized:
    return texts if isinstance(texts, Tokenized) else window_passages(backbone.tokenizer, texts, max_length)


def _decoder(backbone: Backbone) -> tuple[torch.nn.Module, torch.Tensor]:
    emb = backbone.model.get_input_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        raise ProbekitError(f"{backbone.name}: the model exposes no input word-embedding matrix")
    return emb, emb.weight.detach().float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MLMHeadProbe:
    """MLM heads on every layer (or ``layers``) of a frozen encoder, trained with embedding dropout.

    ``fit(backbone, passages)`` trains all heads from one forward pass per batch; ``score``
    returns per-layer accuracy and top-5 accuracy at predicting each real token of
    held-out text from its own (unmasked) hidden state. Training length is ``steps``
    batches, or ``epochs`` passes over the windows (default one epoch). With
    ``checkpoint`` set, heads and optimizer state are saved there (safetensors) every
    ``checkpoint_seconds`` and at the end, and a new ``fit`` with the same settings,
    encoder and data resumes from it, ending exactly as an uninterrupted run.
    """

    mask_ratio: float = DEFAULT_MASK_RATIO
    dropout_ratio: float = DEFAULT_DROPOUT_RATIO
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    seed: int = 0
    layers: Sequence[int] | None = None
    max_length: int = 128
    checkpoint: str | Path | None = None
    checkpoint_seconds: float = 60.0
    progress: bool = False
    heads_: MLMHeads | None = field(default=None, init=False, repr=False)
    layers_: list[int] = field(default_factory=list, init=False)
    steps_: int = field(default=0, init=False)
    """Total training steps of the fit (resolved from ``steps`` or ``epochs``)."""
    resumed_from_: int = field(default=0, init=False)
    loss_: list[float] = field(default_factory=list, init=False, repr=False)
    timings_: dict[str, float] = field(default_factory=dict, init=False)
    tokens_: int = field(default=0, init=False)
    """Tokens (padding excluded) that went through the encoder during this fit."""

    def settings(self) -> dict[str, Any]:
        """What determines the trained heads (besides the encoder and the data)."""
        return {
            "mask_ratio": self.mask_ratio,
            "dropout_ratio": self.dropout_ratio,
            "steps": self.steps,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup": self.warmup,
            "seed": self.seed,
            "layers": list(self.layers) if self.layers is not None else None,
            "max_length": self.max_length,
            "dropout_scaling": "inverted",
        }

    def _check(self, backbone: Backbone) -> None:
        if not 0 < self.mask_ratio <= 1:
            raise ProbekitError(f"--mask-ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 <= self.dropout_ratio <= 1:
            raise ProbekitError(f"--dropout-ratio must be in [0, 1], got {self.dropout_ratio}")
        if self.steps is not None and self.epochs is not None:
            raise ProbekitError("give --steps or --epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ProbekitError("--steps must be at least 1 and --epochs positive")
        if self.batch_size < 1:
            raise ProbekitError(f"--batch-size must be at least 1, got {self.batch_size}")
        layers = list(range(backbone.n_layers)) if self.layers is None else [int(i) for i in self.layers]
        bad = [i for i in layers if not 0 <= i < backbone.n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ProbekitError(f"layers must be distinct values in 0..{backbone.n_layers - 1}, got {layers}")
        self.layers_ = layers

    def fit(
        self, backbone: Backbone, passages: Sequence[str] | Tokenized, on_step: Callable[[int], None] | None = None
    ) -> MLMHeadProbe:
        """Train the heads on ``passages`` (texts, or windows from ``window_passages``).

        ``on_step(step)`` is called after each step (and its checkpoint, if due).
        """
        self._check(backbone)
        tok = _windows(backbone, passages, self.max_length)
        if not len(tok.lengths):
            raise ProbekitError("no training text: the corpus is empty")
        n_batches = math.ceil(len(tok.lengths) / self.batch_size)
        total = self.steps or max(1, round((self.epochs or 1.0) * n_batches))
        self.steps_ = total
        emb, decoder = _decoder(backbone)
        dev = backbone.device
        eps = float(getattr(backbone.config, "layer_norm_eps", 1e-12))
        heads = MLMHeads(len(self.layers_), backbone.hidden_size, decoder.shape[0], eps, seed=self.seed).to(dev)
        decay = [heads.dense_weight]
        rest = [heads.dense_bias, heads.norm_weight, heads.norm_bias, heads.bias]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=self.lr
        )
        key = sha256_json(
            {**self.settings(), "model": backbone.fingerprint, "steps": total, "data": _windows_digest(tok)}
        )
        start = self._resume(heads, opt, key)
        self.resumed_from_, self.heads_, self.loss_ = start, heads, []
        self.timings_ = {"forward": 0.0, "heads": 0.0, "total": 0.0}
        self.tokens_ = 0
        pad_id = int(backbone.tokenizer.pad_token_id)
        perms: dict[int, np.ndarray] = {}
        last_save = time.perf_counter()
        began = time.perf_counter()
        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc=f"mlm heads {backbone.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for step in range(start, total):
            epoch, b = divmod(step, n_batches)
            if epoch not in perms:
                perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(tok.lengths))}
            idx = perms[epoch][b * self.batch_size : (b + 1) * self.batch_size]
            t0 = time.perf_counter()
            batch = collate(tok, idx, pad_id, dev)
            candidates = batch["attention_mask"].bool() & ~batch["special_tokens_mask"]
            with torch.no_grad():
                clean = emb(batch["input_ids"])
            inputs, chosen = embedding_dropout(
                clean, candidates, self.mask_ratio, self.dropout_ratio, _generator(self.seed, step, 1)
            )
            hs = hidden_states(backbone, batch, inputs)
            h = torch.stack([hs[i][chosen] for i in self.layers_]).float()
            targets = batch["input_ids"][chosen]
            _sync(dev)
            t1 = time.perf_counter()
            if len(targets):
                for group in opt.param_groups:
                    group["lr"] = self._lr(step, total)
                loss = heads.loss(h, decoder, targets)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                self.loss_.append(float(loss.detach().mean()))
                bar.set_postfix(loss=f"{self.loss_[-1]:.3f}", refresh=False)
            _sync(dev)
            t2 = time.perf_counter()
            self.timings_["forward"] += t1 - t0
            self.timings_["heads"] += t2 - t1
            self.tokens_ += int(batch["attention_mask"].sum())
            bar.update(1)
            if self.checkpoint is not None and (
                step + 1 == total or time.perf_counter() - last_save >= self.checkpoint_seconds
            ):
                self._save(heads, opt, key, step + 1)
                last_save = time.perf_counter()
            if on_step is not None:
                on_step(step + 1)
        bar.close()
        self.timings_["total"] = time.perf_counter() - began
        return self

    def _lr(self, step: int, total: int) -> float:
        """Linear warm-up over the first ``warmup`` fraction of steps, then linear decay to zero."""
        warm = max(1, round(self.warmup * total))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(0.0, (total - step) / max(1, total - warm))

    def _save(self, heads: MLMHeads, opt: torch.optim.Optimizer, key: str, step: int) -> None:
        from safetensors.torch import save

        tensors = {f"heads.{k}": v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
        for i, state in opt.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta = {"key": key, "step": str(step), "layers": json.dumps(self.layers_), "format": "probekit-mlm-heads/1"}
        with atomic_path(self.checkpoint) as tmp:  # type: ignore[arg-type]
            tmp.write_bytes(save(tensors, metadata=meta))

    def _resume(self, heads: MLMHeads, opt: torch.optim.Optimizer, key: str) -> int:
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            return 0
        from safetensors import safe_open

        try:
            with safe_open(str(self.checkpoint), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ProbekitError(
                f"could not read the checkpoint {self.checkpoint} ({e}); delete it to start over"
            ) from None
        if meta.get("key") != key:
            raise ProbekitError(
                f"the checkpoint {self.checkpoint} was made with other settings, model or data; "
                "delete it or choose another output folder"
            )
        heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, i, field_name = name.split(".", 2)
                state.setdefault(int(i), {})[field_name] = value
        sd = opt.state_dict()
        sd["state"] = state
        opt.load_state_dict(sd)
        return int(meta["step"])

    @torch.no_grad()
    def score(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        corrupt: tuple[float, float] | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Per-layer accuracy and top-5 accuracy at predicting each real token of ``passages``.

        Without ``corrupt`` every real (non-special, non-padding) token is scored from its
        clean hidden state. ``corrupt=(mask_ratio, dropout_ratio)`` scores only positions
        chosen by embedding dropout (seeded), i.e. the masked-token task the heads train on.
        Returns columns ``layer``, ``acc``, ``top5``, ``n``.
        """
        if self.heads_ is None:
            raise ProbekitError("the MLM heads are not trained yet: call fit first")
        tok = _windows(backbone, passages, self.max_length)
        emb, decoder = _decoder(backbone)
        pad_id = int(backbone.tokenizer.pad_token_id)
        k = len(self.layers_)
        correct = torch.zeros(k, dtype=torch.long)
        top5 = torch.zeros(k, dtype=torch.long)
        n = 0
        plan = plan_batches(tok.lengths, max_tokens=4096)
        for b, idx in enumerate(tqdm(plan, disable=not progress, unit="batch", desc="mlm eval")):
            batch = collate(tok, idx, pad_id, backbone.device)
            positions = batch["attention_mask"].bool() & ~batch["special_tokens_mask"]
            inputs = None
            if corrupt is not None:
                inputs, positions = embedding_dropout(
                    emb(batch["input_ids"]), positions, *corrupt, generator=_generator(self.seed, b, 2)
                )
            hs = hidden_states(backbone, batch, inputs)
            h_all = torch.stack([hs[i][positions] for i in self.layers_])
            targets_all = batch["input_ids"][positions]
            for r in range(0, len(targets_all), EVAL_ROWS):
                h, targets = h_all[:, r : r + EVAL_ROWS].float(), targets_all[r : r + EVAL_ROWS]
                best = self.heads_.topk(h, decoder, TOPK)
                hit = best == targets.view(1, -1, 1)
                correct += hit[..., 0].sum(1).cpu()
                top5 += hit.any(-1).sum(1).cpu()
                n += len(targets)
        denom = max(n, 1)
        return pd.DataFrame(
            {"layer": self.layers_, "acc": (correct / denom).numpy(), "top5": (top5 / denom).numpy(), "n": n}
        )


def _windows_digest(tok: Tokenized) -> str:
    import hashlib

    h = hashlib.sha256()
    for ids in tok.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


# ---------------------------------------------------------------- sweep and the command


def sweep(
    backbone: Backbone,
    train: Sequence[str] | Tokenized,
    heldout: Sequence[str] | Tokenized,
    mask_ratios: Sequence[float],
    dropout_ratios: Sequence[float],
    checkpoint_dir: str | Path | None = None,
    **probe_kwargs: Any,
) -> pd.DataFrame:
    """Train and score heads for every ``mask_ratio`` x ``dropout_ratio``; one row per setting.

    Columns: the two ratios, ``acc_l<i>`` (unmasked held-out accuracy of layer i),
    ``mean_acc``, ``mean_masked_acc`` (the masked task of ``REFERENCE_CORRUPTION``: 15% of
    tokens fully dropped, the same for every setting), ``criterion`` (the mean of the two)
    and ``chosen`` (the setting with the best criterion: heads that name a token both when
    they see it and when they must infer it from context, as BERT's own head is trained to).
    """
    rows = []
    for mr in mask_ratios:
        for dr in dropout_ratios:
            probe = MLMHeadProbe(mask_ratio=mr, dropout_ratio=dr, **probe_kwargs)
            if checkpoint_dir is not None:
                probe.checkpoint = Path(checkpoint_dir) / f"heads-{_probe_key(probe, backbone, train)}.safetensors"
            probe.fit(backbone, train)
            clean = probe.score(backbone, heldout)
            masked = probe.score(backbone, heldout, corrupt=REFERENCE_CORRUPTION)
            row: dict[str, Any] = {"mask_ratio": mr, "dropout_ratio": dr}
            row.update({f"acc_l{layer}": acc for layer, acc in zip(clean["layer"], clean["acc"], strict=True)})
            row["mean_acc"] = float(clean["acc"].mean())
            row["mean_masked_acc"] = float(masked["acc"].mean())
            row["criterion"] = (row["mean_acc"] + row["mean_masked_acc"]) / 2
            rows.append(row)
    df = pd.DataFrame(rows)
    df["chosen"] = df.index == df["criterion"].idxmax()
    return df


def _probe_key(probe: MLMHeadProbe, backbone: Backbone, train: Sequence[str] | Tokenized) -> str:
    """A short name for a checkpoint: what the heads depend on."""
    data = _windows_digest(train) if isinstance(train, Tokenized) else sha256_json(list(train))
    return sha256_json({**probe.settings(), "model": backbone.fingerprint, "data": data})[:16]


@dataclass
class MLMProbeRun:
    """What ``mlm_probe`` made: the results table, the sweep (if any) and the trained probe."""

    results: pd.DataFrame
    probe: MLMHeadProbe
    out: Path
    sweep: pd.DataFrame | None = None
    info: dict[str, Any] = field(default_factory=dict)


def mlm_probe(
    model: str | Path | Backbone,
    corpus: str | Path | Sequence[str | Path],
    out: str | Path,
    mask_ratio: float = DEFAULT_MASK_RATIO,
    dropout_ratio: float = DEFAULT_DROPOUT_RATIO,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 32,
    lr: float = 2e-3,
    max_length: int = 128,
    heldout: float = 0.1,
    seed: int = 0,
    sweep_mask_ratios: Sequence[float] | None = None,
    sweep_dropout_ratios: Sequence[float] | None = None,
    sweep_steps: int | None = None,
    corpus_format: str = "auto",
    data_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    name: str | None = None,
    trust_remote_code: bool = False,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> MLMProbeRun:
    """What ``probekit mlm-probe`` runs: read the corpus, split it by passage, optionally sweep
    ``mask_ratio`` x ``dropout_ratio`` (then train with the chosen setting), train the heads
    (checkpointed under ``out/checkpoints``, resumable) and save the per-layer held-out
    ``mlm_acc``/``mlm_top5`` to ``out/results.{parquet,csv}`` (and ``out/sweep.csv``)."""
    out = Path(out)
    data = read_corpus(corpus, data_dir=data_dir, format=corpus_format)
    train_texts, heldout_texts = split_passages(data.passages, heldout, seed)
    backbone = (
        model
        if isinstance(model, Backbone)
        else load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, name=name)
    )
    train = window_passages(backbone.tokenizer, train_texts, max_length)
    held = window_passages(backbone.tokenizer, heldout_texts, max_length)
    common = {
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "max_length": max_length,
        "checkpoint_seconds": checkpoint_seconds,
        "progress": progress,
    }
    ckpt_dir = out / "checkpoints"
    sweep_df = None
    if sweep_mask_ratios or sweep_dropout_ratios:
        grid_steps = sweep_steps if sweep_steps is not None else steps
        sweep_df = sweep(
            backbone,
            train,
            held,
            sweep_mask_ratios or [mask_ratio],
            sweep_dropout_ratios or [dropout_ratio],
            checkpoint_dir=ckpt_dir,
            steps=grid_steps,
            epochs=None if grid_steps is not None else epochs,
            **common,
        )
        best = sweep_df[sweep_df["chosen"]].iloc[0]
        mask_ratio, dropout_ratio = float(best["mask_ratio"]), float(best["dropout_ratio"])
        with atomic_path(out / "sweep.csv") as tmp:
            sweep_df.to_csv(tmp, index=False)
    probe = MLMHeadProbe(mask_ratio=mask_ratio, dropout_ratio=dropout_ratio, steps=steps, epochs=epochs, **common)
    probe.checkpoint = ckpt_dir / f"heads-{_probe_key(probe, backbone, train)}.safetensors"
    probe.fit(backbone, train)
    scores = probe.score(backbone, held, progress=progress)
    settings = {
        **probe.settings(),
        "steps": probe.steps_,
        "corpus": data.name,
        "corpus_sources": data.sources,
        "heldout": heldout,
        "n_train_passages": len(train_texts),
        "n_heldout_passages": len(heldout_texts),
        "n_train_windows": len(train.lengths),
        "chosen_by": "sweep" if sweep_df is not None else "given",
        "checkpoint": str(probe.checkpoint),
    }
    if sweep_df is not None:
        settings["sweep"] = {
            "mask_ratios": list(sweep_mask_ratios or [mask_ratio]),
            "dropout_ratios": list(sweep_dropout_ratios or [dropout_ratio]),
            "steps": sweep_steps if sweep_steps is not None else steps,
            "criterion": "mean of unmasked and reference-masked held-out accuracy",
            "table": "sweep.csv",
        }
    rows = []
    for r in scores.itertuples(index=False):
        for metric, value in (("mlm_acc", r.acc), ("mlm_top5", r.top5)):
            lo, hi = (float(b) for b in wilson(round(value * r.n), r.n))
            rows.append(
                {
                    "model": backbone.name,
                    "task": data.name,
                    "layer": int(r.layer),
                    "split": "heldout",
                    "metric": metric,
                    "value": float(value),
                    "source": "mlm-probe",
                    "model_fingerprint": backbone.fingerprint,
                    "probe": "mlm-head",
                    "seed": seed,
                    "n": int(r.n),
                    "ci_low": lo,
                    "ci_high": hi,
                    "max_length": max_length,
                    "data_sha256": data.sha256,
                    "settings": settings,
                }
            )
    results = tidy(rows)
    save_results(results, out)
    info = {
        "timings": probe.timings_,
        "resumed_from": probe.resumed_from_,
        "steps": probe.steps_,
        "n_train_windows": len(train.lengths),
        "n_heldout_windows": len(held.lengths),
    }
    write_json(out / "mlm_run.json", {"settings": settings, **info, "model": backbone.info()})
    return MLMProbeRun(results=results, probe=probe, out=out, sweep=sweep_df, info=info)
