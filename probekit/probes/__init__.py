"""Layerwise probes: SentEval's protocol on every layer at once.

    import probekit
    df = probekit.probe("caches/minilm", kind="linear", seeds=3, out="results")
    lp = probekit.LayerwiseProbe(kind="mlp").fit(X_train, y_train, X_dev, y_dev)
    lp.score(X_test, y_test)                 # accuracy per layer

Modules: :mod:`.base` (what a probe kind is, the registry), :mod:`.linear` (logistic
regression, scikit-learn's objective), :mod:`.lbfgs` (the batched optimiser), :mod:`.mlp`
(SentEval's MLP), :mod:`.layerwise` (selection, control, baselines), :mod:`.run` (caches in,
results table out), :mod:`.table` (the printed summary).
"""

from probekit.metrics import wilson
from probekit.probes import linear, mlp  # noqa: F401  (registers the kinds)
from probekit.probes.base import KINDS, ProbeKind, register
from probekit.probes.layerwise import LayerwiseProbe
from probekit.probes.run import probe

__all__ = ["KINDS", "LayerwiseProbe", "ProbeKind", "probe", "register", "wilson"]
