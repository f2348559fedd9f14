"""``probekit offramp``: train off-ramps, sweep exit policies, time real early exit.

The steps, for one model, task and training method:

1. read the task (train, dev), optionally subsample train / dev, and hold a part of train
   out (``holdout``) to fit the learned exit policies on outputs the off-ramps were not
   trained on;
2. train the off-ramps with the method (:mod:`probekit.offramp.methods`); ``frozen`` reads the
   states from a ``pool="cls"`` feature cache (made or reused under ``cache_dir``, so it is cheap
   and resumable), the other methods fine-tune a copy of the encoder (checkpointed in ``out``,
   resumed by the resume rule of :mod:`probekit.fingerprint`);
3. record every off-ramp's output on the held-out and dev splits;
4. the task metric at every forced exit layer, and each policy's threshold sweep on dev
   (metric, mean exit layer, exit histogram, expected saving);
5. unless ``measure=False``, real early-exit inference at every swept threshold, batch size 1
   and batched, timed against full inference on the same dev samples (measured saving);
6. a tidy results table (``source`` ``offramp`` and ``exit-policy``, ``probe="offramp"``,
   ``mode`` the method, see :mod:`probekit.results`), the off-ramps and policies
   (``offramps.safetensors`` + ``offramps.json``), the dev outputs (``records.npz``) and
   ``run.json`` written to ``out``.

The options are config dataclasses (:class:`OffRampConfig`, :class:`MeasureConfig`, the method's
:class:`~probekit.offramp.train.TrainConfig`, :class:`~probekit.offramp.policies.PolicyConfig`); the CLI
derives its flags from them.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from probekit import metrics as M
from probekit.backbone import Backbone, load_backbone
from probekit.config import Config, option
from probekit.cpu import cpu_threads
from probekit.data import HELDOUT, Split, Task, TaskData, load_task
from probekit.encoding import tokenize
from probekit.errors import ParamError, ProbekitError
from probekit.io import atomic_path, write_json
from probekit.offramp import checkpoint as ckpt
from probekit.offramp import inference, policies
from probekit.offramp.estimator import OffRamps, layer_rows
from probekit.offramp.heads import OffRampHeads, Record, record
from probekit.offramp.methods import TRAINING_METHODS, FrozenMethod, TrainingJob, TrainingMethod
from probekit.offramp.policies import EXIT_POLICIES, Policy, PolicyConfig, SweepPoint
from probekit.offramp.train import TrainConfig
from probekit.paths import claim_output
from probekit.results import row, save_results, tidy
from probekit.runs import Run


@dataclass(frozen=True)
class OffRampConfig(Config):
    """Options of an off-ramp run: the data, the policies swept and the run's seed and threads."""

    component: ClassVar[str] = "the off-ramp run"

    policies: str = option("all", "Comma-separated exit policies (or all: the default set).", cli=False)
    train_n: int | None = option(None, "Train on a random subset of this many examples.", ge=1)
    dev_n: int | None = option(None, "Evaluate on a random subset of this many dev examples.", ge=1)
    holdout: float = option(0.1, "Fraction of train held out to fit the learned policies.", ge=0, lt=1)
    max_length: int = option(128, "Truncate texts to this many tokens.", ge=2)
    seed: int = option(0, "Seed of subsampling, initialisation and training order.", ge=0)
    threads: int | None = option(
        None, "CPU threads for the whole run (0 = torch's default; 1 is often faster on a busy CPU).", ge=0
    )
    unseen_labels: str = option(
        "error", "Dev labels never seen in train: error or drop.", choices=("error", "drop"), cli=False
    )
    policy_fit: str = option(
        "trained",
        "Learned policies: trained (use the LTE / halting layer the method trained, post hoc where it trained "
        "none) or post-hoc (always fit on the held-out outputs).",
        choices=("trained", "post-hoc"),
    )
    choose_tolerance: float = option(
        0.01, "Chosen threshold: the largest saving within this of the full model's held-out score.", ge=0
    )


@dataclass(frozen=True)
class MeasureConfig(Config):
    """Options of the timed early exit (the measured savings)."""

    component: ClassVar[str] = "the early-exit timing"

    measure: bool = option(True, "Time real early exit against full inference.")
    time_n: int | None = option(150, "Time on the first N dev examples (none: all; each threshold runs twice).", ge=1)
    time_thresholds: int | None = option(5, "Thresholds timed per policy, spread over the savings (none: all).", ge=1)
    measure_batch_size: int = option(32, "Batch size of the batched timing mode.", ge=1)
    measure_threads: int | None = option(1, "CPU threads while timing (0 = torch's default).", ge=0)
    measure_repeats: int = option(1, "Timing repeats (best of).", ge=1)
    time_policies: str = option(
        "all", "Policies timed: all, native (the training method's own: PABEE's patience, ...) or a list."
    )


ALIASES = {
    "policy_names": "policies",
    "method": "mode",
    "measure_n": "time_n",
    "measure_points": "time_thresholds",
}
"""Keyword names of earlier versions (``policy_names``, ``measure_n``, ``measure_points``) and ``method``."""


def option_sources() -> list[tuple[str, type[Config]]]:
    """Every config whose options ``probekit offramp`` has (read when the CLI is built: plugins count)."""
    sources: list[tuple[str, type[Config]]] = [("run", OffRampConfig), ("timing", MeasureConfig)]
    for group in (TRAINING_METHODS.items(), EXIT_POLICIES.items()):
        by_config: dict[type[Config], list[str]] = {}
        for name, component in group:
            by_config.setdefault(component.config_class, []).append(name)
        sources += [(", ".join(names), cfg) for cfg, names in by_config.items()]
    return sources


def _split_options(options: Mapping[str, Any], groups: Sequence[Sequence[type[Config]]]) -> list[dict[str, Any]]:
    """``options`` by group of configs (run, timing, method, policies); a name in several goes to the first."""
    parts: list[dict[str, Any]] = [{} for _ in groups]
    for key, value in options.items():
        for part, group in zip(parts, groups, strict=True):
            if any(key in cfg.field_names() for cfg in group):
                part[key] = value
                break
        else:
            known = sorted({n for group in groups for cfg in group for n in cfg.field_names()})
            raise ParamError(key, f"is not an option of the off-ramp run; its options: {', '.join(known)}")
    return parts


def policy_configs(
    options: Mapping[str, Any], policy: PolicyConfig | None, seed: int
) -> dict[type[PolicyConfig], PolicyConfig]:
    """The options of every registered policy config class (a plugin policy may bring its own), from
    ``policy``'s values, the given ``options`` and the run's ``seed``."""
    given = {**(policy.to_dict() if policy is not None else {}), **options, "seed": seed}
    classes = dict.fromkeys(cls.config_class for _, cls in EXIT_POLICIES.items())
    return {c: c.from_mapping({k: v for k, v in given.items() if k in c.field_names()}) for c in classes}


def resolve_method(
    method: str | TrainingMethod | OffRamps, train: TrainConfig | None, options: Mapping[str, Any]
) -> TrainingMethod:
    """The training method object: a registered name, a method object or an ``OffRamps`` estimator (frozen),
    with ``train`` and the method options of ``options`` applied."""
    if isinstance(method, OffRamps):  # its own parameters decide (the run's seed included)
        return FrozenMethod(FrozenMethod.config_from(method), estimator=method)
    obj = copy.copy(method) if isinstance(method, TrainingMethod) else TRAINING_METHODS.get(method)()
    base = train if train is not None else obj.options
    cfg = obj.config_class.from_mapping({**base.to_dict(), **options})
    obj.config = cfg
    return obj


def run_offramp(
    model: str | Path | Backbone,
    task: str | Path | Task | TaskData,
    out: str | Path,
    method: str | TrainingMethod | OffRamps | None = None,
    *,
    mode: str | None = None,
    config: OffRampConfig | None = None,
    train: TrainConfig | None = None,
    policy: PolicyConfig | None = None,
    timing: MeasureConfig | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    name: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    fresh: bool = False,
    progress: bool = True,
    **options: Any,
) -> Run:
    """Off-ramps at every layer of ``model`` on ``task``, exit policies, and measured early exit.

    What ``probekit offramp`` runs; see the module docstring for the steps. ``method`` (or ``mode``,
    its earlier name): a registered training method's name (default ``frozen``), a method object or an
    :class:`~probekit.offramp.estimator.OffRamps` estimator. The options are the fields of the configs
    (``config``, ``train``, ``policy``, ``timing``), or the same names as keywords (``train_n=...``,
    ``epochs=...``, ``beta=...``, ``measure=False``; ``policy_names`` is ``policies``). ``seed`` sets the
    subsampling, initialisation and training order (it overrides the method's and policies' seeds);
    ``threads`` the CPU threads of the whole run. ``fresh`` starts a fine-tuning over where a checkpoint
    in ``out`` was made with other settings (otherwise refused). Returns a :class:`~probekit.runs.Run`
    (``details``: ``heads``, ``policies``, ``dev``, ``encoder``, ``history``, ``settings``).
    """
    options = {ALIASES.get(k, k): v for k, v in options.items()}
    if "mode" in options:
        mode = options.pop("mode")
    if method is not None and mode is not None and not (isinstance(method, str) and method == mode):
        raise ParamError("mode", f"is given twice ({method!r} and {mode!r})")
    chosen = method if method is not None else (mode if mode is not None else "frozen")
    probe_method = chosen if not isinstance(chosen, str) else TRAINING_METHODS.get(chosen)
    method_config = probe_method.config_class if not isinstance(probe_method, OffRamps) else TrainConfig
    policy_classes = list(dict.fromkeys(cls.config_class for _, cls in EXIT_POLICIES.items()))
    run_opts, measure_opts, method_opts, policy_opts = _split_options(
        options, [[OffRampConfig], [MeasureConfig], [method_config], policy_classes]
    )
    cfg = OffRampConfig.from_mapping({**(config or OffRampConfig()).to_dict(), **run_opts})
    tcfg = MeasureConfig.from_mapping({**(timing or MeasureConfig()).to_dict(), **measure_opts})
    method_obj = resolve_method(chosen, train, {**method_opts, "seed": cfg.seed})
    pcfg = policy_configs(policy_opts, policy, cfg.seed)
    with cpu_threads(cfg.threads or None):
        return _run(
            model,
            task,
            Path(out),
            method_obj,
            cfg,
            tcfg,
            pcfg,
            data_dir,
            device,
            name,
            cache_dir,
            trust_remote_code,
            fresh,
            progress,
        )


def _run(
    model: str | Path | Backbone,
    task: str | Path | Task | TaskData,
    out: Path,
    method: TrainingMethod,
    cfg: OffRampConfig,
    tcfg: MeasureConfig,
    pcfg: dict[type[PolicyConfig], PolicyConfig],
    data_dir: str | Path | None,
    device: str,
    name: str | None,
    cache_dir: str | Path | None,
    trust_remote_code: bool,
    fresh: bool,
    progress: bool,
) -> Run:
    started = time.perf_counter()
    ckpt.refuse_pickles(out, fresh=fresh)
    claim_output(out, "out", force=fresh, force_param="fresh")
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    seed = cfg.seed
    full = load_task(task, data_dir, unseen_labels=cfg.unseen_labels) if not isinstance(task, TaskData) else task
    regression = M.is_regression(full.task) or not full.label_names
    names = policies.parse_policies(cfg.policies, regression)
    metric_names = M.task_metrics(full.task)
    if regression and not set(metric_names) <= set(M.REGRESSION_METRICS):
        metric_names = list(M.REGRESSION_METRICS)
    data = full.subsample(cfg.train_n, cfg.dev_n, cfg.holdout, seed)
    learned = [n for n in names if EXIT_POLICIES.get(n).learned]
    if learned and HELDOUT not in data.splits:
        raise ProbekitError(
            f"the learned exit policies {learned} need held-out training examples; use {{holdout}} > 0",
            params=("holdout",),
        )
    backbone = (
        model
        if isinstance(model, Backbone)
        else load_backbone(model, device=device, trust_remote_code=trust_remote_code, name=name)
    )
    if tcfg.measure:
        inference.LayerStepper(backbone.model)  # fail early on an unsupported architecture
    n_layers = backbone.n_layers - 1
    subset = {"train_n": cfg.train_n, "dev_n": cfg.dev_n, "holdout": cfg.holdout, "seed": seed}
    reader_options = {"unseen_labels": cfg.unseen_labels, "offramp_subset": subset}

    t0 = time.perf_counter()
    max_length = backbone.usable_length(cfg.max_length)
    job = TrainingJob(backbone, data, max_length, cache_dir, out, reader_options, progress, fresh)
    trained = method.train(job)
    heads, encoder, states = trained.heads, trained.encoder, trained.states
    timings = {"train": time.perf_counter() - t0}
    dev = record(heads, states["dev"], data.splits["dev"].labels)
    held = record(heads, states[HELDOUT], data.splits[HELDOUT].labels) if HELDOUT in states else None

    t0 = time.perf_counter()
    fitted: dict[str, Policy] = {}
    adopted: list[str] = []
    for pname in names:
        cls = EXIT_POLICIES.get(pname)
        pol = cls(pcfg[cls.config_class])
        if cfg.policy_fit == "trained" and pol.adopt(dev, trained.components):
            fitted[pname] = pol
            adopted.append(pname)
        else:
            fitted[pname] = pol.fit(held if pol.learned else dev, progress=progress)  # type: ignore[arg-type]
    sweeps = {pname: policies.sweep(pol, dev, metric_names, seed=seed) for pname, pol in fitted.items()}
    chosen = _choose_thresholds(fitted, held, metric_names[0], cfg.choose_tolerance, seed)
    timings["policies"] = time.perf_counter() - t0

    timed: dict[str, dict[str, Any]] = {}
    if tcfg.measure:
        to_time = _timed_policies(tcfg.time_policies, list(fitted), method.exit_policies, regression)
        t0 = time.perf_counter()
        with cpu_threads(tcfg.measure_threads or None):
            timed = _measure_all(
                backbone,
                encoder,
                heads,
                data.splits["dev"],
                {k: v for k, v in fitted.items() if k in to_time},
                {k: v for k, v in sweeps.items() if k in to_time},
                dev,
                max_length,
                tcfg.time_n,
                tcfg.measure_batch_size,
                tcfg.time_thresholds,
                seed,
                progress,
                tcfg.measure_repeats,
                chosen,
            )
        timings["measure"] = time.perf_counter() - t0

    settings = {
        "mode": method.name,
        "train": method.options.to_dict(),
        "policy": {k: v for c in pcfg.values() for k, v in c.to_dict().items()},
        "train_n": len(data.splits["train"]),
        "heldout_n": len(held) if held is not None else 0,
        "dev_n": len(dev),
        "holdout": cfg.holdout,
        "measure_batch_size": tcfg.measure_batch_size,
        "measure_threads": tcfg.measure_threads or None,
        "time_n": tcfg.time_n,
        "time_thresholds": tcfg.time_thresholds,
        "time_policies": tcfg.time_policies,
        "policy_fit": cfg.policy_fit,
        "trained_policies": sorted(adopted),
        "measure_repeats": tcfg.measure_repeats,
        "threads": torch.get_num_threads(),
        "device": str(backbone.device),
    }
    base = {
        "model": backbone.name,
        "task": full.name,
        "split": "dev",
        "seed": seed,
        "probe": "offramp",
        "mode": method.name,
        "model_fingerprint": backbone.fingerprint,
        "pool": "cls",
        "max_length": cfg.max_length,
        "data_sha256": full.sha256,
        "settings": json.dumps(settings, sort_keys=True),
    }
    native = set(method.exit_policies)
    rows = layer_rows(base, dev, metric_names) + _policy_rows(base, dev, sweeps, timed, n_layers, chosen, native)
    df = tidy(rows)
    save_results(df, out)
    paths = _save_artifacts(out, heads, fitted, dev, full, settings, trained.history, timings, started)
    timings["total"] = time.perf_counter() - started
    estimator = trained.estimator
    if estimator is None:  # fine-tuned: the off-ramps as a fitted estimator on the tuned encoder's states
        estimator = OffRamps.from_config(method.options, n_classes=data.n_classes, device=str(backbone.device))
        estimator.heads_, estimator.n_layers_, estimator.n_classes_ = heads, heads.n_layers, data.n_classes
        estimator.history_ = trained.history
        estimator.mode = method.name
    return Run(
        results=df,
        paths={"out": out, **paths, **trained.paths},
        timings=timings,
        estimator=estimator,
        details={
            "heads": heads,
            "policies": fitted,
            "dev": dev,
            "encoder": encoder,
            "history": trained.history,
            "settings": settings,
            "sweeps": sweeps,
        },
    )


def _timed_policies(spec: str, names: list[str], native: Sequence[str], regression: bool) -> list[str]:
    """The policies to time: ``all``, ``native`` (the method's own) or a comma-separated list."""
    if spec == "all":
        return names
    wanted = list(native) if spec == "native" else policies.parse_policies(spec, regression)
    return [n for n in names if n in wanted]


def _choose_thresholds(
    fitted: Mapping[str, Policy], held: Record | None, metric: str, tolerance: float, seed: int
) -> dict[str, float]:
    """Each policy's threshold chosen on the held-out split (never on dev, which is reported): the largest
    expected saving whose held-out ``metric`` is within ``tolerance`` of the last off-ramp's there (the
    highest-scoring threshold when none is). Empty without a held-out split."""
    if held is None or not len(held):
        return {}
    full = M.score([metric], held.labels, held.predictions()[:, -1])[metric]
    out = {}
    for pname, pol in fitted.items():
        points = policies.sweep(pol, held, [metric], seed=seed)
        ok = [p for p in points if p.scores[metric] >= full - tolerance]
        pick = (
            max(ok, key=lambda p: (p.expected_saving(held.n_layers), p.scores[metric]))
            if ok
            else max(points, key=lambda p: (p.scores[metric], p.expected_saving(held.n_layers)))
        )
        out[pname] = pick.threshold
    return out


def timing_points(
    points: Sequence[SweepPoint], k: int | None, n_layers: int, must: float | None = None
) -> list[SweepPoint]:
    """Up to ``k`` thresholds of a sweep with distinct exits, spread over the range of expected savings
    (plus the threshold ``must``, the chosen one, when given)."""
    picked = _spread(points, k, n_layers)
    if must is not None and all(p.threshold != must for p in picked):
        picked += [p for p in points if p.threshold == must]
    return picked


def _spread(points: Sequence[SweepPoint], k: int | None, n_layers: int) -> list[SweepPoint]:
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
    heads: OffRampHeads,
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
    must: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time chosen thresholds of each policy, batch size 1 and batched, against full inference (``must``:
    the thresholds chosen on the held-out split, always timed)."""
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
    chosen = {
        pname: timing_points(points, points_per_policy, dev.n_layers, (must or {}).get(pname))
        for pname, points in sweeps.items()
    }
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


def _policy_rows(
    base: dict[str, Any],
    dev: Record,
    sweeps: dict[str, list[SweepPoint]],
    timed: dict[str, dict[str, Any]],
    n_layers: int,
    chosen: Mapping[str, float] | None = None,
    native: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Exit-policy rows: per policy and threshold, the metric(s) (no single layer) and the exit histogram
    (``metric="exit_fraction"``, ``layer`` the exit layer); ``chosen`` marks the threshold chosen on the
    held-out split (:func:`_choose_thresholds`), ``native`` the training method's own policies."""
    rows: list[dict[str, Any]] = []
    chosen = chosen or {}
    for pname, points in sweeps.items():
        for p in points:
            extra = {
                "policy": pname,
                "chosen": pname in chosen and chosen[pname] == p.threshold,
                "native": pname in (native or set()),
                "threshold": p.threshold,
                "threshold_name": p.threshold_name,
                "mean_exit_layer": p.mean_exit_layer,
                "expected_saving": p.expected_saving(n_layers),
                "n": len(dev),
                **timed.get(f"{pname}@{p.threshold}", {}),
            }
            rows += [
                row(**base, **extra, source="exit-policy", layer=None, metric=m, value=v) for m, v in p.scores.items()
            ]
            counts = policies.exit_histogram(p.exit_layers, n_layers)
            rows += [
                row(**base, **extra, source="exit-policy", layer=i + 1, metric="exit_fraction", value=c / len(dev))
                for i, c in enumerate(counts)
            ]
    return rows


def _save_artifacts(
    out: Path,
    heads: OffRampHeads,
    fitted: dict[str, Policy],
    dev: Record,
    data: TaskData,
    settings: dict[str, Any],
    history: dict[str, list[float]],
    timings: dict[str, float],
    started: float,
) -> dict[str, Path]:
    """The off-ramps and the learned policies (safetensors, the rest JSON: no pickle), the dev record
    and ``run.json``."""
    tensors, tree = ckpt.flatten(
        {"heads": heads.state_dict(), "policies": {k: p.state_dict() for k, p in fitted.items()}}
    )
    with atomic_path(out / "offramps.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": ckpt.FORMAT})
    write_json(
        out / "offramps.json",
        {
            "format": ckpt.FORMAT,
            "state": tree,
            "n_layers": heads.n_layers,
            "n_classes": data.n_classes,
            "label_names": data.label_names,
            "settings": settings,
        },
    )
    with atomic_path(out / "records.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, outputs=dev.outputs, labels=dev.labels)
    write_json(
        out / "run.json",
        {
            "task": data.name,
            "settings": settings,
            "history": history,
            "policy_history": {k: p.history_ for k, p in fitted.items() if p.history_},
            "seconds": {**timings, "total": time.perf_counter() - started},
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return {
        "results": out / "results.parquet",
        "offramps": out / "offramps.safetensors",
        "records": out / "records.npz",
        "run": out / "run.json",
    }


def load_offramps(out: str | Path) -> dict[str, Any]:
    """What :func:`run_offramp` saved of the off-ramps and policies: ``heads`` and ``policies`` (state dicts
    of tensors) and the JSON fields (``n_layers``, ``n_classes``, ``label_names``, ``settings``)."""
    out = Path(out)
    meta = json.loads((out / "offramps.json").read_text(encoding="utf-8"))
    state = ckpt.unflatten(load_file(str(out / "offramps.safetensors")), meta.pop("state"))
    return {**state, **meta}


def summarize(results: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for a console summary (narrow enough for 80 columns): the metric at each forced exit layer,
    and each policy's best threshold (highest metric, then largest expected saving)."""
    layers = results[results["source"] == "offramp"]
    per_layer = [
        {"mode": r.mode, "layer": int(r.layer), "metric": r.metric, "value": f"{r.value:.4f}"}
        for r in layers.itertuples()
    ]
    pol = results[(results["source"] == "exit-policy") & (results["metric"] != "exit_fraction")]
    best = []
    for (mode, name, metric), cur in pol.groupby(["mode", "policy", "metric"], sort=False):
        top = cur.sort_values(["value", "expected_saving"], ascending=False).iloc[0]
        best.append(
            {
                "mode": mode,
                "policy": name,
                "threshold": f"{top.threshold:g}",
                "metric": metric,
                "value": f"{top.value:.4f}",
                "exit layer": f"{top.mean_exit_layer:.2f}",
                "saving": f"{top.expected_saving:.3f}",
            }
        )
    return per_layer, best
