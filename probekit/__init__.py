"""probekit: layerwise probing and analysis of transformer encoders.

The Python API that the ``probekit`` command wraps::

    import probekit
    caches = probekit.extract("path/to/model", ["bigram_shift"], out="caches")
    cache = probekit.LayerCache.open(caches[0].path)
    cache["train", 3]          # layer 3 of the train split, [N, D]
"""

from __future__ import annotations

from probekit._version import __version__
from probekit.backbone import Backbone, load_backbone
from probekit.cache import LayerCache, find_caches
from probekit.data import get_task, list_tasks, load_task
from probekit.errors import ProbekitError
from probekit.extraction import encode, extract
from probekit.mlm import MLMHeadProbe, mlm_probe
from probekit.offramp import run_offramp as run_offramp
from probekit.probes import LayerwiseProbe, probe
from probekit.results import load_results, save_results
from probekit.suite import run_suite as run_suite

__all__ = [
    "Backbone",
    "LayerCache",
    "LayerwiseProbe",
    "MLMHeadProbe",
    "ProbekitError",
    "__version__",
    "encode",
    "extract",
    "find_caches",
    "get_task",
    "list_tasks",
    "load_backbone",
    "load_results",
    "load_task",
    "mlm_probe",
    "probe",
    "save_results",
]
