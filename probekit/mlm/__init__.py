"""MLM-head probes with embedding dropout ("The Convexity of BERT", Mohebbi & Modarressi).

- :mod:`probekit.mlm.kernels`: embedding dropout, the batched heads, the tied cross-entropy and
  the streaming top-k over vocabulary blocks;
- :mod:`probekit.mlm.estimator`: :class:`MLMHeadProbe` (scikit-learn dialect) and its options,
  :class:`MLMConfig`;
- :mod:`probekit.mlm.runner`: :func:`mlm_probe` (what ``probekit mlm-probe`` runs), the ratio
  sweep :func:`sweep_ratios` and the runner's options, :class:`MLMRunConfig`.
"""

from __future__ import annotations

from probekit.mlm.estimator import MLMConfig, MLMHeadProbe, windows_digest
from probekit.mlm.kernels import (
    CPU_BLOCK,
    CPU_KEEP,
    DEFAULT_DROPOUT_RATIO,
    DEFAULT_MASK_RATIO,
    LOGITS_BUDGET,
    TOPK,
    MLMHeads,
    _generator,
    embedding_dropout,
    generator,
    streaming_topk,
    tied_cross_entropy,
    vocab_chunk,
)
from probekit.mlm.runner import REFERENCE_CORRUPTION, MLMRunConfig, checkpoint_name, mlm_probe, sweep_ratios

__all__ = [
    "CPU_BLOCK",
    "CPU_KEEP",
    "DEFAULT_DROPOUT_RATIO",
    "DEFAULT_MASK_RATIO",
    "LOGITS_BUDGET",
    "REFERENCE_CORRUPTION",
    "TOPK",
    "MLMConfig",
    "MLMHeadProbe",
    "MLMHeads",
    "MLMRunConfig",
    "_generator",
    "checkpoint_name",
    "embedding_dropout",
    "generator",
    "mlm_probe",
    "streaming_topk",
    "sweep_ratios",
    "tied_cross_entropy",
    "vocab_chunk",
    "windows_digest",
]
