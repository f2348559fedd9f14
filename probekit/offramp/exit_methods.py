"""The early-exit training methods of the seed papers, trained with the encoder (components of
:data:`~probekit.offramp.methods.TRAINING_METHODS`):

- ``pabee`` (Zhou et al., 2020): off-ramps trained on PABEE's weighted average of the per-layer losses
  (weight j for layer j); its exit is the ``patience`` policy.
- ``berxit`` (Xin et al., 2021): the LTE module u_i = sigmoid(c . h_i + b) trained jointly on
  ``L_i + J_i`` with ``J_i = (u_i - u~_i)^2``, with BERxiT's alternating fine-tuning (odd steps the last
  layer's loss L_L, even steps sum_i (L_i + J_i)); its exit is the ``lte`` policy on the trained module.
- ``pondernet`` (Banino et al., 2021) and ``palbert`` (Balagansky & Gavrilov, 2022): the PonderNet
  objective ``sum_i p(i|x) loss_i + beta KL(p || geometric(lambda_p))`` with one classifier at every
  layer (shared by default) and a Lambda layer trained with the encoder: ``pondernet`` one linear
  layer on h_i (sampling exit), ``palbert`` a 3-layer tanh MLP on [h_i, h_{i-1}] with its own learning
  rate (deterministic Q-exit, ``qexit``, with the sampling exit beside it).
- ``slf`` (BERTer's Sequential Layer Focus): stage 1 trains layer 1, 2, ..., L in turn with only that
  layer's off-ramp and encoder block updated (everything else bit for bit unchanged); stage 2 fine-tunes
  everything jointly on the sum of the losses.
- ``smart-alternating`` (BERTer): per epoch, either the sum of all layers' losses or the last layer's
  alone, switched by the last off-ramp's score on the held-out split after each epoch.

All record every layer's outputs, so every exit policy sweeps on them; all checkpoint and resume
through :func:`~probekit.offramp.train.train_phases`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from probekit import metrics as M
from probekit.config import option
from probekit.data import HELDOUT
from probekit.encoding import collate, plan_batches, tokenize
from probekit.errors import ProbekitError
from probekit.offramp.halting import LTE, Halting, lte_targets, pabee_loss
from probekit.offramp.heads import OffRampHeads, per_layer_loss, predict
from probekit.offramp.inference import LayerStepper
from probekit.offramp.methods import (
    TRAINING_METHODS,
    FineTuneConfig,
    Trained,
    TrainingJob,
    _encode_recorded,
    _fine_tuned_backbone,
    _FineTuning,
)
from probekit.offramp.policies import ponder_loss
from probekit.offramp.train import Phase, train_phases


def first_tokens(hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every layer's first-token state from ``output_hidden_states``: [B, L+1, D]."""
    return torch.stack([h[:, 0] for h in hs], dim=1)


def all_outputs(heads: OffRampHeads, hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every off-ramp's output on a batch's hidden states: [B, L, C]."""
    return torch.stack([heads.ramps[i](hs[i + 1][:, 0]) for i in range(heads.n_layers)], dim=1)


def sum_loss(heads: OffRampHeads, hs: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return per_layer_loss(all_outputs(heads, hs), y, heads.regression).mean(0).sum()


def last_loss(heads: OffRampHeads, hs: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    out = heads.ramps[-1](hs[-1][:, 0])[:, None]
    return per_layer_loss(out, y, heads.regression).mean()


def berxit_loss(
    heads: OffRampHeads, lte: LTE, hs: Sequence[torch.Tensor], y: torch.Tensor, last_only: bool
) -> torch.Tensor:
    """BERxiT: ``L_L`` (``last_only``, the odd steps of alternating fine-tuning) or ``sum_i (L_i + J_i)``."""
    if last_only:
        return last_loss(heads, hs, y)
    out = all_outputs(heads, hs)
    losses = per_layer_loss(out, y, heads.regression).mean(0)
    u = lte(first_tokens(hs)[:, 1:])
    j = ((u - lte_targets(out, y, heads.regression)) ** 2).mean(0)
    return (losses + j).sum()


def ponder_objective(
    heads: OffRampHeads, halting: Halting, hs: Sequence[torch.Tensor], y: torch.Tensor, beta: float, prior: float
) -> torch.Tensor:
    """PonderNet's objective on a batch (the last layer takes the remaining halting mass)."""
    states = first_tokens(hs)
    losses = per_layer_loss(all_outputs(heads, hs), y, heads.regression)
    return ponder_loss(halting(states), losses, beta, prior)


def _train(
    method: _FineTuning,
    job: TrainingJob,
    setup: tuple[OffRampHeads, nn.Module, Any, dict[str, Any]],
    phases: list[Phase] | Callable[[Sequence[torch.Tensor], torch.Tensor, int], torch.Tensor],
    others: dict[str, tuple[nn.Module, float]] | None = None,
    **kw: Any,
) -> list[float]:
    """:func:`train_phases` of one method on the train split, checkpointed in OUT/checkpoint-<method>:
    ``setup`` is :meth:`_FineTuning._setup`'s; ``phases`` a list, or one loss trained for the method's
    epochs; the off-ramps learn at ``head_lr`` and each of ``others`` (name: module, learning rate) at its own."""
    heads, encoder, tok, common = setup
    cfg: Any = method.options
    if callable(phases):
        phases = [Phase(method.name, cfg.n_epochs(finetune=True), phases)]
    modules = {"heads": heads, **{name: m for name, (m, _) in (others or {}).items()}}
    groups = [(list(heads.parameters()), cfg.head_lr)]
    groups += [(list(m.parameters()), lr) for m, lr in (others or {}).values()]
    return train_phases(
        encoder,
        nn.ModuleDict(modules),
        groups,
        phases,
        tok,
        job.data.splits["train"].labels,
        common["pad_id"],
        cfg,
        checkpoint=job.out / f"checkpoint-{method.name}",
        **{k: common[k] for k in ("input_names", "device", "progress", "fresh", "key_extra")},
        **kw,
    )


def _finish(
    job: TrainingJob, method: str, heads: OffRampHeads, encoder: nn.Module, history: dict, **kw: Any
) -> Trained:
    tuned = _fine_tuned_backbone(encoder, job.backbone, method)
    folder = job.out / f"checkpoint-{method}"
    return Trained(heads, tuned.model, _encode_recorded(tuned, job), history, {"checkpoint": folder}, **kw)


@TRAINING_METHODS.register("pabee")
class PABEEMethod(_FineTuning):
    """PABEE: the encoder and every off-ramp on the weighted average of the per-layer losses (weight j)."""

    name = "pabee"
    exit_policies = ("patience",)

    def train(self, job: TrainingJob) -> Trained:
        setup = self._setup(job)
        heads, encoder = setup[:2]

        def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
            return pabee_loss(per_layer_loss(all_outputs(heads, hs), y, heads.regression))

        history = _train(self, job, setup, loss)
        return _finish(job, self.name, heads, encoder, {"pabee": history})


@dataclass(frozen=True)
class BERxiTConfig(FineTuneConfig):
    component: ClassVar[str] = "BERxiT's training"
    alternating: bool = option(True, "BERxiT: alternating fine-tuning (odd steps the last layer's loss).")


@TRAINING_METHODS.register("berxit")
class BERxiTMethod(_FineTuning):
    """BERxiT: off-ramps and the LTE module trained with the encoder (``L_i + J_i``), alternating."""

    name = "berxit"
    exit_policies = ("lte",)
    config_class = BERxiTConfig

    def train(self, job: TrainingJob) -> Trained:
        setup = self._setup(job)
        heads, encoder = setup[:2]
        cfg = self.options
        lte = LTE(job.backbone.hidden_size).to(job.backbone.device)
        alternating = bool(getattr(cfg, "alternating", True))

        def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
            return berxit_loss(heads, lte, hs, y, last_only=alternating and step % 2 == 1)

        history = _train(self, job, setup, loss, others={"lte": (lte, cfg.head_lr)})
        lte.eval()
        return _finish(job, self.name, heads, encoder, {"berxit": history}, components={"lte": lte})


@dataclass(frozen=True)
class PonderConfig(FineTuneConfig):
    component: ClassVar[str] = "PonderNet/PALBERT training"
    halting_beta: float = option(0.01, "PonderNet/PALBERT training: weight beta of the KL to the prior.", ge=0)
    halting_prior: float = option(0.1, "PonderNet/PALBERT training: lambda_p of the geometric prior.", gt=0, le=1)
    halting_lr: float = option(1e-3, "PonderNet/PALBERT training: learning rate of the Lambda layer.", gt=0)
    halting_hidden: int = option(128, "PALBERT training: width of the Lambda MLP.", ge=1)
    shared_classifier: bool = option(True, "PonderNet/PALBERT: one classifier shared by every layer.")


class _Ponder(_FineTuning):
    config_class = PonderConfig
    kind: ClassVar[str] = "linear"

    def train(self, job: TrainingJob) -> Trained:
        cfg: Any = self.options
        setup = self._setup(job, shared=cfg.shared_classifier)
        heads, encoder = setup[:2]
        halting = Halting(job.backbone.hidden_size, self.kind, cfg.halting_hidden).to(job.backbone.device)

        def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
            return ponder_objective(heads, halting, hs, y, cfg.halting_beta, cfg.halting_prior)

        history = _train(self, job, setup, loss, others={"halting": (halting, cfg.halting_lr)})
        halting.eval()
        components = {"halting": halting, "prior_lambda": cfg.halting_prior}
        return _finish(job, self.name, heads, encoder, {self.name: history}, components=components)


@TRAINING_METHODS.register("pondernet")
class PonderNetMethod(_Ponder):
    """PonderNet: a linear Lambda layer on h_i and the classifier, trained with the encoder (sampling exit)."""

    name = "pondernet"
    exit_policies = ("pondernet",)
    kind = "linear"


@TRAINING_METHODS.register("palbert")
class PALBERTMethod(_Ponder):
    """PALBERT: a 3-layer tanh Lambda MLP on [h_i, h_{i-1}] with its own learning rate (Q-exit)."""

    name = "palbert"
    exit_policies = ("qexit", "pondernet")
    kind = "mlp"


@dataclass(frozen=True)
class SLFConfig(FineTuneConfig):
    component: ClassVar[str] = "Sequential Layer Focus"
    focus_epochs: int = option(1, "SLF stage 1: epochs per layer in focus.", ge=1)


def layer_parameters(model: nn.Module) -> list[list[nn.Parameter]]:
    """The encoder parameters of each layer 1..L (ALBERT: the shared group each layer runs)."""
    return [list(block.parameters()) for block in LayerStepper(model).blocks]


def slf_phases(heads: OffRampHeads, blocks: list[list[nn.Parameter]], focus_epochs: int, epochs: int) -> list[Phase]:
    """SLF's phases: layer k in focus (its off-ramp's loss; only block k and off-ramp k updated) for
    k = 1..L, then all layers jointly (the sum of the losses, everything updated)."""
    regression = heads.regression

    def focus_loss(k: int) -> Any:
        def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
            out = heads.ramps[k](hs[k + 1][:, 0])[:, None]
            return per_layer_loss(out, y, regression).mean()

        return loss

    phases = [
        Phase(
            f"slf focus layer {k + 1}",
            focus_epochs,
            focus_loss(k),
            trainable=lambda k=k: [*blocks[k], *heads.ramps[k].parameters()],
        )
        for k in range(heads.n_layers)
    ]
    phases.append(Phase("slf joint", epochs, lambda hs, y, step: sum_loss(heads, hs, y)))
    return phases


@TRAINING_METHODS.register("slf")
class SLFMethod(_FineTuning):
    """BERTer's Sequential Layer Focus: each layer in turn with its off-ramp, then everything jointly."""

    name = "slf"
    exit_policies = ("confidence",)
    config_class = SLFConfig

    def train(self, job: TrainingJob) -> Trained:
        heads, encoder, tok, common = self._setup(job)
        cfg: Any = self.options
        blocks = layer_parameters(encoder)
        if len(blocks) != heads.n_layers:
            raise ProbekitError(f"slf: the encoder has {len(blocks)} blocks for {heads.n_layers} off-ramps")
        phases = slf_phases(heads, blocks, cfg.focus_epochs, cfg.n_epochs(finetune=True))
        history = _train(self, job, (heads, encoder, tok, common), phases)
        return _finish(job, self.name, heads, encoder, {"slf": history})


@TRAINING_METHODS.register("smart-alternating", aliases=("smart_alternating", "alternating"))
class SmartAlternatingMethod(_FineTuning):
    """BERTer's Smart Alternating: per epoch the sum of all layers' losses, or the last layer's alone once
    the last off-ramp's held-out score fell below its best (then back to all once it recovers)."""

    name = "smart-alternating"
    exit_policies = ("confidence",)

    def train(self, job: TrainingJob) -> Trained:
        if HELDOUT not in job.data.splits:
            raise ProbekitError(
                "smart-alternating switches its loss on the held-out split's score; use {holdout} > 0",
                params=("holdout",),
            )
        heads, encoder, tok, common = self._setup(job)
        held = job.data.splits[HELDOUT]
        metric = (M.task_metrics(job.data.task) or ["acc"])[0]
        if heads.regression and metric not in M.REGRESSION_METRICS:
            metric = "pearson"
        extra: dict[str, Any] = {"loss": "all", "best": None, "losses": []}

        def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
            return last_loss(heads, hs, y) if extra["loss"] == "last" else sum_loss(heads, hs, y)

        def on_epoch(epoch: int, state: dict[str, Any]) -> None:
            score = self._held_score(job, encoder, heads, held, metric)
            best = state["best"]
            state["losses"] = [*state["losses"], state["loss"]]
            state["loss"] = "last" if best is not None and score < best else "all"
            state["best"] = score if best is None else max(best, score)
            encoder.train()
            heads.train()

        history = _train(self, job, (heads, encoder, tok, common), loss, on_epoch=on_epoch, extra=extra)
        return _finish(job, self.name, heads, encoder, {"smart-alternating": history, "losses": extra["losses"]})

    @staticmethod
    def _held_score(job: TrainingJob, encoder: nn.Module, heads: OffRampHeads, held: Any, metric: str) -> float:
        """The last off-ramp's ``metric`` on the held-out split (eval mode, no gradient; the encoder is left
        trainable: a ``Backbone`` would freeze it)."""
        bb = job.backbone
        tok = tokenize(bb.tokenizer, held.texts, held.text_pairs, job.max_length)
        pad = int(bb.tokenizer.pad_token_id)
        names = bb.input_names or ("input_ids", "attention_mask", "token_type_ids")
        encoder.eval()
        heads.eval()
        preds = np.zeros(len(held), dtype=np.float64 if heads.regression else np.int64)
        with torch.no_grad():
            for idx in plan_batches(tok.lengths, batch_size=64):
                batch = {k: v for k, v in collate(tok, idx, pad, bb.device).items() if k in names}
                last = encoder(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1][:, 0]
                preds[idx] = np.asarray(predict(heads.ramps[-1](last).cpu(), heads.regression))
        return float(M.score([metric], held.labels, preds)[metric])
