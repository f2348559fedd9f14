"""The numerical kernels of the MLM-head probes: embedding dropout, the batched heads, the tied
cross-entropy and the streaming top-k over vocabulary blocks.

Embedding dropout (Zhou et al., 2019) corrupts a chosen token's *input word embedding*: each
real token is chosen with probability ``mask_ratio``, and each dimension of a chosen token's
embedding is dropped with probability ``dropout_ratio`` (kept ones are scaled by
1/(1 - dropout_ratio), as ``torch.nn.Dropout`` does; at ratio 1 the embedding is exactly zero,
like an all-masked token).

The heads are one batched module (dense weights [K, D, D], LayerNorm [K, D], output bias
[K, V]) sharing the encoder's frozen embedding matrix as the decoder, which is never copied.
The vocabulary projection runs in blocks (a streaming log-sum-exp for the loss, with a
hand-written backward that recomputes each block; a streaming top-k for evaluation), so memory
stays bounded whatever the vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probekit.errors import ProbekitError

DEFAULT_MASK_RATIO = 0.15
DEFAULT_DROPOUT_RATIO = 0.3
"""The best of 0.3 / 0.6 / 1.0 in a small sweep on MiniLM (README, MLM-head probes); the paper tuned it per model."""
LOGITS_BUDGET = 1 << 24
"""Most elements of one [heads, positions, vocabulary chunk] block of logits (64 MiB in float32);
logits within it are computed in one block and kept for the backward pass."""
CPU_KEEP = 1 << 22
CPU_BLOCK = 1 << 20
"""Training on a CPU, logits are kept whole only up to ``CPU_KEEP`` elements (16 MiB) and otherwise
run in cache-sized blocks of ``CPU_BLOCK`` (4 MiB): for 7 heads about 1.5x faster than 64 MiB blocks
on this repository's machine, recomputation included. A GPU prefers few large blocks."""
TOPK = 5


# ---------------------------------------------------------------- embedding dropout


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for ``seed`` and the sub-stream ``stream`` (e.g. step, purpose): independent
    streams from one seed, the same on every device."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


_generator = generator
"""The former private name (``probekit.finetune.variants`` imports it)."""


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
        raise ProbekitError(
            f"{{mask_ratio}} and {{dropout_ratio}} must lie in [0, 1], got {mask_ratio}, {dropout_ratio}",
            params=("mask_ratio", "dropout_ratio"),
        )
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


def head_activation(name: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLM head's activation from a config's ``hidden_act`` (``gelu``, ``gelu_new``, ``relu``, ...;
    a callable is used as it is), as the model's own head applies it."""
    if callable(name):
        return name
    from transformers.activations import ACT2FN  # here: importing it loads torch._dynamo (70 MB)

    try:
        return ACT2FN[str(name)]
    except KeyError:
        raise ProbekitError(f"unknown activation {name!r} in the model config (hidden_act)") from None


class MLMHeads(torch.nn.Module):
    """K independent BERT-style MLM heads as one batched module (the decoder matrix is passed in).

    ``embedding_size`` (default ``hidden``): the decoder's width. Encoders with factorised
    embeddings (ALBERT, ELECTRA) have a head whose dense layer maps the hidden size to the
    embedding size, LayerNorm and decoder working there; ``activation`` is the config's
    ``hidden_act`` (BERT's and ALBERT's heads apply it)."""

    def __init__(
        self,
        n_heads: int,
        hidden: int,
        vocab_size: int,
        eps: float = 1e-12,
        init_std: float = 0.02,
        seed: int = 0,
        embedding_size: int | None = None,
        activation: Any = "gelu",
    ) -> None:
        super().__init__()
        g = generator(seed, 0xE4D5)
        width = hidden if embedding_size is None else int(embedding_size)
        self.eps = eps
        self.activation = head_activation(activation)
        self.dense_weight = torch.nn.Parameter(torch.randn(n_heads, width, hidden, generator=g) * init_std)
        self.dense_bias = torch.nn.Parameter(torch.zeros(n_heads, width))
        self.norm_weight = torch.nn.Parameter(torch.ones(n_heads, width))
        self.norm_bias = torch.nn.Parameter(torch.zeros(n_heads, width))
        self.bias = torch.nn.Parameter(torch.zeros(n_heads, vocab_size))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """dense, activation, LayerNorm of each head's hidden states: ``[K, N, D] -> [K, N, E]``."""
        x = torch.baddbmm(self.dense_bias.unsqueeze(1), h, self.dense_weight.transpose(1, 2))
        x = F.layer_norm(self.activation(x), x.shape[-1:], eps=self.eps)
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
