"""Off-ramps and early exit: a classifier at every layer, exit policies, and their savings.

Analysis tools after DeeBERT (Xin et al., 2020), PABEE (Zhou et al., 2020), BERxiT (Xin et
al., 2021) and PALBERT (Balagansky & Gavrilov, 2022, PonderNet with Q-exit), for any
BERT-family encoder::

    from probekit.offramp import OffRamps, run_offramp
    run = run_offramp("path/to/model", "sst2", out="runs/offramp", method="frozen",
                      policies="entropy,patience,lte,qexit", train_n=8000)
    run.results          # tidy table: per-layer metric, policy sweeps, expected/measured savings
    OffRamps().fit(cache).score(cache.features("dev"), cache.labels("dev"))   # in a notebook

Modules: ``heads`` (the off-ramp modules and recorded outputs), ``train`` (training kernels),
``estimator`` (the ``OffRamps`` estimator), ``methods`` (``TRAINING_METHODS``: frozen / deebert /
joint), ``exit_methods`` (pabee, berxit, pondernet, palbert, slf, smart-alternating), ``halting``
(LTE and Lambda modules, the methods' losses), ``compare`` (the comparison table of methods),
``policies`` (``EXIT_POLICIES``: exit rules, threshold sweeps, expected saving), ``inference`` (real
early exit and timing), ``checkpoint`` (safetensors + JSON checkpoints), ``run`` (the whole analysis).
"""

from __future__ import annotations

from probekit.offramp import exit_methods
from probekit.offramp.estimator import OffRamps
from probekit.offramp.heads import OffRamp, OffRampHeads, Record
from probekit.offramp.inference import LayerStepper, early_exit
from probekit.offramp.methods import TRAINING_METHODS, FineTuneConfig, FrozenConfig, TrainingMethod
from probekit.offramp.policies import (
    EXIT_POLICIES,
    Policy,
    PolicyConfig,
    expected_saving,
    make_policy,
    simulate,
    sweep,
)
from probekit.offramp.run import MeasureConfig, OffRampConfig, run_offramp
from probekit.offramp.train import TrainConfig

__all__ = [
    "EXIT_POLICIES",
    "TRAINING_METHODS",
    "FineTuneConfig",
    "FrozenConfig",
    "LayerStepper",
    "MeasureConfig",
    "OffRamp",
    "OffRampConfig",
    "OffRampHeads",
    "OffRamps",
    "Policy",
    "PolicyConfig",
    "Record",
    "TrainConfig",
    "TrainingMethod",
    "early_exit",
    "exit_methods",
    "expected_saving",
    "make_policy",
    "run_offramp",
    "simulate",
    "sweep",
]
