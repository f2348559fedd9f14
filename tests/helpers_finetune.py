"""A fine-tuning variant from outside the package, written as a plugin writes one: one class."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from probekit.config import option
from probekit.errors import ParamError
from probekit.finetune import VARIANTS, Variant, encoder_layers, register_variant


@dataclass(frozen=True)
class FreezeEmbeddings(Variant):
    """freeze-embeddings: the input embeddings (and the blocks below freeze_below) are not trained."""

    name: ClassVar[str] = "freeze-embeddings"

    freeze_below: int = option(0, "freeze-embeddings: also freeze blocks 1..this.", ge=0)

    @property
    def slug(self) -> str:
        return self.name if not self.freeze_below else f"{self.name}-b{self.freeze_below}"

    def check(self, n_layers: int | None = None) -> None:
        if n_layers is not None and self.freeze_below >= n_layers:
            raise ParamError("freeze_below", f"must be below the model's {n_layers} layers, got {self.freeze_below}")

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        layers = encoder_layers(model)
        self.check(len(layers))
        frozen: list[Any] = [model.base_model.embeddings, *list(layers)[: self.freeze_below]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return model


def register() -> None:
    register_variant(FreezeEmbeddings)


@contextlib.contextmanager
def registered() -> Iterator[type[FreezeEmbeddings]]:
    """The plugin variant registered for the block's duration (the registry is the process's)."""
    register()
    try:
        yield FreezeEmbeddings
    finally:
        VARIANTS.unregister(FreezeEmbeddings.name)
