"""Modules that methods train beside the off-ramps, and the losses of the early-exit methods.

- :class:`Halting`: PonderNet's lambda layer (``linear``: one linear layer on h_i) or PALBERT's
  (``mlp``: a 3-layer tanh MLP on [h_i, h_{i-1}]), lambda_i = sigmoid(.), for layers 1..L;
- :class:`LTE`: BERxiT's learning-to-exit module u_i = sigmoid(c . h_i + b), one for all layers;
- :func:`pabee_loss`: PABEE's weighted average of the per-layer losses (weight j for layer j);
- :func:`lte_targets`: BERxiT's targets u~_i (1[correct], or 1 - tanh|g_i - y| for regression);
- the PonderNet objective is :func:`probekit.offramp.policies.ponder_loss`.

h_i is layer i's first-token state as the encoder gives it (no standardisation: the modules are
trained with the encoder, whose states they see as they are).
"""

from __future__ import annotations

import torch
from torch import nn

from probekit.offramp.heads import INIT_STD, predict


class Halting(nn.Module):
    """lambda_i = sigmoid(f(h_i)) (``linear``) or sigmoid(MLP([h_i, h_{i-1}])) (``mlp``), for layers 1..L."""

    def __init__(self, hidden: int, kind: str = "linear", mlp_hidden: int = 128) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(hidden, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(2 * hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, mlp_hidden), nn.Tanh()
            )
            self.net.append(nn.Linear(mlp_hidden, 1))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """First-token states of layers 0..L, [B, L+1, D] -> halting probabilities of layers 1..L, [B, L]."""
        x = states[:, 1:] if self.kind == "linear" else torch.cat([states[:, 1:], states[:, :-1]], dim=-1)
        return torch.sigmoid(self.net(x)[..., 0])

    def step(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """lambda at one layer from its first-token state ``hidden`` and ``prev`` of the layer below: [B]."""
        x = hidden if self.kind == "linear" else torch.cat([hidden, prev], dim=-1)
        return torch.sigmoid(self.net(x)[..., 0])


class LTE(nn.Module):
    """BERxiT's learning-to-exit module: u_i = sigmoid(c . h_i + b), shared by all layers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Linear(hidden, 1)
        nn.init.normal_(self.net.weight, std=INIT_STD)
        nn.init.zeros_(self.net.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """First-token states [B, L, D] of layers 1..L -> u [B, L]."""
        return torch.sigmoid(self.net(states)[..., 0])


def pabee_loss(losses: torch.Tensor) -> torch.Tensor:
    """PABEE: sum_j j * L_j / sum_j j over layers j = 1..L of the batch-mean per-layer losses ([B, L])."""
    weights = torch.arange(1, losses.shape[1] + 1, dtype=losses.dtype, device=losses.device)
    return (losses.mean(0) * weights).sum() / weights.sum()


def lte_targets(outputs: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """BERxiT's u~_i for off-ramp outputs [B, L, C]: 1 if layer i's prediction is correct (classification),
    ``1 - tanh(|g_i - y|)`` (regression); no gradient flows through them."""
    pred = predict(outputs.detach(), regression)
    if regression:
        return 1 - torch.tanh((pred.float() - labels.float()[:, None]).abs())
    return (pred == labels[:, None]).float()
