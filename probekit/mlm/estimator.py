"""``MLMHeadProbe``: MLM heads on every layer of a frozen encoder ("The Convexity of BERT", Mohebbi & Modarressi).

For every layer l = 0..L, a head shaped like BERT's MLM head (dense D->D, GELU, LayerNorm, then
the encoder's own frozen input word-embedding matrix as the decoder plus a trainable output
bias) learns to predict the input token at positions whose input was corrupted by embedding
dropout (:mod:`probekit.mlm.kernels`). Evaluation needs no masking: at every real token of
held-out text, how often does layer l's head name the token itself? Lower accuracy = less like
the static input embeddings = more contextual.

All heads learn from one frozen forward pass per batch. The estimator follows scikit-learn:
``__init__`` stores the options (:class:`MLMConfig`), ``fit`` trains and returns ``self``
(checkpointed and resumable through :mod:`probekit.fingerprint` when given a ``checkpoint``),
``score`` gives the accuracy per layer, ``evaluate`` the per-layer table, ``rows`` the tidy rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from probekit.backbone import Backbone
from probekit.config import Config, fields_of, option
from probekit.data.corpus import window_passages
from probekit.encoding import Tokenized, collate, hidden_states, plan_batches
from probekit.errors import ParamError, ProbekitError, ResumeError
from probekit.fingerprint import canonical_json, check, differences, fingerprint, normalize
from probekit.io import atomic_path, sha256_json
from probekit.metrics import wilson
from probekit.mlm.intervals import N_BOOT, dip_recovery, passage_intervals
from probekit.mlm.kernels import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO, TOPK, MLMHeads, embedding_dropout, generator
from probekit.results import row

EVAL_ROWS = 2048
"""Token positions scored per block in evaluation."""
FORMAT = "probekit-mlm-heads/2"
"""Checkpoint format: safetensors tensors (heads, optimizer state) + JSON metadata carrying the
fingerprint. Version 1 carried only a hash key (still resumed when it matches)."""


@dataclass(frozen=True)
class MLMConfig(Config):
    """The options that determine trained MLM heads (besides the encoder and the data)."""

    component: ClassVar[str] = "the MLM-head probe"

    mask_ratio: float = option(DEFAULT_MASK_RATIO, "Probability that a token is chosen for masking.", gt=0, le=1)
    dropout_ratio: float = option(
        DEFAULT_DROPOUT_RATIO,
        "Dropout on a chosen token's input embedding: 0 none, 1 all of it (like [MASK]).",
        ge=0,
        le=1,
    )
    steps: int | None = option(None, "Training steps (batches).", ge=1)
    epochs: float | None = option(None, "Passes over the training windows (default 1).", gt=0)
    batch_size: int = option(32, "Windows per training batch.", ge=1)
    lr: float = option(2e-3, "Peak learning rate (AdamW, warm-up then linear decay).", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay of the heads' dense weights.", ge=0)
    warmup: float = option(0.05, "Fraction of the steps spent warming the learning rate up.", ge=0, le=1)
    seed: int = option(0, "Seed of the split, the masks, the batch order and the heads.", ge=0)
    layers: tuple[int, ...] | None = option(
        None, "Layers to probe, comma-separated (default: all; 0 = embeddings).", ge=0
    )
    max_length: int = option(128, "Tokens per window; longer passages are split.", ge=3)

    def check(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ParamError("steps", "give {steps} or {epochs}, not both", params=("epochs",))


RUNTIME = ("progress",)
"""Parameters of the estimator that do not change what it learns (not in :class:`MLMConfig`)."""


def windows(backbone: Backbone, texts: Sequence[str] | Tokenized, max_length: int) -> Tokenized:
    """``texts`` as windows of ``max_length`` tokens (windows are passed through)."""
    if isinstance(texts, Tokenized):
        return texts
    return window_passages(backbone.tokenizer, texts, backbone.usable_length(max_length))


def windows_digest(tok: Tokenized) -> str:
    """SHA-256 of the token ids of every window: the fingerprint of the training data."""
    h = hashlib.sha256()
    for ids in tok.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _decoder(backbone: Backbone) -> tuple[torch.nn.Module, torch.Tensor]:
    emb = backbone.model.get_input_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        raise ProbekitError(f"{backbone.name}: the model exposes no input word-embedding matrix")
    return emb, emb.weight.detach().float()


def head_shape(backbone: Backbone, decoder: torch.Tensor) -> dict[str, Any]:
    """The head's width and activation for ``backbone``: the decoder's (embedding) width, so factorised
    embeddings (ALBERT, ELECTRA: embedding size below the hidden size) get a dense hidden -> embedding
    layer as their own MLM heads have, and the config's ``hidden_act``."""
    return {
        "embedding_size": int(decoder.shape[1]),
        "activation": getattr(backbone.config, "hidden_act", "gelu") or "gelu",
    }


def check_inputs(stamp: dict[str, Any] | None, inputs: dict[str, Any], *, where: str | Path, what: str) -> None:
    """Refuse an artifact made from other inputs (encoder, data), naming them.

    :func:`probekit.fingerprint.check` names differing settings well but shows a differing input
    as ``inputs.data "(absent)" -> "(absent)"``; this check runs first so the message says which input.
    """
    if stamp is None:
        return
    names = [n.removeprefix("inputs.") for n in differences(stamp.get("inputs", {}), normalize(inputs), "inputs")]
    if names:
        raise ResumeError(
            f"{where} holds {what} made from other inputs (its {' and '.join(names)} fingerprint differs); "
            "remove it or rerun with {fresh} to start over",
            params=("fresh",),
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MLMHeadProbe:
    """MLM heads on every layer (or ``layers``) of a frozen encoder, trained with embedding dropout.

    ``MLMHeadProbe(config)`` or ``MLMHeadProbe(mask_ratio=0.3, steps=100)`` (options of
    :class:`MLMConfig`, validated by ``fit``). Training length is ``steps`` batches, or ``epochs``
    passes over the windows (default one epoch). Learned: ``heads_``, ``layers_``, ``config_``,
    ``steps_`` (total steps), ``resumed_from_``, ``loss_``, ``timings_``, ``tokens_``.
    """

    def __init__(self, config: MLMConfig | None = None, *, progress: bool = False, **options: Any) -> None:
        names = MLMConfig.field_names()
        for key in options:
            if key not in names:
                raise ParamError(key, f"is not an option of {MLMConfig.label()}; its options: {', '.join(names)}")
        base = (
            {s.name: s.default for s in fields_of(MLMConfig)}
            if config is None
            else {n: getattr(config, n) for n in names}
        )
        for name in names:
            setattr(self, name, options.get(name, base[name]))
        self.progress = progress

    # ------------------------------------------------------------ parameters

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """The parameters as given (scikit-learn's ``get_params``)."""
        return {**{n: getattr(self, n) for n in MLMConfig.field_names()}, **{n: getattr(self, n) for n in RUNTIME}}

    def set_params(self, **params: Any) -> Self:
        for key, value in params.items():
            if key not in MLMConfig.field_names() and key not in RUNTIME:
                raise ParamError(key, f"is not an option of {MLMConfig.label()}")
            setattr(self, key, value)
        return self

    def clone(self, **changes: Any) -> MLMHeadProbe:
        """An unfitted copy with ``changes`` to its parameters."""
        return type(self)(**{**self.get_params(), **changes})

    def get_config(self) -> MLMConfig:
        """The parameters, validated (a :class:`ParamError` names a bad one)."""
        return MLMConfig.from_mapping({n: getattr(self, n) for n in MLMConfig.field_names()})

    def settings(self) -> dict[str, Any]:
        """What determines the trained heads besides the encoder and the data (fingerprinted, recorded)."""
        return {**self.get_config().to_dict(), "dropout_scaling": "inverted"}

    def __repr__(self) -> str:
        defaults = {s.name: s.default for s in fields_of(MLMConfig)}
        given = ", ".join(
            f"{n}={getattr(self, n)!r}" for n in MLMConfig.field_names() if getattr(self, n) != defaults[n]
        )
        return f"{type(self).__name__}({given})"

    # ------------------------------------------------------------ training

    @staticmethod
    def _layers(cfg: MLMConfig, backbone: Backbone) -> list[int]:
        layers = list(range(backbone.n_layers)) if cfg.layers is None else list(cfg.layers)
        bad = [i for i in layers if not 0 <= i < backbone.n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ParamError("layers", f"must be distinct values in 0..{backbone.n_layers - 1}, got {layers}")
        return layers

    def fit(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        *,
        checkpoint: str | Path | None = None,
        checkpoint_seconds: float = 60.0,
        fresh: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> Self:
        """Train the heads on ``passages`` (texts, or windows from ``window_passages``).

        With ``checkpoint`` (a ``.safetensors`` path) heads and optimizer state are saved there
        every ``checkpoint_seconds`` and at the end, with the fingerprint of the settings, the
        encoder and the data: a later ``fit`` with the same fingerprint resumes from it (ending
        exactly as an uninterrupted run; a finished one is only loaded), another one is refused
        (a :class:`ResumeError`) unless ``fresh``, which starts over. ``on_step(step)`` is called
        after each step (and its checkpoint, if due).
        """
        cfg = self.get_config()
        layers = self._layers(cfg, backbone)
        tok = windows(backbone, passages, cfg.max_length)
        if not len(tok.lengths):
            raise ProbekitError("no training text: the corpus is empty")
        n_batches = math.ceil(len(tok.lengths) / cfg.batch_size)
        total = cfg.steps or max(1, round((cfg.epochs or 1.0) * n_batches))
        self.config_, self.layers_, self.steps_ = cfg, layers, total
        emb, decoder = _decoder(backbone)
        dev = backbone.device
        eps = float(getattr(backbone.config, "layer_norm_eps", 1e-12))
        heads = MLMHeads(
            len(layers), backbone.hidden_size, decoder.shape[0], eps, seed=cfg.seed, **head_shape(backbone, decoder)
        ).to(dev)
        decay = [heads.dense_weight]
        rest = [heads.dense_bias, heads.norm_weight, heads.norm_bias, heads.bias]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
        )
        settings = self.settings()
        digest = windows_digest(tok)
        inputs = {"model": backbone.fingerprint, "data": digest}
        self.fingerprint_ = fingerprint(settings, inputs)
        self.checkpoint_ = Path(checkpoint) if checkpoint is not None else None
        legacy = sha256_json({**settings, "model": backbone.fingerprint, "steps": total, "data": digest})
        start = self._resume(heads, opt, settings, inputs, legacy, fresh)
        self.resumed_from_, self.heads_, self.loss_ = start, heads, []
        self.timings_ = {"forward": 0.0, "heads": 0.0, "total": 0.0}
        self.tokens_ = 0
        pad_id = int(backbone.tokenizer.pad_token_id)
        perms: dict[int, np.ndarray] = {}
        last_save = time.perf_counter()
        began = time.perf_counter()
        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc=f"mlm heads {backbone.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for step in range(start, total):
            epoch, b = divmod(step, n_batches)
            if epoch not in perms:
                perms = {epoch: np.random.default_rng([cfg.seed, epoch]).permutation(len(tok.lengths))}
            idx = perms[epoch][b * cfg.batch_size : (b + 1) * cfg.batch_size]
            t0 = time.perf_counter()
            batch = collate(tok, idx, pad_id, dev)
            candidates = batch["attention_mask"].bool() & ~batch["special_tokens_mask"]
            with torch.no_grad():
                clean = emb(batch["input_ids"])
            inputs_embeds, chosen = embedding_dropout(
                clean, candidates, cfg.mask_ratio, cfg.dropout_ratio, generator(cfg.seed, step, 1)
            )
            hs = hidden_states(backbone, batch, inputs_embeds)
            h = torch.stack([hs[i][chosen] for i in layers]).float()
            targets = batch["input_ids"][chosen]
            _sync(dev)
            t1 = time.perf_counter()
            if len(targets):
                for group in opt.param_groups:
                    group["lr"] = self._lr(cfg, step, total)
                loss = heads.loss(h, decoder, targets)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                self.loss_.append(float(loss.detach().mean()))
                bar.set_postfix(loss=f"{self.loss_[-1]:.3f}", refresh=False)
            _sync(dev)
            t2 = time.perf_counter()
            self.timings_["forward"] += t1 - t0
            self.timings_["heads"] += t2 - t1
            self.tokens_ += int(batch["attention_mask"].sum())
            bar.update(1)
            if self.checkpoint_ is not None and (
                step + 1 == total or time.perf_counter() - last_save >= checkpoint_seconds
            ):
                self._save(self.checkpoint_, heads, opt, settings, inputs, step + 1)
                last_save = time.perf_counter()
            if on_step is not None:
                on_step(step + 1)
        bar.close()
        self.timings_["total"] = time.perf_counter() - began
        return self

    @staticmethod
    def _lr(cfg: MLMConfig, step: int, total: int) -> float:
        """Linear warm-up over the first ``warmup`` fraction of steps, then linear decay to zero."""
        warm = max(1, round(cfg.warmup * total))
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * max(0.0, (total - step) / max(1, total - warm))

    def _save(
        self,
        path: Path,
        heads: MLMHeads,
        opt: torch.optim.Optimizer,
        settings: dict[str, Any],
        inputs: dict[str, Any],
        step: int,
    ) -> None:
        tensors = {f"heads.{k}": v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
        for i, state in opt.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint_,
            "settings": canonical_json(settings),
            "inputs": canonical_json(inputs),
            "step": str(step),
            "layers": json.dumps(self.layers_),
        }
        with atomic_path(path) as tmp:
            tmp.write_bytes(save(tensors, metadata=meta))

    def _resume(
        self,
        heads: MLMHeads,
        opt: torch.optim.Optimizer,
        settings: dict[str, Any],
        inputs: dict[str, Any],
        legacy: str,
        fresh: bool,
    ) -> int:
        """The step to start from: 0, or where the checkpoint (same fingerprint) ended."""
        path = self.checkpoint_
        if path is None or not path.is_file() or fresh:
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            stamp = (
                {
                    "fingerprint": meta["fingerprint"],
                    "settings": json.loads(meta["settings"]),
                    "inputs": json.loads(meta["inputs"]),
                }
                if "fingerprint" in meta
                else None
            )
        except Exception as e:  # safetensors and json raise several types for a damaged file
            raise ProbekitError(
                f"could not read the checkpoint {path} ({e}); remove it or rerun with {{fresh}} to start over",
                params=("fresh",),
            ) from None
        if stamp is not None:  # a ResumeError when inputs or settings differ
            check_inputs(stamp, inputs, where=path, what="MLM heads")
            check(stamp, settings, inputs, where=path, what="MLM heads")
        elif meta.get("key") != legacy:
            raise ResumeError(
                f"{path} holds MLM heads made with other settings, model or data (an earlier probekit's "
                "checkpoint); remove it or rerun with {fresh} to start over",
                params=("fresh",),
            )
        heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, i, field_name = name.split(".", 2)
                state.setdefault(int(i), {})[field_name] = value
        sd = opt.state_dict()
        sd["state"] = state
        opt.load_state_dict(sd)
        return int(meta["step"])

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def window_hits(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        corrupt: tuple[float, float] | None = None,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Per window of ``passages``: ``top1`` and ``top5`` hits [layers, windows] and scored tokens ``n``
        [windows] (what :meth:`evaluate` sums; a passage-level bootstrap resamples them)."""
        heads = getattr(self, "heads_", None)
        if heads is None:
            raise ProbekitError("the MLM heads are not trained yet: call fit first")
        cfg = self.config_
        tok = windows(backbone, passages, cfg.max_length)
        emb, decoder = _decoder(backbone)
        pad_id = int(backbone.tokenizer.pad_token_id)
        k, w = len(self.layers_), len(tok.lengths)
        top1 = torch.zeros(k, w, dtype=torch.long)
        top5 = torch.zeros(k, w, dtype=torch.long)
        n = torch.zeros(w, dtype=torch.long)
        plan = plan_batches(tok.lengths, max_tokens=4096)
        for b, idx in enumerate(tqdm(plan, disable=not progress, unit="batch", desc="mlm eval")):
            batch = collate(tok, idx, pad_id, backbone.device)
            positions = batch["attention_mask"].bool() & ~batch["special_tokens_mask"]
            inputs = None
            if corrupt is not None:
                inputs, positions = embedding_dropout(
                    emb(batch["input_ids"]), positions, *corrupt, generator=generator(cfg.seed, b, 2)
                )
            hs = hidden_states(backbone, batch, inputs)
            h_all = torch.stack([hs[i][positions] for i in self.layers_])
            targets_all = batch["input_ids"][positions]
            owner = torch.as_tensor(np.asarray(idx), dtype=torch.long)[positions.nonzero()[:, 0].cpu()]  # window
            n.index_add_(0, owner, torch.ones_like(owner))
            for r in range(0, len(targets_all), EVAL_ROWS):
                h, targets = h_all[:, r : r + EVAL_ROWS].float(), targets_all[r : r + EVAL_ROWS]
                best = heads.topk(h, decoder, TOPK)
                hit = (best == targets.view(1, -1, 1)).cpu()
                rows = owner[r : r + EVAL_ROWS]
                top1.index_add_(1, rows, hit[..., 0].long())
                top5.index_add_(1, rows, hit.any(-1).long())
        return {"top1": top1.numpy(), "top5": top5.numpy(), "n": n.numpy()}

    @torch.no_grad()
    def evaluate(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        corrupt: tuple[float, float] | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Per-layer accuracy and top-5 accuracy at predicting each real token of ``passages``.

        Without ``corrupt`` every real (non-special, non-padding) token is scored from its
        clean hidden state. ``corrupt=(mask_ratio, dropout_ratio)`` scores only positions
        chosen by embedding dropout (seeded), i.e. the masked-token task the heads train on.
        Returns columns ``layer``, ``acc``, ``top5``, ``n``.
        """
        hits = self.window_hits(backbone, passages, corrupt, progress)
        n = int(hits["n"].sum())
        denom = max(n, 1)
        return pd.DataFrame(
            {
                "layer": self.layers_,
                "acc": hits["top1"].sum(1) / denom,
                "top5": hits["top5"].sum(1) / denom,
                "n": n,
            }
        )

    def score(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        corrupt: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Accuracy of each probed layer's head (``layers_`` order) at naming the tokens of ``passages``."""
        return self.evaluate(backbone, passages, corrupt)["acc"].to_numpy(dtype=np.float64)

    def rows(
        self,
        backbone: Backbone,
        passages: Sequence[str] | Tokenized,
        *,
        task: str = "corpus",
        split: str = "heldout",
        data_sha256: str | None = None,
        settings: dict[str, Any] | None = None,
        progress: bool = False,
        passage_ids: Sequence[int] | np.ndarray | None = None,
        masked: tuple[float, float] | None = None,
        n_boot: int = N_BOOT,
    ) -> list[dict[str, Any]]:
        """Tidy results rows (:mod:`probekit.results`): ``mlm_acc`` and ``mlm_top5`` per layer, with a
        95% interval; ``settings`` defaults to :meth:`settings` with the trained steps.

        Without ``passage_ids`` the intervals are Wilson's (tokens independent). With ``passage_ids``
        (the passage of each window of ``passages``) they are passage-level bootstrap intervals (whole
        passages resampled, ``n_boot`` times), and the rows add the dip-and-recovery statistic
        (:func:`probekit.mlm.intervals.dip_recovery`: ``mlm_dip_layer``, ``mlm_recovery`` with its
        interval, layer empty). ``masked=(mask_ratio, dropout_ratio)`` adds ``mlm_masked_acc`` per layer:
        the accuracy at positions so corrupted (``(0.15, 1.0)``: fully dropped, MASK-like)."""
        hits = self.window_hits(backbone, passages, progress=progress)
        recorded = settings if settings is not None else {**self.settings(), "steps": self.steps_}
        common = {
            "model": backbone.name,
            "task": task,
            "split": split,
            "source": "mlm-probe",
            "model_fingerprint": backbone.fingerprint,
            "probe": "mlm-head",
            "seed": self.config_.seed,
            "max_length": self.config_.max_length,
            "data_sha256": data_sha256,
            "settings": recorded,
        }
        groups = None if passage_ids is None else np.asarray(passage_ids)
        tables = [("mlm_acc", hits["top1"], hits["n"]), ("mlm_top5", hits["top5"], hits["n"])]
        if masked is not None:
            m = self.window_hits(backbone, passages, corrupt=masked, progress=progress)
            tables.append(("mlm_masked_acc", m["top1"], m["n"]))
        out = []
        for metric, top, n in tables:
            total = int(n.sum())
            if groups is None:
                bounds = [tuple(float(b) for b in wilson(int(t.sum()), total)) for t in top]
            else:
                bounds = [tuple(b) for b in passage_intervals(top, n, groups, n_boot, self.config_.seed)]
            for i, layer in enumerate(self.layers_):
                value = float(top[i].sum() / max(total, 1))
                out.append(
                    row(**common, layer=int(layer), metric=metric, value=value, n=total,
                        ci_low=bounds[i][0], ci_high=bounds[i][1])
                )  # fmt: skip
        if groups is not None:
            stat = dip_recovery(hits["top1"], hits["n"], groups, list(self.layers_), n_boot, self.config_.seed)
            if stat is not None:
                n = int(hits["n"].sum())
                out.append(row(**common, layer=None, metric="mlm_dip_layer", value=float(stat["dip_layer"]), n=n,
                               ci_low=None, ci_high=None))  # fmt: skip
                out.append(row(**common, layer=None, metric="mlm_recovery", value=stat["recovery"], n=n,
                               ci_low=stat["ci_low"], ci_high=stat["ci_high"]))  # fmt: skip
        return out
