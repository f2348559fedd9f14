"""Off-ramps: DeeBERT's per-layer classifiers, and the per-layer outputs they record.

An off-ramp (DeeBERT's ``BertHighway``) reads the first token's hidden state of its layer:
a pooler (dense + tanh), dropout and a linear layer to the classes, or to one number for a
regression task (STS-B). ``OffRampHeads`` holds one per transformer layer; ramp ``i`` (0-based)
sits on layer ``i + 1`` (layer 0 is the embeddings, which have no off-ramp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INIT_STD = 0.02  # BERT's initializer_range


class OffRamp(nn.Module):
    """Pooler (dense + tanh) on the first token, dropout, linear: DeeBERT's off-ramp.

    ``shift`` and ``scale`` (fixed buffers, 0 and 1 unless :meth:`standardize` sets them) map the
    input to zero mean and unit variance first. The dense layer could absorb that affine map, so
    the off-ramp computes the same family of functions; on a frozen encoder it makes training
    well conditioned (some layers' first-token states vary by 1e-3 around large constant values).
    """

    def __init__(self, hidden: int, n_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, n_out)
        for lin in (self.dense, self.classifier):
            nn.init.normal_(lin.weight, std=INIT_STD)
            nn.init.zeros_(lin.bias)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        x = (first_token - self.shift) / self.scale
        return self.classifier(self.dropout(torch.tanh(self.dense(x))))

    @torch.no_grad()
    def standardize(self, states: np.ndarray | torch.Tensor) -> None:
        """Standardise inputs with the mean and standard deviation of ``states`` ([N, D])."""
        x = torch.as_tensor(np.asarray(states, dtype=np.float32))
        self.shift.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-6))


class OffRampHeads(nn.Module):
    """One off-ramp per transformer layer (``n_layers`` = L, the layers 1..L); ``shared``: one off-ramp
    applied at every layer (PonderNet's and PALBERT's classifier)."""

    def __init__(self, n_layers: int, hidden: int, n_classes: int, dropout: float = 0.1, shared: bool = False) -> None:
        super().__init__()
        self.regression = n_classes == 0
        self.n_out = 1 if self.regression else n_classes
        self.shared = shared
        if shared:
            one = OffRamp(hidden, self.n_out, dropout)
            self.ramps = nn.ModuleList(one for _ in range(n_layers))
        else:
            self.ramps = nn.ModuleList(OffRamp(hidden, self.n_out, dropout) for _ in range(n_layers))

    @property
    def n_layers(self) -> int:
        return len(self.ramps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """First-token states of layers 1..L, [B, L, D] -> outputs [B, L, C] (C = 1 for regression)."""
        return torch.stack([ramp(features[:, i]) for i, ramp in enumerate(self.ramps)], dim=1)

    @torch.no_grad()
    def outputs(self, features: np.ndarray | torch.Tensor, chunk: int = 4096) -> np.ndarray:
        """Eval-mode outputs of every off-ramp for first-token states of layers 1..L ([N, L, D])."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [
            self(torch.as_tensor(np.array(features[s : s + chunk]), dtype=torch.float32, device=device)).cpu()
            for s in range(0, len(features), chunk)
        ]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_layers, self.n_out), np.float32)


def per_layer_loss(outputs: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Loss of each sample at each off-ramp: [B, L] (cross-entropy, or squared error for regression)."""
    b, n_layers, c = outputs.shape
    if regression:
        return (outputs[..., 0] - labels.float()[:, None]) ** 2
    flat = F.cross_entropy(outputs.reshape(b * n_layers, c), labels.repeat_interleave(n_layers), reduction="none")
    return flat.view(b, n_layers)


def predict(outputs: np.ndarray | torch.Tensor, regression: bool) -> np.ndarray | torch.Tensor:
    """Predicted class ids (argmax over the last axis) or regression values."""
    if regression:
        return outputs[..., 0]
    return outputs.argmax(-1)


@dataclass
class Record:
    """What the off-ramps output on one split: the per-layer outputs that exit policies are evaluated on.

    ``hidden`` is every layer's first-token state ([N, L+1, D], 0 = embeddings; the learned
    exit policies read it), ``outputs`` every off-ramp's output ([N, L, C]).
    """

    hidden: np.ndarray
    outputs: np.ndarray
    labels: np.ndarray
    regression: bool

    @property
    def n_layers(self) -> int:
        return int(self.outputs.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def predictions(self) -> np.ndarray:
        """[N, L]: each off-ramp's prediction."""
        return np.asarray(predict(self.outputs, self.regression))

    def losses(self) -> np.ndarray:
        """[N, L]: each off-ramp's loss on each sample."""
        out = torch.from_numpy(np.ascontiguousarray(self.outputs))
        return per_layer_loss(out, torch.from_numpy(np.asarray(self.labels)), self.regression).numpy()

    def subset(self, idx: np.ndarray) -> Record:
        return Record(self.hidden[idx], self.outputs[idx], self.labels[idx], self.regression)


def record(heads: OffRampHeads, hidden: np.ndarray, labels: np.ndarray) -> Record:
    """Run the off-ramps over first-token states of every layer ([N, L+1, D], from a cache or ``encode``)."""
    hidden = np.asarray(hidden, dtype=np.float32)
    return Record(hidden, heads.outputs(hidden[:, 1:]), np.asarray(labels), heads.regression)
