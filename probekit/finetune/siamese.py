"""BERTer's sentence-pair architectures: the Siamese encoder with cosine similarity (as SBERT), and
"embed then concatenate".

``siamese``: one encoder, shared by construction (the same module), reads each sentence of a pair
on its own (``[CLS] a [SEP]``, ``[CLS] b [SEP]``); each is pooled (mean over its real tokens by
default, ``--siamese-pool cls``) and the score is their cosine similarity. A binary task
(paraphrase, entailment) trains with PyTorch's cosine embedding loss (target +1 for the positive
class, -1 otherwise; margin ``siamese_margin``) and predicts the positive class when the cosine is
above a threshold tuned on dev *cross-fitted*: dev is split in two halves (even and odd rows),
the threshold that maximises the task's metric on one half labels the other, so no dev example
is scored with a threshold fitted on itself. A regression (STS-B) fits the cosine to the score
divided by 5 (squared error, SBERT's CosineSimilarityLoss). The saved checkpoint is the encoder
alone (``AutoModel``), the folder ``probekit extract --model`` reads.

``embed-then-concat``: each sentence of a pair goes through the embedding layer on its own
(positions restart at 0 for the second sentence, which keeps its own ``[CLS]``), and the two are
concatenated before the encoder layers: ``[CLS] a [SEP] [CLS] b [SEP]``. Token types are 0 for
both sentences (each is embedded exactly as it would be alone, BERTer's reading);
``--concat-token-types pair`` gives the second sentence type 1 instead. Each sentence is
truncated to ``max_length`` on its own, so a pair may hold up to twice that many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probekit.config import option
from probekit.data import Split, TaskData
from probekit.encoding import tokenize
from probekit.finetune.batches import PAIR_PREFIX, SidesDataset
from probekit.finetune.variants import Scorer, Variant, register_variant

STS_SCALE = 5.0
"""STS-B's scores run from 0 to 5; the cosine is fitted to score / 5."""
POSITIVE = ("entailment", "paraphrase", "duplicate", "equivalent", "1")
"""Label names taken as the positive class of a binary pair task (the first found; else label 1)."""


def positive_label(config: Any) -> int:
    """The class id of the positive class ("entailment", "paraphrase", "1"...) from a model config."""
    names = {str(v).lower(): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return next((names[n] for n in POSITIVE if n in names), 1)


def best_threshold(cos: np.ndarray, y: np.ndarray, score: Scorer) -> float:
    """The threshold on ``cos`` (predict 1 above it) that maximises ``score`` on (``cos``, ``y``): candidates
    are the midpoints between sorted distinct values (and beyond both ends); ties go to the lowest."""
    v = np.unique(cos)
    cands = np.concatenate([[v[0] - 1.0], (v[1:] + v[:-1]) / 2, [v[-1] + 1.0]]) if len(v) else np.array([0.0])
    scores = [score(y, (cos > t).astype(np.int64)) for t in cands]
    return float(cands[int(np.nanargmax(np.nan_to_num(scores, nan=-np.inf)))])


def cross_fitted(cos: np.ndarray, y01: np.ndarray, score: Scorer) -> np.ndarray:
    """0/1 predictions of the cosines ``cos``: each half of the rows (even, odd) thresholded where the
    other half scores best."""
    pred = np.zeros(len(cos), dtype=np.int64)
    halves = [np.arange(0, len(cos), 2), np.arange(1, len(cos), 2)]
    for this, other in (halves, halves[::-1]):
        if len(this) == 0:
            continue
        fit = other if len(other) else this
        t = best_threshold(cos[fit], y01[fit], score)
        pred[this] = (cos[this] > t).astype(np.int64)
    return pred


def _pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def _sides(tokenizer: Any, split: Split, max_length: int) -> tuple[Any, Any]:
    assert split.text_pairs is not None
    return tokenize(tokenizer, split.texts, None, max_length), tokenize(tokenizer, split.text_pairs, None, max_length)


@register_variant
@dataclass(frozen=True)
class Siamese(Variant):
    """siamese: a shared encoder on each sentence of a pair, pooled, cosine similarity (pair tasks)."""

    name: ClassVar[str] = "siamese"
    order: ClassVar[int] = 6
    role: ClassVar[str] = "architecture"
    needs_pairs: ClassVar[bool] = True

    siamese_pool: Literal["mean", "cls"] = option("mean", "siamese: pooling of each sentence (mean or cls).")
    siamese_margin: float = option(0.0, "siamese: margin of the cosine embedding loss (binary tasks).", ge=-1, le=1)

    @property
    def slug(self) -> str:
        tags = ([] if self.siamese_pool == "mean" else [self.siamese_pool]) + (
            [] if self.siamese_margin == 0 else [f"m{self.siamese_margin:g}"]
        )
        return "-".join([self.name, *tags])

    def applies(self, data: TaskData) -> str | None:
        reason = super().applies(data)
        if reason is None and data.label_names and data.n_classes != 2:
            return f"siamese scores binary or similarity pair tasks; {data.name} has {data.n_classes} classes"
        return reason

    def dataset(self, tokenizer: Any, split: Split, max_length: int, pad_id: int, *, train: bool) -> Any:
        a, b = _sides(tokenizer, split, max_length)
        return SidesDataset(a, b, split.labels, pad_id)

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        return SiameseModel(model, self)

    def saved(self, trained: nn.Module) -> nn.Module:
        return trained.encoder if isinstance(trained, SiameseModel) else trained

    def predictions(self, outputs: np.ndarray, labels: np.ndarray, regression: bool, score: Scorer) -> np.ndarray:
        cos = outputs.reshape(-1)
        if regression:
            return cos * STS_SCALE
        return cross_fitted(cos, labels.reshape(-1).astype(np.int64), score)

    def notes(self, model: nn.Module) -> dict[str, Any]:
        if isinstance(model, SiameseModel):
            return {
                "siamese": {
                    "positive_label": model.positive,
                    "pool": self.siamese_pool,
                    "dev_threshold": "cross-fitted",
                }
            }
        return {}


class SiameseModel(nn.Module):
    """Two towers of one encoder (``encoder``, the classifier's base model: the same weights for both)."""

    accepts_loss_kwargs = False

    def __init__(self, classifier: nn.Module, variant: Siamese) -> None:
        super().__init__()
        self.encoder = classifier.base_model
        self.variant = variant
        self.regression = getattr(classifier.config, "problem_type", None) == "regression"
        self.positive = positive_label(classifier.config)

    @property
    def config(self) -> Any:
        return self.encoder.config

    @property
    def base_model(self) -> nn.Module:
        """The shared encoder (where a loss wrapper such as SMART finds the embedding layer)."""
        return self.encoder

    def embed(self, **inputs: torch.Tensor) -> torch.Tensor:
        """One tower: the pooled top layer of one sentence batch."""
        hidden = self.encoder(**inputs, return_dict=True).last_hidden_state
        return _pool(hidden, inputs["attention_mask"], self.variant.siamese_pool)

    def forward(self, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput  # deferred: transformers is heavy

        inputs.pop("return_dict", None)
        first = {k: v for k, v in inputs.items() if not k.startswith(PAIR_PREFIX)}
        second = {k.removeprefix(PAIR_PREFIX): v for k, v in inputs.items() if k.startswith(PAIR_PREFIX)}
        u, v = self.embed(**first), self.embed(**second)
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1)
        loss = None
        if labels is not None:
            if self.regression:
                loss = F.mse_loss(cos, labels.float().reshape(-1) / STS_SCALE)
            else:
                target = torch.where(labels.reshape(-1) == self.positive, 1.0, -1.0)
                loss = F.cosine_embedding_loss(u.float(), v.float(), target, margin=self.variant.siamese_margin)
        return SequenceClassifierOutput(loss=loss, logits=cos)


@register_variant
@dataclass(frozen=True)
class EmbedThenConcat(Variant):
    """embed-then-concat: each sentence of a pair embedded alone (positions restart), then concatenated."""

    name: ClassVar[str] = "embed-then-concat"
    order: ClassVar[int] = 7
    role: ClassVar[str] = "architecture"
    needs_pairs: ClassVar[bool] = True

    concat_token_types: Literal["alone", "pair"] = option(
        "alone", "embed-then-concat: token types, 0 for both sentences (alone) or 1 for the second (pair)."
    )

    @property
    def slug(self) -> str:
        return self.name if self.concat_token_types == "alone" else f"{self.name}-types"

    def dataset(self, tokenizer: Any, split: Split, max_length: int, pad_id: int, *, train: bool) -> Any:
        a, b = _sides(tokenizer, split, max_length)
        return SidesDataset(a, b, split.labels, pad_id, concat=True, second_type=int(self.concat_token_types == "pair"))
