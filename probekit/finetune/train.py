"""Fine-tuning an encoder on a GLUE task with the Hugging Face Trainer: grid, seeds, best dev checkpoint.

For each task, variant and seed, every configuration of the grid (batch size x learning
rate) is trained for up to ``epochs`` epochs, evaluated on dev after each epoch, and the
epoch with the best dev score (the task's main metric: MCC for CoLA, accuracy for RTE and
SST-2, Pearson for STS-B) is kept (``load_best_model_at_end``). The configuration with the
best kept score is the seed's result. Layout under ``out``::

    <task>/<variant>/seed<k>/best/            save_pretrained: config, model.safetensors, tokenizer,
                                              metrics.json (the chosen configuration and epoch, every
                                              configuration's dev score per epoch, settings, times)
    <task>/<variant>/seed<k>/runs/bs32-lr5e-05/
        checkpoints/checkpoint-N/             the Trainer's checkpoints (removed once the run is done)
        model/                                the run's best epoch (removed once best/ is written)
        result.json                           written last: the run is done
    comparison.csv, comparison.md             dev score per task and variant (mean and sd over seeds)

Everything is resumable: a seed whose ``best/metrics.json`` exists is skipped, so is a
configuration whose ``result.json`` exists, and an interrupted configuration resumes from
its last Trainer checkpoint. Outputs made with other settings are never reused: the command
stops and says which folder to remove. ``best/`` is a standard checkpoint folder of the
sequence classifier: ``AutoModel.from_pretrained(best)`` gives the encoder and
``probekit extract --model best`` extracts it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probekit import metrics as M
from probekit._version import __version__
from probekit.backbone import from_pretrained, model_source, quiet_hub
from probekit.cpu import cpu_threads
from probekit.data import Split, Task, TaskData, get_task, load_task
from probekit.encoding import Tokenized, collate, tokenize
from probekit.errors import ProbekitError
from probekit.finetune.variants import (
    MLM_PREFIX,
    MLM_WARMUP_STEPS,
    VARIANTS,
    MultiObjective,
    Variant,
    apply_variant,
    encoder_layers,
    saved_model,
)
from probekit.io import _UMASK, read_json, remove_tree, replace_dir, write_json

METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
DATA_SEED = 1234
"""Seed of the ``max_train_samples`` subset: the same subset for every seed and configuration."""


@dataclass(frozen=True)
class Grid:
    """Batch sizes x learning rates, each trained for up to ``epochs`` epochs."""

    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: int

    def configs(self) -> list[tuple[int, float]]:
        return [(bs, lr) for bs in self.batch_sizes for lr in self.lrs]


GRIDS = {
    "default": Grid((16, 32), (2e-5, 3e-5, 5e-5), 5),
    "quick": Grid((32,), (5e-5,), 3),
}
"""``default``: BERT's fine-tuning grid as the convexity paper uses it; ``quick``: one configuration."""


def config_slug(batch_size: int, lr: float) -> str:
    return f"bs{batch_size}-lr{lr:.0e}".replace("e-0", "e-")


@dataclass
class TrainOptions:
    """Settings shared by every run of a fine-tuning job."""

    grid: str | Grid = "default"
    """A name in ``GRIDS`` or a :class:`Grid`."""
    epochs: int | None = None
    """Overrides the grid's number of epochs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (evaluating every ``eval_steps``; tests and smoke runs)."""
    eval_steps: int | None = None
    max_train_samples: int | None = None
    max_dev_samples: int | None = None
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    logging_steps: int | None = None
    device: str = "auto"
    precision: str = "auto"
    keep_checkpoints: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.grid, str) and self.grid not in GRIDS:
            raise ProbekitError(f"unknown grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        for name in ("epochs", "max_steps", "eval_steps", "max_train_samples", "max_dev_samples", "logging_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ProbekitError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ProbekitError(f"unknown precision {self.precision!r}; choose auto, fp32, fp16 or bf16")

    @property
    def grid_spec(self) -> Grid:
        return GRIDS[self.grid] if isinstance(self.grid, str) else self.grid

    @property
    def grid_name(self) -> str | dict[str, Any]:
        return self.grid if isinstance(self.grid, str) else json.loads(json.dumps(asdict(self.grid)))

    @property
    def n_epochs(self) -> int:
        return self.epochs or self.grid_spec.epochs

    def settings(self) -> dict[str, Any]:
        """What determines the trained weights (besides model, task, variant, seed and configuration)."""
        return {
            "epochs": self.n_epochs,
            "max_steps": self.max_steps,
            "eval_steps": self.eval_steps,
            "max_train_samples": self.max_train_samples,
            "max_dev_samples": self.max_dev_samples,
            "max_length": self.max_length,
            "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio,
        }


@dataclass
class SeedResult:
    """One task x variant x seed: the best checkpoint and its metrics file."""

    task: str
    variant: str
    seed: int
    path: Path
    metrics: dict[str, Any]
    skipped: bool = False

    @property
    def value(self) -> float:
        return float(self.metrics["chosen"]["value"])


@dataclass
class FinetuneRun:
    """What :func:`finetune` made."""

    out: Path
    results: list[SeedResult] = field(default_factory=list)
    comparison: Any = None
    """The comparison table (a DataFrame), also in ``out/comparison.csv``."""


# ---------------------------------------------------------------- data


class TextDataset(torch.utils.data.Dataset):
    """A tokenised split; items are indices, batches are padded by :meth:`collate`.

    With ``mlm_order`` (multi-objective training) each item also brings the text at
    ``mlm_order[i]`` as an MLM sample (``mlm_`` keys).
    """

    def __init__(self, tok: Tokenized, labels: np.ndarray, pad_id: int, mlm_order: np.ndarray | None = None) -> None:
        self.tok, self.labels, self.pad_id, self.mlm_order = tok, labels, pad_id, mlm_order

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"dataset": self, "index": int(i)}

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx)
        batch = collate(self.tok, idx, self.pad_id, torch.device("cpu"))
        batch.pop("special_tokens_mask")
        labels = self.labels[idx]
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.long)
        if self.mlm_order is not None:
            mlm = collate(self.tok, self.mlm_order[idx], self.pad_id, torch.device("cpu"))
            batch.update({MLM_PREFIX + k: v for k, v in mlm.items()})
        return batch


def collate_items(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The Trainer's data collator: pad a list of :class:`TextDataset` items."""
    return items[0]["dataset"].collate([it["index"] for it in items])


def prepare_data(data: TaskData, max_train: int | None, max_dev: int | None) -> tuple[Split, Split]:
    """The train and dev splits, each optionally a fixed random subset (the same whatever the seed)."""
    sub = data.subsample(max_train, max_dev, seed=DATA_SEED)
    return sub.splits["train"], sub.splits["dev"]


# ---------------------------------------------------------------- one run


def _precision(precision: str, device: str) -> str:
    cuda = device != "cpu" and torch.cuda.is_available()
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("fp16", "bf16") and not cuda:
        raise ProbekitError(f"--precision {precision} needs a CUDA GPU; use fp32 (or auto) on the CPU")
    return precision


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ProbekitError(f"--device {device!r}: choose auto, cpu or cuda (CUDA_VISIBLE_DEVICES picks the GPU)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProbekitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


def load_classifier(source: str, data: TaskData, seed: int) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` for the task (regression head for STS-B), head seeded."""
    from transformers import AutoModelForSequenceClassification, set_seed

    regression = M.is_regression(data.task)
    kwargs: dict[str, Any] = {"num_labels": 1 if regression else data.n_classes}
    if regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(data.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(data.label_names)}
        kwargs["problem_type"] = "single_label_classification"
    set_seed(seed)
    return from_pretrained(AutoModelForSequenceClassification, source, **kwargs)


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, source)
    if tok.pad_token_id is None:
        raise ProbekitError(f"the tokenizer of {source} has no padding token")
    return tok


def _compute_metrics(names: list[str], regression: bool):  # type: ignore[no-untyped-def]
    def compute(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        y_pred = np.asarray(logits).reshape(-1) if regression else np.asarray(logits).argmax(-1)
        scores = M.score(names, np.asarray(pred.label_ids).reshape(len(y_pred)), y_pred)
        # a constant prediction has no correlation (NaN): count it as 0 so that a checkpoint can still be chosen
        return {k: (0.0 if math.isnan(v) else v) for k, v in scores.items()}

    return compute


def _last_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1])) if found else None


def _check_settings(path: Path, settings: dict[str, Any], folder: Path) -> None:
    """Stop when ``path`` (a settings or metrics file) was made with other settings."""
    if not path.is_file():
        return
    recorded = read_json(path).get("settings")
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back (tuples become lists)
    if recorded != settings:
        diff = sorted(k for k in set(recorded or {}) | set(settings) if (recorded or {}).get(k) != settings.get(k))
        raise ProbekitError(
            f"{folder} was made with other settings ({', '.join(diff)} differ); "
            "remove it or choose another --out to fine-tune again"
        )


@dataclass
class _Job:
    """What every run of one task x variant shares."""

    source: str
    data: TaskData
    train: Split
    dev: Split
    tokenizer: Any
    train_tok: Tokenized
    dev_tok: Tokenized
    variant: Variant
    options: TrainOptions
    metric: str
    metric_names: list[str]


def run_config(job: _Job, seed: int, batch_size: int, lr: float, run_dir: Path, settings: dict[str, Any]) -> dict:
    """Train one configuration (resuming its checkpoints); return its ``result.json`` contents."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    done = run_dir / RESULT_FILE
    _check_settings(done, settings, run_dir)
    if done.is_file():
        return read_json(done)
    _check_settings(run_dir / "settings.json", settings, run_dir)
    write_json(run_dir / "settings.json", {"settings": settings})
    opts = job.options
    precision = _precision(opts.precision, opts.device)
    model = apply_variant(load_classifier(job.source, job.data, seed), job.variant, seed)
    mlm_order = None
    if job.variant.name == "multi-objective":
        mlm_order = np.random.default_rng([seed, 7]).permutation(len(job.train.labels))
    pad = int(job.tokenizer.pad_token_id)
    train_ds = TextDataset(job.train_tok, job.train.labels, pad, mlm_order)
    dev_ds = TextDataset(job.dev_tok, job.dev.labels, pad)
    steps_per_epoch = max(1, math.ceil(len(train_ds) / batch_size))
    by_steps = opts.max_steps is not None
    every = opts.eval_steps or opts.max_steps or steps_per_epoch
    ckpt_dir = run_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(64, batch_size),
        learning_rate=lr,
        num_train_epochs=opts.n_epochs,
        max_steps=opts.max_steps or -1,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps" if by_steps else "epoch",
        save_strategy="steps" if by_steps else "epoch",
        eval_steps=every if by_steps else None,
        save_steps=every if by_steps else 500,
        load_best_model_at_end=True,
        metric_for_best_model=job.metric,
        greater_is_better=True,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=opts.logging_steps or max(1, steps_per_epoch // 10),
        seed=seed,
        data_seed=seed,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=opts.device == "cpu" or not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=not opts.progress,
        dataloader_num_workers=0,
        label_names=["labels"],
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collate_items,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        compute_metrics=_compute_metrics(job.metric_names, M.is_regression(job.data.task)),
    )
    trainer.remove_callback(PrinterCallback)
    resume = _last_checkpoint(ckpt_dir)
    started = time.perf_counter()
    warmup: list[float] = []
    if isinstance(model, MultiObjective) and job.variant.mlm_warmup and resume is None:
        model.to(args.device)
        warmup = model.warm_up(_mlm_batches(train_ds, batch_size, job.variant.mlm_warmup, seed, args.device))
    with quiet_hub():
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - started
    result = _summarize(trainer, job, batch_size, lr, wall, resumed=resume is not None)
    if warmup:
        result["mlm_warmup_loss"] = {"steps": len(warmup), "first": warmup[0], "last10": float(np.mean(warmup[-10:]))}
    final = run_dir / "model"
    tmp = run_dir / ".model.tmp"
    remove_tree(tmp)
    with quiet_hub():
        saved_model(trainer.model).save_pretrained(tmp)
        job.tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():  # some writers leave 0600 files (mkstemp); give them the usual mode
        f.chmod(0o666 & ~_UMASK)
    replace_dir(tmp, final)
    result["settings"] = settings
    write_json(done, result)
    if not opts.keep_checkpoints:
        remove_tree(ckpt_dir)
    return result


def _mlm_batches(
    ds: TextDataset, batch_size: int, steps: int, seed: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of training texts in random order (for the MLM head's warm-up)."""
    rng = np.random.default_rng([seed, 11])
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(ds))])
        idx, order = order[:batch_size], order[batch_size:]
        yield collate(ds.tok, idx, ds.pad_id, device)


def _summarize(trainer: Any, job: _Job, batch_size: int, lr: float, wall: float, resumed: bool) -> dict[str, Any]:
    """Per-evaluation dev metrics, training losses and the chosen evaluation, from the Trainer's state."""
    state = trainer.state
    key = f"eval_{job.metric}"
    evals = [
        {"epoch": round(float(e["epoch"]), 4), "step": int(e["step"]), **{m: e[f"eval_{m}"] for m in job.metric_names}}
        for e in state.log_history
        if key in e
    ]
    losses = [{"step": int(e["step"]), "loss": float(e["loss"])} for e in state.log_history if "loss" in e]
    if not evals:
        raise ProbekitError("training ended before any dev evaluation; raise --max-steps or --epochs")
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    chosen = next((e for e in evals if e["step"] == best_step), max(evals, key=lambda e: e[job.metric]))
    return {
        "batch_size": batch_size,
        "lr": lr,
        "evals": evals,
        "train_loss": losses,
        "chosen": {**chosen, "value": chosen[job.metric]},
        "steps": int(state.global_step),
        "wall_s": round(wall, 2),
        "resumed": resumed,
    }


# ---------------------------------------------------------------- a seed, a task, the job


def _job(source: str, task: str | Task, variant: Variant, options: TrainOptions, data_dir: Any, tokenizer: Any) -> _Job:
    spec = task if isinstance(task, Task) else get_task(task)
    if spec.format != "glue":
        raise ProbekitError(f"task {spec.name!r} is not a GLUE task; fine-tuning reads GLUE tasks (cola, rte, sst2...)")
    data = load_task(spec, data_dir)
    train, dev = prepare_data(data, options.max_train_samples, options.max_dev_samples)
    names = M.task_metrics(data.task)
    return _Job(
        source=source,
        data=data,
        train=train,
        dev=dev,
        tokenizer=tokenizer,
        train_tok=tokenize(tokenizer, train.texts, train.text_pairs, options.max_length),
        dev_tok=tokenize(tokenizer, dev.texts, dev.text_pairs, options.max_length),
        variant=variant,
        options=options,
        metric=names[0],
        metric_names=names,
    )


def seed_settings(source: str, task: str, variant: Variant, seed: int, options: TrainOptions) -> dict[str, Any]:
    """What a seed's best checkpoint depends on (recorded in ``metrics.json``; a mismatch stops a re-run)."""
    return {
        "model": source,
        "task": task,
        "variant": variant.settings(),
        "seed": seed,
        "grid": options.grid_name,
        **options.settings(),
    }


def finetune_seed(job: _Job, seed: int, seed_dir: Path) -> SeedResult:
    """Every grid configuration of one seed, then the best one saved to ``seed_dir/best``."""
    opts = job.options
    settings = seed_settings(job.source, job.data.name, job.variant, seed, opts)
    best = seed_dir / "best"
    runs = []
    for bs, lr in opts.grid_spec.configs():
        run_settings = {**settings, "batch_size": bs, "lr": lr}
        result = run_config(job, seed, bs, lr, seed_dir / "runs" / config_slug(bs, lr), run_settings)
        runs.append(result)
    pick = max(range(len(runs)), key=lambda i: runs[i]["chosen"]["value"])
    chosen_dir = seed_dir / "runs" / config_slug(runs[pick]["batch_size"], runs[pick]["lr"]) / "model"
    if not chosen_dir.is_dir():
        raise ProbekitError(
            f"{chosen_dir} is missing (removed after an earlier run?); remove {seed_dir} to fine-tune this seed again"
        )
    metrics = _metrics_file(job, seed, settings, runs, pick, chosen_dir)
    tmp = seed_dir / ".best.tmp"
    remove_tree(tmp)
    shutil.copytree(chosen_dir, tmp)
    write_json(tmp / METRICS_FILE, metrics)
    replace_dir(tmp, best)
    if not opts.keep_checkpoints:
        for r in runs:
            remove_tree(seed_dir / "runs" / config_slug(r["batch_size"], r["lr"]) / "model")
    return SeedResult(job.data.name, job.variant.slug, seed, best, read_json(best / METRICS_FILE))


def _metrics_file(job: _Job, seed: int, settings: dict, runs: list[dict], pick: int, model_dir: Path) -> dict:
    import transformers

    chosen = runs[pick]
    n_layers = _saved_layers(model_dir)
    return {
        "task": job.data.name,
        "metric": job.metric,
        "metrics": job.metric_names,
        "variant": job.variant.slug,
        "seed": seed,
        "chosen": {
            "batch_size": chosen["batch_size"],
            "lr": chosen["lr"],
            "epoch": chosen["chosen"]["epoch"],
            "step": chosen["chosen"]["step"],
            "value": chosen["chosen"]["value"],
            **{m: chosen["chosen"][m] for m in job.metric_names},
        },
        "runs": [{k: v for k, v in r.items() if k != "settings"} for r in runs],
        "hyperparameters": {
            "grid": job.options.grid_name,
            "grid_batch_sizes": list(job.options.grid_spec.batch_sizes),
            "grid_lrs": list(job.options.grid_spec.lrs),
            **job.options.settings(),
            "optimizer": "adamw",
            "schedule": "linear warm-up then linear decay",
        },
        "data": {
            "sha256": job.data.sha256,
            "n_train": len(job.train),
            "n_dev": len(job.dev),
            "data_seed": DATA_SEED,
        },
        "model": {"source": job.source, "n_layers": n_layers},
        "settings": settings,
        "wall_s": round(sum(r["wall_s"] for r in runs), 2),
        "device": _device_name(job.options.device),
        "precision": _precision(job.options.precision, job.options.device),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"probekit": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


def _saved_layers(model_dir: Path) -> int:
    cfg = read_json(model_dir / "config.json")
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layers") or 0)


def _device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _variants(variants: str | Variant | Sequence[str | Variant], **params: Any) -> list[Variant]:
    """Variants from names (``all``: every one) and their parameters (``copy_from``, ``drop``, ...)."""
    items = [variants] if isinstance(variants, (str, Variant)) else list(variants)
    if "all" in items:
        items = list(VARIANTS)
    out = [v if isinstance(v, Variant) else Variant(v, **params) for v in items]
    return list(dict.fromkeys(out))


def finetune(
    model: str | Path,
    tasks: str | Task | Sequence[str | Task],
    out: str | Path,
    seeds: int | Sequence[int] = 3,
    grid: str | Grid = "default",
    variants: str | Variant | Sequence[str | Variant] = "plain",
    copy_from: int | None = None,
    drop: int | None = None,
    mlm_weight: float = 1.0,
    mlm_warmup: int = MLM_WARMUP_STEPS,
    max_train_samples: int | None = None,
    max_dev_samples: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    eval_steps: int | None = None,
    max_length: int = 128,
    logging_steps: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    keep_checkpoints: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> FinetuneRun:
    """What ``probekit finetune`` runs: fine-tune ``model`` on each task, variant and seed; best
    checkpoints under ``out/<task>/<variant>/seed<k>/best``; update ``out/comparison.{csv,md}``.

    ``seeds``: a count (seeds 0..n-1) or a list. ``variants``: names (``plain``,
    ``multi-objective``, ``copy-layers``, ``drop-layers``, or ``all``) or :class:`Variant`;
    ``copy_from``, ``drop``, ``mlm_weight`` and ``mlm_warmup`` parameterise the named ones.
    Already finished seeds and runs are skipped; interrupted ones resume. ``threads``: CPU
    threads for torch while it runs (on a busy CPU, 1 is often much faster than
    oversubscribing the cores).
    """
    from probekit.finetune.table import write_comparison

    _check_device(device)
    options = TrainOptions(
        grid=grid,
        epochs=epochs,
        max_steps=max_steps,
        eval_steps=eval_steps,
        max_train_samples=max_train_samples,
        max_dev_samples=max_dev_samples,
        max_length=max_length,
        logging_steps=logging_steps,
        device=device,
        precision=precision,
        keep_checkpoints=keep_checkpoints,
        progress=progress,
    )
    _precision(precision, device)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ProbekitError("no seed given (--seeds must be at least 1)")
    task_list = [tasks] if isinstance(tasks, (str, Task)) else list(tasks)
    if not task_list:
        raise ProbekitError("no task given; pass --task (e.g. --task cola)")
    variant_list = _variants(variants, copy_from=copy_from, drop=drop, mlm_weight=mlm_weight, mlm_warmup=mlm_warmup)
    source = model_source(model)
    out = Path(out)
    with cpu_threads(threads):
        run = _finetune_all(source, task_list, variant_list, seed_list, out, options, data_dir)
    run.comparison = write_comparison(out)
    return run


def _finetune_all(
    source: str,
    task_list: list[str | Task],
    variant_list: list[Variant],
    seed_list: list[int],
    out: Path,
    options: TrainOptions,
    data_dir: str | Path | None,
) -> FinetuneRun:
    run = FinetuneRun(out=out)
    tokenizer = None
    for task in task_list:
        for variant in variant_list:
            job = None
            for seed in seed_list:
                task_name = task.name if isinstance(task, Task) else get_task(task).name
                seed_dir = out / task_name / variant.slug / f"seed{seed}"
                settings = seed_settings(source, task_name, variant, seed, options)
                best = seed_dir / "best"
                _check_settings(best / METRICS_FILE, settings, best)
                if (best / METRICS_FILE).is_file():  # done: no need to load the data or the tokenizer
                    metrics = read_json(best / METRICS_FILE)
                    run.results.append(SeedResult(task_name, variant.slug, seed, best, metrics, skipped=True))
                    continue
                tokenizer = tokenizer or load_tokenizer(source)
                job = job or _job(source, task, variant, options, data_dir, tokenizer)
                run.results.append(finetune_seed(job, seed, seed_dir))
    return run


def checkpoint_layers(path: str | Path) -> int:
    """Transformer layers of a saved checkpoint (from its config)."""
    return _saved_layers(Path(path))


__all__ = [
    "GRIDS",
    "FinetuneRun",
    "Grid",
    "SeedResult",
    "TextDataset",
    "TrainOptions",
    "checkpoint_layers",
    "encoder_layers",
    "finetune",
    "finetune_seed",
    "load_classifier",
    "prepare_data",
    "run_config",
]
