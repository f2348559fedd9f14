"""Figures of MLM-head probe results (``source="mlm-probe"``)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from probekit.errors import ProbekitError
from probekit.plot.style import _line_panels, _source, _styled


@_styled
def mlm_curves(results: pd.DataFrame, *, col_wrap: int = 4) -> Figure:
    """MLM-head probe accuracy over layers (``source="mlm-probe"``): one panel per data set, one colour per
    model, solid = top-1, dashed = top-5."""
    rows = _source(results, "mlm-probe")
    if rows.empty:
        raise ProbekitError("no MLM-head probe results (source='mlm-probe'); run `probekit mlm-probe` first")
    rows = rows[rows["layer"].notna()]  # per-model statistics (dip layer, recovery) have no layer
    names = {"mlm_acc": "top-1", "mlm_top5": "top-5", "mlm_masked_acc": "top-1 at fully dropped tokens"}
    rows = rows.assign(metric=rows["metric"].map(names).fillna(rows["metric"]))
    return _line_panels(
        rows,
        ["task"],
        ["model"],
        "metric",
        "MLM-head probe: accuracy of a head trained on each layer at naming the (unmasked) input token",
        "layer",
        col_wrap,
    )
