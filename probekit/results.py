"""The tidy results table shared by every analysis (probes, MLM-head probes, off-ramps).

One row per measured number: model, task, layer, probe, seed, split, metric and value,
with the settings that produced it. Every command saves its table with
:func:`save_results` (Parquet and CSV, written atomically) and the report and
notebooks read any number of them back with :func:`load_results`.

Vocabulary (``source`` says which analysis wrote a row; the report keys on it):

- ``source="probe"`` (``probekit probe``): ``probe`` is ``linear`` or ``mlp``; ``split`` is
  ``dev`` or ``test``; ``metric`` is ``acc`` (the probe), ``control_acc`` (same probe on
  shuffled train labels), ``selectivity`` (acc - control_acc) or ``majority_acc``
  (majority-class baseline); ``layer`` 0..L (0 = embeddings); ``ci_low``/``ci_high`` a
  95% binomial (Wilson) interval; ``reg`` the regularisation chosen on dev.
- ``source="mlm-probe"`` (``probekit mlm-probe``): ``probe="mlm-head"``, ``split="heldout"``,
  ``metric`` ``mlm_acc`` or ``mlm_top5``; ``settings`` holds mask_ratio, dropout_ratio, ...
- ``source="offramp"`` (``probekit offramp``): ``probe`` is the training mode (``frozen``,
  ``deebert``, ``joint``), ``layer`` the forced exit layer, ``metric`` the task's official
  metric(s) (``acc``, ``mcc``, ``f1``, ``pearson``, ``spearman``).
- ``source="exit-policy"``: one row per policy and threshold, with extra columns ``policy``,
  ``threshold``, ``mean_exit_layer``, ``expected_saving`` (and ``measured_saving`` when
  timed); ``layer`` is -1; the exit histogram is rows with ``metric="exit_fraction"`` and
  ``layer`` the exit layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from probekit.errors import ProbekitError
from probekit.io import atomic_path

PARQUET = "results.parquet"
CSV = "results.csv"

REQUIRED = ("model", "task", "layer", "split", "metric", "value")
"""Columns every results table has."""

STANDARD = (
    "source",  # what made the row: "probe", "mlm-probe", "offramp", ...
    "model_fingerprint",
    "probe",  # "linear", "mlp", "mlm-head", "offramp", ...
    "seed",
    "n",  # examples the metric was computed on
    "ci_low",
    "ci_high",
    "reg",  # chosen regularisation (or other selected hyper-parameter)
    "pool",
    "max_length",
    "data_sha256",
    "settings",  # JSON string of any further settings
)
"""Columns with a fixed meaning that tables fill when they apply (NaN/None otherwise)."""


def tidy(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build a results table from dict rows: required columns first, then standard, then extra."""
    df = pd.DataFrame(list(rows))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"results rows lack required columns {missing}")
    for col in STANDARD:
        if col not in df.columns:
            df[col] = None
    if "settings" in df.columns:
        df["settings"] = [
            s if s is None or isinstance(s, str) else json.dumps(s, sort_keys=True) for s in df["settings"]
        ]
    ordered = [*REQUIRED, *STANDARD]
    return df[ordered + [c for c in df.columns if c not in ordered]]


def save_results(df: pd.DataFrame, out: str | Path) -> Path:
    """Write ``out/results.parquet`` and ``out/results.csv`` atomically; return ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PARQUET) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / CSV) as tmp:
        df.to_csv(tmp, index=False)
    return out


def _result_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / PARQUET).is_file():
        return [path / PARQUET]
    found = sorted(path.glob(f"**/{PARQUET}"))
    if not found:
        raise ProbekitError(f"no results found in {path} (expected {PARQUET}, written by probekit probe)")
    return found


def load_results(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Read one or more results tables (files, or folders holding ``results.parquet``) into one DataFrame."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in map(Path, paths):
        if not p.exists():
            raise ProbekitError(f"results {p} do not exist")
        for f in _result_files(p):
            try:
                df = pd.read_csv(f) if f.suffix == ".csv" else pd.read_parquet(f)
            except Exception as e:  # pyarrow/pandas raise many types for a damaged file
                raise ProbekitError(f"could not read results {f}: {e}") from None
            missing = [c for c in REQUIRED if c not in df.columns]
            if missing:
                raise ProbekitError(f"{f} is not a probekit results table (missing columns {missing})")
            frames.append(df)
    return (
        tidy(pd.concat(frames, ignore_index=True).to_dict("records"))
        if len(frames) > 1
        else tidy(frames[0].to_dict("records"))
    )
