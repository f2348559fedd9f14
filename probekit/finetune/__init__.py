"""Fine-tuning encoders on GLUE tasks, with the convexity paper's fixes as variants.

::

    from probekit.finetune import finetune
    run = finetune("path/to/minilm", ["cola", "rte"], "runs/ft", seeds=3, grid="default")
    run.results[0].path          # runs/ft/cola/plain/seed0/best: AutoModel.from_pretrained(...) loads it
    run.comparison               # task x variant x seed dev scores (also runs/ft/comparison.csv/.md)

- :mod:`probekit.finetune.train`: the Trainer-based runs, grid, seeds, best checkpoint, resume.
- :mod:`probekit.finetune.variants`: ``multi-objective``, ``copy-layers``, ``drop-layers``.
- :mod:`probekit.finetune.table`: the comparison of variants (the paper's Tables 1 and 2).
"""

from __future__ import annotations

from probekit.finetune.table import comparison, write_comparison
from probekit.finetune.train import GRIDS, FinetuneRun, Grid, SeedResult, TrainOptions, checkpoint_layers, finetune
from probekit.finetune.variants import (
    VARIANTS,
    MultiObjective,
    Variant,
    apply_variant,
    copy_layers,
    drop_layers,
    encoder_layers,
)

__all__ = [
    "GRIDS",
    "VARIANTS",
    "FinetuneRun",
    "Grid",
    "MultiObjective",
    "SeedResult",
    "TrainOptions",
    "Variant",
    "apply_variant",
    "checkpoint_layers",
    "comparison",
    "copy_layers",
    "drop_layers",
    "encoder_layers",
    "finetune",
    "write_comparison",
]
