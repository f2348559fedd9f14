"""Training kernels of the off-ramps: on fixed states, and with the encoder.

- :func:`fit_heads`: off-ramps trained on fixed first-token states (the ``frozen`` method, and
  DeeBERT's stage 2, :func:`deebert_stage2`);
- :func:`train_encoder_with_offramps`: a trainable copy of the encoder (the frozen ``Backbone`` is
  never touched) and off-ramps trained together on the sum of their losses (DeeBERT's stage 1, and
  the ``joint`` method), with AdamW, linear warm-up and decay, gradient clipping and a fixed seed;
  it checkpoints every ``checkpoint_every`` steps (safetensors + JSON, :mod:`probekit.offramp.checkpoint`)
  and resumes after an interruption by the resume rule of :mod:`probekit.fingerprint`.

The training methods built from them (``frozen``, ``deebert``, ``joint``) are components of
:data:`probekit.offramp.methods.TRAINING_METHODS`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probekit.backbone import Backbone
from probekit.config import Config, option
from probekit.cpu import cpu_threads
from probekit.data import Split
from probekit.encoding import Tokenized, collate, encode
from probekit.errors import ProbekitError
from probekit.fingerprint import STAMP, resume_rule, write_stamp
from probekit.io import remove_tree
from probekit.offramp import checkpoint as ckpt
from probekit.offramp.heads import OffRampHeads, per_layer_loss


@dataclass(frozen=True)
class TrainConfig(Config):
    """Optimisation settings of the off-ramps (``epochs=None``: 5 for frozen off-ramps, 2 when fine-tuning).

    Every training method (:mod:`probekit.offramp.methods`) takes these; each sets its own ``epochs``."""

    component: ClassVar[str] = "the off-ramp training"

    epochs: int | None = option(None, "Epochs (default 5 frozen, 2 fine-tuning).", ge=1)
    batch_size: int = option(32, "Batch size when fine-tuning the encoder (every method but frozen).", ge=1)
    head_batch_size: int = option(128, "Batch size of off-ramps on fixed states (frozen, deebert stage 2).", ge=1)
    lr: float = option(3e-5, "Encoder learning rate (every method but frozen).", gt=0)
    head_lr: float = option(1e-3, "Off-ramp learning rate.", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay.", ge=0)
    warmup: float = option(0.1, "Fraction of the fine-tuning steps with a linear learning-rate warm-up.", ge=0, le=1)
    dropout: float = option(0.1, "Dropout of the off-ramps.", ge=0, lt=1)
    max_grad_norm: float = option(1.0, "Gradient clipping when fine-tuning.", gt=0)
    seed: int = option(0, "Seed of initialisation and training order (the run's seed overrides it).", ge=0, cli=False)
    checkpoint_every: int = option(100, "Fine-tuning steps between checkpoints.", ge=1)
    head_threads: int = option(1, "CPU threads when training off-ramps on fixed states (0 = the run's).", ge=0)

    def n_epochs(self, finetune: bool) -> int:
        return self.epochs if self.epochs is not None else (2 if finetune else 5)


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    warm = int(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a pure function of seed and epoch, so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit_heads(
    heads: OffRampHeads,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    cfg: TrainConfig,
    ramps: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "off-ramps",
    standardize: bool = True,
) -> list[float]:
    """Train off-ramps (``ramps``: 0-based indices, default all) on fixed first-token states.

    ``features`` are the states of layers 1..L ([N, L, D]); with ``standardize`` each trained off-ramp
    first standardises its input with these states' statistics (see :class:`OffRamp`); the other
    off-ramps are not touched. On a CPU it runs single-threaded (``cfg.head_threads``): the heads are a
    few small matrix products per step, and on a shared CPU a second thread mostly waits for the first
    (measured: 60 steps/s with 1 thread against 22 with 2 beside one busy process; ``bench/offramp_heads.py``).
    """
    device = next(heads.parameters()).device
    threads = cfg.head_threads if device.type == "cpu" else None
    with cpu_threads(threads or None):
        return _fit_heads(heads, features, labels, cfg, ramps, progress, desc, standardize)


def _fit_heads(
    heads: OffRampHeads,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    cfg: TrainConfig,
    ramps: Sequence[int] | None,
    progress: bool,
    desc: str,
    standardize: bool,
) -> list[float]:
    ramps = list(range(heads.n_layers)) if ramps is None else list(ramps)
    feats = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: caches are read-only maps
    if standardize:
        for i in ramps:
            heads.ramps[i].standardize(feats[:, i])
    y = torch.as_tensor(np.asarray(labels))
    params = [p for i in ramps for p in heads.ramps[i].parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    epochs = cfg.n_epochs(finetune=False)
    steps_per_epoch = -(-len(feats) // cfg.head_batch_size)
    sched = _schedule(opt, epochs * steps_per_epoch, 0.0)
    device = next(heads.parameters()).device
    torch.manual_seed(cfg.seed)
    heads.train()
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False, unit="step")
    for epoch in range(epochs):
        order = torch.from_numpy(_order(len(feats), cfg.seed, epoch))
        total = 0.0
        for idx in order.split(cfg.head_batch_size):
            x = feats[idx].to(device)
            out = torch.stack([heads.ramps[i](x[:, i]) for i in ramps], dim=1)
            loss = per_layer_loss(out, y[idx].to(device), heads.regression).mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update()
        history.append(total / len(feats))
    bar.close()
    heads.eval()
    return history


def trainable_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of a (frozen) encoder with gradients on, in training mode."""
    enc = copy.deepcopy(model).float()
    enc.requires_grad_(True)
    enc.train()
    return enc


@dataclass
class Phase:
    """One stretch of a fine-tuning: ``epochs`` over the data with its own loss and learning-rate schedule.

    ``loss(hidden_states, labels, step)`` -> a scalar (``step``: 1-based within the whole training);
    ``trainable``: the only parameters this phase updates (None: all of the optimizer's; the others'
    gradients are dropped, so AdamW leaves them bit for bit as they are)."""

    name: str
    epochs: int
    loss: Callable[[Sequence[torch.Tensor], torch.Tensor, int], torch.Tensor]
    trainable: Callable[[], list[nn.Parameter]] | None = None


def train_encoder_with_offramps(
    model: nn.Module,
    heads: OffRampHeads,
    tok: Tokenized,
    labels: np.ndarray,
    pad_id: int,
    cfg: TrainConfig,
    ramps: Sequence[int] | None = None,
    input_names: Sequence[str] = (),
    checkpoint: Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "fine-tune",
    key_extra: dict[str, Any] | None = None,
    fresh: bool = False,
) -> list[float]:
    """Train the encoder and off-ramps ``ramps`` (default all) on the sum of those off-ramps' losses.

    With ``checkpoint`` (a folder, :mod:`probekit.offramp.checkpoint`), the state is saved there every
    ``cfg.checkpoint_every`` steps and at the end. By the resume rule (:mod:`probekit.fingerprint`), a run
    with the same settings and inputs (the data, and ``key_extra``, e.g. the starting weights' fingerprint)
    resumes from it (a finished one only loads its final state); other settings are refused with a
    :class:`~probekit.errors.ResumeError`, unless ``fresh`` (then it starts over).
    """
    ramps = list(range(heads.n_layers)) if ramps is None else list(ramps)
    regression = heads.regression

    def loss(hs: Sequence[torch.Tensor], y: torch.Tensor, step: int) -> torch.Tensor:
        out = torch.stack([heads.ramps[i](hs[i + 1][:, 0]) for i in ramps], dim=1)
        return per_layer_loss(out, y, regression).mean(0).sum()

    head_params = [p for i in ramps for p in heads.ramps[i].parameters()]
    phases = [Phase(desc, cfg.n_epochs(finetune=True), loss)]
    return train_phases(
        model,
        nn.ModuleDict({"heads": heads}),
        [(head_params, cfg.head_lr)],
        phases,
        tok,
        labels,
        pad_id,
        cfg,
        input_names=input_names,
        checkpoint=checkpoint,
        device=device,
        progress=progress,
        key_extra={**(key_extra or {}), "ramps": ramps, "desc": desc},
        fresh=fresh,
    )


def train_phases(
    model: nn.Module,
    modules: nn.ModuleDict,
    groups: Sequence[tuple[list[nn.Parameter], float]],
    phases: Sequence[Phase],
    tok: Tokenized,
    labels: np.ndarray,
    pad_id: int,
    cfg: TrainConfig,
    input_names: Sequence[str] = (),
    checkpoint: Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    key_extra: dict[str, Any] | None = None,
    fresh: bool = False,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[float]:
    """The fine-tuning kernel of every method: the encoder (learning rate ``cfg.lr``) and ``modules``
    (off-ramps, LTE, halting layers; their parameter ``groups`` with their own learning rates) trained by
    AdamW through ``phases`` one after another, each with linear warm-up and decay, gradient clipping and
    a fixed seed; checkpointed and resumed as :func:`train_encoder_with_offramps` says.

    ``on_epoch(epoch, extra)`` runs after each epoch (0-based, counted over all phases) with ``extra``, a
    JSON dict saved in the checkpoint and restored on resume (e.g. Smart Alternating's choice of loss for
    the next epoch); pass your own dict as ``extra`` to read it from the losses."""
    device = torch.device(device)
    model.to(device).train()
    modules.to(device).train()
    y = torch.as_tensor(np.asarray(labels))
    names = tuple(input_names) or ("input_ids", "attention_mask", "token_type_ids")
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
        + [{"params": params, "lr": lr} for params, lr in groups],
        weight_decay=cfg.weight_decay,
    )
    n = len(tok.lengths)
    steps_per_epoch = -(-n // cfg.batch_size)
    bounds = np.cumsum([0] + [ph.epochs * steps_per_epoch for ph in phases])
    total_steps = int(bounds[-1])
    sched = _phase_schedule(opt, bounds, cfg.warmup)
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tok.input_ids]) if n else np.zeros(0, np.int64)
    data_hash = hashlib.sha256(ids.tobytes() + tok.lengths.tobytes() + np.ascontiguousarray(labels).tobytes())
    settings = {
        "train": {**cfg.to_dict(), "epochs": phases[-1].epochs, "checkpoint_every": None},
        "phases": [ph.name for ph in phases],
        "n": n,
    }
    inputs = {"data": data_hash.hexdigest(), "start": dict(key_extra or {})}
    torch.manual_seed(cfg.seed)
    step, history = 0, []
    extra = extra if extra is not None else {}
    state = _resume(checkpoint, settings, inputs, fresh)
    if state is not None:
        model.load_state_dict(state["model"])
        for name, module in modules.items():
            module.load_state_dict(state["heads"] if name == "heads" else state["modules"][name])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        step, history = int(state["step"]), list(state["history"])
        extra.update(state.get("extra") or {})
    bar = tqdm(total=total_steps, initial=step, disable=not progress, leave=False, unit="step")
    running = 0.0
    while step < total_steps:
        p = int(np.searchsorted(bounds, step, side="right")) - 1
        phase = phases[p]
        bar.set_description(phase.name)
        epoch, within = divmod(step, steps_per_epoch)
        order = _order(n, cfg.seed, epoch)
        idx = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
        batch = collate(tok, idx, pad_id, device)
        batch_inputs = {k: v for k, v in batch.items() if k in names}
        hs = model(**batch_inputs, output_hidden_states=True, return_dict=True).hidden_states
        loss = phase.loss(hs, y[idx].to(device), step + 1)
        opt.zero_grad()
        loss.backward()
        params = [q for g in opt.param_groups for q in g["params"]]
        if phase.trainable is not None:
            keep = {id(q) for q in phase.trainable()}
            for q in params:
                if id(q) not in keep:
                    q.grad = None
            params = [q for q in params if id(q) in keep]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        running += loss.item()
        bar.update()
        if step % steps_per_epoch == 0 or step == total_steps:
            history.append(running / (within + 1))
            running = 0.0
            if on_epoch is not None:
                on_epoch(epoch, extra)
        if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == total_steps):
            _save_checkpoint(checkpoint, step, history, model, modules, opt, sched, extra)
    bar.close()
    model.eval()
    modules.eval()
    return history


def _phase_schedule(opt: torch.optim.Optimizer, bounds: np.ndarray, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of each phase's steps, then linear decay to 0, phase by phase."""

    def factor(step: int) -> float:
        p = min(int(np.searchsorted(bounds, step, side="right")) - 1, len(bounds) - 2)
        start, total = int(bounds[p]), int(bounds[p + 1] - bounds[p])
        warm, at = int(total * warmup), step - start
        if at < warm:
            return (at + 1) / warm
        return max(0.0, (total - at) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _resume(
    folder: Path | None, settings: dict[str, Any], inputs: dict[str, Any], fresh: bool
) -> dict[str, Any] | None:
    """The saved state to resume from (None: start), by the resume rule on the checkpoint folder's stamp."""
    if folder is None:
        return None
    decision = resume_rule(folder, settings, inputs, fresh=fresh, what="an off-ramp checkpoint")
    if decision == "new" and ckpt.exists(folder):  # a saved state whose stamp is gone or unreadable
        raise ProbekitError(
            f"the checkpoint {folder} has no readable {STAMP}; remove it or rerun with {{fresh}} to start over",
            params=("fresh",),
        )
    if decision == "reuse":
        return ckpt.load(folder) if ckpt.exists(folder) else None  # stamped, interrupted before the first save
    if decision == "fresh":
        remove_tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_stamp(folder, settings, inputs)
    return None


def _save_checkpoint(
    folder: Path,
    step: int,
    history: list[float],
    model: nn.Module,
    modules: nn.ModuleDict,
    opt: torch.optim.Optimizer,
    sched: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    ckpt.save(
        folder,
        {
            "step": step,
            "history": history,
            "model": model.state_dict(),
            "heads": modules["heads"].state_dict(),
            "modules": {k: m.state_dict() for k, m in modules.items() if k != "heads"},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state().tolist(),
            "extra": dict(extra or {}),
        },
    )


def read_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The state saved in an off-ramp checkpoint folder: ``step``, ``history``, ``model``, ``heads``,
    ``optimizer``, ``scheduler``, ``rng`` (tensors as tensors, the rest as JSON values)."""
    return ckpt.load(folder)


def deebert_stage2(
    encoder: Backbone, heads: OffRampHeads, split: Split, cfg: TrainConfig, max_length: int = 128, progress: bool = True
) -> list[float]:
    """DeeBERT stage 2: with the stage-1 encoder frozen (a ``Backbone``) and its last off-ramp frozen,
    train off-ramps 1..L-1 on the encoder's first-token states of ``split``. The encoder and the last
    off-ramp are left exactly as they are (bit for bit). As DeeBERT's code does it: the states are the
    eval-mode (dropout-free) encoder's, unstandardised, and the off-ramps train for ``stage2_epochs``
    (default 5) at ``stage2_lr`` (1e-3) when ``cfg`` has them."""
    if hasattr(cfg, "stage2_epochs"):
        cfg = cfg.replace(epochs=cfg.stage2_epochs, head_lr=cfg.stage2_lr)
    if heads.n_layers < 2:
        raise ProbekitError("deebert mode needs an encoder with at least 2 layers")
    feats = encode(encoder, split.texts, split.text_pairs, pool="cls", max_length=max_length, progress=progress)
    last = heads.ramps[-1]
    last.requires_grad_(False)
    try:
        return fit_heads(
            heads,
            feats[:, 1:],
            split.labels,
            cfg,
            ramps=range(heads.n_layers - 1),
            progress=progress,
            desc="deebert stage 2",
            standardize=False,
        )
    finally:
        last.requires_grad_(True)
