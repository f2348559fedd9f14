"""Off-ramp training methods: ``frozen``, ``deebert`` and ``joint``, components of :data:`TRAINING_METHODS`.

- ``frozen``: the encoder stays as it is; every off-ramp is trained on its layer's cached
  first-token states (``probekit extract --pool cls``) by the :class:`~probekit.offramp.estimator.OffRamps`
  estimator. Cheap, and the probing view: what each layer of the pre-trained encoder makes decodable.
- ``deebert``: DeeBERT's two stages. Stage 1 fine-tunes the encoder with the last off-ramp
  (the usual fine-tuning); stage 2 freezes all of that and trains the other off-ramps on
  the fine-tuned encoder's states.
- ``joint``: encoder and all off-ramps trained together on the sum of their losses.

A method is a class with a ``name``, a ``config_class`` (its options, a :class:`TrainConfig`) and
``train(job)``; adding one is registering it: ``@TRAINING_METHODS.register("mine")``. Its options then
appear on ``probekit offramp`` and in the suite's ``[offramp]`` table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from probekit.backbone import Backbone
from probekit.config import option
from probekit.data import HELDOUT, TaskData
from probekit.encoding import encode, tokenize
from probekit.extraction import extract_task
from probekit.offramp.estimator import OffRamps
from probekit.offramp.heads import OffRampHeads
from probekit.offramp.train import TrainConfig, deebert_stage2, train_encoder_with_offramps, trainable_copy
from probekit.registry import Registry


@dataclass(frozen=True)
class FrozenConfig(TrainConfig):
    component: ClassVar[str] = "the frozen off-ramps"
    epochs: int | None = option(5, "Epochs of frozen off-ramps.", ge=1)


@dataclass(frozen=True)
class FineTuneConfig(TrainConfig):
    component: ClassVar[str] = "the fine-tuned off-ramps"
    epochs: int | None = option(2, "Epochs when fine-tuning (deebert, joint).", ge=1)


@dataclass
class TrainingJob:
    """What a training method works on (the runner fills it: I/O settings, no options)."""

    backbone: Backbone
    data: TaskData
    max_length: int
    cache_dir: Path
    out: Path
    reader_options: dict[str, Any]
    progress: bool = True
    fresh: bool = False

    @property
    def recorded(self) -> list[str]:
        """The splits whose off-ramp outputs are recorded (held-out, for the learned policies, and dev)."""
        return [s for s in (HELDOUT, "dev") if s in self.data.splits]


@dataclass
class Trained:
    """A method's result: the off-ramps, the encoder they sit on, every layer's first-token states of
    the recorded splits ([N, L+1, D]) and the loss history."""

    heads: OffRampHeads
    encoder: torch.nn.Module
    states: dict[str, np.ndarray]
    history: dict[str, list[float]]
    paths: dict[str, Path] = field(default_factory=dict)
    estimator: OffRamps | None = None
    components: dict[str, Any] = field(default_factory=dict)
    """Modules the method trained for its exit policy (``lte``; ``halting`` with its ``prior_lambda``)."""


TRAINING_METHODS: Registry[type[TrainingMethod]] = Registry("off-ramp training method", "mode")
"""Every off-ramp training method, by name; plugins register theirs here."""


class TrainingMethod:
    """Base of the training methods: ``__init__`` stores the options (``config``, default the class's)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    exit_policies: ClassVar[tuple[str, ...]] = ("entropy",)
    """The exit policies of the method's paper (marked ``native`` in the results; the comparison's rows)."""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config

    @property
    def options(self) -> TrainConfig:
        return self.config if self.config is not None else self.config_class()

    def train(self, job: TrainingJob) -> Trained:
        raise NotImplementedError


def _fine_tuned_backbone(encoder: torch.nn.Module, base: Backbone, mode: str) -> Backbone:
    return Backbone(
        model=encoder,
        tokenizer=base.tokenizer,
        name=f"{base.name}-{mode}",
        source=base.source,
        device=base.device,
        dtype=torch.float32,
    )


@TRAINING_METHODS.register("frozen")
class FrozenMethod(TrainingMethod):
    """Off-ramps on cached states of the frozen encoder."""

    name = "frozen"
    config_class = FrozenConfig

    def __init__(self, config: TrainConfig | None = None, estimator: OffRamps | None = None) -> None:
        super().__init__(config)
        self.estimator = estimator

    @staticmethod
    def config_from(estimator: OffRamps) -> FrozenConfig:
        """An estimator's parameters as this method's options (recorded in the results' settings)."""
        return FrozenConfig(
            epochs=estimator.epochs,
            head_batch_size=estimator.batch_size,
            head_lr=estimator.lr,
            weight_decay=estimator.weight_decay,
            dropout=estimator.dropout,
            seed=estimator.seed,
        )

    def train(self, job: TrainingJob) -> Trained:
        bb, data = job.backbone, job.data
        cache = extract_task(
            bb,
            data,
            job.cache_dir,
            pool="cls",
            max_length=job.max_length,
            storage_dtype="float32",
            reader_options=job.reader_options,
            progress=job.progress,
        )
        params = {"n_classes": data.n_classes, "device": bb.device, "progress": job.progress}
        if self.estimator is not None:
            est = OffRamps(**{**self.estimator.get_params(), **params})
        else:
            est = OffRamps.from_config(self.options, **params)
        est.fit(cache["train"], data.splits["train"].labels)
        states = {s: np.array(cache[s]) for s in job.recorded}  # in memory: the cache is a read-only map
        return Trained(est.heads_, bb.model, states, {"off-ramps": est.history_}, estimator=est)


def _encode_recorded(tuned: Backbone, job: TrainingJob) -> dict[str, np.ndarray]:
    d = job.data.splits
    return {
        s: encode(tuned, d[s].texts, d[s].text_pairs, pool="cls", max_length=job.max_length, progress=job.progress)
        for s in job.recorded
    }


class _FineTuning(TrainingMethod):
    config_class = FineTuneConfig

    def _setup(
        self, job: TrainingJob, shared: bool = False
    ) -> tuple[OffRampHeads, torch.nn.Module, Any, dict[str, Any]]:
        bb, data, cfg = job.backbone, job.data, self.options
        torch.manual_seed(cfg.seed)
        heads = OffRampHeads(bb.n_layers - 1, bb.hidden_size, data.n_classes, cfg.dropout, shared=shared)
        heads = heads.to(bb.device)
        encoder = trainable_copy(bb.model)
        train = data.splits["train"]
        tok = tokenize(bb.tokenizer, train.texts, train.text_pairs, job.max_length)
        common = {
            "pad_id": int(bb.tokenizer.pad_token_id),
            "input_names": bb.input_names,
            "device": bb.device,
            "progress": job.progress,
            "key_extra": {"model": bb.fingerprint, "mode": self.name},
            "fresh": job.fresh,
        }
        return heads, encoder, tok, common


@dataclass(frozen=True)
class DeeBERTConfig(FineTuneConfig):
    component: ClassVar[str] = "DeeBERT's two stages"
    stage2_epochs: int = option(5, "DeeBERT stage 2: epochs of the other off-ramps (the paper's 5).", ge=1)
    stage2_lr: float = option(1e-3, "DeeBERT stage 2: learning rate of the other off-ramps (the paper's 1e-3).", gt=0)
    encoder_pooler: bool = option(
        True, "DeeBERT: the last off-ramp starts from the encoder's own pre-trained pooler (when it has one)."
    )


def init_from_pooler(ramp: torch.nn.Module, encoder: torch.nn.Module) -> bool:
    """Start an off-ramp's pooler (dense + tanh) from the encoder's pre-trained pooler, as DeeBERT's last
    layer uses BERT's own; False when the encoder has none of that shape."""
    pooler = getattr(getattr(encoder, "pooler", None), "dense", None)
    if not isinstance(pooler, torch.nn.Linear) or pooler.weight.shape != ramp.dense.weight.shape:
        return False
    with torch.no_grad():
        ramp.dense.weight.copy_(pooler.weight)
        ramp.dense.bias.copy_(pooler.bias)
    return True


@TRAINING_METHODS.register("deebert")
class DeeBERTMethod(_FineTuning):
    """Two-stage fine-tuning: the encoder with the last off-ramp, then the other off-ramps on it."""

    name = "deebert"
    config_class = DeeBERTConfig

    def train(self, job: TrainingJob) -> Trained:
        heads, encoder, tok, common = self._setup(job)
        cfg, train = self.options, job.data.splits["train"]
        if getattr(cfg, "encoder_pooler", False):
            init_from_pooler(heads.ramps[-1], encoder)
        folder = job.out / "checkpoint-deebert-stage1"
        history = {
            "stage 1": train_encoder_with_offramps(
                encoder,
                heads,
                tok,
                train.labels,
                cfg=cfg,
                ramps=[heads.n_layers - 1],
                checkpoint=folder,
                desc="deebert stage 1",
                **common,
            )
        }
        tuned = _fine_tuned_backbone(encoder, job.backbone, self.name)
        history["stage 2"] = deebert_stage2(tuned, heads, train, cfg, job.max_length, progress=job.progress)
        return Trained(heads, tuned.model, _encode_recorded(tuned, job), history, {"checkpoint": folder})


@TRAINING_METHODS.register("joint")
class JointMethod(_FineTuning):
    """The encoder and all off-ramps trained together on the sum of their losses."""

    name = "joint"

    def train(self, job: TrainingJob) -> Trained:
        heads, encoder, tok, common = self._setup(job)
        train = job.data.splits["train"]
        folder = job.out / "checkpoint-joint"
        history = {
            "joint": train_encoder_with_offramps(
                encoder, heads, tok, train.labels, cfg=self.options, checkpoint=folder, desc="joint", **common
            )
        }
        tuned = _fine_tuned_backbone(encoder, job.backbone, self.name)
        return Trained(heads, tuned.model, _encode_recorded(tuned, job), history, {"checkpoint": folder})
