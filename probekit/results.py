"""The tidy results table shared by every analysis, and its schema written down as code.

One row per measured number: model, task, layer, split, metric and value, with the settings
that produced it. :data:`SCHEMA` lists every column with a fixed meaning (name, dtype,
meaning); :func:`row` builds a row from keyword arguments (checking names and the vocabulary),
:func:`tidy` a table from rows, :func:`validate` checks a table against the schema. Every
command saves its table with :func:`save_results` (Parquet and CSV, atomically) and the report
and notebooks read any number of them back with :func:`load_results`, which migrates tables
written by earlier versions (:func:`migrate`).

``source`` says which analysis wrote a row (the report keys on it):

- ``probe`` (``probekit probe``): ``probe`` the kind (``linear``, ``mlp``, ...); ``split``
  ``dev`` or ``test``; ``metric`` ``acc``, ``control_acc`` (the same probe on shuffled train
  labels), ``control_gap`` (acc - control_acc; called ``selectivity`` before schema 3) or
  ``majority_acc``; ``layer`` 0..L (0 = the embeddings); ``ci_low``/``ci_high`` a 95% Wilson
  interval; ``reg`` the value chosen on dev. The MDL probe (``probe="mdl"``) adds rows with
  ``split="train"``: ``codelength`` (online codelength of the train labels, bits),
  ``uniform_codelength`` (``N log2 K``), ``compression`` (uniform / online) and
  ``control_codelength``/``control_compression`` (the same for the shuffled train labels), ``n``
  the train rows.
- ``mlm-probe`` (``probekit mlm-probe``): ``probe="mlm-head"``, ``split="heldout"``, ``metric``
  ``mlm_acc`` or ``mlm_top5``.
- ``offramp`` (``probekit offramp``): ``probe="offramp"``, ``mode`` the training method
  (``frozen``, ``deebert``, ``joint``...), ``layer`` the forced exit layer 1..L (numbered as
  the probes': 0 would be the embeddings), ``metric`` the task's official metric(s).
- ``exit-policy``: ``probe="offramp"``, ``mode`` as above, one row per policy, threshold and
  metric with ``policy``, ``threshold``, ``mean_exit_layer``, ``expected_saving`` (and
  ``measured_saving`` when timed); ``layer`` is empty (no single layer); the exit histogram
  is rows with ``metric="exit_fraction"`` and ``layer`` the exit layer.
- ``finetune`` (``probekit finetune``): ``probe="finetune"``, ``mode`` the variant slug, ``layer``
  empty, ``split="dev"``, one row per configuration and epoch (``epoch``, ``batch_size``,
  ``lr``) and metric, and ``chosen=True`` on the rows of the selected configuration and epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.io import atomic_path

PARQUET = "results.parquet"
CSV = "results.csv"
SCHEMA_VERSION = 3
"""1: before the ``mode`` column (off-ramp rows had the training mode in ``probe`` and exit-policy
rows ``layer=-1``); 2: probe rows named acc - control_acc ``selectivity``; 3: this schema
(``control_gap``: Hewitt & Liang's selectivity uses control *tasks*, which probekit does not build)."""


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # a pandas dtype: "string", "Int64" (nullable integer), "float64", "boolean", "object"
    meaning: str
    required: bool = False


SCHEMA: tuple[Column, ...] = (
    Column("model", "object", "model name (the --name given to extract, or the model's folder name)", True),
    Column("task", "object", "task name (registry name, or a file's stem)", True),
    Column("layer", "Int64", "0 = embeddings, 1..L the blocks; empty when a row has no single layer", True),
    Column("split", "object", "dev, test, heldout, ...", True),
    Column("metric", "object", "what value measures (acc, control_acc, mlm_acc, mcc, exit_fraction, ...)", True),
    Column("value", "float64", "the number", True),
    Column("source", "object", "the analysis that wrote the row: probe, mlm-probe, offramp, exit-policy, finetune"),
    Column("mode", "object", "how the model was trained for this row: off-ramp method, fine-tuning variant"),
    Column("model_fingerprint", "object", "fingerprint of the model's weights"),
    Column("probe", "object", "probe kind: linear, mlp, mlm-head, offramp, finetune, ..."),
    Column("seed", "Int64", "run seed"),
    Column("n", "Int64", "examples the metric was computed on"),
    Column("ci_low", "float64", "lower end of a 95% interval"),
    Column("ci_high", "float64", "upper end of a 95% interval"),
    Column("reg", "float64", "the regularisation (or other hyper-parameter) chosen on dev"),
    Column("pool", "object", "pooling of the features: mean, cls"),
    Column("max_length", "Int64", "token limit of the inputs"),
    Column("data_sha256", "object", "SHA-256 of the data file"),
    Column("settings", "object", "JSON of the settings that produced the row"),
    Column("protocol", "object", "probe protocol preset: senteval-sklearn, senteval, conneau2018, jawahar2019"),
)
"""Every column with a fixed meaning, in table order; tables may carry further columns
(``policy``, ``threshold``, ``epoch``, ...), described in the module docstring."""

COLUMNS = {c.name: c for c in SCHEMA}
REQUIRED = tuple(c.name for c in SCHEMA if c.required)
"""Columns every results table has."""
STANDARD = tuple(c.name for c in SCHEMA if not c.required)
"""Columns with a fixed meaning that tables fill when they apply (empty otherwise)."""
SOURCES = ("probe", "mlm-probe", "offramp", "exit-policy", "finetune", "senteval")


def row(**values: Any) -> dict[str, Any]:
    """One results row: the required columns must be given (``layer=None`` for no layer)."""
    missing = [c for c in REQUIRED if c not in values]
    if missing:
        raise ValueError(f"a results row needs {missing}")
    if isinstance(values.get("settings"), dict):
        values["settings"] = json.dumps(values["settings"], sort_keys=True)
    return values


def _cast(df: pd.DataFrame) -> pd.DataFrame:
    for col in SCHEMA:
        if col.name not in df.columns or col.dtype == "object":
            continue
        s = df[col.name]
        if col.dtype == "Int64":
            num = pd.to_numeric(s, errors="coerce")
            if ((num.dropna() % 1) != 0).any():
                raise ValueError(f"results column {col.name!r} must hold integers")
            df[col.name] = num.astype("Int64")
        elif col.dtype == "float64":
            df[col.name] = pd.to_numeric(s, errors="coerce").astype("float64")
    return df


def _is_text_or_empty(s: Any) -> bool:
    return s is None or isinstance(s, str) or (isinstance(s, float) and pd.isna(s))


def tidy(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Build a results table: required columns first, then standard, then extra; schema dtypes."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"results rows lack required columns {missing}")
    for col in STANDARD:
        if col not in df.columns:
            df[col] = None
    if "settings" in df.columns:
        df["settings"] = [
            s
            if s is None or isinstance(s, str) or (isinstance(s, float) and pd.isna(s))
            else json.dumps(s, sort_keys=True)
            for s in df["settings"]
        ]
    ordered = [*REQUIRED, *STANDARD]
    df = df[ordered + [c for c in df.columns if c not in ordered]].reset_index(drop=True)
    return _cast(df)


def empty_results() -> pd.DataFrame:
    """A results table with no rows (every schema column)."""
    return tidy([dict.fromkeys(REQUIRED)]).iloc[0:0]


def validate(df: pd.DataFrame) -> None:
    """Raise ``ValueError`` if ``df`` does not follow the schema (columns, dtypes, vocabulary)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"missing required columns {missing}")
    for col in SCHEMA:
        if col.name in df.columns and col.dtype != "object" and str(df[col.name].dtype) != col.dtype:
            raise ValueError(f"column {col.name!r} has dtype {df[col.name].dtype}, the schema says {col.dtype}")
    bad = set(df["source"].dropna()) - set(SOURCES) if "source" in df.columns else set()
    if bad:
        raise ValueError(f"unknown source(s) {sorted(bad)}; known: {SOURCES}")
    if df["value"].isna().any():
        raise ValueError("value holds empty cells")
    if (df["layer"].dropna() < 0).any():
        raise ValueError("layer must be 0..L or empty (no -1 sentinel)")


def migrate(df: pd.DataFrame) -> pd.DataFrame:
    """A table of an earlier schema in this one (version 1: no ``mode`` column; off-ramp rows with the
    training mode in ``probe``; exit-policy rows with ``layer=-1``; versions 1 and 2: the probe rows'
    ``selectivity`` metric, now ``control_gap``; before the ``protocol`` column, linear probe rows were
    SentEval's scikit-learn protocol). A current table is returned as it is."""
    if "protocol" not in df.columns and "probe" in df.columns:
        df = df.copy()
        linear = (df["probe"] == "linear").to_numpy() & (
            (df["source"] == "probe").to_numpy() if "source" in df.columns else True
        )
        df["protocol"] = ["senteval-sklearn" if x else None for x in np.broadcast_to(linear, (len(df),))]
    if "mode" not in df.columns or not df["mode"].notna().any():
        df = _migrate_mode(df)
    if "metric" in df.columns and (df["metric"] == "selectivity").any():
        source = df["source"] if "source" in df.columns else pd.Series(None, index=df.index, dtype=object)
        old = ((df["metric"] == "selectivity") & (source.isna() | (source == "probe"))).to_numpy()
        if old.any():
            df = df.copy()
            df.loc[old, "metric"] = "control_gap"
    return df


def _migrate_mode(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "mode" not in df.columns:
        df["mode"] = None
    if "source" in df.columns:
        ramp = df["source"].isin(["offramp", "exit-policy"]).to_numpy()
        if ramp.any():
            df["mode"] = df["mode"].astype(object)
            df.loc[ramp, "mode"] = df.loc[ramp, "probe"]
            df.loc[ramp, "probe"] = "offramp"
            layer = pd.to_numeric(df["layer"], errors="coerce").astype("Int64")
            df["layer"] = layer.mask(ramp & (layer == -1).fillna(False).to_numpy())
    return df


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
    """Read one or more results tables (files, or folders holding ``results.parquet``) into one DataFrame,
    migrated to the current schema."""
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
            frames.append(migrate(df))
    return tidy(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
