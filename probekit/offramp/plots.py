"""Figures of an off-ramp run, drawn by :mod:`probekit.plot` (the report's plotting module).

``probekit report`` shows the same figures in its off-ramp section; :func:`save_figures` writes
them as PNG files for a README or a paper: the metric by forced exit layer, quality against
expected saving for all policies on one plot, the exit histograms, and (when the run was
timed) expected against measured saving.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def save_figures(results: pd.DataFrame, out: str | Path, stem: str = "offramp", dpi: int = 130) -> list[Path]:
    """Write ``out/<stem>_{layers,tradeoff,exits[,savings]}.png`` from an off-ramp results table."""
    from probekit import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"layers": plot.offramp_curves, "tradeoff": plot.quality_vs_saving, "exits": plot.exit_histograms}
    if "measured_saving" in results and results["measured_saving"].notna().any():
        figures["savings"] = plot.saving_calibration
    paths = []
    for name, draw in figures.items():
        fig = draw(results)
        path = out / f"{stem}_{name}.png"
        plot.save(fig, path, dpi=dpi)
        paths.append(path)
    return paths
