"""``mlm_probe``: what ``probekit mlm-probe`` runs (I/O around :class:`~probekit.mlm.estimator.MLMHeadProbe`).

Read the corpus, split it by passage, optionally sweep ``mask_ratio`` x ``dropout_ratio``
(:func:`sweep_ratios` on a validation split of the training passages, then train on all training
passages with the chosen setting), train the heads (checkpointed under
``out/checkpoints``, resumable) and save the per-layer held-out ``mlm_acc``/``mlm_top5`` to
``out/results.{parquet,csv}`` (and ``out/sweep.csv``). The output folder is stamped with the
fingerprint of the run (:mod:`probekit.fingerprint`): the same run again resumes or only re-scores,
another one is refused unless ``fresh``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from probekit.backbone import Backbone, load_backbone
from probekit.config import Config, option, split_options
from probekit.data.corpus import CORPUS_FORMATS, read_corpus, split_passages, window_passages
from probekit.encoding import Tokenized
from probekit.errors import ParamError
from probekit.fingerprint import STAMP, read_stamp, resume_rule, write_stamp
from probekit.io import atomic_path, sha256_json, write_json
from probekit.mlm.estimator import MLMConfig, MLMHeadProbe, check_inputs, windows_digest
from probekit.paths import claim_output
from probekit.results import CSV, PARQUET, save_results, tidy
from probekit.runs import Run

REFERENCE_CORRUPTION = (0.15, 1.0)
"""The masked task every sweep setting is also scored on: 15% of tokens, fully dropped."""


def _corpus_formats() -> list[str]:
    """``auto`` and every registered corpus format (plugins' too)."""
    return ["auto", *CORPUS_FORMATS.names()]


@dataclass(frozen=True)
class MLMRunConfig(Config):
    """The runner's own options (the probe's are :class:`~probekit.mlm.estimator.MLMConfig`)."""

    component: ClassVar[str] = "mlm-probe"

    heldout: float = option(0.1, "Held-out passages: a fraction below 1, or a number of passages.", gt=0)
    sweep_mask_ratios: tuple[float, ...] | None = option(
        None, "Sweep these mask ratios (comma-separated), then train the best.", gt=0, le=1
    )
    sweep_dropout_ratios: tuple[float, ...] | None = option(
        None, "Sweep these dropout ratios (comma-separated).", ge=0, le=1
    )
    sweep_steps: int | None = option(None, "Training steps of each sweep setting (default: the training steps).", ge=1)
    validation: float = option(
        0.1,
        "Validation passages split off the training passages for the sweep's choice: a fraction below 1, "
        "or a number of passages (the held-out passages never enter the choice).",
        gt=0,
    )
    corpus_format: str = option(
        "auto",
        "How to read the corpus; auto: .json is SQuAD, another file is text, else a task.",
        choices=_corpus_formats,
    )


IO_OPTIONS = ("corpus_format",)
"""Runner options that do not change the results (left out of the output folder's fingerprint)."""


def checkpoint_name(probe: MLMHeadProbe, backbone: Backbone, train: Sequence[str] | Tokenized) -> str:
    """The file name of the checkpoint of ``probe`` trained on ``train``: a short hash of what the heads
    depend on (the same names as earlier versions, so their checkpoints are found)."""
    data = windows_digest(train) if isinstance(train, Tokenized) else sha256_json(list(train))
    key = sha256_json({**probe.settings(), "model": backbone.fingerprint, "data": data})[:16]
    return f"heads-{key}.safetensors"


def sweep_ratios(
    backbone: Backbone,
    train: Sequence[str] | Tokenized,
    heldout: Sequence[str] | Tokenized,
    mask_ratios: Sequence[float],
    dropout_ratios: Sequence[float],
    probe: MLMHeadProbe | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_seconds: float = 60.0,
) -> pd.DataFrame:
    """Train and score heads (``probe``'s other options) for every ``mask_ratio`` x ``dropout_ratio``.

    ``heldout``: the passages each setting is scored on; the runner passes a validation split of the
    training passages (:func:`sweep_split`), never the passages it reports. One row per setting.
    Columns: the two ratios, ``acc_l<i>`` (unmasked accuracy of layer i on ``heldout``),
    ``mean_acc``, ``mean_masked_acc`` (the masked task of ``REFERENCE_CORRUPTION``: 15% of tokens
    fully dropped, the same for every setting), ``criterion`` (the mean of the two) and
    ``chosen`` (the setting with the best criterion: heads that name a token both when they see
    it and when they must infer it from context, as BERT's own head is trained to).
    """
    base = probe if probe is not None else MLMHeadProbe()
    rows = []
    for mr in mask_ratios:
        for dr in dropout_ratios:
            p = base.clone(mask_ratio=mr, dropout_ratio=dr)
            ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / checkpoint_name(p, backbone, train)
            p.fit(backbone, train, checkpoint=ckpt, checkpoint_seconds=checkpoint_seconds)
            clean = p.evaluate(backbone, heldout)
            masked = p.evaluate(backbone, heldout, corrupt=REFERENCE_CORRUPTION)
            row: dict[str, Any] = {"mask_ratio": mr, "dropout_ratio": dr}
            row.update({f"acc_l{layer}": acc for layer, acc in zip(clean["layer"], clean["acc"], strict=True)})
            row["mean_acc"] = float(clean["acc"].mean())
            row["mean_masked_acc"] = float(masked["acc"].mean())
            row["criterion"] = (row["mean_acc"] + row["mean_masked_acc"]) / 2
            rows.append(row)
    df = pd.DataFrame(rows)
    df["chosen"] = df.index == df["criterion"].idxmax()
    return df


def sweep_split(train_texts: Sequence[str], validation: float, seed: int) -> tuple[list[str], list[str]]:
    """The training passages split into (sweep training, sweep validation): the ratio choice is made on the
    validation part, so the held-out passages whose accuracies are reported never enter it."""
    try:
        return split_passages(train_texts, validation, seed + 1)
    except ParamError as e:
        raise ParamError("validation", str(e).split(": ", 1)[-1]) from None


def passage_ids(tokenizer: Any, passages: Sequence[str], max_length: int) -> np.ndarray:
    """The passage of each window of ``window_passages(tokenizer, passages, max_length)``."""
    counts = [len(window_passages(tokenizer, [p], max_length).lengths) for p in passages]
    return np.repeat(np.arange(len(passages)), counts)


def _probe_from(probe: MLMHeadProbe | MLMConfig | None, options: dict[str, Any], progress: bool) -> MLMHeadProbe:
    if isinstance(probe, MLMHeadProbe):
        return probe.clone(progress=progress, **options)
    return MLMHeadProbe(probe, progress=progress, **options)


def mlm_probe(
    model: str | Path | Backbone,
    corpus: str | Path | Sequence[str | Path],
    out: str | Path,
    probe: MLMHeadProbe | MLMConfig | None = None,
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    name: str | None = None,
    trust_remote_code: bool = False,
    checkpoint_seconds: float = 60.0,
    fresh: bool = False,
    progress: bool = True,
    **options: Any,
) -> Run:
    """Train MLM heads on every layer of ``model`` on ``corpus`` and score them on held-out passages.

    ``probe``: an :class:`MLMHeadProbe` (unfitted; its parameters are used) or an :class:`MLMConfig`;
    ``options``: options of :class:`MLMConfig` (``mask_ratio``, ``steps``, ...) on top of it, and
    of :class:`MLMRunConfig` (``heldout``, ``sweep_mask_ratios``, ...). Returns a :class:`Run`:
    ``results`` (the tidy rows), ``paths``, ``timings``, ``estimator`` (the fitted probe, also
    ``run.probe``), ``run.sweep`` (the sweep table or None) and ``run.info``.
    """
    began = time.perf_counter()
    known = [*MLMConfig.field_names(), *MLMRunConfig.field_names()]
    for key in options:
        if key not in known:
            raise ParamError(key, f"is not an option of mlm_probe; its options: {', '.join(known)}")
    probe_options, run_options = split_options(options, MLMConfig)
    run_cfg = MLMRunConfig.from_mapping(run_options)
    base = _probe_from(probe, probe_options, progress)
    cfg = base.get_config()
    out = Path(out)
    ckpt_dir = out / "checkpoints"

    data = read_corpus(corpus, data_dir=data_dir, format=run_cfg.corpus_format)
    train_texts, heldout_texts = split_passages(data.passages, run_cfg.heldout, cfg.seed)
    backbone = (
        model
        if isinstance(model, Backbone)
        else load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, name=name)
    )
    run_settings = {k: v for k, v in run_cfg.to_dict().items() if k not in IO_OPTIONS}
    stamp_settings = {"probe": base.settings(), **run_settings}
    stamp_inputs = {"model": backbone.fingerprint, "corpus": data.sha256}
    claim_output(out, "out", force=fresh, force_param="fresh")
    if not fresh:
        check_inputs(read_stamp(out), stamp_inputs, where=out, what="MLM-probe results")
    if resume_rule(out, stamp_settings, stamp_inputs, fresh=fresh, what="MLM-probe results") == "fresh":
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (out / "sweep.csv").unlink(missing_ok=True)
    write_stamp(out, stamp_settings, stamp_inputs)
    max_length = backbone.usable_length(cfg.max_length)
    train = window_passages(backbone.tokenizer, train_texts, max_length)
    held = window_passages(backbone.tokenizer, heldout_texts, max_length)
    timings = {"load": time.perf_counter() - began}
    paths = {"out": out, "stamp": out / STAMP}

    sweep_df = None
    mask_ratio, dropout_ratio = cfg.mask_ratio, cfg.dropout_ratio
    sweeping = bool(run_cfg.sweep_mask_ratios or run_cfg.sweep_dropout_ratios)
    grid_steps = run_cfg.sweep_steps if run_cfg.sweep_steps is not None else cfg.steps
    split_info: dict[str, Any] = {"heldout": heldout_texts, "train": train_texts}
    if sweeping:
        t0 = time.perf_counter()
        sweep_fit, sweep_val = sweep_split(train_texts, run_cfg.validation, cfg.seed)
        split_info.update(sweep_train=sweep_fit, sweep_validation=sweep_val)
        sweep_df = sweep_ratios(
            backbone,
            window_passages(backbone.tokenizer, sweep_fit, max_length),
            window_passages(backbone.tokenizer, sweep_val, max_length),
            run_cfg.sweep_mask_ratios or [mask_ratio],
            run_cfg.sweep_dropout_ratios or [dropout_ratio],
            probe=base.clone(steps=grid_steps, epochs=None if grid_steps is not None else cfg.epochs),
            checkpoint_dir=ckpt_dir,
            checkpoint_seconds=checkpoint_seconds,
        )
        best = sweep_df[sweep_df["chosen"]].iloc[0]
        mask_ratio, dropout_ratio = float(best["mask_ratio"]), float(best["dropout_ratio"])
        with atomic_path(out / "sweep.csv") as tmp:
            sweep_df.to_csv(tmp, index=False)
        paths["sweep"] = out / "sweep.csv"
        timings["sweep"] = time.perf_counter() - t0

    fitted = base.clone(mask_ratio=mask_ratio, dropout_ratio=dropout_ratio)
    ckpt = ckpt_dir / checkpoint_name(fitted, backbone, train)
    t0 = time.perf_counter()
    fitted.fit(backbone, train, checkpoint=ckpt, checkpoint_seconds=checkpoint_seconds)
    timings["fit"] = time.perf_counter() - t0
    paths["checkpoint"] = ckpt
    settings = {
        **fitted.settings(),
        "steps": fitted.steps_,
        "corpus": data.name,
        "corpus_sources": data.sources,
        "heldout": run_cfg.heldout,
        "n_train_passages": len(train_texts),
        "n_heldout_passages": len(heldout_texts),
        "n_train_windows": len(train.lengths),
        "chosen_by": "sweep" if sweep_df is not None else "given",
        "checkpoint": str(ckpt),
    }
    if sweep_df is not None:
        settings["sweep"] = {
            "mask_ratios": list(run_cfg.sweep_mask_ratios or [mask_ratio]),
            "dropout_ratios": list(run_cfg.sweep_dropout_ratios or [dropout_ratio]),
            "steps": grid_steps,
            "criterion": "mean of unmasked and reference-masked accuracy on the validation passages",
            "chosen_on": "a validation split of the training passages (never the held-out ones)",
            "n_validation_passages": len(split_info["sweep_validation"]),
            "table": "sweep.csv",
        }
    t0 = time.perf_counter()
    groups = passage_ids(backbone.tokenizer, heldout_texts, max_length)
    rows = fitted.rows(
        backbone,
        held,
        task=data.name,
        data_sha256=data.sha256,
        settings={**settings, "intervals": "passage bootstrap"},
        progress=progress,
        passage_ids=groups if len(groups) == len(held.lengths) else None,
        masked=REFERENCE_CORRUPTION,
    )
    timings["score"] = time.perf_counter() - t0
    results = tidy(rows)
    save_results(results, out)
    paths.update(results=out / PARQUET, csv=out / CSV, run=out / "mlm_run.json")
    info = {
        "timings": fitted.timings_,
        "resumed_from": fitted.resumed_from_,
        "steps": fitted.steps_,
        "n_train_windows": len(train.lengths),
        "n_heldout_windows": len(held.lengths),
    }
    write_json(out / "mlm_run.json", {"settings": settings, **info, "model": backbone.info()})
    timings["total"] = time.perf_counter() - began
    return Run(
        results=results,
        paths=paths,
        timings=timings,
        estimator=fitted,
        details={"probe": fitted, "sweep": sweep_df, "info": info, "settings": settings, "passages": split_info},
    )
