"""The convexity paper's fixes to fine-tuning (Section 4.4), as changes to the model before training.

- ``plain``: the encoder as it is.
- ``copy-layers`` (``copy_from=K``): the weights of layer K initialise every layer above it
  (K+1..L). Layers are numbered as in probekit's results: 0 is the embeddings, 1..L the
  transformer blocks, so K is in 1..L-1.
- ``drop-layers`` (``drop=N``): the top N blocks are removed (and ``num_hidden_layers`` set
  to L-N, so the saved checkpoint reloads with L-N layers).
- ``multi-objective`` and ``multi-objective-extra-layer`` (:mod:`probekit.finetune.multi_objective`),
  ``smart`` (:mod:`probekit.finetune.smart`), ``siamese`` and ``embed-then-concat``
  (:mod:`probekit.finetune.siamese`): registered by their modules.

Each variant is one class registered in :data:`VARIANTS` (its options are its dataclass
fields, a :class:`~probekit.config.Config`; its behaviour its methods); a plugin adds one by
writing one class with :func:`register_variant`, and the CLI, the comparison table and the
suite find it there.

Variants compose (``a+b``, :class:`Composed`): any number that change the model's weights or depth
(``role = "model"``), at most one that changes the forward pass and the data (``"architecture"``) and at
most one that wraps the loss (``"objective"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from probekit.config import Config, option, split_options
from probekit.data import Split, TaskData
from probekit.encoding import tokenize
from probekit.errors import ParamError, ProbekitError
from probekit.finetune.batches import TextDataset
from probekit.registry import Registry

Scorer = Callable[[np.ndarray, np.ndarray], float]


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
    needs_pairs: ClassVar[bool] = False
    """Whether the variant applies to sentence-pair tasks only."""
    needs_special_tokens: ClassVar[bool] = False
    """Whether training batches keep the special-tokens mask (for masking real tokens only)."""
    role: ClassVar[str] = "model"
    """How it composes with others (``a+b``): ``model`` changes the encoder's weights or depth (any number),
    ``architecture`` changes the forward pass and the data (one at most), ``objective`` wraps the loss
    (one at most, outermost)."""

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

    def applies(self, data: TaskData) -> str | None:
        """Why the variant cannot fine-tune on ``data`` (e.g. a pair architecture on a one-sentence task),
        or None when it can."""
        if self.needs_pairs and data.splits["train"].text_pairs is None:
            return f"{self.name} needs a sentence-pair task; {data.name} has one sentence per example"
        return None

    def dataset(
        self, tokenizer: Any, split: Split, max_length: int, pad_id: int, *, train: bool
    ) -> torch.utils.data.Dataset:
        """The split as the model reads it (default: one sequence per example, pairs packed)."""
        tok = tokenize(tokenizer, split.texts, split.text_pairs, max_length)
        return TextDataset(tok, split.labels, pad_id, keep_special=train and self.needs_special_tokens)

    def predictions(self, outputs: np.ndarray, labels: np.ndarray, regression: bool, score: Scorer) -> np.ndarray:
        """Dev predictions from the model's outputs (default: the argmax of the logits, or the regression
        value); ``score(y_true, y_pred)`` is the task's main metric, for variants that tune a threshold."""
        return outputs.reshape(-1) if regression else outputs.argmax(-1)

    def notes(self, model: nn.Module) -> dict[str, Any]:
        """What to record about a trained model in its run's result (e.g. where a head came from)."""
        return {}

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
    set of parameters can serve several variants). ``a+b`` composes registered variants into one
    (:class:`Composed`, e.g. ``smart+siamese``)."""
    if isinstance(name, Variant):
        return name
    if "+" in name:
        return Composed(tuple(make_variant(part.strip(), **params) for part in name.split("+")))
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


@dataclass(frozen=True)
class Composed(Variant):
    """Several variants in one run (``smart+siamese``, ``copy-layers+smart``): the ``model`` variants change the
    encoder first (in the order given), then the ``architecture`` one (at most one) wraps it, then the
    ``objective`` one (at most one) wraps that; the saved part is unwrapped in the reverse order."""

    component: ClassVar[str] = "a composed fine-tuning variant"
    name: ClassVar[str] = ""
    parts: tuple[Any, ...] = ()

    def check(self, n_layers: int | None = None) -> None:
        names = [p.name for p in self.parts]
        if len(self.parts) < 2 or len(set(names)) != len(names):
            raise VariantError("variant", f"{{variant}} {'+'.join(names)}: compose two or more different variants")
        for role in ("architecture", "objective"):
            found = [p.name for p in self.parts if p.role == role]
            if len(found) > 1:
                raise VariantError("variant", f"{{variant}} {'+'.join(names)}: {' and '.join(found)} do not compose")
        if any(p.role == "objective" for p in self.parts) and any(p.needs_special_tokens for p in self.parts):
            raise VariantError(
                "variant",
                f"{{variant}} {'+'.join(names)}: a loss wrapper does not compose with a variant that splits the batch",
            )
        if any(isinstance(p, Plain) for p in self.parts):
            raise VariantError("variant", "{variant} plain composes with nothing (it is the encoder as it is)")
        for p in self.parts:
            p.check(n_layers)

    @property
    def ordered(self) -> list[Variant]:
        rank = {"model": 0, "architecture": 1, "objective": 2}
        return sorted(self.parts, key=lambda p: rank[p.role])

    @property
    def _arch(self) -> Variant | None:
        return next((p for p in self.parts if p.role == "architecture"), None)

    @property
    def slug(self) -> str:
        return "+".join(p.slug for p in self.parts)

    @property
    def needs_pairs(self) -> bool:  # type: ignore[override]
        return any(p.needs_pairs for p in self.parts)

    @property
    def keeps_depth(self) -> bool:  # type: ignore[override]
        return all(p.keeps_depth for p in self.parts)

    def settings(self) -> dict[str, Any]:
        return {"name": "+".join(p.name for p in self.parts), "parts": [p.settings() for p in self.parts]}

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [p.settings() for p in self.parts]}

    def applies(self, data: TaskData) -> str | None:
        return next((r for p in self.parts if (r := p.applies(data))), None)

    def n_layers(self, original: int) -> int:
        for p in self.ordered:
            original = p.n_layers(original)
        return original

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        for p in self.ordered:
            model = p.apply(model, seed)
        return model

    def saved(self, trained: nn.Module) -> nn.Module:
        for p in reversed(self.ordered):
            trained = p.saved(trained)
        return trained

    def dataset(self, tokenizer: Any, split: Split, max_length: int, pad_id: int, *, train: bool) -> Any:
        arch = self._arch
        return (arch or Plain()).dataset(tokenizer, split, max_length, pad_id, train=train)

    def predictions(self, outputs: np.ndarray, labels: np.ndarray, regression: bool, score: Scorer) -> np.ndarray:
        return (self._arch or Plain()).predictions(outputs, labels, regression, score)

    def notes(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(p.notes(model))
        return out

    def before_training(self, model: nn.Module, batches: Any, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(p.before_training(model, batches, device))
        return out


def apply_variant(model: nn.Module, variant: Variant, seed: int = 0) -> nn.Module:
    """The model to train (:meth:`Variant.apply`)."""
    return variant.apply(model, seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model of training-time wrappers (each keeps what it wraps as ``inner``)."""
    while hasattr(model, "inner"):
        model = model.inner
    return model
