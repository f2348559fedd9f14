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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from probekit.errors import ProbekitError
from probekit.mlm import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO, MLMHeads, _generator, embedding_dropout

if TYPE_CHECKING:
    from transformers.modeling_outputs import SequenceClassifierOutput

VARIANTS = ("plain", "multi-objective", "copy-layers", "drop-layers")
MLM_WARMUP_STEPS = 200
MLM_WARMUP_LR = 1e-3
MLM_PREFIX = "mlm_"


@dataclass(frozen=True)
class Variant:
    """How the model is changed before fine-tuning (see the module docstring)."""

    name: str = "plain"
    copy_from: int | None = None
    """copy-layers: the layer (1..L-1) whose weights initialise the layers above it."""
    drop: int | None = None
    """drop-layers: how many top layers to remove (1..L-1)."""
    mlm_weight: float = 1.0
    """multi-objective: weight of the MLM loss added to the classification loss."""
    mlm_warmup: int = MLM_WARMUP_STEPS
    """multi-objective: steps that train the extra layer and the new MLM head alone (encoder frozen)
    before fine-tuning, so that a random head's large early loss does not swamp the classifier's."""
    mask_ratio: float = DEFAULT_MASK_RATIO
    dropout_ratio: float = DEFAULT_DROPOUT_RATIO

    def __post_init__(self) -> None:
        if self.name not in VARIANTS:
            raise ProbekitError(f"unknown variant {self.name!r}; choose one of {', '.join(VARIANTS)}")
        if self.name == "copy-layers" and self.copy_from is None:
            raise ProbekitError("--variant copy-layers needs --copy-from K (the layer copied into the layers above)")
        if self.name == "drop-layers" and self.drop is None:
            raise ProbekitError("--variant drop-layers needs --drop N (how many top layers to remove)")
        if self.name == "multi-objective" and not self.mlm_weight > 0:
            raise ProbekitError(f"the MLM loss weight must be positive, got {self.mlm_weight}")
        if self.name == "multi-objective" and self.mlm_warmup < 0:
            raise ProbekitError(f"the MLM head warm-up must be 0 or more steps, got {self.mlm_warmup}")

    @property
    def slug(self) -> str:
        """Folder name: ``plain``, ``multi-objective``, ``copy-layers-k3``, ``drop-layers-n2``."""
        if self.name == "copy-layers":
            return f"copy-layers-k{self.copy_from}"
        if self.name == "drop-layers":
            return f"drop-layers-n{self.drop}"
        if self.name == "multi-objective":  # non-default settings get their own folder
            default = Variant("multi-objective")
            tags = [
                f"{tag}{getattr(self, name):g}"
                for tag, name in (
                    ("w", "mlm_weight"),
                    ("wu", "mlm_warmup"),
                    ("m", "mask_ratio"),
                    ("d", "dropout_ratio"),
                )
                if getattr(self, name) != getattr(default, name)
            ]
            return "-".join(["multi-objective", *tags])
        return self.name

    def settings(self) -> dict[str, Any]:
        """What the variant changes (only the fields that apply to it)."""
        keep = {"name"} | {
            "copy-layers": {"copy_from"},
            "drop-layers": {"drop"},
            "multi-objective": {"mlm_weight", "mlm_warmup", "mask_ratio", "dropout_ratio"},
        }.get(self.name, set())
        return {k: v for k, v in asdict(self).items() if k in keep}

    def n_layers(self, original: int) -> int:
        """Layers of the fine-tuned checkpoint, given the pre-trained model's."""
        return original - self.drop if self.name == "drop-layers" and self.drop else original

    def check(self, n_layers: int) -> None:
        """Raise if the variant cannot apply to a model of ``n_layers`` transformer blocks."""
        if self.name == "copy-layers" and not 1 <= int(self.copy_from) < n_layers:  # type: ignore[arg-type]
            raise ProbekitError(
                f"--copy-from {self.copy_from}: the model has layers 1..{n_layers}; K must be in 1..{n_layers - 1} "
                "(layer K initialises the layers above it)"
            )
        if self.name == "drop-layers" and not 1 <= int(self.drop) < n_layers:  # type: ignore[arg-type]
            raise ProbekitError(f"--drop {self.drop}: the model has {n_layers} layers; N must be in 1..{n_layers - 1}")


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
    Variant("copy-layers", copy_from=k).check(len(layers))
    source = layers[k - 1].state_dict()
    for j in range(k, len(layers)):
        layers[j].load_state_dict(source)
    return model


def drop_layers(model: nn.Module, n: int) -> nn.Module:
    """Remove the top ``n`` layers and record the new depth in the config, in place."""
    owner, attr = _layers_owner(model)
    layers = getattr(owner, attr)
    Variant("drop-layers", drop=n).check(len(layers))
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

    def __init__(self, classifier: nn.Module, variant: Variant, seed: int = 0) -> None:
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
        from transformers.masking_utils import create_bidirectional_mask

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
    """The model to train: ``model`` changed in place (copy/drop), or wrapped (multi-objective)."""
    if variant.name == "copy-layers":
        return copy_layers(model, int(variant.copy_from))  # type: ignore[arg-type]
    if variant.name == "drop-layers":
        return drop_layers(model, int(variant.drop))  # type: ignore[arg-type]
    if variant.name == "multi-objective":
        return MultiObjective(model, variant, seed)
    return model


def saved_model(trained: nn.Module) -> nn.Module:
    """The part of a trained model that is saved: the classifier without training-time extras."""
    return trained.classifier if isinstance(trained, MultiObjective) else trained
