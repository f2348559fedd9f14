"""SMART (Jiang et al., 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization", ACL), as BERTer uses it.

The loss gains ``lambda_s * R_s``, the smoothness-inducing adversarial regulariser: the
embedding layer's output ``x`` of each batch is perturbed by ``delta`` (started from Gaussian
noise of standard deviation ``sigma``), ``delta`` takes ``steps`` projected gradient-ascent steps
on the divergence between the model's outputs at ``x + delta`` and at ``x``
(``delta += eta * g / ||g||_inf``, then clipped to the ``epsilon`` l-inf ball), and
``R_s = D(f(x + delta), f(x))``, with ``D`` the symmetric KL divergence of the softmaxes for
classification and the squared error for a regression (a Siamese cosine). The paper's defaults
(its Section 5, "Implementation details"): ``epsilon = sigma = 1e-5``, ``eta = 1e-3``, one ascent
step, ``lambda_s = 1`` (its grid: 1, 3, 5), ``mu = 1``, ``beta = 0.99``.

With ``--smart-bregman`` the Bregman proximal point term ``mu * D(f(x; theta), f(x; theta_tilde))``
is added, ``theta_tilde`` a momentum teacher: ``theta_tilde <- beta * theta_tilde + (1 - beta) *
theta`` before every training step (one proximal iteration per step, the paper's ``S = 1``).

Every extra forward pass of a step replays the clean pass's random state (the same dropout masks),
so that ``D`` measures the perturbation and not dropout (zero for ``delta = 0``), and the random
stream after the step is the one plain training has: with ``lambda_s = 0`` (and no Bregman
term) SMART training is plain training bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from probekit.config import option
from probekit.finetune.variants import Variant, register_variant
from probekit.mlm import generator

SMART_EPSILON = 1e-5
SMART_SIGMA = 1e-5
SMART_ETA = 1e-3


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) + KL(q || p) of the softmaxes, mean over the batch (gradients through both sides)."""
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


def divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SMART's ``D``: symmetric KL for class logits (``[N, C]``, C > 1), squared error otherwise."""
    if a.dim() == 2 and a.shape[-1] > 1:
        return symmetric_kl(a, b)
    return ((a.float() - b.float()) ** 2).mean()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Perturbation:
    """Forward hook on the embedding layer: records its outputs, or adds the i-th delta to its i-th call
    (a Siamese model calls it once per tower)."""

    def __init__(self) -> None:
        self.deltas: list[torch.Tensor] | None = None
        self.shapes: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        i = self.calls
        self.calls += 1
        if self.deltas is None:
            self.shapes.append(output.detach())
            return None
        return output + self.deltas[i].to(output.dtype)


@register_variant
@dataclass(frozen=True)
class Smart(Variant):
    """smart: SMART's adversarial smoothness regulariser on the embeddings (optionally its Bregman proximal term)."""

    name: ClassVar[str] = "smart"
    order: ClassVar[int] = 5
    role: ClassVar[str] = "objective"

    lambda_s: float = option(1.0, "smart: weight of the smoothness regulariser (paper: 1, 3 or 5).", ge=0)
    smart_epsilon: float = option(SMART_EPSILON, "smart: l-inf radius of the perturbation (paper: 1e-5).", gt=0)
    smart_sigma: float = option(SMART_SIGMA, "smart: sd of the perturbation's initial noise (paper: 1e-5).", ge=0)
    smart_eta: float = option(SMART_ETA, "smart: step size of the ascent on the perturbation (paper: 1e-3).", gt=0)
    smart_steps: int = option(1, "smart: projected gradient-ascent steps per batch (paper: 1).", ge=1)
    smart_bregman: bool = option(False, "smart: add the Bregman proximal point term (momentum teacher).")
    smart_mu: float = option(1.0, "smart: weight of the Bregman proximal term (paper: 1).", ge=0)
    smart_beta: float = option(0.99, "smart: momentum of the Bregman teacher (paper: 0.99).", ge=0, lt=1)

    @property
    def slug(self) -> str:
        tags = [] if self.lambda_s == 1.0 else [f"l{self.lambda_s:g}"]
        return "-".join([self.name, *tags, *(["bregman"] if self.smart_bregman else [])])

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        return SmartModel(model, self, seed)

    def saved(self, trained: nn.Module) -> nn.Module:
        return trained.inner if isinstance(trained, SmartModel) else trained


class SmartModel(nn.Module):
    """``inner`` trained with SMART's regulariser (see the module docstring); in eval it is ``inner``."""

    accepts_loss_kwargs = False

    def __init__(self, inner: nn.Module, variant: Smart, seed: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.variant = variant
        self.seed = seed
        self.calls = 0
        self.last_regularizer: float | None = None
        self.teacher: nn.Module | None = None
        if variant.smart_bregman:
            teacher = copy.deepcopy(inner)
            for p in teacher.parameters():
                p.requires_grad_(False)
            object.__setattr__(self, "teacher", teacher)  # not a submodule: neither trained nor saved

    @property
    def config(self) -> Any:
        return self.inner.config

    def embeddings(self) -> nn.Module:
        """The module whose output SMART perturbs: the encoder's embedding layer (words, positions, types,
        LayerNorm), as MT-DNN's implementation does."""
        base = unwrap_base(self.inner)
        return getattr(base, "embeddings", None) or base.get_input_embeddings()

    @contextmanager
    def _hooked(self, hook: _Perturbation):  # type: ignore[no-untyped-def]
        handle = self.embeddings().register_forward_hook(hook)
        try:
            yield hook
        finally:
            handle.remove()

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> Any:
        if not self.training or labels is None:
            return self.inner(**inputs, labels=labels, return_dict=True)
        v = self.variant
        device = labels.device
        before = _rng_state(device)
        hook = _Perturbation()
        with self._hooked(hook):
            out = self.inner(**inputs, labels=labels, return_dict=True)
        after = _rng_state(device)
        self.calls += 1
        g = generator(self.seed, self.calls, 17)  # its own stream: the dropout stream is left as it was
        noise = [(torch.randn(x.shape, generator=g) * v.smart_sigma).to(device) for x in hook.shapes]
        reg = self.regularizer(inputs, out.logits, noise, before)
        loss = out.loss + v.lambda_s * reg
        if self.teacher is not None:
            self._update_teacher()
            _set_rng_state(before, device)
            with torch.no_grad():
                taught = self.teacher(**inputs, return_dict=True).logits
            loss = loss + v.smart_mu * divergence(out.logits, taught)
        _set_rng_state(after, device)
        out.loss = loss
        return out

    def perturbed_logits(
        self, inputs: dict[str, Any], deltas: list[torch.Tensor], state: tuple[torch.Tensor, torch.Tensor | None]
    ) -> torch.Tensor:
        """The model's outputs with ``deltas`` added to the embedding layer's outputs, replaying the random
        ``state`` (the dropout masks of the clean pass)."""
        _set_rng_state(state, deltas[0].device if deltas else torch.device("cpu"))
        hook = _Perturbation()
        hook.deltas = deltas
        with self._hooked(hook):
            return self.inner(**inputs, return_dict=True).logits

    def regularizer(
        self,
        inputs: dict[str, Any],
        clean: torch.Tensor,
        noise: list[torch.Tensor],
        state: tuple[torch.Tensor, torch.Tensor | None],
    ) -> torch.Tensor:
        """``R_s``: ``noise`` takes the ascent steps, then ``D(f(x + delta), f(x))``."""
        v = self.variant
        target = clean.detach()
        deltas = [n.clone() for n in noise]
        for _ in range(v.smart_steps):
            deltas = [d.detach().requires_grad_(True) for d in deltas]
            adv = divergence(self.perturbed_logits(inputs, deltas, state), target)
            grads = torch.autograd.grad(adv, deltas, allow_unused=True)
            stepped = []
            for d, gr in zip(deltas, grads, strict=True):
                if gr is None:
                    stepped.append(d.detach())
                    continue
                scale = gr.abs().amax(-1, keepdim=True).clamp_min(1e-12)
                stepped.append((d + v.smart_eta * gr / scale).clamp(-v.smart_epsilon, v.smart_epsilon).detach())
            deltas = stepped
        reg = divergence(self.perturbed_logits(inputs, deltas, state), clean)
        self.last_regularizer = float(reg.detach())
        return reg

    @torch.no_grad()
    def _update_teacher(self) -> None:
        assert self.teacher is not None
        beta = self.variant.smart_beta
        for t, p in zip(self.teacher.parameters(), self.inner.parameters(), strict=True):
            t.mul_(beta).add_(p.detach().to(t.device), alpha=1 - beta)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SmartModel:  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self


def unwrap_base(model: nn.Module) -> nn.Module:
    """The encoder inside a classifier or a training-time wrapper (each keeps what it wraps as ``inner``)."""
    while hasattr(model, "inner"):
        model = model.inner
    return getattr(model, "base_model", model)
