"""The convexity paper's fixes to fine-tuning (Section 4.4), as changes to the model before training.

- ``plain``: the encoder as it is.
- ``copy-layers`` (``copy_from=K``): the weights of layer K initialise every layer above it
  (K+1..L). Layers are numbered as in probekit's results: 0 is the embeddings, 1..L the
  transformer blocks, so K is in 1..L-1.
- ``drop-layers`` (``drop=N``): the top N blocks are removed (and ``num_hidden_layers`` set
  to L-N, so the saved checkpoint reloads with L-N layers).
- ``multi-objective``: an extra block (initialised as a copy of the top one) is stacked on
  top, used only by a masked-language-model objective: each training batch also carries
  texts whose input word embeddings are corrupted by embedding dropout, and an MLM head over
  the extra block (BERT's head, decoder tied to the input word embeddings) predicts their
  tokens; the loss is the classifier's plus ``mlm_weight`` times the MLM loss. The new head
  and the extra block are first trained alone for ``mlm_warmup`` steps (encoder frozen), so
  that a random head's early loss (about log(vocabulary)) does not swamp the classifier's.
  The classifier still reads the original top layer. The extra block and the head are
  training-time only: the saved checkpoint is the classifier model with its L layers.

Each variant is one class registered in :data:`VARIANTS` (its options are its dataclass
fields, a :class:`~probekit.config.Config`; its behaviour its methods); a plugin adds one by
writing one class with :func:`register_variant`, and the CLI, the comparison table and the
suite find it there.

The embedding-dropout corruption and the MLM head are those of the MLM-head probe
(:mod:`probekit.mlm`): :func:`~probekit.mlm.embedding_dropout` and a one-head
:class:`~probekit.mlm.MLMHeads`, whose tied vocabulary projection gives the decoder (the
embedding matrix) no gradient through the MLM loss (the embeddings still learn through the
encoder).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from probekit.config import Config, fields_of, option, split_options
from probekit.errors import ParamError, ProbekitError
from probekit.mlm import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO, MLMHeads, _generator, embedding_dropout
from probekit.registry import Registry

if TYPE_CHECKING:
    from transformers.modeling_outputs import SequenceClassifierOutput

MLM_WARMUP_STEPS = 200
MLM_WARMUP_LR = 1e-3
MLM_PREFIX = "mlm_"


class VariantError(ParamError):
    """A variant's parameter is missing or does not fit the model. Unlike a plain :class:`ParamError`
    (``param: detail``) the message is written whole, with ``{param}`` markers the front ends render."""

    def __init__(self, param: str, message: str, *, params: Iterable[str] = ()) -> None:
        ProbekitError.__init__(self, message, params=(param, *params))
        self.param = param
        self.detail = message


@dataclass(frozen=True)
class Variant(Config):
    """How the model is changed before fine-tuning (see the module docstring); subclass, declare the
    options as fields and register the class with :func:`register_variant`."""

    component: ClassVar[str] = "a fine-tuning variant"
    name: ClassVar[str] = ""
    """The registered name (``--variant NAME``)."""
    keeps_depth: ClassVar[bool] = True
    """Whether the fine-tuned checkpoint has the pre-trained model's layers (only those are probed layer by
    layer against the pre-trained model in a suite)."""
    order: ClassVar[int] = 100
    """Position in the comparison table (rows sorted by it, then by name)."""

    @property
    def slug(self) -> str:
        """Folder name and results ``mode``: the name, plus the options that tell two settings apart."""
        return self.name

    def settings(self) -> dict[str, Any]:
        """What the variant changes: its name and options (fingerprinted, recorded in ``metrics.json``)."""
        return {"name": self.name, **self.to_dict()}

    def check(self, n_layers: int | None = None) -> None:
        """Raise a :class:`ParamError` when an option is missing, or (given ``n_layers``) when the variant
        cannot apply to a model of ``n_layers`` transformer blocks."""

    def n_layers(self, original: int) -> int:
        """Layers of the fine-tuned checkpoint, given the pre-trained model's."""
        return original

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """The model to train: ``model`` changed in place, or wrapped."""
        return model

    def saved(self, trained: nn.Module) -> nn.Module:
        """The part of a trained model that is saved (without training-time extras)."""
        return trained

    def mlm_order(self, n_train: int, seed: int) -> np.ndarray | None:
        """For variants that train on a second view of the training texts: which text each example brings
        (an index per example), else None."""
        return None

    def before_training(self, model: nn.Module, batches: Any, device: torch.device) -> dict[str, Any]:
        """Work before the Trainer starts (not on a resumed run); ``batches(steps)`` gives training batches.
        Returns what to record in the run's result."""
        return {}


VARIANTS: Registry[type[Variant]] = Registry("fine-tuning variant", "variant")
"""Every fine-tuning variant by name (plugins register theirs with :func:`register_variant`)."""


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Class decorator: register a :class:`Variant` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...'")
    VARIANTS.register(cls.name, cls, help=(cls.__doc__ or "").strip())
    return cls


def make_variant(name: str | Variant, **params: Any) -> Variant:
    """The variant ``name`` with those of ``params`` that are its options (the others are ignored, so one
    set of parameters can serve several variants)."""
    if isinstance(name, Variant):
        return name
    cls = VARIANTS.get(name)
    own, _ = split_options({k: v for k, v in params.items() if v is not None}, cls)
    return cls.from_mapping(own)


def variant_class(slug: str) -> type[Variant] | None:
    """The registered variant a slug (``copy-layers-k3``) belongs to: the longest name it starts with."""
    found = [(n, c) for n, c in VARIANTS.items() if slug == n or slug.startswith(n + "-")]
    return max(found, key=lambda nc: len(nc[0]))[1] if found else None


def variant_order() -> list[str]:
    """The registered names in the comparison table's order."""
    return [n for n, _ in sorted(VARIANTS.items(), key=lambda nc: (nc[1].order, nc[0]))]


def probed_variants() -> list[str]:
    """Variants whose checkpoints keep the model's depth (the ones a suite probes layer by layer)."""
    return [n for n in variant_order() if VARIANTS.get(n).keeps_depth]


def variant_options() -> list[tuple[str, type[Variant]]]:
    """(name, class) of every variant: the sources of the variants' CLI options and suite keys."""
    return [(n, VARIANTS.get(n)) for n in variant_order()]


@register_variant
@dataclass(frozen=True)
class Plain(Variant):
    """plain: the encoder as it is."""

    name: ClassVar[str] = "plain"
    order: ClassVar[int] = 0


@register_variant
@dataclass(frozen=True)
class MultiObjectiveVariant(Variant):
    """multi-objective: an extra top layer and an MLM objective on embedding-dropout texts during training."""

    name: ClassVar[str] = "multi-objective"
    order: ClassVar[int] = 1
    tags: ClassVar[tuple[tuple[str, str], ...]] = (
        ("w", "mlm_weight"),
        ("wu", "mlm_warmup"),
        ("m", "mask_ratio"),
        ("d", "dropout_ratio"),
    )

    mlm_weight: float = option(1.0, "multi-objective: weight of the MLM loss.", gt=0)
    mlm_warmup: int = option(
        MLM_WARMUP_STEPS, "multi-objective: steps training the new MLM head alone before fine-tuning.", ge=0
    )
    mask_ratio: float = option(
        DEFAULT_MASK_RATIO, "multi-objective: share of real tokens whose embeddings are corrupted.", gt=0, le=1
    )
    dropout_ratio: float = option(
        DEFAULT_DROPOUT_RATIO, "multi-objective: dropout rate of a corrupted token's embedding.", ge=0, le=1
    )

    @property
    def slug(self) -> str:
        """``multi-objective``, with a tag per option that is not the default (its own folder)."""
        defaults = {f.name: f.default for f in fields_of(type(self))}
        tags = [f"{tag}{getattr(self, n):g}" for tag, n in self.tags if getattr(self, n) != defaults[n]]
        return "-".join([self.name, *tags])

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        return MultiObjective(model, self, seed)

    def saved(self, trained: nn.Module) -> nn.Module:
        return trained.classifier if isinstance(trained, MultiObjective) else trained

    def mlm_order(self, n_train: int, seed: int) -> np.ndarray | None:
        return np.random.default_rng([seed, 7]).permutation(n_train)

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
class CopyLayers(Variant):
    """copy-layers: the weights of layer K initialise every layer above it."""

    name: ClassVar[str] = "copy-layers"
    order: ClassVar[int] = 2

    copy_from: int | None = option(None, "copy-layers: layer K (1..L-1) whose weights initialise the layers above it.")

    @property
    def slug(self) -> str:
        return f"{self.name}-k{self.copy_from}"

    def check(self, n_layers: int | None = None) -> None:
        if self.copy_from is None:
            raise VariantError(
                "copy_from",
                "{variant} copy-layers needs {copy_from} K (the layer copied into the layers above)",
                params=("variant",),
            )
        if n_layers is not None and not 1 <= self.copy_from < n_layers:
            raise VariantError(
                "copy_from",
                f"{{copy_from}} {self.copy_from}: the model has layers 1..{n_layers}; K must be in 1..{n_layers - 1} "
                "(layer K initialises the layers above it)",
            )

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        return copy_layers(model, int(self.copy_from))  # type: ignore[arg-type]  (check() made sure)


@register_variant
@dataclass(frozen=True)
class DropLayers(Variant):
    """drop-layers: the top N blocks are removed."""

    name: ClassVar[str] = "drop-layers"
    order: ClassVar[int] = 3
    keeps_depth: ClassVar[bool] = False

    drop: int | None = option(None, "drop-layers: how many top layers to remove.")

    @property
    def slug(self) -> str:
        return f"{self.name}-n{self.drop}"

    def check(self, n_layers: int | None = None) -> None:
        if self.drop is None:
            raise VariantError(
                "drop", "{variant} drop-layers needs {drop} N (how many top layers to remove)", params=("variant",)
            )
        if n_layers is not None and not 1 <= self.drop < n_layers:
            raise VariantError(
                "drop", f"{{drop}} {self.drop}: the model has {n_layers} layers; N must be in 1..{n_layers - 1}"
            )

    def n_layers(self, original: int) -> int:
        return original - int(self.drop or 0)

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        return drop_layers(model, int(self.drop))  # type: ignore[arg-type]  (check() made sure)


def _layers_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the list of transformer blocks, and that attribute's name."""
    base = getattr(model, "base_model", model)
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        owner: Any = base
        *parents, attr = path.split(".")
        try:
            for p in parents:
                owner = getattr(owner, p)
            if isinstance(getattr(owner, attr), nn.ModuleList):
                return owner, attr
        except AttributeError:
            continue
    raise ProbekitError(
        f"{type(model).__name__}: cannot find its list of transformer layers (encoder.layer, transformer.layer); "
        "only plain fine-tuning supports this architecture"
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face encoder (or a model with one as ``base_model``)."""
    owner, attr = _layers_owner(model)
    return getattr(owner, attr)


def copy_layers(model: nn.Module, k: int) -> nn.Module:
    """Initialise layers K+1..L with the weights of layer K (1-based, as in the results), in place."""
    layers = encoder_layers(model)
    CopyLayers(copy_from=k).check(len(layers))
    source = layers[k - 1].state_dict()
    for j in range(k, len(layers)):
        layers[j].load_state_dict(source)
    return model


def drop_layers(model: nn.Module, n: int) -> nn.Module:
    """Remove the top ``n`` layers and record the new depth in the config, in place."""
    owner, attr = _layers_owner(model)
    layers = getattr(owner, attr)
    DropLayers(drop=n).check(len(layers))
    setattr(owner, attr, nn.ModuleList(list(layers)[: len(layers) - n]))
    model.config.num_hidden_layers = len(layers) - n
    return model


class MultiObjective(nn.Module):
    """A sequence classifier plus a training-time extra layer and MLM head (the multi-objective variant).

    ``forward`` takes the classifier's inputs and, in training, ``mlm_input_ids``,
    ``mlm_attention_mask``, ``mlm_special_tokens_mask`` (and ``mlm_token_type_ids``): texts
    whose real tokens are corrupted by embedding dropout, encoded, passed through the extra
    layer and predicted by the MLM head. The loss is the classifier's plus ``mlm_weight`` times
    the MLM loss. ``classifier`` is the model to save.
    """

    accepts_loss_kwargs = False
    """Tells the Trainer to scale the loss for gradient accumulation itself."""

    def __init__(self, classifier: nn.Module, variant: MultiObjectiveVariant, seed: int = 0) -> None:
        super().__init__()
        self.classifier = classifier
        self.variant = variant
        cfg = classifier.config
        self.extra_layer = copy.deepcopy(encoder_layers(classifier)[-1])
        emb = classifier.get_input_embeddings()
        self.mlm_head = MLMHeads(
            1,
            int(emb.weight.shape[1]),
            int(emb.weight.shape[0]),
            eps=float(getattr(cfg, "layer_norm_eps", 1e-12)),
            init_std=float(getattr(cfg, "initializer_range", 0.02)),
            seed=seed,
        )
        self.seed = seed
        self.calls = 0
        self.last_mlm_loss: float | None = None
        base = classifier.base_model
        self._inputs = set(inspect.signature(base.forward).parameters)

    @property
    def config(self) -> Any:
        return self.classifier.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **mlm: torch.Tensor,
    ) -> SequenceClassifierOutput:
        kwargs = {"attention_mask": attention_mask, "labels": labels}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.classifier(input_ids=input_ids, **kwargs, return_dict=True)
        batch = {k.removeprefix(MLM_PREFIX): v for k, v in mlm.items() if k.startswith(MLM_PREFIX)}
        if not self.training or "input_ids" not in batch:
            return out
        mlm_loss = self.mlm_loss(batch)
        loss = mlm_loss * self.variant.mlm_weight
        out.loss = loss if out.loss is None else out.loss + loss
        return out

    def mlm_loss(self, batch: dict[str, torch.Tensor], train_encoder: bool = True) -> torch.Tensor:
        """Embedding-dropout MLM loss of the extra layer's head on ``batch`` (input_ids, attention_mask, ...);
        with ``train_encoder=False`` no gradient reaches the encoder (or the embeddings)."""
        from transformers.masking_utils import create_bidirectional_mask  # deferred: transformers is heavy

        emb = self.classifier.get_input_embeddings()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        candidates = mask.bool() & ~batch["special_tokens_mask"].bool()
        self.calls += 1
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            embeds = emb(ids)
        corrupted, chosen = embedding_dropout(
            embeds,
            candidates,
            self.variant.mask_ratio,
            self.variant.dropout_ratio,
            _generator(self.seed, self.calls, 3),
        )
        inputs: dict[str, torch.Tensor] = {"inputs_embeds": corrupted, "attention_mask": mask}
        if "token_type_ids" in batch and "token_type_ids" in self._inputs:
            inputs["token_type_ids"] = batch["token_type_ids"]
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            hidden = self.classifier.base_model(**inputs, return_dict=True).last_hidden_state
        mask4d = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        top = self.extra_layer(hidden, mask4d)
        top = top[0] if isinstance(top, tuple) else top
        if not bool(chosen.any()):
            return top.sum() * 0.0  # no token drawn in this batch: a zero that keeps the graph
        with torch.autocast(device_type=top.device.type, enabled=False):
            loss = self.mlm_head.loss(top[chosen].float().unsqueeze(0), emb.weight.float(), ids[chosen])[0]
        self.last_mlm_loss = float(loss.detach())
        return loss

    def warm_up(self, batches: Iterable[dict[str, torch.Tensor]], lr: float = MLM_WARMUP_LR) -> list[float]:
        """Train the extra layer and the MLM head alone on ``batches`` (MLM samples, keys without the
        ``mlm_`` prefix, on the model's device), the encoder frozen; return the losses."""
        params = [*self.extra_layer.parameters(), *self.mlm_head.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        was_training = self.training
        self.train()
        losses = []
        for batch in batches:
            loss = self.mlm_loss(batch, train_encoder=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        return losses


def apply_variant(model: nn.Module, variant: Variant, seed: int = 0) -> nn.Module:
    """The model to train (:meth:`Variant.apply`)."""
    return variant.apply(model, seed)


def saved_model(trained: nn.Module, variant: Variant | None = None) -> nn.Module:
    """The part of a trained model that is saved (:meth:`Variant.saved`)."""
    if variant is not None:
        return variant.saved(trained)
    return trained.classifier if isinstance(trained, MultiObjective) else trained
