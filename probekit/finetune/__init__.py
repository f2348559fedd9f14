"""Fine-tuning encoders on GLUE tasks, with the convexity paper's fixes as variants.

::

    from probekit.finetune import finetune
    run = finetune("path/to/minilm", ["cola", "rte"], "runs/ft", seeds=3, grid="default")
    run.results                  # tidy rows: dev metrics per configuration and epoch (also runs/ft/results.parquet)
    run.seeds[0].path            # runs/ft/cola/plain/seed0/best: AutoModel.from_pretrained(...) loads it
    run.comparison               # task x variant x seed dev scores (also runs/ft/comparison.csv/.md)

- :mod:`probekit.finetune.variants`: :data:`VARIANTS`, one registered class per variant (``plain``,
  ``copy-layers``, ``drop-layers``; ``a+b`` composes them; plugins add theirs with :func:`register_variant`);
  :mod:`~probekit.finetune.multi_objective` (``multi-objective``, ``multi-objective-extra-layer``),
  :mod:`~probekit.finetune.smart` (``smart``), :mod:`~probekit.finetune.siamese` (``siamese``,
  ``embed-then-concat``).
- :mod:`probekit.finetune.train`: the Trainer-based runs, :data:`GRIDS`, seeds, best checkpoint, resume.
- :mod:`probekit.finetune.table`: the comparison of variants (the paper's Tables 1 and 2) and the tidy rows.
"""

from __future__ import annotations

from probekit.finetune.multi_objective import (
    MultiObjective,
    MultiObjectiveExtraLayer,
    MultiObjectiveVariant,
    pretrained_mlm_head,
)
from probekit.finetune.multitask import MultitaskModel, MultitaskOptions, finetune_multitask, multitask_rows
from probekit.finetune.siamese import EmbedThenConcat, Siamese, SiameseModel
from probekit.finetune.smart import Smart, SmartModel
from probekit.finetune.table import comparison, seed_rows, write_comparison, write_results
from probekit.finetune.train import (
    GRIDS,
    Grid,
    JobOptions,
    SeedResult,
    TrainOptions,
    checkpoint_layers,
    finetune,
    option_sources,
)
from probekit.finetune.variants import (
    VARIANTS,
    Composed,
    CopyLayers,
    DropLayers,
    Plain,
    Variant,
    VariantError,
    apply_variant,
    copy_layers,
    drop_layers,
    encoder_layers,
    make_variant,
    probed_variants,
    register_variant,
    variant_order,
)

__all__ = [
    "GRIDS",
    "VARIANTS",
    "Composed",
    "CopyLayers",
    "DropLayers",
    "EmbedThenConcat",
    "Grid",
    "JobOptions",
    "MultiObjective",
    "MultiObjectiveExtraLayer",
    "MultiObjectiveVariant",
    "MultitaskModel",
    "MultitaskOptions",
    "Plain",
    "SeedResult",
    "Siamese",
    "SiameseModel",
    "Smart",
    "SmartModel",
    "TrainOptions",
    "Variant",
    "VariantError",
    "apply_variant",
    "checkpoint_layers",
    "comparison",
    "copy_layers",
    "drop_layers",
    "encoder_layers",
    "finetune",
    "finetune_multitask",
    "make_variant",
    "multitask_rows",
    "option_sources",
    "pretrained_mlm_head",
    "probed_variants",
    "register_variant",
    "seed_rows",
    "variant_order",
    "write_comparison",
    "write_results",
]
