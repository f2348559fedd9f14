"""Multi-task fine-tuning (BERTer's setting): one encoder, one head per task, batches of one task at a time.

::

    from probekit.finetune import finetune_multitask
    run = finetune_multitask("path/to/minilm", ["sst2", "rte", "cola"], "runs/mt", seeds=1, grid="quick")

Each task keeps its own head (dropout, then a linear layer over the encoder's pooled output, as
``AutoModelForSequenceClassification``; one output for a regression task) and its own loss
(cross-entropy, or squared error for STS-B). An epoch's batches, each drawn from one task:

- ``round-robin`` (default): the tasks take turns, batch by batch, until the largest task has been
  seen once; a smaller task's batches are reshuffled and repeated when it runs out.
- ``proportional``: every task's batches once (each task in proportion to its size), shuffled together.

After each epoch every task is scored on its own dev set with its own metric; the epoch kept
(per configuration, then the configuration kept) is the one with the best mean of the tasks'
main dev metrics (``--select paper`` is not offered here). Layout under ``out``::

    multitask-<a>+<b>/<variant>/seed<k>/best/   the encoder (AutoModel: ``probekit extract`` loads it), its
                                                tokenizer, heads.safetensors (head.<task>.weight/bias) and
                                                metrics.json (per epoch: every task's dev metrics)
    results.parquet, results.csv                tidy rows, one per task, evaluation and metric (``finetune_task``
                                                the task, ``mode`` the variant slug, ``variant`` "multitask")

Resumable as single-task fine-tuning is (a stamp per seed; finished configurations are skipped).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from probekit import metrics as M
from probekit.backbone import check_encoder, from_pretrained, model_source, quiet_hub, usable_length
from probekit.config import Config, option
from probekit.cpu import cpu_threads
from probekit.data import Split, Task, TaskData
from probekit.encoding import Tokenized, collate, tokenize
from probekit.errors import ParamError, ProbekitError
from probekit.finetune.table import write_results
from probekit.finetune.train import (
    DATA_SEED,
    GRIDS,
    METRICS_FILE,
    RESULT_FILE,
    Grid,
    SeedResult,
    TrainOptions,
    _check_device,
    _device_name,
    _last_checkpoint,
    _precision,
    _split_params,
    _task_data,
    _variants,
    config_slug,
    load_tokenizer,
    prepare_data,
    resume_seed,
    training_arguments,
)
from probekit.finetune.variants import Variant
from probekit.io import _UMASK, read_json, remove_tree, replace_dir, write_json
from probekit.paths import claim_output
from probekit.results import row, tidy
from probekit.runs import Run

NEG = -1e4
"""Logit padding of a head with fewer outputs than the widest (never the argmax)."""


@dataclass(frozen=True)
class MultitaskOptions(Config):
    """How the tasks of a multi-task run share the batches."""

    component: ClassVar[str] = "multi-task fine-tuning"

    multitask: bool = option(False, "Fine-tune one encoder on every --task at once (one head per task).")
    task_sampling: Literal["round-robin", "proportional"] = option(
        "round-robin", "multi-task: tasks take turns (round-robin) or batches in proportion to the tasks' sizes."
    )


@dataclass
class _Head:
    name: str
    regression: bool
    n_out: int
    metric_names: list[str]


class MultitaskModel(nn.Module):
    """One encoder and one head per task; ``forward(task=[B], labels=[B])`` (one task per batch)."""

    accepts_loss_kwargs = False

    def __init__(self, encoder: nn.Module, heads: Sequence[_Head], seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.specs = list(heads)
        cfg = encoder.config
        self.dropout = nn.Dropout(float(getattr(cfg, "classifier_dropout", None) or cfg.hidden_dropout_prob))
        self.heads = nn.ModuleDict({h.name: nn.Linear(cfg.hidden_size, h.n_out) for h in heads})
        for lin in self.heads.values():
            nn.init.normal_(lin.weight, std=float(getattr(cfg, "initializer_range", 0.02)))
            nn.init.zeros_(lin.bias)
        self.width = max(h.n_out for h in heads)
        self.batches_seen = {h.name: 0 for h in heads}

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, task: torch.Tensor, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput  # deferred: transformers is heavy

        inputs.pop("return_dict", None)
        spec = self.specs[int(task[0])]
        out = self.encoder(**inputs, return_dict=True)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        logits = self.heads[spec.name](self.dropout(pooled))
        if self.training:
            self.batches_seen[spec.name] += 1
        loss = None
        if labels is not None:
            y = labels.reshape(-1)
            loss = F.mse_loss(logits.reshape(-1), y.float()) if spec.regression else F.cross_entropy(logits, y.long())
        padded = F.pad(logits.float(), (0, self.width - logits.shape[-1]), value=NEG)
        return SequenceClassifierOutput(loss=loss, logits=padded)


class BatchPlan(torch.utils.data.Dataset):
    """A dataset whose items are whole batches (the Trainer reads it with batch size 1, in order)."""

    def __init__(self, plan: list[tuple[int, np.ndarray]], toks: list[Tokenized], labels: list[np.ndarray], pad: int):
        self.plan, self.toks, self.labels, self.pad = plan, toks, labels, pad

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t, idx = self.plan[i]
        batch = collate(self.toks[t], idx, self.pad, torch.device("cpu"))
        batch.pop("special_tokens_mask")
        batch["task"] = torch.full((len(idx),), t, dtype=torch.long)
        batch["labels"] = torch.as_tensor(self.labels[t][idx], dtype=torch.float32)
        return batch


def _single(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return items[0]


def _batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [np.sort(order[i : i + size]) for i in range(0, n, size)]


def epoch_plan(
    sizes: Sequence[int], batch_size: int, sampling: str, seed: int, epoch: int
) -> list[tuple[int, np.ndarray]]:
    """One epoch's batches as (task, example indices) (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 31])
    per = [_batches(n, batch_size, rng) for n in sizes]
    if sampling == "proportional":
        flat = [(t, b) for t, bs in enumerate(per) for b in bs]
        return [flat[i] for i in rng.permutation(len(flat))]
    rounds = max(len(bs) for bs in per)
    cycled = []
    for t, bs in enumerate(per):
        out = list(bs)
        while len(out) < rounds:
            out += _batches(sizes[t], batch_size, rng)
        cycled.append(out[:rounds])
    return [(t, cycled[t][r]) for r in range(rounds) for t in range(len(sizes))]


def dev_plan(sizes: Sequence[int], batch_size: int) -> list[tuple[int, np.ndarray]]:
    """Every task's dev set, in order, in batches of one task."""
    return [(t, np.arange(i, min(i + batch_size, n))) for t, n in enumerate(sizes) for i in range(0, n, batch_size)]


def _compute(heads: Sequence[_Head], task_rows: list[np.ndarray]):  # type: ignore[no-untyped-def]
    """``compute_metrics``: each task's dev rows (``task_rows``, the dev plan's fixed order) scored with its own
    metrics; ``mean`` is the mean of the tasks' main metrics (what picks the epoch)."""

    def compute(pred: Any) -> dict[str, float]:
        logits = np.asarray(pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions)
        labels = np.asarray(pred.label_ids).reshape(-1)
        out: dict[str, float] = {}
        mains = []
        for h, rows in zip(heads, task_rows, strict=True):
            y = labels[rows]
            y_pred = logits[rows, 0] if h.regression else logits[rows, : h.n_out].argmax(-1)
            scores = M.score(h.metric_names, y if h.regression else y.astype(np.int64), y_pred)
            for k, v in scores.items():
                out[f"{h.name}_{k}"] = 0.0 if math.isnan(v) else float(v)
            mains.append(out[f"{h.name}_{h.metric_names[0]}"])
        out["mean"] = float(np.mean(mains))
        return out

    return compute


def finetune_multitask(
    model: str | Path,
    tasks: Sequence[str | Task],
    out: str | Path,
    seeds: int | Sequence[int] = 3,
    grid: str | Grid = "default",
    variants: str | Variant | Sequence[str | Variant] = "plain",
    *,
    task_sampling: str = "round-robin",
    data_dir: str | Path | None = None,
    threads: int | None = None,
    fresh: bool = False,
    **options: Any,
) -> Run:
    """Fine-tune one encoder on every task of ``tasks`` at once (see the module docstring); the options are
    :func:`~probekit.finetune.finetune`'s (variants that change the encoder's weights or depth only)."""
    started = time.perf_counter()
    sampling = MultitaskOptions(multitask=True, task_sampling=task_sampling).task_sampling
    train_params, variant_params = _split_params(options)
    if isinstance(grid, Grid):
        train_params = {**train_params, "batch_sizes": grid.batch_sizes, "lrs": grid.lrs}
        train_params["epochs"] = train_params.get("epochs") or grid.epochs
    else:
        train_params["grid"] = grid
    opts = TrainOptions.from_mapping(train_params)
    if opts.select != "best-dev":
        raise ParamError("select", "multi-task fine-tuning keeps the epoch with the best mean dev score (best-dev)")
    if opts.max_steps is not None:
        raise ParamError("max_steps", "multi-task fine-tuning runs whole epochs; use epochs")
    _check_device(opts.device)
    if len(tasks) < 2:
        raise ParamError("task", "multi-task fine-tuning needs two or more tasks")
    variant_list = _variants(variants, variant_params)
    bad = [v.slug for v in variant_list if v.role != "model"]
    if bad:
        raise ParamError(
            "variant", f"{', '.join(bad)}: multi-task fine-tuning takes variants that change the encoder only"
        )
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    source = model_source(model)
    out = Path(out)
    claim_output(out, "out", force=fresh, force_param="fresh")
    datas = [_task_data(t, data_dir) for t in tasks]
    names = [d.name for d in datas]
    if len(set(names)) != len(names):
        raise ParamError("task", f"a task is given twice: {', '.join(names)}")
    folder = "multitask-" + "+".join(names)
    results: list[SeedResult] = []
    rows: list[dict[str, Any]] = []
    with cpu_threads(threads or None):
        tokenizer = None
        for variant in variant_list:
            for seed in seed_list:
                seed_dir = out / folder / variant.slug / f"seed{seed}"
                settings = {
                    "model": source,
                    "tasks": names,
                    "task_sampling": sampling,
                    "variant": variant.settings(),
                    "seed": seed,
                    "grid": opts.grid_name,
                    **opts.settings(),
                }
                inputs = {"data": [d.sha256 for d in datas]}
                decision = resume_seed(seed_dir, settings, inputs, fresh)
                best = seed_dir / "best"
                if decision == "reuse" and (best / METRICS_FILE).is_file():
                    m = read_json(best / METRICS_FILE)
                    results.append(SeedResult(folder, variant.slug, seed, best, m, skipped=True))
                else:
                    tokenizer = tokenizer or load_tokenizer(source)
                    m = _train_seed(source, datas, variant, seed, seed_dir, opts, sampling, settings, tokenizer)
                    results.append(SeedResult(folder, variant.slug, seed, best, m))
                rows += multitask_rows(m)
    paths = {"out": out, "results": write_results(out, rows)}
    return Run(
        results=tidy(rows) if rows else pd.DataFrame(),
        paths=paths,
        timings={"finetune": round(time.perf_counter() - started, 2)},
        details={"seeds": results, "options": opts, "variants": variant_list},
    )


def _heads(datas: Sequence[TaskData]) -> list[_Head]:
    return [
        _Head(d.name, M.is_regression(d.task), 1 if M.is_regression(d.task) else d.n_classes, M.task_metrics(d.task))
        for d in datas
    ]


def _train_seed(
    source: str,
    datas: Sequence[TaskData],
    variant: Variant,
    seed: int,
    seed_dir: Path,
    opts: TrainOptions,
    sampling: str,
    settings: dict[str, Any],
    tokenizer: Any,
) -> dict[str, Any]:
    from transformers import AutoConfig  # deferred: transformers is heavy (seconds), needed only to train

    config = from_pretrained(AutoConfig, source)
    check_encoder(config, source)
    max_length = usable_length(opts.max_length, config, repr(source))
    splits = [prepare_data(d, opts.max_train_samples, opts.max_dev_samples) for d in datas]
    heads = _heads(datas)
    runs = []
    for bs, lr in opts.grid_spec.configs():
        run_dir = seed_dir / "runs" / config_slug(bs, lr)
        runs.append(_run(source, splits, heads, variant, seed, bs, lr, run_dir, opts, sampling, tokenizer, max_length))
    pick = max(range(len(runs)), key=lambda i: runs[i]["chosen"]["mean"])
    chosen_dir = seed_dir / "runs" / config_slug(runs[pick]["batch_size"], runs[pick]["lr"]) / "model"
    import transformers  # deferred: transformers is heavy (seconds), needed only to train

    metrics = {
        "task": "+".join(h.name for h in heads),
        "tasks": {h.name: {"metric": h.metric_names[0], "metrics": h.metric_names} for h in heads},
        "metric": "mean",
        "variant": variant.slug,
        "seed": seed,
        "task_sampling": sampling,
        "chosen": {**runs[pick]["chosen"], "batch_size": runs[pick]["batch_size"], "lr": runs[pick]["lr"]},
        "runs": runs,
        "hyperparameters": {"grid": opts.grid_name, **opts.settings(), "optimizer": opts.optimizer},
        "data": {
            "sha256": {d.name: d.sha256 for d in datas},
            "n_train": {d.name: len(tr) for d, (tr, _) in zip(datas, splits, strict=True)},
            "n_dev": {d.name: len(dv) for d, (_, dv) in zip(datas, splits, strict=True)},
            "data_seed": DATA_SEED,
        },
        "model": {"source": source, "n_layers": int(read_json(chosen_dir / "config.json")["num_hidden_layers"])},
        "settings": settings,
        "wall_s": round(sum(r["wall_s"] for r in runs), 2),
        "device": _device_name(opts.device),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    tmp = seed_dir / ".best.tmp"
    remove_tree(tmp)
    shutil.copytree(chosen_dir, tmp)
    write_json(tmp / METRICS_FILE, metrics)
    replace_dir(tmp, seed_dir / "best")
    if not opts.keep_checkpoints:
        for r in runs:
            remove_tree(seed_dir / "runs" / config_slug(r["batch_size"], r["lr"]) / "model")
    return metrics


def _run(
    source: str,
    splits: list[tuple[Split, Split]],
    heads: list[_Head],
    variant: Variant,
    seed: int,
    batch_size: int,
    lr: float,
    run_dir: Path,
    opts: TrainOptions,
    sampling: str,
    tokenizer: Any,
    max_length: int,
) -> dict[str, Any]:
    # deferred: transformers is heavy (seconds), needed only to train
    from transformers import AutoModel, PrinterCallback, Trainer, set_seed

    done = run_dir / RESULT_FILE
    if done.is_file():
        return read_json(done)
    set_seed(seed)
    encoder = variant.apply(from_pretrained(AutoModel, source), seed)
    model = MultitaskModel(encoder, heads, seed)
    pad = int(tokenizer.pad_token_id)
    train_toks = [tokenize(tokenizer, tr.texts, tr.text_pairs, max_length) for tr, _ in splits]
    dev_toks = [tokenize(tokenizer, dv.texts, dv.text_pairs, max_length) for _, dv in splits]
    sizes = [len(tr) for tr, _ in splits]
    plan = [b for e in range(opts.n_epochs) for b in epoch_plan(sizes, batch_size, sampling, seed, e)]
    per_epoch = len(plan) // opts.n_epochs
    train_ds = BatchPlan(plan, train_toks, [tr.labels for tr, _ in splits], pad)
    dplan = dev_plan([len(dv) for _, dv in splits], max(64, batch_size))
    dev_ds = BatchPlan(dplan, dev_toks, [dv.labels for _, dv in splits], pad)
    offsets = np.cumsum([0, *[len(idx) for _, idx in dplan]])
    task_rows = [
        np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, (t, _) in enumerate(dplan) if t == k])
        for k in range(len(heads))
    ]
    precision = _precision(opts.precision, opts.device)
    ckpt_dir = run_dir / "checkpoints"
    args = training_arguments(
        opts,
        ckpt_dir,
        seed,
        lr,
        precision,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        max_steps=len(plan),
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=per_epoch,
        save_steps=per_epoch,
        metric_for_best_model="mean",
        logging_steps=opts.logging_steps or max(1, per_epoch // 10),
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=_single,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        compute_metrics=_compute(heads, task_rows),
    )
    trainer.remove_callback(PrinterCallback)
    resume = _last_checkpoint(ckpt_dir)
    t0 = time.perf_counter()
    with quiet_hub():
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - t0
    keys = [f"{h.name}_{m}" for h in heads for m in h.metric_names]
    evals = [
        {
            "epoch": round(int(e["step"]) / per_epoch, 4),
            "step": int(e["step"]),
            "mean": float(e["eval_mean"]),
            **{k: float(e[f"eval_{k}"]) for k in keys},
        }
        for e in trainer.state.log_history
        if "eval_mean" in e
    ]
    if not evals:
        raise ProbekitError("training ended before any dev evaluation; raise {epochs}", params=("epochs",))
    best_step = (
        int(Path(trainer.state.best_model_checkpoint).name.rsplit("-", 1)[1])
        if trainer.state.best_model_checkpoint
        else None
    )
    chosen = next((e for e in evals if e["step"] == best_step), max(evals, key=lambda e: e["mean"]))
    result = {
        "batch_size": batch_size,
        "lr": lr,
        "evals": evals,
        "train_loss": [
            {"step": int(e["step"]), "loss": float(e["loss"])} for e in trainer.state.log_history if "loss" in e
        ],
        "chosen": chosen,
        "batches_per_task": dict(model.batches_seen) if resume is None else None,
        "plan": {h.name: sum(1 for t, _ in plan if t == k) for k, h in enumerate(heads)},
        "steps": int(trainer.state.global_step),
        "wall_s": round(wall, 2),
        "resumed": resume is not None,
    }
    final, tmp = run_dir / "model", run_dir / ".model.tmp"
    remove_tree(tmp)
    best_model = trainer.model
    with quiet_hub():
        variant.saved(best_model.encoder).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    state = {
        f"head.{n}.{k}": v.detach().cpu().contiguous()
        for n, lin in best_model.heads.items()
        for k, v in lin.state_dict().items()
    }
    save_file(state, str(tmp / "heads.safetensors"), metadata={"tasks": ",".join(h.name for h in heads)})
    for f in tmp.iterdir():
        f.chmod(0o666 & ~_UMASK)
    replace_dir(tmp, final)
    write_json(done, result)
    if not opts.keep_checkpoints:
        remove_tree(ckpt_dir)
    return result


def multitask_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A multi-task seed's ``metrics.json`` as tidy rows: per task, evaluation and metric (``finetune_task`` the
    task, ``chosen`` the kept evaluation of the kept configuration)."""
    m = metrics
    rows = []
    for run in m["runs"]:
        picked = run["batch_size"] == m["chosen"]["batch_size"] and run["lr"] == m["chosen"]["lr"]
        for e in run["evals"]:
            for task, spec in m["tasks"].items():
                for name in spec["metrics"]:
                    rows.append(
                        row(
                            model=Path(m["model"]["source"]).name,
                            task=task,
                            layer=None,
                            split="dev",
                            metric=name,
                            value=float(e[f"{task}_{name}"]),
                            source="finetune",
                            mode=m["variant"],
                            probe="finetune",
                            seed=int(m["seed"]),
                            n=int(m["data"]["n_dev"][task]),
                            max_length=m["hyperparameters"].get("max_length"),
                            data_sha256=m["data"]["sha256"][task],
                            settings=m.get("settings") or {},
                            epoch=float(e["epoch"]),
                            step=int(e["step"]),
                            batch_size=int(run["batch_size"]),
                            lr=float(run["lr"]),
                            chosen=bool(picked and e["step"] == m["chosen"]["step"]),
                            variant="multitask",
                            finetune_task=task,
                            n_layers=int(m["model"]["n_layers"]),
                        )
                    )
    return rows


__all__ = ["GRIDS", "MultitaskModel", "MultitaskOptions", "epoch_plan", "finetune_multitask", "multitask_rows"]
