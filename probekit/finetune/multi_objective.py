"""The convexity paper's multi-objective fine-tuning (its Table 1, both rows), as the paper writes it.

Within every training batch a fraction of the samples (``mlm_fraction``, drawn at random per
batch) is set aside for the masked-language-model objective: their real tokens' input
embeddings are corrupted by embedding dropout (the MLM-head probe's
:func:`~probekit.mlm.embedding_dropout`) and an MLM head predicts those tokens; the other
samples feed the classification objective. The loss is their sum (``mlm_weight`` scales the MLM
term; 1, the default, is the paper's plain sum).

- ``multi-objective``: the MLM head reads the encoder's top layer.
- ``multi-objective-extra-layer``: an extra encoder layer (a copy of the top one) is stacked on top
  for the MLM objective only; it is dropped at save, so the checkpoint has the model's L layers.

The MLM head (BERT's: dense, GELU, LayerNorm, decoder tied to the input embeddings) starts from the
checkpoint's pre-trained MLM head when the checkpoint has one (``cls.predictions.*``, as
``BertForMaskedLM`` saves it), else at random; the run's result says which (``mlm_head``).
``mlm_warmup`` (not in the paper, default 0) first trains the head (and the extra layer) alone.
The tied vocabulary projection gives the decoder (the embedding matrix) no gradient through the
MLM loss; the embeddings still learn through the encoder.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from probekit.config import fields_of, option
from probekit.finetune.variants import Variant, encoder_layers, register_variant
from probekit.mlm import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO, MLMHeads, _generator, embedding_dropout

MLM_WARMUP_LR = 1e-3
DEFAULT_MLM_FRACTION = 0.5
"""Share of each batch's samples given to the MLM objective (the paper does not give a number: ours)."""
HEAD_KEYS = {
    "dense_weight": ("cls.predictions.transform.dense.weight",),
    "dense_bias": ("cls.predictions.transform.dense.bias",),
    "norm_weight": ("cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.gamma"),
    "norm_bias": ("cls.predictions.transform.LayerNorm.bias", "cls.predictions.transform.LayerNorm.beta"),
    "bias": ("cls.predictions.bias", "cls.predictions.decoder.bias"),
}
"""Where BERT's pre-trained MLM head lives in a checkpoint (``BertForMaskedLM``/``BertForPreTraining``)."""


def pretrained_mlm_head(source: str | Path) -> dict[str, torch.Tensor] | None:
    """The pre-trained MLM head of the checkpoint folder ``source`` as :class:`~probekit.mlm.MLMHeads`
    tensors (one head), or None when it has none (an encoder saved without its head, e.g. MiniLM)."""
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            found = {}
            for name, candidates in HEAD_KEYS.items():
                key = next((k for k in candidates if k in keys), None)
                if key is None:
                    break
                found[name] = f.get_tensor(key).unsqueeze(0)
            else:
                return found
    return None


@register_variant
@dataclass(frozen=True)
class MultiObjectiveVariant(Variant):
    """multi-objective: part of each batch feeds an MLM objective (embedding dropout, head on the top layer)."""

    name: ClassVar[str] = "multi-objective"
    order: ClassVar[int] = 1
    role: ClassVar[str] = "architecture"
    needs_special_tokens: ClassVar[bool] = True
    extra_layer: ClassVar[bool] = False
    tags: ClassVar[tuple[tuple[str, str], ...]] = (
        ("f", "mlm_fraction"),
        ("w", "mlm_weight"),
        ("wu", "mlm_warmup"),
        ("m", "mask_ratio"),
        ("d", "dropout_ratio"),
    )

    mlm_fraction: float = option(
        DEFAULT_MLM_FRACTION, "multi-objective: share of each batch's samples given to the MLM objective.", gt=0, lt=1
    )
    mlm_weight: float = option(1.0, "multi-objective: weight of the MLM loss (1: the paper's plain sum).", gt=0)
    mlm_warmup: int = option(0, "multi-objective: steps training the MLM head alone first (not in the paper).", ge=0)
    mask_ratio: float = option(
        DEFAULT_MASK_RATIO, "multi-objective: share of real tokens whose embeddings are corrupted.", gt=0, le=1
    )
    dropout_ratio: float = option(
        DEFAULT_DROPOUT_RATIO, "multi-objective: dropout rate of a corrupted token's embedding.", ge=0, le=1
    )

    @property
    def slug(self) -> str:
        """The name, with a tag per option that is not the default (its own folder)."""
        defaults = {f.name: f.default for f in fields_of(type(self))}
        tags = [f"{tag}{getattr(self, n):g}" for tag, n in self.tags if getattr(self, n) != defaults[n]]
        return "-".join([self.name, *tags])

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        head = pretrained_mlm_head(getattr(model, "name_or_path", "") or "")
        return MultiObjective(model, self, seed, head=head)

    def saved(self, trained: nn.Module) -> nn.Module:
        return trained.inner if isinstance(trained, MultiObjective) else trained

    def notes(self, model: nn.Module) -> dict[str, Any]:
        if not isinstance(model, MultiObjective):
            return {}
        return {"mlm_head": model.head_source}

    def before_training(self, model: nn.Module, batches: Any, device: torch.device) -> dict[str, Any]:
        if not isinstance(model, MultiObjective) or not self.mlm_warmup:
            return {}
        model.to(device)
        losses = model.warm_up(batches(self.mlm_warmup))
        if not losses:
            return {}
        return {"mlm_warmup_loss": {"steps": len(losses), "first": losses[0], "last10": float(np.mean(losses[-10:]))}}


@register_variant
@dataclass(frozen=True)
class MultiObjectiveExtraLayer(MultiObjectiveVariant):
    """multi-objective-extra-layer: as multi-objective, the MLM head over an extra top layer (dropped at save)."""

    name: ClassVar[str] = "multi-objective-extra-layer"
    order: ClassVar[int] = 4
    extra_layer: ClassVar[bool] = True


class MultiObjective(nn.Module):
    """A sequence classifier trained with the multi-objective split of every batch (see the module docstring).

    ``forward`` takes the classifier's inputs plus ``special_tokens_mask``; in training the rows
    ``last_split[0]`` feed the MLM objective and ``last_split[1]`` the classifier. ``inner`` is the
    model to save.
    """

    accepts_loss_kwargs = False
    """Tells the Trainer to scale the loss for gradient accumulation itself."""

    def __init__(
        self,
        classifier: nn.Module,
        variant: MultiObjectiveVariant,
        seed: int = 0,
        head: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.inner = classifier
        self.variant = variant
        cfg = classifier.config
        self.extra_layer = copy.deepcopy(encoder_layers(classifier)[-1]) if variant.extra_layer else None
        emb = classifier.get_input_embeddings()
        self.mlm_head = MLMHeads(
            1,
            int(emb.weight.shape[1]),
            int(emb.weight.shape[0]),
            eps=float(getattr(cfg, "layer_norm_eps", 1e-12)),
            init_std=float(getattr(cfg, "initializer_range", 0.02)),
            seed=seed,
        )
        self.head_source = "random (the checkpoint has no MLM head)"
        if head is not None and all(head[k].shape == p.shape for k, p in self.mlm_head.named_parameters()):
            with torch.no_grad():
                for k, p in self.mlm_head.named_parameters():
                    p.copy_(head[k])
            self.head_source = "pre-trained (the checkpoint's)"
        self.seed = seed
        self.calls = 0
        self.last_split: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_mlm_loss: float | None = None
        self._inputs = set(inspect.signature(classifier.base_model.forward).parameters)

    @property
    def classifier(self) -> nn.Module:
        return self.inner

    @property
    def config(self) -> Any:
        return self.inner.config

    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLM rows, classification rows) of a batch of ``n``: a random ``mlm_fraction`` of them (at least
        one of each when ``n`` > 1), drawn anew for every batch."""
        k = min(max(round(self.variant.mlm_fraction * n), 1), n - 1) if n > 1 else 0
        perm = torch.randperm(n, generator=_generator(self.seed, self.calls, 5))
        return perm[:k].sort().values, perm[k:].sort().values

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        special_tokens_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if not self.training or special_tokens_mask is None or labels is None or len(labels) < 2:
            return self.inner(**batch, labels=labels, return_dict=True)
        self.calls += 1
        mlm_rows, cls_rows = self.split(len(labels))
        self.last_split = (mlm_rows, cls_rows)
        dev = labels.device
        out = self.inner(
            **{k: v[cls_rows.to(dev)] for k, v in batch.items()}, labels=labels[cls_rows.to(dev)], return_dict=True
        )
        mlm = {k: v[mlm_rows.to(dev)] for k, v in batch.items()}
        mlm["special_tokens_mask"] = special_tokens_mask[mlm_rows.to(dev)]
        out.loss = out.loss + self.variant.mlm_weight * self.mlm_loss(mlm)
        return out

    def mlm_loss(self, batch: dict[str, torch.Tensor], train_encoder: bool = True) -> torch.Tensor:
        """Embedding-dropout MLM loss of the head (over the top layer, or the extra one) on ``batch``
        (input_ids, attention_mask, special_tokens_mask, ...); with ``train_encoder=False`` no gradient
        reaches the encoder (or the embeddings)."""
        from transformers.masking_utils import create_bidirectional_mask  # deferred: transformers is heavy

        emb = self.inner.get_input_embeddings()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        candidates = mask.bool() & ~batch["special_tokens_mask"].bool()
        grad = train_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            embeds = emb(ids)
        corrupted, chosen = embedding_dropout(
            embeds,
            candidates,
            self.variant.mask_ratio,
            self.variant.dropout_ratio,
            _generator(self.seed, self.calls, 3),
        )
        inputs: dict[str, torch.Tensor] = {"inputs_embeds": corrupted, "attention_mask": mask}
        for key in ("token_type_ids", "position_ids"):
            if key in batch and key in self._inputs:
                inputs[key] = batch[key]
        with torch.set_grad_enabled(grad):
            top = self.inner.base_model(**inputs, return_dict=True).last_hidden_state
        if self.extra_layer is not None:
            mask4d = create_bidirectional_mask(config=self.config, inputs_embeds=top, attention_mask=mask)
            top = self.extra_layer(top, mask4d)
            top = top[0] if isinstance(top, tuple) else top
        if not bool(chosen.any()):
            return top.sum() * 0.0  # no token drawn in this batch: a zero that keeps the graph
        with torch.autocast(device_type=top.device.type, enabled=False):
            loss = self.mlm_head.loss(top[chosen].float().unsqueeze(0), emb.weight.float(), ids[chosen])[0]
        self.last_mlm_loss = float(loss.detach())
        return loss

    def warm_up(self, batches: Iterable[dict[str, torch.Tensor]], lr: float = MLM_WARMUP_LR) -> list[float]:
        """Train the MLM head (and the extra layer) alone on ``batches`` (on the model's device), the encoder
        frozen; return the losses."""
        params = [*self.mlm_head.parameters(), *(self.extra_layer.parameters() if self.extra_layer else [])]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        was_training = self.training
        self.train()
        losses = []
        for batch in batches:
            self.calls += 1
            loss = self.mlm_loss(batch, train_encoder=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        return losses
