"""Training the off-ramps three ways.

- ``frozen``: the encoder stays as it is; every off-ramp is trained on its layer's cached
  first-token states (``probekit extract --pool cls``). Cheap, and the probing view: what
  each layer of the pre-trained encoder makes linearly-ish decodable.
- ``deebert``: DeeBERT's two stages. Stage 1 fine-tunes the encoder with the last off-ramp
  (the usual fine-tuning); stage 2 freezes all of that and trains the other off-ramps on
  the fine-tuned encoder's states.
- ``joint``: encoder and all off-ramps trained together on the sum of their losses.

Fine-tuning works on a trainable copy of the encoder (the frozen ``Backbone`` is never
touched), with AdamW, linear warm-up and decay, gradient clipping and a fixed seed; it
checkpoints every ``checkpoint_every`` steps and resumes from the checkpoint after an
interruption (same settings only).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probekit.backbone import Backbone
from probekit.data import Split
from probekit.encoding import Tokenized, collate, encode
from probekit.errors import ProbekitError
from probekit.io import atomic_path, sha256_json
from probekit.offramp.heads import OffRamps, per_layer_loss

MODES = ("frozen", "deebert", "joint")


@dataclass
class TrainConfig:
    """Optimisation settings (``epochs=None``: 5 for frozen off-ramps, 2 when fine-tuning)."""

    epochs: int | None = None
    batch_size: int = 32
    """Batch size when fine-tuning the encoder."""
    head_batch_size: int = 128
    """Batch size when training off-ramps on fixed states (frozen, deebert stage 2)."""
    lr: float = 3e-5
    """Encoder learning rate (deebert stage 1, joint)."""
    head_lr: float = 1e-3
    """Off-ramp learning rate."""
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100

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
    heads: OffRamps,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    cfg: TrainConfig,
    ramps: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "off-ramps",
) -> list[float]:
    """Train off-ramps (``ramps``: 0-based indices, default all) on fixed first-token states.

    ``features`` are the states of layers 1..L ([N, L, D]); each trained off-ramp first standardises
    its input with these states' statistics (see :class:`OffRamp`); the other off-ramps are not touched.
    """
    ramps = list(range(heads.n_layers)) if ramps is None else list(ramps)
    feats = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: caches are read-only maps
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


def finetune(
    model: nn.Module,
    heads: OffRamps,
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
) -> list[float]:
    """Train the encoder and off-ramps ``ramps`` (default all) on the sum of those off-ramps' losses.

    With ``checkpoint``, the state is saved there every ``cfg.checkpoint_every`` steps and at the
    end, and a run with the same settings (and ``key_extra``, e.g. the starting weights' fingerprint)
    resumes from it; a finished one only loads its final state.
    """
    ramps = list(range(heads.n_layers)) if ramps is None else list(ramps)
    device = torch.device(device)
    model.to(device).train()
    heads.to(device).train()
    y = torch.as_tensor(np.asarray(labels))
    names = tuple(input_names) or ("input_ids", "attention_mask", "token_type_ids")
    head_params = [p for i in ramps for p in heads.ramps[i].parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    epochs = cfg.n_epochs(finetune=True)
    n = len(tok.lengths)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = epochs * steps_per_epoch
    sched = _schedule(opt, total_steps, cfg.warmup)
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tok.input_ids]) if n else np.zeros(0, np.int64)
    data_hash = hashlib.sha256(ids.tobytes() + tok.lengths.tobytes() + np.ascontiguousarray(labels).tobytes())
    data_hash = data_hash.hexdigest()
    key = sha256_json(
        {"cfg": asdict(cfg), "ramps": ramps, "n": n, "data": data_hash, "desc": desc, "start": dict(key_extra or {})}
    )
    torch.manual_seed(cfg.seed)
    step, history = 0, []
    state = _load_checkpoint(checkpoint, key)
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress, leave=False, unit="step")
    running = 0.0
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        order = _order(n, cfg.seed, epoch)
        idx = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
        batch = collate(tok, idx, pad_id, device)
        inputs = {k: v for k, v in batch.items() if k in names}
        hs = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
        out = torch.stack([heads.ramps[i](hs[i + 1][:, 0]) for i in ramps], dim=1)
        loss = per_layer_loss(out, y[idx].to(device), heads.regression).mean(0).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        running += loss.item()
        bar.update()
        if step % steps_per_epoch == 0 or step == total_steps:
            history.append(running / (within + 1))
            running = 0.0
        if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == total_steps):
            _save_checkpoint(checkpoint, key, step, history, model, heads, opt, sched)
    bar.close()
    model.eval()
    heads.eval()
    return history


def _load_checkpoint(path: Path | None, key: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a damaged checkpoint: start over
        return None
    return state if state.get("key") == key else None


def _save_checkpoint(
    path: Path,
    key: str,
    step: int,
    history: list[float],
    model: nn.Module,
    heads: OffRamps,
    opt: torch.optim.Optimizer,
    sched: Any,
) -> None:
    state = {
        "key": key,
        "step": step,
        "history": history,
        "model": model.state_dict(),
        "heads": heads.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def deebert_stage2(
    encoder: Backbone, heads: OffRamps, split: Split, cfg: TrainConfig, max_length: int = 128, progress: bool = True
) -> list[float]:
    """DeeBERT stage 2: with the stage-1 encoder frozen (a ``Backbone``) and its last off-ramp frozen,
    train off-ramps 1..L-1 on the encoder's first-token states of ``split``. The encoder and the last
    off-ramp are left exactly as they are (bit for bit)."""
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
        )
    finally:
        last.requires_grad_(True)
