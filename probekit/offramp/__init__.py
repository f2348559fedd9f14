"""Off-ramps and early exit: a classifier at every layer, exit policies, and their savings.

Analysis tools after DeeBERT (Xin et al., 2020), PABEE (Zhou et al., 2020), BERxiT (Xin et
al., 2021) and PALBERT (Balagansky & Gavrilov, 2022, PonderNet with Q-exit), for any
BERT-family encoder::

    from probekit.offramp import run_offramp
    run = run_offramp("path/to/model", "sst2", out="runs/offramp", mode="frozen",
                      policy_names="entropy,patience,lte,qexit", train_n=8000)
    run.results          # tidy table: per-layer metric, policy sweeps, expected/measured savings

Modules: ``heads`` (the off-ramps and recorded outputs), ``train`` (frozen / deebert / joint),
``policies`` (exit rules, threshold sweeps, expected saving), ``inference`` (real early exit
and timing), ``plots`` (figures), ``run`` (the whole analysis).
"""

from __future__ import annotations

from probekit.offramp.heads import OffRamp, OffRamps, Record
from probekit.offramp.inference import LayerStepper, early_exit
from probekit.offramp.policies import POLICIES, PolicyConfig, expected_saving, make_policy, simulate, sweep
from probekit.offramp.run import OffRampRun, run_offramp
from probekit.offramp.train import MODES, TrainConfig

__all__ = [
    "MODES",
    "POLICIES",
    "LayerStepper",
    "OffRamp",
    "OffRampRun",
    "OffRamps",
    "PolicyConfig",
    "Record",
    "TrainConfig",
    "early_exit",
    "expected_saving",
    "make_policy",
    "run_offramp",
    "simulate",
    "sweep",
]
