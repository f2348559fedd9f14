"""L-BFGS over a batch of independent problems, each with its own step size and stopping point.

Full-batch L-BFGS on the summed loss of many problems would share one line search (and
one curvature estimate) between problems that have nothing to do with each other; here
every problem keeps its own history, scaling, Armijo backtracking line search and
convergence test, while each function evaluation is one batched call for all problems.

The objective is ``fun(x, active) -> (f, g, gmax)`` for the [P, n] points ``x``: ``f`` the
objective per problem (float64), ``g`` its gradient and ``gmax`` the per-problem number
compared with ``tol`` (for example the largest absolute gradient entry in the caller's own
coordinates, as scikit-learn's ``gtol``). Only the rows where ``active`` is true are used,
so ``fun`` may skip the others (and leave anything finite there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

ARMIJO = 1e-4
MAX_BACKTRACK = 20
FLOOR = 1e-10
"""A step whose predicted decrease is below ``FLOOR * max(|f|, 1)`` cannot be told from rounding
(the objective is summed in float64 from float32 terms): the line search gives up there."""


@dataclass
class Result:
    """What :func:`minimize` found: the solutions and, per problem, how it stopped."""

    x: torch.Tensor
    f: torch.Tensor
    gmax: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    """``gmax <= tol``, or the objective stopped changing (``ftol``)."""
    stalled: torch.Tensor
    """No step decreased the objective any more: the floating-point floor of the problem."""


def minimize(
    fun: Objective,
    x0: torch.Tensor,
    tol: float = 1e-4,
    max_iter: int = 1000,
    history: int = 10,
    ftol: float = 0.0,
    callback: Callable[[int, int], None] | None = None,
) -> Result:
    """Minimise ``P`` independent smooth functions at once, starting from ``x0`` [P, n].

    A problem stops when ``gmax <= tol``, when an iteration changed its objective by at most
    ``ftol * max(|f|, 1)``, when no step decreases it any more (the floating-point floor) or
    after ``max_iter`` iterations. ``callback(iteration, still_running)`` follows each iteration.
    """
    x = x0.clone()
    p, n = x.shape
    dev, dt = x.device, x.dtype
    running = torch.ones(p, dtype=torch.bool, device=dev)
    f, g, gmax = fun(x, running)
    s_hist = torch.zeros(history, p, n, dtype=dt, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history, p, dtype=dt, device=dev)
    gamma = torch.ones(p, dtype=dt, device=dev)
    n_iter = torch.zeros(p, dtype=torch.long, device=dev)
    converged = gmax <= tol
    stalled = torch.zeros_like(converged)
    running &= ~converged
    for it in range(max_iter):
        if not bool(running.any()):
            break
        # direction: two-loop recursion; on the running problems only once most have stopped
        n_running = int(running.sum())
        if 2 * n_running >= p:
            d = _direction(g, s_hist, y_hist, rho, gamma, it)
        else:
            rows = running.nonzero().squeeze(1)
            d = torch.zeros_like(g)
            d[rows] = _direction(g[rows], s_hist[:, rows], y_hist[:, rows], rho[:, rows], gamma[rows], it)
        slope = (g * d).sum(1)
        uphill = slope >= 0  # cannot happen in exact arithmetic; fall back to steepest descent
        d = torch.where(uphill[:, None], -g, d)
        slope = torch.where(uphill, -(g * g).sum(1), slope).double()
        x_new, f_new, g_new, gmax_new, ok = _line_search(fun, x, f, g, gmax, d, slope, running)
        s = x_new - x
        yv = g_new - g
        sy = (s * yv).sum(1)
        yy = (yv * yv).sum(1)
        good = running & ok & (sy > 1e-10 * yy) & (yy > 0)
        slot = it % history
        s_hist[slot] = torch.where(good[:, None], s, 0.0)
        y_hist[slot] = torch.where(good[:, None], yv, 0.0)
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        gamma = torch.where(good, sy / torch.where(good, yy, 1.0), gamma)
        change = (f - f_new).abs()
        x, f, g, gmax = x_new, f_new, g_new, gmax_new
        n_iter += running.long()
        now_converged = running & ((gmax <= tol) | (ok & (change <= ftol * f.abs().clamp(min=1.0))))
        converged |= now_converged
        stalled |= running & ~ok & ~now_converged
        running &= ~(converged | stalled)
        if callback is not None:
            callback(it + 1, int(running.sum()))
    return Result(x=x, f=f, gmax=gmax, n_iter=n_iter, converged=converged, stalled=stalled)


def _direction(
    g: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor, gamma: torch.Tensor, it: int
) -> torch.Tensor:
    """The L-BFGS direction ``-H g`` per row (two-loop recursion, newest pair first; pairs that
    were skipped have ``rho = 0`` and change nothing)."""
    history = len(rho)
    q = g.clone()
    alphas = []
    for k in range(history):
        slot = (it - 1 - k) % history
        a = rho[slot] * (s_hist[slot] * q).sum(1)
        q -= a[:, None] * y_hist[slot]
        alphas.append((slot, a))
    r = q * gamma[:, None]
    for slot, a in reversed(alphas):
        b = rho[slot] * (y_hist[slot] * r).sum(1)
        r += (a - b)[:, None] * s_hist[slot]
    return -r


def _line_search(
    fun: Objective,
    x0: torch.Tensor,
    f0: torch.Tensor,
    g0: torch.Tensor,
    gmax0: torch.Tensor,
    d: torch.Tensor,
    slope: torch.Tensor,
    running: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking Armijo search from the unit step, per problem, with safeguarded quadratic
    interpolation. Problems that are not running, or that find no decreasing step, keep their
    point; ``ok`` says which moved."""
    x_out, f_out, g_out, gmax_out = x0.clone(), f0.clone(), g0.clone(), gmax0.clone()
    ok = torch.zeros_like(running)
    pending = running.clone()
    t = torch.ones_like(f0)
    for _ in range(MAX_BACKTRACK):
        xt = torch.where(pending[:, None], x0 + t[:, None].to(x0.dtype) * d, x0)
        ft, gt, gmt = fun(xt, pending)
        accept = pending & torch.isfinite(ft) & (ft <= f0 + ARMIJO * t * slope)
        x_out = torch.where(accept[:, None], xt, x_out)
        g_out = torch.where(accept[:, None], gt, g_out)
        f_out = torch.where(accept, ft, f_out)
        gmax_out = torch.where(accept, gmt, gmax_out)
        ok |= accept
        pending &= ~accept
        pending &= -slope * t > FLOOR * f0.abs().clamp(min=1.0)
        if not bool(pending.any()):
            break
        # minimiser of the quadratic through f0, the slope and f(t), kept within [0.1 t, 0.5 t]
        denom = 2.0 * (ft - f0 - slope * t)
        t_quad = -slope * t * t / torch.where(denom > 0, denom, 1.0)
        t_quad = torch.where(torch.isfinite(t_quad) & (denom > 0), t_quad, 0.5 * t)
        t = torch.where(pending, torch.minimum(torch.maximum(t_quad, 0.1 * t), 0.5 * t), t)
    return x_out, f_out, g_out, gmax_out, ok
