"""The MLP probe: SentEval's ``nhid`` classifier, every layer and regularisation value at once.

SentEval's ``MLP`` (``senteval/tools/classifier.py``) is ``Linear(D, nhid) -> Dropout ->
Sigmoid -> Linear(nhid, classes)`` trained with Adam (lr 1e-3) on the summed cross-entropy
of mini-batches of 64, with the L2 strength as Adam's (coupled) ``weight_decay`` from the
grid 1e-5, 1e-4, 1e-3, 1e-2. Every ``epoch_size`` epochs it scores the dev split, keeps the
best model so far, and stops after ``tenacity`` checks without improvement (its counter is
never reset, which is kept here) or at ``max_epoch``. The selected grid value is then the
one with the best dev accuracy, as for the linear probe.

Here the problems (layer x label set x weight decay) are trained together: the first
layer's weights are [layers, features, problems x nhid] so that one batched product per
step serves every problem of a layer, and the loss is the sum of the problems' losses
(independent parameters, so each gets its own gradient; Adam is element-wise). All
problems see the same mini-batch order, as SentEval's runs with one seed would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from probekit.config import option
from probekit.errors import ProbekitError
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind


@dataclass(frozen=True)
class MLPConfig(KindConfig):
    """Options of the MLP probe (SentEval's classifier and its defaults)."""

    component: ClassVar[str] = "the MLP probe"
    grid: tuple[float, ...] = option(
        (1e-5, 1e-4, 1e-3, 1e-2), "Comma-separated weight decay grid (L2 strength), selected on dev.", gt=0
    )
    nhid: int = option(50, "Hidden units.", ge=1)
    dropout: float = option(0.1, "Dropout on the hidden layer.", ge=0, lt=1)
    batch_size: int = option(64, "Mini-batch size.", ge=1)
    lr: float = option(1e-3, "Adam learning rate.", gt=0)
    epoch_size: int = option(4, "Epochs between two dev checks.", ge=1)
    tenacity: int = option(5, "Dev checks without improvement before stopping.", ge=0)
    max_epoch: int = option(200, "Epoch limit (it stops early on dev before).", ge=1)


@PROBE_KINDS.register("mlp")
class MLPProbe(ProbeKind):
    """SentEval's MLP: one hidden sigmoid layer with dropout, early-stopped on dev."""

    Config = MLPConfig
    reg_name = "weight_decay"
    step_name = "epoch"
    limit_option = "max_epoch"
    fixed_settings: ClassVar[dict[str, Any]] = {"optim": "adam"}
    config: MLPConfig

    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> MLPProbe:
        if dev is None:
            raise ProbekitError("the MLP probe stops early on the dev split; pass dev=(X_dev, y_dev)")
        n_layers, n, d = X.shape
        device, dtype = X.device, X.dtype
        self.n_sets_ = Y.shape[0]
        g = len(self.grid)
        q, h, k = self.n_sets_ * g, self.config.nhid, n_classes
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        # nn.Linear's default initialisation, drawn in a fixed order from the seeded generator
        b1, b2 = 1 / math.sqrt(d), 1 / math.sqrt(h)
        params = [
            _uniform(gen, (n_layers, d, q * h), b1),  # w1: [L, D, Q*H]
            _uniform(gen, (n_layers, 1, q * h), b1),  # b1
            _uniform(gen, (n_layers * q, h, k), b2),  # w2: [L*Q, H, K]
            _uniform(gen, (n_layers * q, 1, k), b2),  # b2
        ]
        params = [p.to(device=device, dtype=dtype).requires_grad_() for p in params]
        decay = torch.tensor(self.grid, dtype=dtype, device=device).repeat(self.n_sets_)  # [Q]
        decays = [
            decay.repeat_interleave(h)[None, None, :],
            decay.repeat_interleave(h)[None, None, :],
            decay.repeat(n_layers)[:, None, None],
            decay.repeat(n_layers)[:, None, None],
        ]
        opt = torch.optim.Adam(params, lr=self.config.lr)
        drop_gen = torch.Generator(device=device).manual_seed(self.seed + 1)
        sets = torch.arange(q, device=device) // g
        targets = Y[sets]  # [Q, N]
        x_dev, y_dev = dev
        best_acc = torch.full((n_layers, q), -1.0, device=device)
        best = [p.detach().clone() for p in params]
        strikes = torch.zeros(n_layers, q, dtype=torch.long, device=device)
        running = torch.ones(n_layers, q, dtype=torch.bool, device=device)
        epochs = torch.zeros(n_layers, q, dtype=torch.long, device=device)
        epoch = 0
        while bool(running.any()) and epoch <= self.config.max_epoch:
            for _ in range(self.config.epoch_size):
                order = torch.randperm(n, generator=gen).to(device)
                for i in range(0, n, self.config.batch_size):
                    idx = order[i : i + self.config.batch_size]
                    logits = self._forward(params, X[:, idx], train=True, gen=drop_gen)  # [L, Q, B, K]
                    yb = targets[:, idx].expand(n_layers, -1, -1)
                    loss = F.cross_entropy(logits.reshape(-1, k), yb.reshape(-1), reduction="sum")
                    opt.zero_grad(set_to_none=False)
                    loss.backward()
                    with torch.no_grad():
                        for p, wd in zip(params, decays, strict=True):
                            p.grad.add_(p * wd)  # Adam's coupled weight decay, one strength per problem
                    opt.step()
            epoch += self.config.epoch_size
            epochs += running.long() * self.config.epoch_size
            acc = (self._predict_with(params, x_dev) == y_dev).float().mean(-1)  # [L, Q]
            better = running & (acc > best_acc)
            best_acc = torch.where(better, acc, best_acc)
            with torch.no_grad():
                for b, p in zip(best, params, strict=True):
                    b.copy_(torch.where(_expand_mask(better, p, n_layers, q, h), p, b))
            worse = running & ~better
            stop = worse & (strikes >= self.config.tenacity)
            strikes += worse.long()
            running &= ~stop
            if callback is not None:
                callback(epoch, int(running.sum()))
        self.params_ = best
        self.n_iter_ = epochs.view(n_layers, self.n_sets_, g)
        self.not_converged_ = int(running.sum())
        return self

    def _forward(
        self, params: list[torch.Tensor], x: torch.Tensor, train: bool = False, gen: torch.Generator | None = None
    ) -> torch.Tensor:
        """Logits [L, Q, B, K] for inputs ``x`` [L, B, D]."""
        w1, b1, w2, b2 = params
        n_layers, b, _ = x.shape
        q, h = w1.shape[2] // self.config.nhid, self.config.nhid
        hid = torch.baddbmm(b1, x, w1)  # [L, B, Q*H]
        if train and self.config.dropout > 0:
            keep = torch.rand(hid.shape, generator=gen, device=hid.device) >= self.config.dropout
            hid = hid * keep / (1 - self.config.dropout)
        hid = torch.sigmoid(hid).view(n_layers, b, q, h).permute(0, 2, 1, 3).reshape(n_layers * q, b, h)
        return torch.baddbmm(b2, hid, w2).view(n_layers, q, b, -1)

    def _predict_with(self, params: list[torch.Tensor], X: torch.Tensor, block: int = 4096) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [self._forward(params, X[:, i : i + block]).argmax(-1) for i in range(0, X.shape[1], block)], dim=-1
            )

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        pred = self._predict_with(self.params_, X)  # [L, Q, M]
        return pred.view(X.shape[0], self.n_sets_, len(self.grid), -1)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _expand_mask(mask: torch.Tensor, p: torch.Tensor, n_layers: int, q: int, h: int) -> torch.Tensor:
    """Broadcast a per-problem mask [L, Q] onto a parameter tensor's layout."""
    if p.shape[0] == n_layers:  # w1/b1: [L, *, Q*H]
        return mask.repeat_interleave(h, dim=1)[:, None, :]
    return mask.reshape(n_layers * q)[:, None, None]  # w2/b2: [L*Q, *, K]
