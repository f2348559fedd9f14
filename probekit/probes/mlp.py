"""The MLP probe: SentEval's ``nhid`` classifier, every layer and regularisation value at once.

SentEval's ``MLP`` (``senteval/tools/classifier.py``) is ``Linear(D, nhid) -> Dropout ->
Sigmoid -> Linear(nhid, classes)``, or with ``nhid=0`` one ``Linear(D, classes)`` (logistic
regression, SentEval's default protocol), trained with Adam (lr 1e-3) on the cross-entropy of
mini-batches of 64 with the L2 strength as Adam's (coupled) ``weight_decay`` from the grid 1e-5,
1e-4, 1e-3, 1e-2. The loss is the batch **mean**: SentEval sets ``size_average = False`` on its
loss module after construction, which has had no effect since PyTorch 0.4.1. Every
``epoch_size`` epochs it scores the dev split, keeps the best model so far, and stops after
``tenacity`` checks without improvement (its counter is never reset, which is kept here) or
at ``max_epoch``. The selected grid value is then the one with the best dev accuracy.

SentEval's randomness is reproduced: every classifier re-seeds (``torch.manual_seed`` and
``np.random.seed`` with SentEval's seed, 1111 for run seed 0), so every layer and every grid value
starts from the same ``nn.Linear`` initialisation and sees the same sample permutations (one
``np.random.permutation`` per epoch) and, on the CPU, the same dropout masks; ``fit(order=...)``
gives the row order those permutations index (SentEval sorts each split by sentence length and
label, :func:`probekit.senteval.senteval_order`). The same seed then gives SentEval's numbers.

Here the problems (layer x label set x weight decay) are trained together: the first
layer's weights are [layers, features, problems x nhid] so that one batched product per
step serves every problem of a layer, and the loss is the sum of the problems' mean losses
(independent parameters, so each gets its own gradient; Adam is element-wise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probekit.config import option
from probekit.errors import ProbekitError
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind

SENTEVAL_SEED = 1111
"""SentEval's default seed (``params.seed``); run seed ``s`` uses ``base_seed + s``."""


@dataclass(frozen=True)
class MLPConfig(KindConfig):
    """Options of the MLP probe (SentEval's classifier and its defaults)."""

    component: ClassVar[str] = "the MLP probe"
    grid: tuple[float, ...] = option(
        (1e-5, 1e-4, 1e-3, 1e-2), "Comma-separated weight decay grid (L2 strength), selected on dev.", gt=0
    )
    nhid: int = option(50, "Hidden units (0: logistic regression, SentEval's default classifier).", ge=0)
    dropout: float = option(0.0, "Dropout on the hidden layer (SentEval's default: 0).", ge=0, lt=1)
    batch_size: int = option(64, "Mini-batch size.", ge=1)
    lr: float = option(1e-3, "Adam learning rate.", gt=0)
    epoch_size: int = option(4, "Epochs between two dev checks.", ge=1)
    tenacity: int = option(5, "Dev checks without improvement before stopping.", ge=0)
    max_epoch: int = option(200, "Epoch limit (it stops early on dev before).", ge=1)
    max_rounds: int = option(
        0, "Stop after this many dev checks (0: no limit; 1: Jawahar et al.'s released code).", ge=0
    )
    base_seed: int = option(SENTEVAL_SEED, "SentEval's classifier seed for run seed 0 (seed s: base_seed + s).", ge=0)


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
        order: Any = None,
    ) -> MLPProbe:
        """As :meth:`ProbeKind.fit`; ``order``: the train rows in SentEval's order (row ``order[j]`` is
        SentEval's ``j``-th; default the given order)."""
        if dev is None:
            raise ProbekitError("the MLP probe stops early on the dev split; pass dev=(X_dev, y_dev)")
        cfg = self.config
        n_layers, n, d = X.shape
        device, dtype = X.device, X.dtype
        self.n_sets_ = Y.shape[0]
        g = len(self.grid)
        q, h, k = self.n_sets_ * g, cfg.nhid, n_classes
        seed = cfg.base_seed + self.seed
        rows = torch.arange(n, device=device) if order is None else torch.as_tensor(order, device=device).long()
        if rows.shape != (n,):
            raise ProbekitError(f"order must hold the {n} train rows, got {tuple(rows.shape)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # SentEval's PyTorchClassifier.__init__, then nn.Linear's initialisation
            first = nn.Linear(d, h or k)
            second = nn.Linear(h, k) if h else None
            params = self._replicate(first, second, n_layers, q)
            params = [p.to(device=device, dtype=dtype).requires_grad_() for p in params]
            self._train(params, X, Y, rows, n_classes, dev, callback, seed)
        return self

    def _replicate(self, first: nn.Linear, second: nn.Linear | None, n_layers: int, q: int) -> list[torch.Tensor]:
        """One copy of SentEval's freshly initialised model per problem, in the batched layout."""
        with torch.no_grad():
            w1 = first.weight.t().repeat(1, q)[None].repeat(n_layers, 1, 1)  # [L, D, Q*H]
            b1 = first.bias.repeat(q)[None, None].repeat(n_layers, 1, 1)  # [L, 1, Q*H]
            if second is None:
                return [w1, b1]
            w2 = second.weight.t()[None].repeat(n_layers * q, 1, 1)  # [L*Q, H, K]
            b2 = second.bias[None, None].repeat(n_layers * q, 1, 1)  # [L*Q, 1, K]
            return [w1, b1, w2, b2]

    def _train(
        self,
        params: list[torch.Tensor],
        X: torch.Tensor,
        Y: torch.Tensor,
        rows: torch.Tensor,
        k: int,
        dev: tuple[torch.Tensor, torch.Tensor],
        callback: Callable[[int, int], None] | None,
        seed: int,
    ) -> None:
        cfg = self.config
        n_layers, n, _ = X.shape
        device, dtype = X.device, X.dtype
        g = len(self.grid)
        q, h = self.n_sets_ * g, cfg.nhid
        width = h or k
        decay = torch.tensor(self.grid, dtype=dtype, device=device).repeat(self.n_sets_)  # [Q]
        decays = [decay.repeat_interleave(width)[None, None, :]] * 2
        if h:
            decays += [decay.repeat(n_layers)[:, None, None]] * 2
        linear = not h  # logistic regression: hand-written gradient, fused Adam (no autograd)
        opt = None if linear else torch.optim.Adam(params, lr=cfg.lr)
        step = _LinearStep(params, decays[0], cfg.lr, k) if linear else None
        if step is not None:
            params = step.params  # views of the step's one parameter buffer
        perm_rng = np.random.RandomState(seed)  # SentEval's np.random.seed(seed)
        sets = torch.arange(q, device=device) // g
        targets = Y[sets]  # [Q, N]
        onehot = F.one_hot(Y, k).to(dtype).permute(1, 0, 2)[:, sets].reshape(n, q * k) if linear else None  # [N, Q*K]
        x_dev, y_dev = dev
        best_acc = torch.full((n_layers, q), -1.0, device=device)
        best = [p.detach().clone() for p in params]
        strikes = torch.zeros(n_layers, q, dtype=torch.long, device=device)
        running = torch.ones(n_layers, q, dtype=torch.bool, device=device)
        epochs = torch.zeros(n_layers, q, dtype=torch.long, device=device)
        epoch, rounds = 0, 0
        while bool(running.any()) and epoch <= cfg.max_epoch:
            for _ in range(cfg.epoch_size):
                order = rows[torch.from_numpy(perm_rng.permutation(n)).to(device)]
                for i in range(0, n, cfg.batch_size):
                    idx = order[i : i + cfg.batch_size]
                    mask = None
                    if h and cfg.dropout > 0:  # SentEval's nn.Dropout on the CPU: one bernoulli_ draw per batch
                        mask = torch.empty(len(idx), h).bernoulli_(1 - cfg.dropout).div_(1 - cfg.dropout)
                        mask = mask.to(device=device, dtype=dtype).repeat(1, q)[None]
                    xb = X.index_select(1, idx)  # [L, B, D]; index_select, not X[:, idx] (8x slower on the CPU)
                    if step is not None:
                        step(xb, onehot.index_select(0, idx))  # type: ignore[union-attr]
                        continue
                    logits = self._forward(params, xb, mask=mask)  # [L, Q, B, K]
                    yb = targets[:, idx].expand(n_layers, -1, -1)
                    loss = F.cross_entropy(logits.reshape(-1, k), yb.reshape(-1), reduction="sum") / len(idx)
                    opt.zero_grad(set_to_none=False)  # type: ignore[union-attr]
                    loss.backward()
                    with torch.no_grad():
                        for p, wd in zip(params, decays, strict=True):
                            p.grad.add_(p * wd)  # Adam's coupled weight decay, one strength per problem
                    opt.step()  # type: ignore[union-attr]
            epoch += cfg.epoch_size
            rounds += 1
            epochs += running.long() * cfg.epoch_size
            acc = (self._predict_with(params, x_dev) == y_dev).float().mean(-1)  # [L, Q]
            better = running & (acc > best_acc)
            best_acc = torch.where(better, acc, best_acc)
            with torch.no_grad():
                for j, (b, p) in enumerate(zip(best, params, strict=True)):
                    b.copy_(torch.where(_expand_mask(better, j, n_layers, q, width), p, b))
            worse = running & ~better
            stop = worse & (strikes >= cfg.tenacity)
            strikes += worse.long()
            running &= ~stop
            if callback is not None:
                callback(epoch, int(running.sum()))
            if cfg.max_rounds and rounds >= cfg.max_rounds:
                running[:] = False  # a documented stop, not the limit
        self.params_ = best
        self.n_iter_ = epochs.view(n_layers, self.n_sets_, g)
        self.not_converged_ = int(running.sum())

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [L, Q, B, K] for inputs ``x`` [L, B, D] (``mask``: the dropout multipliers [1, B, Q*H])."""
        n_layers, b, _ = x.shape
        if len(params) == 2:  # nhid = 0: logistic regression
            w, bias = params
            z = batched_matmul(x, w).add_(bias)  # [L, B, Q*K]
            return z.view(n_layers, b, -1, self._k(params)).transpose(1, 2)
        w1, b1, w2, b2 = params
        q, h = w1.shape[2] // self.config.nhid, self.config.nhid
        hid = torch.baddbmm(b1, x, w1)  # [L, B, Q*H]
        if mask is not None:
            hid = hid * mask
        hid = torch.sigmoid(hid).view(n_layers, b, q, h).permute(0, 2, 1, 3).reshape(n_layers * q, b, h)
        return torch.baddbmm(b2, hid, w2).view(n_layers, q, b, -1)

    def _k(self, params: list[torch.Tensor]) -> int:
        return params[0].shape[2] // (self.n_sets_ * len(self.grid))

    def _predict_with(self, params: list[torch.Tensor], X: torch.Tensor, block: int = 4096) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [self._forward(params, X[:, i : i + block]).argmax(-1) for i in range(0, X.shape[1], block)], dim=-1
            )

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits [L, S, G, K, M] of the selected (best-on-dev) state of every problem on ``X`` [L, M, D]."""
        with torch.no_grad():
            z = self._forward(self.params_, X)  # [L, Q, M, K]
        return z.view(X.shape[0], self.n_sets_, len(self.grid), X.shape[1], -1).transpose(3, 4)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        pred = self._predict_with(self.params_, X)  # [L, Q, M]
        return pred.view(X.shape[0], self.n_sets_, len(self.grid), -1)


class _LinearStep:
    """One Adam step of every logistic-regression problem on a mini-batch, written out: the gradient of the mean
    cross-entropy (``(softmax - onehot) / B``) plus the coupled weight decay, then ``torch.optim.Adam``'s fused
    update. Weights [L, D, Q*K] and biases [L, 1, Q*K] are views of one buffer, so the update is one kernel."""

    def __init__(self, params: list[torch.Tensor], decay: torch.Tensor, lr: float, k: int) -> None:
        w, b = (p.detach() for p in params)
        self.buf = torch.cat([w, b], dim=1)  # [L, D + 1, Q*K]
        self.buf.grad = torch.zeros_like(self.buf)
        self.params = [self.buf[:, :-1], self.buf[:, -1:]]
        self.grads = [self.buf.grad[:, :-1], self.buf.grad[:, -1:]]
        self.decay, self.k = decay, k
        self.opt = torch.optim.Adam([self.buf], lr=lr, fused=self.buf.device.type in ("cpu", "cuda"))

    def __call__(self, x: torch.Tensor, onehot: torch.Tensor) -> None:
        n_layers, b, _ = x.shape
        w, bias = self.params
        z = batched_matmul(x, w).add_(bias).view(n_layers, b, -1, self.k)  # [L, B, Q, K]
        e = z.sub_(z.amax(-1, keepdim=True)).exp_()  # softmax written out: torch's kernel is slow for K = 2
        r = e.div_(e.sum(-1, keepdim=True)).view(n_layers, b, -1).sub_(onehot).div_(b)
        self.grads[0].copy_(batched_matmul(x.transpose(1, 2), r))
        torch.sum(r, 1, keepdim=True, out=self.grads[1])
        self.buf.grad.add_(self.buf * self.decay)  # Adam's coupled weight decay, one strength per problem
        self.opt.step()


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` outside autograd; on the CPU through NumPy's BLAS, which multiplies the probe's small, skinny
    matrices several times faster than torch's CPU kernels do (``bench/probe.py --cases senteval-step``)."""
    numpy_ok = a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
    if not numpy_ok or a.requires_grad or b.requires_grad:
        return torch.bmm(a, b)
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def _expand_mask(mask: torch.Tensor, j: int, n_layers: int, q: int, h: int) -> torch.Tensor:
    """Broadcast a per-problem mask [L, Q] onto the layout of parameter ``j`` (w1, b1, w2, b2)."""
    if j < 2:  # w1/b1: [L, *, Q*H]
        return mask.repeat_interleave(h, dim=1)[:, None, :]
    return mask.reshape(n_layers * q)[:, None, None]  # w2/b2: [L*Q, *, K]
