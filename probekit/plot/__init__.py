"""Figures of results tables; every function returns a :class:`matplotlib.figure.Figure`.

One module per analysis's figures, all in one house style (:mod:`probekit.plot.style`)::

    from probekit import analysis, plot
    plot.heatmap(results)                              # layer x task, one panel per model
    plot.curves(results)                               # per task, with bands and baselines
    plot.delta_heatmap(analysis.deltas(ft, pt))        # fine-tuned - pre-trained, 0 = yellow
    plot.finetune_grid(analysis.deltas(ft, pt), top=4) # fine-tuning task x probing task
    plot.mlm_curves(results); plot.offramp_curves(results); plot.quality_vs_saving(results)

Probe figures draw one probe and pooling (``probe=``/``pool=`` choose when the results hold
several; :func:`configs` lists them).
"""

from __future__ import annotations

from probekit.plot.deltas import delta_heatmap, finetune_grid
from probekit.plot.finetune import finetune_epochs
from probekit.plot.forgetting import forgetting_curves
from probekit.plot.mlm import mlm_curves
from probekit.plot.offramp import (
    exit_histograms,
    methods_vs_saving,
    offramp_curves,
    quality_vs_saving,
    save_figures,
    saving_calibration,
)
from probekit.plot.probing import band_description, configs, curves, heatmap
from probekit.plot.style import (
    CELL_H,
    CELL_W,
    DIVERGING,
    METRIC_NAMES,
    SEQUENTIAL,
    STYLE,
    metric_label,
    model_colours,
    save,
    sentence,
    signed,
)

__all__ = [
    "CELL_H",
    "CELL_W",
    "DIVERGING",
    "METRIC_NAMES",
    "SEQUENTIAL",
    "STYLE",
    "band_description",
    "configs",
    "curves",
    "delta_heatmap",
    "exit_histograms",
    "finetune_epochs",
    "finetune_grid",
    "forgetting_curves",
    "heatmap",
    "methods_vs_saving",
    "metric_label",
    "mlm_curves",
    "model_colours",
    "offramp_curves",
    "quality_vs_saving",
    "save",
    "save_figures",
    "saving_calibration",
    "sentence",
    "signed",
]
