"""Layerwise probes: SentEval's protocol on every layer at once.

    import probekit
    run = probekit.probe("caches/minilm", kind="linear", seeds=3, out="results")
    run.results                              # the tidy table (probekit.results)
    lp = probekit.LayerwiseProbe(kind="mlp").fit(X_train, y_train, X_dev, y_dev)
    lp.score(X_test, y_test)                 # accuracy per layer

Modules: :mod:`.base` (what a probe kind is, the registry :data:`PROBE_KINDS`), :mod:`.linear`
(logistic regression, scikit-learn's objective), :mod:`.lbfgs` (the batched optimiser),
:mod:`.mlp` (SentEval's MLP), :mod:`.mdl` (online codelength), :mod:`.layerwise` (selection, control, baselines, rows),
:mod:`.protocols` (the literature's presets, :data:`PROTOCOLS`), :mod:`.tuned` (option sets tuned on dev),
:mod:`.order` (SentEval's row order),
:mod:`.run` (caches in, a ``Run`` out), :mod:`.table` (the printed summary).
"""

from probekit.metrics import wilson
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind
from probekit.probes.layerwise import LayerwiseProbe
from probekit.probes.linear import LinearConfig, LogisticProbe
from probekit.probes.mdl import MDLConfig, MDLProbe
from probekit.probes.mlp import MLPConfig, MLPProbe
from probekit.probes.protocols import PROTOCOLS, Protocol
from probekit.probes.run import probe
from probekit.probes.tuned import TunedProbe

__all__ = [
    "PROBE_KINDS",
    "PROTOCOLS",
    "KindConfig",
    "LayerwiseProbe",
    "LinearConfig",
    "LogisticProbe",
    "MDLConfig",
    "MDLProbe",
    "MLPConfig",
    "MLPProbe",
    "ProbeKind",
    "Protocol",
    "TunedProbe",
    "probe",
    "wilson",
]
