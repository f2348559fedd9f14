"""probekit: layerwise probing and analysis of transformer encoders.

The Python API that the ``probekit`` command wraps::

    import probekit
    caches = probekit.extract("path/to/model", ["bigram_shift"], out="caches")
    cache = probekit.LayerCache.open(caches[0].path)
    cache["train", 3]          # layer 3 of the train split, [N, D]

The names below are loaded on first use (PEP 562), so ``import probekit.results`` (or any
other module) does not import torch, transformers and every analysis through the package face.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from probekit._version import __version__

_EXPORTS = {
    "Backbone": "probekit.backbone",
    "load_backbone": "probekit.backbone",
    "LayerCache": "probekit.cache",
    "find_caches": "probekit.cache",
    "get_task": "probekit.data",
    "list_tasks": "probekit.data",
    "load_task": "probekit.data",
    "ProbekitError": "probekit.errors",
    "ProbekitWarning": "probekit.errors",
    "encode": "probekit.extraction",
    "extract": "probekit.extraction",
    "MLMHeadProbe": "probekit.mlm",
    "mlm_probe": "probekit.mlm",
    "OffRamps": "probekit.offramp",
    "run_offramp": "probekit.offramp",
    "LayerwiseProbe": "probekit.probes",
    "probe": "probekit.probes",
    "PROTOCOLS": "probekit.probes.protocols",
    "load_senteval": "probekit.senteval",
    "senteval_check": "probekit.senteval",
    "finetune": "probekit.finetune",
    "load_results": "probekit.results",
    "save_results": "probekit.results",
    "Run": "probekit.runs",
    "run_suite": "probekit.suite",
    "load_plugins": "probekit.plugins",
}

__all__ = [
    "Backbone",
    "LayerCache",
    "LayerwiseProbe",
    "MLMHeadProbe",
    "OffRamps",
    "ProbekitError",
    "ProbekitWarning",
    "Run",
    "__version__",
    "encode",
    "extract",
    "find_caches",
    "finetune",
    "get_task",
    "list_tasks",
    "load_backbone",
    "load_plugins",
    "load_results",
    "load_task",
    "mlm_probe",
    "probe",
    "run_offramp",
    "run_suite",
    "save_results",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from probekit.backbone import Backbone, load_backbone
    from probekit.cache import LayerCache, find_caches
    from probekit.data import get_task, list_tasks, load_task
    from probekit.errors import ProbekitError, ProbekitWarning
    from probekit.extraction import encode, extract
    from probekit.finetune import finetune
    from probekit.mlm import MLMHeadProbe, mlm_probe
    from probekit.offramp import OffRamps, run_offramp
    from probekit.plugins import load_plugins
    from probekit.probes import LayerwiseProbe, probe
    from probekit.results import load_results, save_results
    from probekit.runs import Run
    from probekit.suite import run_suite
