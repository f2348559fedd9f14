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

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probekit.config import option
from probekit.cpu import one_thread
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
            # the hand-written step on the CPU is thousands of tiny products: on one thread (probekit.cpu.one_thread)
            threads = one_thread() if h == 0 and device.type == "cpu" else contextlib.nullcontext()
            with threads:
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
        perm_rng = np.random.RandomState(seed)  # SentEval's np.random.seed(seed)
        sets = torch.arange(q, device=device) // g
        targets = Y[sets]  # [Q, N]
        step = None
        if linear:
            onehot = F.one_hot(Y, k).to(dtype).permute(1, 0, 2)[:, sets].reshape(n, q * k)  # [N, Q*K]
            step = _LinearStep(params, decays[0], cfg.lr, k, X, onehot)
            params = step.params  # views of the step's one parameter buffer
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
                    if step is not None:
                        step(idx)
                        continue
                    xb = X.index_select(1, idx)  # [L, B, D]; index_select, not X[:, idx] (8x slower on the CPU)
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
            if step is not None:
                step.sync()
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
            if step is not None:
                step.keep(running.any(1))
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
    cross-entropy (``(softmax - onehot) / B``) plus the coupled weight decay, then Adam's fused update
    (``torch._fused_adam_``, the kernel behind ``torch.optim.Adam(fused=True)``, called without the optimiser's
    per-step bookkeeping). Weights [L, D, Q*K] and biases [L, 1, Q*K] are views of one buffer, so the update is one
    kernel. On the CPU the element-wise part runs through NumPy on the same memory: for a mini-batch's few thousand
    logits torch's CPU kernels cost several times more per call (``bench/probe.py --cases senteval-step``).

    Only the layers still training are stepped (:meth:`keep`): a layer whose problems have all stopped on dev no
    longer costs its rows of the gather nor its products; ``params`` (every layer) is brought up to date by
    :meth:`sync` before the dev check reads it."""

    def __init__(
        self,
        params: list[torch.Tensor],
        decay: torch.Tensor,
        lr: float,
        k: int,
        x: torch.Tensor,
        onehot: torch.Tensor,
        use_numpy: bool | None = None,
    ) -> None:
        """``use_numpy``: the element-wise part through NumPy (default: on the CPU in float32/64)."""
        w, b = (p.detach() for p in params)
        self.full = torch.cat([w, b], dim=1)  # [L, D + 1, Q*K], every layer
        self.params = [self.full[:, :-1], self.full[:, -1:]]
        self.buf = self.full.clone()  # the layers still training
        self.grad = torch.zeros_like(self.buf)
        self.decay, self.k, self.lr = decay, k, lr
        self.x, self.onehot = x, onehot
        n_layers, n, _ = x.shape
        # one row gather for all layers: the train rows of layer l start at row l * N of the flat [L * N, D] tensor
        self.flat = x.view(n_layers * n, -1) if x.is_contiguous() else None
        self.layers = torch.arange(n_layers, device=x.device)
        numpy_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        self.numpy = numpy_ok if use_numpy is None else use_numpy and numpy_ok
        self.adam_state = [torch.zeros_like(self.buf), torch.zeros_like(self.buf)]
        self.adam_step = torch.zeros((), dtype=torch.float32, device=x.device)
        fused = hasattr(torch, "_fused_adam_") and x.device.type in ("cpu", "cuda")
        self.opt = None if fused else torch.optim.Adam([self.buf], lr=lr)
        self.rows_out: torch.Tensor | None = None
        self._views()

    def _views(self) -> None:
        """Weights, biases and their gradients as views of the buffers (NumPy arrays on the NumPy path)."""
        views = [self.buf[:, :-1], self.buf[:, -1:], self.grad[:, :-1], self.grad[:, -1:]]
        self.views = [v.numpy() for v in views] if self.numpy else views

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The mini-batch's rows of every layer still training, [L', B, D]."""
        if self.flat is None:  # index_select, not x[:, idx] (8x slower on the CPU)
            return self.x.index_select(1, idx).index_select(0, self.layers)
        rows = (self.layers[:, None] * self.x.shape[1] + idx).view(-1)
        if self.rows_out is None or len(self.rows_out) < len(rows):
            self.rows_out = self.flat.new_empty(len(rows), self.flat.shape[1])  # reused: no fresh pages per step
        out = torch.index_select(self.flat, 0, rows, out=self.rows_out[: len(rows)])
        return out.view(len(self.layers), len(idx), -1)

    def keep(self, layers: torch.Tensor) -> None:
        """Step only the layers where ``layers`` [L] (bool) is true from now on (a subset of those stepped so far)."""
        sel = layers[self.layers]
        if self.opt is not None or bool(sel.all()):  # torch's optimiser keeps its state per tensor: no compaction
            return
        self.sync()
        self.layers, self.buf = self.layers[sel], self.buf[sel]
        self.grad = torch.zeros_like(self.buf)
        self.adam_state = [s[sel] for s in self.adam_state]
        self._views()

    def sync(self) -> None:
        """Copy the layers still training into ``params``."""
        self.full.index_copy_(0, self.layers, self.buf)

    def __call__(self, idx: torch.Tensor) -> None:
        x, onehot = self.gather(idx), self.onehot.index_select(0, idx)
        if self.numpy:
            self._residual_numpy(x.numpy(), onehot.numpy(), *self.views)
        else:
            n_layers, b, _ = x.shape
            w, bias, gw, gb = self.views
            z = torch.baddbmm(bias, x, w).view(n_layers, b, -1, self.k)  # [L, B, Q, K]
            e = z.sub_(z.amax(-1, keepdim=True)).exp_()
            r = e.div_(e.sum(-1, keepdim=True)).view(n_layers, b, -1).sub_(onehot).div_(b)
            torch.bmm(x.transpose(1, 2), r, out=gw)
            torch.sum(r, 1, keepdim=True, out=gb)
        self.grad.addcmul_(self.buf, self.decay)  # Adam's coupled weight decay, one strength per problem
        self._adam()

    def _residual_numpy(
        self, x: np.ndarray, onehot: np.ndarray, w: np.ndarray, bias: np.ndarray, gw: np.ndarray, gb: np.ndarray
    ) -> None:
        """The gradient through NumPy (BLAS products, SIMD exp), written into this step's gradient buffer."""
        b = x.shape[1]
        z = np.matmul(x, w)
        z += bias
        z4 = z.reshape(z.shape[0], b, -1, self.k)  # [L, B, Q, K]
        # the reductions over the classes: with two, one element-wise op (NumPy's small-axis reductions are slow)
        pair = self.k == 2
        z4 -= np.maximum(z4[..., :1], z4[..., 1:]) if pair else torch.from_numpy(z4).amax(-1, keepdim=True).numpy()
        np.exp(z4, out=z4)
        z4 /= z4[..., :1] + z4[..., 1:] if pair else torch.from_numpy(z4).sum(-1, keepdim=True).numpy()
        z -= onehot
        z /= b
        np.matmul(x.transpose(0, 2, 1), z, out=gw)
        np.sum(z, axis=1, keepdims=True, out=gb)

    def _adam(self) -> None:
        """torch.optim.Adam's update (lr, betas 0.9/0.999, eps 1e-8, no decoupled decay) on the one buffer."""
        if self.opt is not None:  # a device or a torch without the fused kernel
            self.buf.grad = self.grad
            self.opt.step()
            return
        self.adam_step += 1
        m, v = self.adam_state
        torch._fused_adam_(
            [self.buf], [self.grad], [m], [v], [], [self.adam_step],
            lr=self.lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip


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
