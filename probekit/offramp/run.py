"""``probekit offramp``: train off-ramps, sweep exit policies, time real early exit.

The steps, for one model, task and training mode:

1. read the task (train, dev), optionally subsample train / dev, and hold a part of train
   out (``holdout``) to fit the learned exit policies on outputs the off-ramps were not
   trained on;
2. train the off-ramps (:mod:`probekit.offramp.train`); ``frozen`` reads the states from a
   ``pool="cls"`` feature cache (made or reused under ``cache_dir``, so it is cheap and
   resumable), the other modes fine-tune a copy of the encoder (checkpointed in ``out``);
3. record every off-ramp's output on the held-out and dev splits;
4. the task metric at every forced exit layer, and each policy's threshold sweep on dev
   (metric, mean exit layer, exit histogram, expected saving);
5. unless ``measure=False``, real early-exit inference at every swept threshold, batch size 1
   and batched, timed against full inference on the same dev samples (measured saving);
6. a tidy results table (``source`` ``offramp`` and ``exit-policy``, see
   :mod:`probekit.results`), the off-ramps and policies (``offramps.pt``), the dev outputs
   (``records.npz``) and ``run.json`` written to ``out``.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probekit import metrics as M
from probekit.backbone import Backbone, load_backbone
from probekit.cpu import cpu_threads
from probekit.data import HELDOUT, Split, Task, TaskData, load_task
from probekit.encoding import encode, tokenize
from probekit.errors import ProbekitError
from probekit.extraction import extract_task
from probekit.io import atomic_path, write_json
from probekit.offramp import inference, policies
from probekit.offramp.heads import OffRamps, Record, record
from probekit.offramp.policies import Policy, PolicyConfig, SweepPoint
from probekit.offramp.train import MODES, TrainConfig, deebert_stage2, finetune, fit_heads, trainable_copy
from probekit.results import save_results, tidy


@dataclass
class OffRampRun:
    """What :func:`run_offramp` produced (also written to ``out``)."""

    results: pd.DataFrame
    out: Path
    heads: OffRamps
    policies: dict[str, Policy]
    dev: Record
    encoder: torch.nn.Module
    timings: dict[str, float] = field(default_factory=dict)


def _fine_tuned_backbone(encoder: torch.nn.Module, base: Backbone, mode: str) -> Backbone:
    return Backbone(
        model=encoder,
        tokenizer=base.tokenizer,
        name=f"{base.name}-{mode}",
        source=base.source,
        device=base.device,
        dtype=torch.float32,
    )


def train_offramps(
    backbone: Backbone,
    data: TaskData,
    mode: str,
    cfg: TrainConfig,
    max_length: int,
    cache_dir: Path,
    out: Path,
    reader_options: dict[str, Any],
    progress: bool = True,
) -> tuple[OffRamps, torch.nn.Module, dict[str, np.ndarray], dict[str, list[float]]]:
    """Train off-ramps in ``mode``; return them, the encoder they sit on, the first-token states of
    every layer of the recorded splits ([N, L+1, D]) and the loss history."""
    if mode not in MODES:
        raise ProbekitError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    n_layers = backbone.n_layers - 1
    torch.manual_seed(cfg.seed)
    heads = OffRamps(n_layers, backbone.hidden_size, data.n_classes, cfg.dropout).to(backbone.device)
    train = data.splits["train"]
    recorded = [s for s in (HELDOUT, "dev") if s in data.splits]
    history: dict[str, list[float]] = {}
    if mode == "frozen":
        cache = extract_task(
            backbone,
            data,
            cache_dir,
            pool="cls",
            max_length=max_length,
            storage_dtype="float32",
            reader_options=reader_options,
            progress=progress,
        )
        history["off-ramps"] = fit_heads(heads, np.asarray(cache["train"][:, 1:]), train.labels, cfg, progress=progress)
        states = {s: np.asarray(cache[s]) for s in recorded}
        return heads, backbone.model, states, history

    encoder = trainable_copy(backbone.model)
    tok = tokenize(backbone.tokenizer, train.texts, train.text_pairs, max_length)
    pad_id = int(backbone.tokenizer.pad_token_id)
    common = {
        "pad_id": pad_id,
        "input_names": backbone.input_names,
        "device": backbone.device,
        "progress": progress,
        "key_extra": {"model": backbone.fingerprint, "mode": mode},
    }
    if mode == "deebert":
        history["stage 1"] = finetune(
            encoder,
            heads,
            tok,
            train.labels,
            cfg=cfg,
            ramps=[n_layers - 1],
            checkpoint=out / "checkpoint-deebert-stage1.pt",
            desc="deebert stage 1",
            **common,
        )
        tuned = _fine_tuned_backbone(encoder, backbone, mode)
        history["stage 2"] = deebert_stage2(tuned, heads, train, cfg, max_length, progress=progress)
    else:
        history["joint"] = finetune(
            encoder, heads, tok, train.labels, cfg=cfg, checkpoint=out / "checkpoint-joint.pt", desc="joint", **common
        )
        tuned = _fine_tuned_backbone(encoder, backbone, mode)
    states = {
        s: encode(
            tuned, data.splits[s].texts, data.splits[s].text_pairs, pool="cls", max_length=max_length, progress=progress
        )
        for s in recorded
    }
    return heads, tuned.model, states, history


def layer_scores(dev: Record, metric_names: Sequence[str]) -> list[dict[str, float]]:
    """The task metric(s) when every sample exits at layer 1, 2, ..., L."""
    preds = dev.predictions()
    return [M.score(metric_names, dev.labels, preds[:, i]) for i in range(dev.n_layers)]


def run_offramp(
    model: str | Path | Backbone,
    task: str | Path | Task,
    out: str | Path,
    mode: str = "frozen",
    policy_names: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    train_n: int | None = None,
    dev_n: int | None = None,
    holdout: float = 0.1,
    max_length: int = 128,
    train: TrainConfig | None = None,
    policy: PolicyConfig | None = None,
    measure: bool = True,
    measure_n: int | None = None,
    measure_batch_size: int = 32,
    measure_points: int | None = 5,
    measure_threads: int | None = 1,
    measure_repeats: int = 1,
    device: str = "auto",
    name: str | None = None,
    cache_dir: str | Path | None = None,
    unseen_labels: str = "error",
    trust_remote_code: bool = False,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> OffRampRun:
    """Off-ramps at every layer of ``model`` on ``task``, exit policies, and measured early exit.

    What ``probekit offramp`` runs; see the module docstring for the steps. ``seed`` sets the
    subsampling, initialisation and training order (it overrides ``train.seed``/``policy.seed``);
    ``threads`` the CPU threads of the whole run (default: torch's; on a busy shared CPU, 1 is
    often much faster).
    """
    with cpu_threads(threads):
        started = time.perf_counter()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
        train = TrainConfig(**{**asdict(train or TrainConfig()), "seed": seed})
        pcfg = PolicyConfig(**{**asdict(policy or PolicyConfig()), "seed": seed})
        full = load_task(task, data_dir, unseen_labels=unseen_labels) if not isinstance(task, TaskData) else task
        regression = M.is_regression(full.task) or not full.label_names
        names = policies.parse_policies(policy_names, regression)
        metric_names = M.task_metrics(full.task)
        if regression and not set(metric_names) <= set(M.REGRESSION_METRICS):
            metric_names = list(M.REGRESSION_METRICS)
        data = full.subsample(train_n, dev_n, holdout, seed)
        learned = [n for n in names if policies.POLICIES[n].learned]
        if learned and HELDOUT not in data.splits:
            raise ProbekitError(
                f"the learned exit policies {learned} need held-out training examples; use --holdout > 0"
            )
        backbone = (
            model
            if isinstance(model, Backbone)
            else load_backbone(model, device=device, trust_remote_code=trust_remote_code, name=name)
        )
        if measure:
            inference.LayerStepper(backbone.model)  # fail early on an unsupported architecture
        n_layers = backbone.n_layers - 1
        subset = {"train_n": train_n, "dev_n": dev_n, "holdout": holdout, "seed": seed}
        reader_options = {"unseen_labels": unseen_labels, "offramp_subset": subset}

        t0 = time.perf_counter()
        heads, encoder, states, history = train_offramps(
            backbone, data, mode, train, max_length, cache_dir, out, reader_options, progress
        )
        timings = {"train": time.perf_counter() - t0}
        dev = record(heads, states["dev"], data.splits["dev"].labels)
        held = record(heads, states[HELDOUT], data.splits[HELDOUT].labels) if HELDOUT in states else None

        t0 = time.perf_counter()
        fitted: dict[str, Policy] = {}
        for pname in names:
            pol = policies.make_policy(pname, n_layers, data.n_classes, pcfg)
            if pol.learned:
                pol.fit(held, progress=progress)  # type: ignore[arg-type]
            fitted[pname] = pol
        sweeps = {pname: policies.sweep(pol, dev, metric_names, seed=seed) for pname, pol in fitted.items()}
        timings["policies"] = time.perf_counter() - t0

        timed: dict[str, dict[str, Any]] = {}
        if measure:
            t0 = time.perf_counter()
            with cpu_threads(measure_threads):
                timed = _measure_all(
                    backbone,
                    encoder,
                    heads,
                    data.splits["dev"],
                    fitted,
                    sweeps,
                    dev,
                    max_length,
                    measure_n,
                    measure_batch_size,
                    measure_points,
                    seed,
                    progress,
                    measure_repeats,
                )
            timings["measure"] = time.perf_counter() - t0

        settings = {
            "mode": mode,
            "train": asdict(train),
            "policy": asdict(pcfg),
            "train_n": len(data.splits["train"]),
            "heldout_n": len(held) if held is not None else 0,
            "dev_n": len(dev),
            "holdout": holdout,
            "measure_batch_size": measure_batch_size,
            "measure_threads": measure_threads,
            "measure_n": measure_n,
            "measure_points": measure_points,
            "measure_repeats": measure_repeats,
            "threads": torch.get_num_threads(),
            "device": str(backbone.device),
        }
        base = {
            "model": backbone.name,
            "task": full.name,
            "split": "dev",
            "seed": seed,
            "probe": mode,
            "model_fingerprint": backbone.fingerprint,
            "pool": "cls",
            "max_length": max_length,
            "data_sha256": full.sha256,
            "settings": json.dumps(settings, sort_keys=True),
        }
        rows = _rows(base, dev, metric_names, sweeps, timed, n_layers)
        df = tidy(rows)
        save_results(df, out)
        _save_artifacts(out, heads, fitted, dev, full, settings, history, timings, started)
        timings["total"] = time.perf_counter() - started
        return OffRampRun(df, out, heads, fitted, dev, encoder, timings)


def timing_points(points: Sequence[SweepPoint], k: int | None, n_layers: int) -> list[SweepPoint]:
    """Up to ``k`` thresholds of a sweep with distinct exits, spread over the range of expected savings."""
    distinct: dict[bytes, SweepPoint] = {}
    for p in points:
        distinct.setdefault(p.exit_layers.tobytes(), p)
    ranked = sorted(distinct.values(), key=lambda p: p.expected_saving(n_layers))
    if k is None or len(ranked) <= k:
        return ranked
    return [ranked[i] for i in sorted({round(x) for x in np.linspace(0, len(ranked) - 1, k)})]


def _measure_all(
    backbone: Backbone,
    encoder: torch.nn.Module,
    heads: OffRamps,
    dev_split: Split,
    fitted: dict[str, Policy],
    sweeps: dict[str, list[SweepPoint]],
    dev: Record,
    max_length: int,
    measure_n: int | None,
    batch_size: int,
    points_per_policy: int | None,
    seed: int,
    progress: bool,
    repeats: int = 1,
) -> dict[str, dict[str, Any]]:
    """Time chosen thresholds of each policy, batch size 1 and batched, against full inference."""
    n = len(dev_split) if measure_n is None else min(measure_n, len(dev_split))
    tok = tokenize(
        backbone.tokenizer,
        dev_split.texts[:n],
        dev_split.text_pairs[:n] if dev_split.text_pairs is not None else None,
        max_length,
    )
    pad_id = int(backbone.tokenizer.pad_token_id)
    dev_n = dev.subset(np.arange(n))
    args = {"device": backbone.device, "seed": seed, "repeats": repeats}
    inference.warm_up(encoder, heads, tok, pad_id, (1, batch_size), device=backbone.device)
    chosen = {pname: timing_points(points, points_per_policy, dev.n_layers) for pname, points in sweeps.items()}
    bar = tqdm(
        total=sum(map(len, chosen.values())),
        desc="timing early exit",
        disable=not progress,
        leave=False,
        unit="threshold",
    )
    timed: dict[str, dict[str, Any]] = {}
    for pname, points in chosen.items():
        pol = fitted[pname]
        for point in points:
            one, many = (
                inference.measure(encoder, heads, tok, pad_id, pol, point.threshold, bs, **args)
                for bs in (1, batch_size)
            )
            offline = policies.simulate(pol, dev_n, point.threshold, seed=seed)
            timed[f"{pname}@{point.threshold}"] = {
                "measured_saving": one.measured_saving,
                "measured_saving_batched": many.measured_saving,
                "expected_saving_timed": policies.expected_saving(one.exit_layers, dev.n_layers),
                "online_agreement": float((one.exit_layers == offline).mean()),
                "timed_n": n,
                "seconds": one.seconds,
                "full_seconds": one.full_seconds,
                "seconds_batched": many.seconds,
                "full_seconds_batched": many.full_seconds,
            }
            bar.update()
    bar.close()
    return timed


def _rows(
    base: dict[str, Any],
    dev: Record,
    metric_names: Sequence[str],
    sweeps: dict[str, list[SweepPoint]],
    timed: dict[str, dict[str, Any]],
    n_layers: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for layer, scores in enumerate(layer_scores(dev, metric_names), start=1):
        rows += [
            {
                **base,
                "source": "offramp",
                "layer": layer,
                "metric": m,
                "value": v,
                "n": len(dev),
                "expected_saving": 1 - layer / n_layers,
            }
            for m, v in scores.items()
        ]
    for pname, points in sweeps.items():
        for p in points:
            extra = {
                "policy": pname,
                "threshold": p.threshold,
                "threshold_name": p.threshold_name,
                "mean_exit_layer": p.mean_exit_layer,
                "expected_saving": p.expected_saving(n_layers),
                "n": len(dev),
                **timed.get(f"{pname}@{p.threshold}", {}),
            }
            rows += [
                {**base, **extra, "source": "exit-policy", "layer": -1, "metric": m, "value": v}
                for m, v in p.scores.items()
            ]
            counts = policies.exit_histogram(p.exit_layers, n_layers)
            rows += [
                {
                    **base,
                    **extra,
                    "source": "exit-policy",
                    "layer": i + 1,
                    "metric": "exit_fraction",
                    "value": c / len(dev),
                }
                for i, c in enumerate(counts)
            ]
    return rows


def _save_artifacts(
    out: Path,
    heads: OffRamps,
    fitted: dict[str, Policy],
    dev: Record,
    data: TaskData,
    settings: dict[str, Any],
    history: dict[str, list[float]],
    timings: dict[str, float],
    started: float,
) -> None:
    state = {
        "heads": heads.state_dict(),
        "policies": {k: p.state_dict() for k, p in fitted.items()},
        "n_layers": heads.n_layers,
        "n_classes": data.n_classes,
        "label_names": data.label_names,
        "settings": settings,
    }
    with atomic_path(out / "offramps.pt") as tmp:
        torch.save(state, tmp)
    with atomic_path(out / "records.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, outputs=dev.outputs, labels=dev.labels)
    write_json(
        out / "run.json",
        {
            "task": data.name,
            "settings": settings,
            "history": history,
            "policy_history": {k: p.history for k, p in fitted.items() if p.history},
            "seconds": {**timings, "total": time.perf_counter() - started},
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    )


def summarize(results: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for a console summary: the metric at each forced exit layer, and each policy's best threshold
    (highest metric, then largest expected saving)."""
    layers = results[results["source"] == "offramp"]
    per_layer = [
        {"mode": r.probe, "layer": int(r.layer), "metric": r.metric, "value": f"{r.value:.4f}"}
        for r in layers.itertuples()
    ]
    pol = results[(results["source"] == "exit-policy") & (results["metric"] != "exit_fraction")]
    best = []
    for (mode, name, metric), cur in pol.groupby(["probe", "policy", "metric"], sort=False):
        top = cur.sort_values(["value", "expected_saving"], ascending=False).iloc[0]
        best.append(
            {
                "mode": mode,
                "policy": name,
                "threshold": f"{top.threshold:g}",
                "metric": metric,
                "value": f"{top.value:.4f}",
                "mean exit layer": f"{top.mean_exit_layer:.2f}",
                "expected saving": f"{top.expected_saving:.3f}",
            }
        )
    return per_layer, best
