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

    results.parquet, results.csv              tidy rows (:mod:`probekit.results`, source ``finetune``): the
                                              dev metrics of every configuration and epoch, ``chosen`` marked

Everything is resumable through :mod:`probekit.fingerprint`: a seed folder holds the stamp of
the settings and inputs (the data's SHA-256) it is made from. With the same fingerprint a seed
whose ``best/metrics.json`` exists is skipped, so is a configuration whose ``result.json``
exists, and an interrupted configuration resumes from its last Trainer checkpoint. Outputs
made with other settings are never reused: the run stops, names the differing settings and
the folder to remove (or ``fresh=True`` starts that seed over). ``best/`` is a standard checkpoint folder of the
sequence classifier: ``AutoModel.from_pretrained(best)`` gives the encoder and
``probekit extract --model best`` extracts it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch

from probekit import metrics as M
from probekit._version import __version__
from probekit.backbone import check_encoder, check_tokenizer, from_pretrained, model_source, quiet_hub, usable_length
from probekit.config import Config, option
from probekit.cpu import cpu_threads
from probekit.data import Split, Task, TaskData, get_task, load_task
from probekit.encoding import Tokenized, collate, tokenize
from probekit.errors import ParamError, ProbekitError, ProbekitWarning
from probekit.finetune.batches import TextDataset, collate_items
from probekit.finetune.table import seed_rows, write_comparison, write_results
from probekit.finetune.variants import (
    VARIANTS,
    Variant,
    encoder_layers,
    make_variant,
    variant_options,
)
from probekit.fingerprint import check, read_stamp, stamp_record, write_stamp
from probekit.io import _UMASK, read_json, remove_tree, replace_dir, write_json
from probekit.paths import claim_output
from probekit.registry import Registry
from probekit.results import tidy
from probekit.runs import Run

METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
DATA_SEED = 1234
"""Seed of the ``max_train_samples`` subset: the same subset for every seed and configuration."""


@dataclass(frozen=True)
class Grid(Config):
    """Batch sizes x learning rates, each trained for up to ``epochs`` epochs."""

    component: ClassVar[str] = "a fine-tuning grid"

    batch_sizes: tuple[int, ...] = option((32,), "Batch sizes of the grid.", ge=1)
    lrs: tuple[float, ...] = option((5e-5,), "Learning rates of the grid.", gt=0)
    epochs: int = option(3, "Epochs of every configuration.", ge=1)

    def configs(self) -> list[tuple[int, float]]:
        return [(bs, lr) for bs in self.batch_sizes for lr in self.lrs]


GRIDS: Registry[Grid] = Registry("fine-tuning grid", "grid")
"""``default``: BERT's fine-tuning grid as the convexity paper uses it; ``quick``: one configuration."""
GRIDS.register("default", Grid((16, 32), (2e-5, 3e-5, 5e-5), 5), help="batch 16/32 x lr 2e-5/3e-5/5e-5, 5 epochs")
GRIDS.register("quick", Grid((32,), (5e-5,), 3), help="batch 32, lr 5e-5, 3 epochs")


def config_slug(batch_size: int, lr: float) -> str:
    return f"bs{batch_size}-lr{lr:.0e}".replace("e-0", "e-")


def _grid_help() -> str:
    return "; ".join(f"{n}: {GRIDS.help(n)}" for n in GRIDS.names())


@dataclass(frozen=True)
class TrainOptions(Config):
    """Settings shared by every run of a fine-tuning job."""

    component: ClassVar[str] = "fine-tuning"

    grid: str = option("default", "Grid of batch sizes x learning rates (and epochs).", choices=GRIDS.names)
    batch_sizes: tuple[int, ...] | None = option(None, "Batch sizes, replacing the grid's (e.g. 16,32).", ge=1)
    lrs: tuple[float, ...] | None = option(None, "Learning rates, replacing the grid's (e.g. 2e-5,5e-5).", gt=0)
    epochs: int | None = option(None, "Override the grid's epochs.", ge=1)
    max_steps: int | None = option(None, "Stop after this many steps (evaluated at the end).", ge=1)
    eval_steps: int | None = option(None, "With max_steps: evaluate (and checkpoint) every this many steps.", ge=1)
    max_train_samples: int | None = option(None, "Train on a fixed random subset of this many examples.", ge=1)
    max_dev_samples: int | None = option(None, "Evaluate on a fixed random subset of dev.", ge=1)
    max_length: int = option(128, "Truncate texts to this many tokens.", ge=2)
    weight_decay: float = option(0.01, "AdamW weight decay.", ge=0)
    warmup_ratio: float = option(0.1, "Share of the steps warming the learning rate up.", ge=0, le=1)
    logging_steps: int | None = option(None, "Log the training loss every this many steps.", ge=1)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto, cpu or cuda.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = option(
        "auto", "auto: fp32 on CPU, bf16 (else fp16) mixed precision on GPU."
    )
    optimizer: Literal["adamw", "rmsprop", "sgd"] = option(
        "adamw", "Optimizer (BERTer also tries RMSprop and SGD; weight decay applies to each)."
    )
    select: Literal["best-dev", "paper"] = option(
        "best-dev",
        "Checkpoint rule: best-dev (the best dev score), or paper (the convexity paper's: the best dev score "
        "among evaluations whose dev score is not below the training score).",
    )
    keep_checkpoints: bool = option(False, "Keep the Trainer checkpoints and every configuration's model.")
    progress: bool = option(True, "Progress bars.", cli=False)

    @property
    def grid_spec(self) -> Grid:
        base = GRIDS.get(self.grid)
        if self.batch_sizes is None and self.lrs is None:
            return base
        return Grid(self.batch_sizes or base.batch_sizes, self.lrs or base.lrs, self.epochs or base.epochs)

    @property
    def grid_name(self) -> str | dict[str, Any]:
        """The grid's name, or (batch sizes or learning rates given) the grid itself."""
        if self.batch_sizes is None and self.lrs is None:
            return GRIDS.canonical(self.grid)
        return self.grid_spec.to_dict()

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
            # new settings enter the fingerprint only when not their default, so earlier runs stay reusable
            **({"optimizer": self.optimizer} if self.optimizer != "adamw" else {}),
            **({"select": self.select} if self.select != "best-dev" else {}),
        }


@dataclass(frozen=True)
class JobOptions(Config):
    """What a fine-tuning job runs besides the training settings: how many seeds, on how many threads."""

    component: ClassVar[str] = "fine-tuning"

    seeds: int = option(3, "Seeds 0..N-1 (each runs the whole grid).", ge=1)
    threads: int = option(0, "CPU threads for torch (0: its default; 1 is often fastest on a busy CPU).", ge=0)


def option_sources() -> list[tuple[str, type[Config]]]:
    """Every option ``finetune`` takes, by component: the job's, the training's, each variant's (the CLI
    derives its flags and the suite its [finetune] keys from these)."""
    return [("fine-tuning", JobOptions), ("fine-tuning", TrainOptions), *variant_options()]


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


# ---------------------------------------------------------------- data


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
        raise ParamError("precision", f"{precision} needs a CUDA GPU; use fp32 (or auto) on the CPU")
    return precision


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ProbekitError(
            "{device} cuda was asked for but no CUDA GPU is available; use {device} cpu", params=("device",)
        )


def load_classifier(source: str, data: TaskData, seed: int) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` for the task (regression head for STS-B), head seeded."""
    # deferred: transformers is heavy (seconds), needed only to train
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
    model = from_pretrained(AutoModelForSequenceClassification, source, **kwargs)
    check_encoder(model.config, source)
    return model


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer  # deferred: transformers is heavy (seconds), needed only to train

    tok = from_pretrained(AutoTokenizer, source)
    check_tokenizer(tok, source)
    if tok.pad_token_id is None:
        raise ProbekitError(f"the tokenizer of {source} has no padding token")
    return tok


def _compute_metrics(names: list[str], regression: bool, variant: Variant | None = None):  # type: ignore[no-untyped-def]
    """The Trainer's ``compute_metrics``: the variant turns the outputs into predictions (a Siamese model
    thresholds its cosines), scored with every metric of the task."""
    predictor = variant or VARIANTS.get("plain")()

    def main(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        v = M.score(names[:1], y_true, y_pred)[names[0]]
        return -math.inf if math.isnan(v) else v

    def compute(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = np.asarray(pred.label_ids).reshape(-1)
        y_pred = predictor.predictions(np.asarray(logits), labels, regression, main)
        scores = M.score(names, labels.reshape(len(y_pred)), y_pred)
        # a constant prediction has no correlation (NaN): count it as 0 so that a checkpoint can still be chosen
        return {k: (0.0 if math.isnan(v) else v) for k, v in scores.items()}

    return compute


SELECT_RULES = {
    "best-dev": {"rule": "best-dev", "reading": "the evaluation (epoch, or step) with the best dev score"},
    "paper": {
        "rule": "paper",
        "reading": "the convexity paper's Section 4.1, 'the most validation performance score while being higher "
        "than the accuracy performance score at the same time', read as: the best dev score among the evaluations "
        "whose dev score is not below the training score (the task's main metric on a fixed random subset of the "
        "training set as large as dev, in eval mode); the best dev score when no evaluation qualifies",
    },
}
"""``--select``: how each configuration's checkpoint is chosen (recorded in ``metrics.json``)."""
OPTIMIZERS = {"adamw": "adamw_torch", "rmsprop": "rmsprop", "sgd": "sgd"}
"""``--optimizer`` -> the Trainer's ``optim`` (torch's AdamW, RMSprop, SGD)."""
PAPER_PENALTY = 1e3
"""Subtracted from the dev score of an evaluation the paper's rule does not admit (dev below train), so
that the Trainer keeps the best admitted one, and the best dev score when none is admitted."""
TRAIN_EVAL_PREFIX = "train_eval"


def _paper_rule(trainer: Any, train_eval: Any, metric: str) -> Any:
    """A Trainer callback: after each dev evaluation, score ``train_eval`` (a fixed subset of the training
    set) and add ``eval_paper`` (the dev score, less :data:`PAPER_PENALTY` when below the training score)."""
    from transformers import TrainerCallback  # deferred: transformers is heavy (seconds), needed only to train

    class PaperRule(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            if not metrics or f"eval_{metric}" not in metrics or "eval_paper" in metrics:
                return
            # in a forked RNG: a DataLoader draws its base seed from torch's global generator, which would
            # otherwise shift every later dropout mask and batch order (the rule must not change the training)
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda):
                train = trainer.predict(train_eval, metric_key_prefix=TRAIN_EVAL_PREFIX).metrics
            tr, dev = float(train[f"{TRAIN_EVAL_PREFIX}_{metric}"]), float(metrics[f"eval_{metric}"])
            metrics["eval_paper"] = dev if dev >= tr else dev - PAPER_PENALTY
            trainer.log({f"{TRAIN_EVAL_PREFIX}_{metric}": tr, "paper_admitted": float(dev >= tr)})

    return PaperRule()


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint: the Trainer writes ``trainer_state.json`` last and not
    atomically, so one a kill cut short (missing, or not valid JSON) is never resumed from."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and _readable_state(p / "trainer_state.json")]
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1])) if found else None


def _readable_state(path: Path) -> bool:
    try:
        return isinstance(read_json(path), dict)
    except (OSError, ValueError):
        return False


@dataclass
class _FinetuneJob:
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
    max_length: int = 128
    train_eval: Split | None = None
    """A fixed random subset of the training set as large as dev (at most): the training score of the
    paper's checkpoint rule."""


def training_arguments(
    opts: TrainOptions, ckpt_dir: Path, seed: int, lr: float, precision: str, **specific: Any
) -> Any:
    """The ``TrainingArguments`` every fine-tuning shares (linear schedule, best checkpoint kept, seeds, precision,
    no reporting) with the run's own batch sizes, lengths and evaluation schedule in ``specific``."""
    from transformers import TrainingArguments  # deferred: transformers is heavy (seconds), needed only to train

    return TrainingArguments(
        output_dir=str(ckpt_dir),
        learning_rate=lr,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_ratio,
        lr_scheduler_type="linear",
        load_best_model_at_end=True,
        greater_is_better=True,
        save_total_limit=2,
        logging_strategy="steps",
        seed=seed,
        data_seed=seed,
        optim=OPTIMIZERS[opts.optimizer],
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=opts.device == "cpu" or not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=not opts.progress,
        dataloader_num_workers=0,
        label_names=["labels"],
        remove_unused_columns=False,
        **specific,
    )


def run_config(
    job: _FinetuneJob, seed: int, batch_size: int, lr: float, run_dir: Path, settings: dict[str, Any]
) -> dict:
    """Train one configuration (resuming its checkpoints); return its ``result.json`` contents."""
    # deferred: transformers is heavy (seconds), needed only to train
    from transformers import PrinterCallback, Trainer

    done = run_dir / RESULT_FILE
    if done.is_file():  # the seed's stamp (checked by the caller) covers its configurations
        return read_json(done)
    opts = job.options
    precision = _precision(opts.precision, opts.device)
    model = job.variant.apply(load_classifier(job.source, job.data, seed), seed)
    pad = int(job.tokenizer.pad_token_id)
    train_ds = job.variant.dataset(job.tokenizer, job.train, job.max_length, pad, train=True)
    dev_ds = job.variant.dataset(job.tokenizer, job.dev, job.max_length, pad, train=False)
    paper = opts.select == "paper"
    steps_per_epoch = max(1, math.ceil(len(train_ds) / batch_size))
    by_steps = opts.max_steps is not None
    every = opts.eval_steps or opts.max_steps or steps_per_epoch
    ckpt_dir = run_dir / "checkpoints"
    args = training_arguments(
        opts,
        ckpt_dir,
        seed,
        lr,
        precision,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(64, batch_size),
        num_train_epochs=opts.n_epochs,
        max_steps=opts.max_steps or -1,
        eval_strategy="steps" if by_steps else "epoch",
        save_strategy="steps" if by_steps else "epoch",
        eval_steps=every if by_steps else None,
        save_steps=every if by_steps else 500,
        metric_for_best_model="paper" if paper else job.metric,
        logging_steps=opts.logging_steps or max(1, steps_per_epoch // 10),
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collate_items,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        compute_metrics=_compute_metrics(job.metric_names, M.is_regression(job.data.task), job.variant),
    )
    trainer.remove_callback(PrinterCallback)
    if paper:
        train_eval = job.variant.dataset(job.tokenizer, job.train_eval, job.max_length, pad, train=False)
        trainer.add_callback(_paper_rule(trainer, train_eval, job.metric))
    resume = _last_checkpoint(ckpt_dir)
    started = time.perf_counter()
    extras: dict[str, Any] = {}
    if resume is None:
        extras = job.variant.before_training(
            model, lambda steps: _mlm_batches(train_ds, batch_size, steps, seed, args.device), args.device
        )
    with quiet_hub():
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - started
    result = _summarize(trainer, job, batch_size, lr, wall, resumed=resume is not None)
    result.update(extras)
    result.update(job.variant.notes(trainer.model))
    final = run_dir / "model"
    tmp = run_dir / ".model.tmp"
    remove_tree(tmp)
    with quiet_hub():
        job.variant.saved(trainer.model).save_pretrained(tmp)
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


def _summarize(
    trainer: Any, job: _FinetuneJob, batch_size: int, lr: float, wall: float, resumed: bool
) -> dict[str, Any]:
    """Per-evaluation dev metrics, training losses and the chosen evaluation, from the Trainer's state."""
    state = trainer.state
    key = f"eval_{job.metric}"
    evals = [
        {"epoch": round(float(e["epoch"]), 4), "step": int(e["step"]), **{m: e[f"eval_{m}"] for m in job.metric_names}}
        for e in state.log_history
        if key in e
    ]
    train_key = f"{TRAIN_EVAL_PREFIX}_{job.metric}"
    train_scores = {int(e["step"]): float(e[train_key]) for e in state.log_history if train_key in e}
    for e in evals:
        if e["step"] in train_scores:
            e[f"train_{job.metric}"] = train_scores[e["step"]]
    losses = [{"step": int(e["step"]), "loss": float(e["loss"])} for e in state.log_history if "loss" in e]
    if not evals:
        raise ProbekitError(
            "training ended before any dev evaluation; raise {max_steps} or {epochs}", params=("max_steps", "epochs")
        )
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    chosen = next((e for e in evals if e["step"] == best_step), max(evals, key=lambda e: e[job.metric]))
    train_score = chosen.get(f"train_{job.metric}")
    if train_score is not None:
        chosen = {**chosen, "admitted": bool(chosen[job.metric] >= train_score)}
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


def _task_data(task: str | Task, data_dir: Any) -> TaskData:
    spec = task if isinstance(task, Task) else get_task(task)
    if spec.format != "glue":
        raise ProbekitError(f"task {spec.name!r} is not a GLUE task; fine-tuning reads GLUE tasks (cola, rte, sst2...)")
    return load_task(spec, data_dir)


def _job(source: str, data: TaskData, variant: Variant, options: TrainOptions, tokenizer: Any) -> _FinetuneJob:
    from transformers import AutoConfig  # deferred: transformers is heavy (seconds), needed only to train

    config = from_pretrained(AutoConfig, source)
    check_encoder(config, source)
    max_length = usable_length(options.max_length, config, repr(source))  # the model's positions, at most
    train, dev = prepare_data(data, options.max_train_samples, options.max_dev_samples)
    names = M.task_metrics(data.task)
    return _FinetuneJob(
        source=source,
        data=data,
        train=train,
        dev=dev,
        tokenizer=tokenizer,
        train_tok=tokenize(tokenizer, train.texts, train.text_pairs, max_length),
        dev_tok=tokenize(tokenizer, dev.texts, dev.text_pairs, max_length),
        variant=variant,
        options=options,
        metric=names[0],
        metric_names=names,
        max_length=max_length,
        train_eval=train.take(np.sort(np.random.default_rng(DATA_SEED + 1).permutation(len(train))[: len(dev)])),
    )


def seed_settings(source: str, task: str, variant: Variant, seed: int, options: TrainOptions) -> dict[str, Any]:
    """What a seed's best checkpoint depends on (fingerprinted in the seed's stamp, recorded in ``metrics.json``)."""
    return {
        "model": source,
        "task": task,
        "variant": variant.settings(),
        "seed": seed,
        "grid": options.grid_name,
        **options.settings(),
    }


def seed_inputs(data: TaskData) -> dict[str, Any]:
    """What a seed reads besides its settings: the data file (by its SHA-256)."""
    return {"data": data.sha256}


def resume_seed(seed_dir: Path, settings: dict[str, Any], inputs: dict[str, Any], fresh: bool = False) -> str:
    """The resume rule (:func:`probekit.fingerprint.check`) for a seed folder: ``"new"``, ``"reuse"`` or
    ``"fresh"`` (the folder is then removed), or a :class:`~probekit.errors.ResumeError`. A finished seed
    written before stamps existed is judged by the settings its ``metrics.json`` recorded."""
    stamp = read_stamp(seed_dir)
    legacy = seed_dir / "best" / METRICS_FILE
    if stamp is None and legacy.is_file():
        recorded = read_json(legacy).get("settings") or {}
        stamp = stamp_record(recorded, inputs)
    decision = check(stamp, settings, inputs, where=seed_dir, fresh=fresh, what="a fine-tuning run")
    if decision == "fresh":
        remove_tree(seed_dir)
    if decision != "reuse" or read_stamp(seed_dir) is None:
        seed_dir.mkdir(parents=True, exist_ok=True)
        write_stamp(seed_dir, settings, inputs)
    return decision


def finetune_seed(job: _FinetuneJob, seed: int, seed_dir: Path) -> SeedResult:
    """Every grid configuration of one seed, then the best one saved to ``seed_dir/best``."""
    opts = job.options
    settings = seed_settings(job.source, job.data.name, job.variant, seed, opts)
    best = seed_dir / "best"
    runs = []
    for bs, lr in opts.grid_spec.configs():
        run_settings = {**settings, "batch_size": bs, "lr": lr}
        result = run_config(job, seed, bs, lr, seed_dir / "runs" / config_slug(bs, lr), run_settings)
        runs.append(result)
    pick = max(range(len(runs)), key=lambda i: (runs[i]["chosen"].get("admitted", True), runs[i]["chosen"]["value"]))
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


def _metrics_file(job: _FinetuneJob, seed: int, settings: dict, runs: list[dict], pick: int, model_dir: Path) -> dict:
    import transformers  # deferred: transformers is heavy (seconds), needed only to train

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
            "optimizer": job.options.optimizer,
            "schedule": "linear warm-up then linear decay",
        },
        "select": SELECT_RULES[job.options.select],
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


def _variants(variants: str | Variant | Sequence[str | Variant], params: Mapping[str, Any]) -> list[Variant]:
    """Variants from names (``all``: every registered one) or objects, named ones taking their options
    from ``params`` (``copy_from``, ``drop``, ``mlm_weight``...)."""
    items = [variants] if isinstance(variants, (str, Variant)) else list(variants)
    if any(isinstance(v, str) and v == "all" for v in items):
        items = [v for v in items if not (isinstance(v, str) and v == "all")] + VARIANTS.names()
    out = [make_variant(v, **params) for v in items]
    return list(dict.fromkeys(out))


def _split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` as training options and variants' options; an option of neither is a :class:`ParamError`."""
    train = set(TrainOptions.field_names())
    of_variants = {f for _, cls in variant_options() for f in cls.field_names()}
    for key in params:
        if key not in train and key not in of_variants:
            known = ", ".join([*TrainOptions.field_names(), *sorted(of_variants)])
            raise ParamError(key, f"is not an option of fine-tuning; its options: {known}")
    return {k: v for k, v in params.items() if k in train}, {k: v for k, v in params.items() if k in of_variants}


def finetune(
    model: str | Path,
    tasks: str | Task | Sequence[str | Task],
    out: str | Path,
    seeds: int | Sequence[int] = 3,
    grid: str | Grid = "default",
    variants: str | Variant | Sequence[str | Variant] = "plain",
    *,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    fresh: bool = False,
    strict: bool = True,
    **options: Any,
) -> Run:
    """What ``probekit finetune`` runs: fine-tune ``model`` on each task, variant and seed; best
    checkpoints under ``out/<task>/<variant>/seed<k>/best``; update ``out/comparison.{csv,md}`` and the
    tidy rows in ``out/results.{parquet,csv}``.

    ``seeds``: a count (seeds 0..n-1) or a list. ``grid``: a name in :data:`GRIDS` or a :class:`Grid`.
    ``variants``: names in :data:`VARIANTS` (or ``all``) or :class:`Variant` objects. ``options``: the
    fields of :class:`TrainOptions` (``epochs``, ``max_steps``, ``max_train_samples``, ``device``...)
    and of the named variants (``copy_from``, ``drop``, ``mlm_weight``, ``mlm_warmup``...). Finished
    seeds and runs with the same fingerprint are reused, interrupted ones resume; other settings are
    refused unless ``fresh``. ``threads``: CPU threads for torch while it runs (on a busy CPU, 1 is
    often much faster than oversubscribing the cores). A variant that does not apply to a task (a pair
    architecture on a one-sentence task) is skipped with a warning, or refused when it is the only
    task x variant asked for (with ``strict=False``, as a suite runs it, always skipped).

    Returns a :class:`~probekit.runs.Run`: ``results`` the tidy rows of these tasks, variants and
    seeds; ``seeds`` the :class:`SeedResult` list; ``comparison`` the comparison table.
    """
    started = time.perf_counter()
    train_params, variant_params = _split_params(options)
    if isinstance(grid, Grid):
        custom = {"batch_sizes": grid.batch_sizes, "lrs": grid.lrs, "epochs": train_params.get("epochs") or grid.epochs}
        train_params = {**train_params, **custom}
    else:
        train_params["grid"] = grid
    opts = TrainOptions.from_mapping(train_params)
    _check_device(opts.device)
    _precision(opts.precision, opts.device)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ParamError("seeds", "no seed given (must be at least 1)")
    task_list = [tasks] if isinstance(tasks, (str, Task)) else list(tasks)
    if not task_list:
        raise ParamError("task", "no task given (e.g. cola)")
    variant_list = _variants(variants, variant_params)
    source = model_source(model)
    out = Path(out)
    claim_output(out, "out", force=fresh, force_param="fresh")
    with cpu_threads(threads or None):
        results = _finetune_all(source, task_list, variant_list, seed_list, out, opts, data_dir, fresh, strict)
    table = write_comparison(out)
    rows = [r for res in results for r in seed_rows(res.metrics)]
    paths = {"out": out, "comparison": out / "comparison.csv"}
    if rows:  # none when every asked-for variant was skipped as not applying to the tasks
        paths["results"] = write_results(out, rows)
    return Run(
        results=tidy(rows) if rows else pd.DataFrame(),
        paths=paths,
        timings={"finetune": round(time.perf_counter() - started, 2)},
        details={"seeds": results, "comparison": table, "options": opts, "variants": variant_list},
    )


def _finetune_all(
    source: str,
    task_list: list[str | Task],
    variant_list: list[Variant],
    seed_list: list[int],
    out: Path,
    options: TrainOptions,
    data_dir: str | Path | None,
    fresh: bool,
    strict: bool = True,
) -> list[SeedResult]:
    results: list[SeedResult] = []
    tokenizer = None
    for task in task_list:
        data = _task_data(task, data_dir)
        inputs = seed_inputs(data)
        for variant in variant_list:
            reason = variant.applies(data)
            if reason is not None:
                if strict and len(task_list) * len(variant_list) == 1:
                    raise ParamError("variant", reason)
                warnings.warn(f"skipped: {reason}", ProbekitWarning, stacklevel=2)
                continue
            job = None
            for seed in seed_list:
                seed_dir = out / data.name / variant.slug / f"seed{seed}"
                settings = seed_settings(source, data.name, variant, seed, options)
                decision = resume_seed(seed_dir, settings, inputs, fresh)
                best = seed_dir / "best"
                if decision == "reuse" and (best / METRICS_FILE).is_file():  # done: no tokenizer, no training
                    metrics = read_json(best / METRICS_FILE)
                    results.append(SeedResult(data.name, variant.slug, seed, best, metrics, skipped=True))
                    continue
                tokenizer = tokenizer or load_tokenizer(source)
                job = job or _job(source, data, variant, options, tokenizer)
                results.append(finetune_seed(job, seed, seed_dir))
    return results


def checkpoint_layers(path: str | Path) -> int:
    """Transformer layers of a saved checkpoint (from its config)."""
    return _saved_layers(Path(path))


__all__ = [
    "GRIDS",
    "Grid",
    "JobOptions",
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
