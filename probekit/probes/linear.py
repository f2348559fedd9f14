"""The linear probe: L2-regularised multinomial logistic regression, scikit-learn's objective.

For each problem (layer, label set, ``C``) it minimises, as
``sklearn.linear_model.LogisticRegression(C=C)`` does::

    mean_i logloss_i + ||W||^2 / (2 C N)        (= (C sum_i logloss_i + ||W||^2 / 2) / (C N))

with an unpenalised intercept, on the raw features (SentEval does not standardise them).
Two classes use one weight vector and the logistic loss, more classes one vector per class
and the softmax loss, again as scikit-learn does, so the minimisers are the same.

Speed: every layer, the whole ``C`` grid and the control labels are one batched problem
(weights [layers, problems x classes, features]); per block of rows, one batched matrix
product gives every logit and one more every gradient. The optimiser
(:mod:`probekit.probes.lbfgs`) runs L-BFGS per problem in an equivalent, preconditioned
parametrisation: the intercept is taken on centred features and ``W = U diag(s) V`` with
``U, e`` the eigenvectors and eigenvalues of the layer's train covariance (estimated on at
most ``COV_ROWS`` rows) and ``s = 1 / sqrt(beta_k e + 1 / (C N))``, ``beta_k = p_k (1 - p_k)``
from the class priors: the inverse square root of the Hessian at the prior. The objective and
its minimiser are unchanged (only ``W`` enters the penalty), the path to it is much shorter,
and ``X`` is never copied. Convergence is tested like scikit-learn's ``tol``, on the largest
absolute gradient entry in the original coordinates; a problem whose objective no longer
changes in float32 stops there (:data:`probekit.probes.lbfgs.FLOOR`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from probekit.config import option
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind
from probekit.probes.lbfgs import minimize

COV_ROWS = 4096
"""Rows used to estimate the covariance for the preconditioner (it need not be exact)."""
BLOCK_ROWS = 1024
"""Rows per block of an evaluation on the CPU: the logits and the gradient of a block are computed
while its features are still in the CPU cache."""
CHUNK_ELEMENTS = 1 << 25
"""At most this many logits per block (bounds the memory of one evaluation)."""
WEIGHTED_BLOCKS = 16
WEIGHTED_MIN_ROWS = 64
"""With row weights, at least this many blocks of rows (of at least this many rows), so that problems
without weight in a block are skipped there."""


@dataclass(frozen=True)
class LinearConfig(KindConfig):
    """Options of the linear probe (scikit-learn's ``LogisticRegression`` names and defaults, ``max_iter``
    raised to 1000)."""

    component: ClassVar[str] = "the linear probe"
    grid: tuple[float, ...] = option(
        (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "Comma-separated C grid (inverse L2 strength), selected on dev.", gt=0
    )
    max_iter: int = option(1000, "L-BFGS iteration limit.", ge=1)
    tol: float = option(1e-4, "Gradient tolerance (scikit-learn's tol).", gt=0)
    history: int = option(10, "L-BFGS memory (pairs of past steps).", ge=1)


@PROBE_KINDS.register("linear")
class LogisticProbe(ProbeKind):
    """Multinomial logistic regression over a C grid (SentEval's CPU protocol)."""

    Config = LinearConfig
    reg_name = "C"
    step_name = "iter"
    limit_option = "max_iter"
    fixed_settings: ClassVar[dict[str, Any]] = {"solver": "lbfgs"}
    config: LinearConfig

    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
        weights: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
    ) -> LogisticProbe:
        """``weights`` [S, N] (optional, >= 0): each label set's weight per row, so that one call fits
        problems on different subsets of the rows (0/1 weights: the nested prefixes of the MDL probe);
        a set's objective is then its weighted mean loss plus ``||W||^2 / (2 C sum(weights))``,
        scikit-learn's objective on the rows with weight 1. ``order`` (a permutation of the rows): the
        order in which rows are visited with ``weights``; a block of rows costs only the problems with
        weight in it, so nested prefixes in this order cost their own rows, not all of them."""
        n_layers, n, d = X.shape
        self.n_sets_ = Y.shape[0]
        self.k_ = k = 1 if n_classes == 2 else n_classes
        g = len(self.grid)
        q = self.n_sets_ * g
        device, dtype = X.device, X.dtype
        if weights is None:
            n_q = torch.full((q,), float(n), dtype=torch.float64, device=device)
        else:
            weights = weights.to(device=device, dtype=dtype)
            n_q = weights.double().sum(1).clamp(min=1.0).repeat_interleave(g)  # [Q] rows per problem
        lam = 1.0 / (torch.tensor(self.grid, dtype=torch.float64, device=device).repeat(self.n_sets_) * n_q)  # [Q]
        mean, rot, eig = _whitening(X)
        counts = torch.bincount(Y[0], minlength=n_classes).double()
        prior = counts / counts.sum()
        beta = (prior * (1 - prior))[1:] if k == 1 else prior * (1 - prior)  # [K] curvature at the priors
        beta = beta.clamp(min=1.0 / n)
        # per (layer, problem, class) scale of each coordinate; the last one is the intercept's
        scale = torch.cat(
            [
                torch.rsqrt(beta[None, None, :, None] * eig[:, None, None, :].double() + lam[None, :, None, None]),
                torch.rsqrt(beta)[None, None, :, None].expand(n_layers, q, k, 1),
            ],
            dim=3,
        ).to(dtype)  # [L, Q, K, D+1]
        sets = torch.arange(q, device=device) // g
        lam_t = lam.to(dtype)
        n_t = n_q.to(dtype)
        rows = BLOCK_ROWS if device.type == "cpu" else n  # a GPU wants large products
        if weights is not None:  # blocks of rows in ``order``: a problem is computed only where it has weight
            order = torch.arange(n, device=device) if order is None else order.to(device)
            rows = max(WEIGHTED_MIN_ROWS, min(rows, n // WEIGHTED_BLOCKS))
        block = max(1, min(rows, CHUNK_ELEMENTS // max(1, n_layers * q * k)))

        def objective(theta: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            act = active.view(n_layers, q)
            m = int(act.sum(1).max())
            # the problems to compute, active ones first, the same number in every layer
            sel = torch.argsort((~act).to(torch.int8), dim=1, stable=True)[:, :m]  # [L, m]
            pick = sel[:, :, None, None].expand(-1, -1, k, d + 1)
            s = scale.gather(1, pick)  # [L, m, K, D+1]
            th = theta.view(n_layers, q, k, d + 1).gather(1, pick) * s
            wt = torch.bmm(th[..., :d].reshape(n_layers, m * k, d), rot.transpose(1, 2))
            bias = th[..., d].reshape(n_layers, m * k) - torch.bmm(wt, mean[:, :, None]).squeeze(2)
            lam_sel = lam_t[sel]  # [L, m]
            n_sel = n_t[sel] if weights is not None else n  # [L, m] rows per problem
            loss = torch.zeros(n_layers, m, dtype=torch.float64, device=device)
            gw = torch.zeros_like(wt)
            rsum = torch.zeros(n_layers, m, k, dtype=dtype, device=device)
            for i in range(0, n, block):
                if weights is not None:  # only the problems with weight in this block of rows
                    _weighted_block(X, Y, weights, order[i : i + block], sets[sel], wt, bias, loss, rsum, gw)
                    continue
                xb = X[:, i : i + block]
                yb = Y[:, i : i + block][sets[sel]]  # [L, m, B]
                z = (torch.bmm(wt, xb.transpose(1, 2)) + bias[:, :, None]).view(n_layers, m, k, -1)
                lb, resid = _loss_resid(z, yb)
                loss += lb.sum(-1, dtype=torch.float64)
                rsum += resid.sum(-1)
                gw += torch.bmm(resid.view(n_layers, m * k, -1), xb)
            if weights is None:
                rmean = (rsum / n).view(n_layers, m * k, 1)
                gw = gw / n
                loss = loss / n
            else:
                rmean = (rsum / n_sel[:, :, None]).view(n_layers, m * k, 1)
                gw = gw / n_sel.repeat_interleave(k, dim=1)[:, :, None]
                loss = loss / n_sel.double()
            wpen = lam_sel.repeat_interleave(k, dim=1)[:, :, None] * wt
            gw = gw - rmean * mean[:, None, :] + wpen  # d/dW with centred features (+ penalty)
            f = loss + 0.5 * lam_sel.double() * (wt.double() ** 2).view(n_layers, m, -1).sum(-1)
            gv = torch.bmm(gw, rot).view(n_layers, m, k, d)
            grad = torch.cat([gv, rmean.view(n_layers, m, k, 1)], dim=3) * s
            # original coordinates: dW = mean x r + lam W = gw + mean(r) * mu, db = mean(r)
            g_orig = torch.maximum((gw + rmean * mean[:, None, :]).abs().amax(2), rmean.abs().squeeze(2))
            gmax = g_orig.view(n_layers, m, k).amax(2).double()
            f_all = torch.zeros(n_layers, q, dtype=torch.float64, device=device).scatter(1, sel, f)
            gmax_all = torch.zeros_like(f_all).scatter(1, sel, gmax)
            g_all = torch.zeros(n_layers, q, k, d + 1, dtype=dtype, device=device)
            g_all.scatter_(1, sel[:, :, None, None].expand(-1, -1, k, d + 1), grad)
            return f_all.view(-1), g_all.view(n_layers * q, -1), gmax_all.view(-1)

        theta0 = torch.zeros(n_layers * q, k * (d + 1), dtype=dtype, device=device)
        cfg = self.config
        res = minimize(objective, theta0, tol=cfg.tol, max_iter=cfg.max_iter, history=cfg.history, callback=callback)
        self.n_iter_ = res.n_iter.view(n_layers, self.n_sets_, g)
        self.not_converged_ = int((~res.converged & ~res.stalled).sum())
        # back to the original coordinates: W = U diag(s) V, b = b' - mu . W
        theta = res.x.view(n_layers, q, k, d + 1) * scale
        v = theta[..., :d].reshape(n_layers, q * k, d)
        self.coef_ = torch.bmm(v, rot.transpose(1, 2))  # [L, Q*K, D]
        self.intercept_ = theta[..., d].reshape(n_layers, q * k) - torch.bmm(self.coef_, mean[:, :, None]).squeeze(2)
        return self

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits [L, S, G, K, M] of every fitted problem on ``X`` [L, M, D]."""
        n_layers, m, _ = X.shape
        z = torch.baddbmm(self.intercept_[:, :, None], self.coef_, X.transpose(1, 2))
        return z.view(n_layers, self.n_sets_, len(self.grid), self.k_, m)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        z = self.decision_function(X)
        return (z[:, :, :, 0] > 0).long() if self.k_ == 1 else z.argmax(3)

    def label_sets(self, start: int, stop: int) -> LogisticProbe:
        """A view of the fitted problems of label sets ``start .. stop - 1`` only (no copy of the weights)."""
        view = copy.copy(self)
        rows = slice(start * len(self.grid) * self.k_, stop * len(self.grid) * self.k_)
        view.coef_, view.intercept_, view.n_sets_ = self.coef_[:, rows], self.intercept_[:, rows], stop - start
        return view


def _weighted_block(
    X: torch.Tensor,
    Y: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    sets: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor,
    loss: torch.Tensor,
    rsum: torch.Tensor,
    gw: torch.Tensor,
) -> None:
    """Add one block of ``rows`` to the loss, residual sums and gradient of the problems (``sets`` [L, m]:
    each problem's label set) with weight there; the others are not computed."""
    n_layers, m = sets.shape
    k, d = rsum.shape[2], X.shape[2]
    wblk = weights[:, rows]  # [S, B]
    rel = (wblk > 0).any(1)[sets]  # [L, m]
    c = int(rel.sum(1).max())
    if c == 0:
        return
    sub = torch.argsort((~rel).to(torch.int8), dim=1, stable=True)[:, :c]  # [L, c], the relevant first
    pick = sub[:, :, None, None].expand(-1, -1, k, d)
    w_sub = wt.view(n_layers, m, k, d).gather(1, pick).view(n_layers, c * k, d)
    b_sub = bias.view(n_layers, m, k).gather(1, sub[:, :, None].expand(-1, -1, k)).reshape(n_layers, c * k)
    s_sub = sets.gather(1, sub)  # [L, c]
    xb = X[:, rows]
    z = (torch.bmm(w_sub, xb.transpose(1, 2)) + b_sub[:, :, None]).view(n_layers, c, k, -1)
    lb, resid = _loss_resid(z, Y[:, rows][s_sub])
    wb = wblk[s_sub]  # [L, c, B]
    lb, resid = lb * wb, resid * wb[:, :, None, :]
    loss.scatter_add_(1, sub, lb.sum(-1, dtype=torch.float64))
    rsum.scatter_add_(1, sub[:, :, None].expand(-1, -1, k), resid.sum(-1))
    g = torch.bmm(resid.view(n_layers, c * k, -1), xb).view(n_layers, c, k, d)
    gw.view(n_layers, m, k, d).scatter_add_(1, pick, g)


def _loss_resid(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example log loss and dloss/dlogits for logits ``z`` [..., K, B] and labels ``y`` [..., B]
    (K = 1: the binary logistic loss with one logit per example, as scikit-learn)."""
    if z.shape[-2] == 1:
        z1 = z.squeeze(-2)
        yf = y.to(z.dtype)
        return F.softplus(z1) - yf * z1, (torch.sigmoid(z1) - yf).unsqueeze(-2)
    lse = torch.logsumexp(z, dim=-2, keepdim=True)
    idx = y.unsqueeze(-2)
    loss = (lse - z.gather(-2, idx)).squeeze(-2)
    resid = torch.exp(z - lse)
    resid.scatter_add_(-2, idx, torch.full_like(idx, -1, dtype=z.dtype))
    return loss, resid


def _whitening(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per layer of ``X`` [L, N, D]: the train mean (all rows, float64 accumulation), and the
    eigenvectors and eigenvalues of the covariance estimated on at most ``COV_ROWS`` evenly
    spaced rows."""
    n_layers, n, d = X.shape
    mean = torch.zeros(n_layers, d, dtype=torch.float64, device=X.device)
    for i in range(0, n, 4096):  # float32 sums of blocks, accumulated in float64
        mean += X[:, i : i + 4096].sum(1).double()
    mean = (mean / n).to(X.dtype)
    rows = torch.linspace(0, n - 1, min(n, COV_ROWS), device=X.device).round().long().unique()
    xs = X[:, rows] - mean[:, None, :]
    cov = torch.bmm(xs.transpose(1, 2), xs) / len(rows)
    eig, rot = torch.linalg.eigh(cov)
    return mean, rot, eig.clamp(min=0)
