"""Interop with the original SentEval engine (facebookresearch/SentEval), run as a peer.

SentEval as published no longer runs: ``senteval/utils.py`` calls ``inspect.getargspec``
(removed in Python 3.11) and its PyTorch classifier moves every tensor and module to CUDA
(``probing.py`` never passes ``cudaEfficient``). :func:`load_senteval` makes it run as it is,
without editing its files: it puts the engine's folder on ``sys.path``, restores
``getargspec`` (as ``getfullargspec``, whose first field is the same list of arguments) and,
when no GPU is there, gives ``senteval.tools.classifier`` a ``torch`` and an ``nn`` whose
``cuda`` calls keep tensors and modules on the CPU. The engine's code, seeding and
training loops are untouched.

:func:`cache_batcher` gives a SentEval ``prepare``/``batcher`` pair over a probekit
:class:`~probekit.cache.LayerCache` (a look-up by sentence: SentEval passes whitespace-
tokenised sentences), and :func:`model_batcher` one over a model, a layer and a pooling, so a
SentEval user's script runs on probekit's extraction;
:func:`run_engine` runs the engine layer by layer on a cache and returns tidy rows
(``source="senteval"``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probekit.backbone import Backbone, load_backbone
from probekit.cache import LayerCache
from probekit.encoding import encode
from probekit.errors import ParamError, ProbekitError
from probekit.metrics import wilson
from probekit.probes.order import cache_sentences
from probekit.probes.protocols import Protocol, make_protocol
from probekit.probes.run import fit_one, fit_settings, load_features, open_caches, probe_template, result_rows
from probekit.results import row, save_results, tidy
from probekit.runs import Run

SENTEVAL_NAMES = {
    "sentence_length": ("Length", "sentence_length.txt"),
    "word_content": ("WordContent", "word_content.txt"),
    "tree_depth": ("Depth", "tree_depth.txt"),
    "top_constituents": ("TopConstituents", "top_constituents.txt"),
    "bigram_shift": ("BigramShift", "bigram_shift.txt"),
    "past_present": ("Tense", "past_present.txt"),
    "subj_number": ("SubjNumber", "subj_number.txt"),
    "obj_number": ("ObjNumber", "obj_number.txt"),
    "odd_man_out": ("OddManOut", "odd_man_out.txt"),
    "coordination_inversion": ("CoordinationInversion", "coordination_inversion.txt"),
}
"""probekit task name -> (SentEval's task name, the file SentEval reads under ``task_path/probing``)."""
ENV = "PROBEKIT_SENTEVAL"
"""Environment variable naming the SentEval checkout (the folder holding ``senteval/``)."""


class _CpuTensor(torch.Tensor):
    """A tensor whose ``cuda()`` is a no-op (what SentEval's ``score``/``predict`` call on the CPU)."""

    def cuda(self, *args: Any, **kwargs: Any) -> _CpuTensor:  # type: ignore[override]
        return self


def _cpu_module(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    return type(cls.__name__, (cls,), {"cuda": lambda self, *a, **k: self})


def _cpu_torch() -> types.SimpleNamespace:
    """A stand-in for the ``torch`` and ``nn`` names of ``senteval.tools.classifier``: everything stays on the CPU."""

    def device(spec: Any, *args: Any) -> torch.device:
        return torch.device("cpu") if str(spec).startswith("cuda") else torch.device(spec, *args)

    def typed(dtype: torch.dtype) -> Callable[[Any], torch.Tensor]:
        return lambda x: torch.as_tensor(
            np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype
        ).as_subclass(_CpuTensor)

    t = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    t.device, t.FloatTensor, t.LongTensor = device, typed(torch.float32), typed(torch.int64)
    nn = types.SimpleNamespace(**{k: getattr(torch.nn, k) for k in dir(torch.nn) if not k.startswith("__")})
    nn.Sequential, nn.CrossEntropyLoss = _cpu_module(torch.nn.Sequential), _cpu_module(torch.nn.CrossEntropyLoss)
    t.nn = nn
    return t


def load_senteval(path: str | Path | None = None, cpu: bool | None = None) -> types.ModuleType:
    """Import the original SentEval engine, made to run on Python 3.11+ and on the CPU; return ``senteval``.

    ``path``: the SentEval checkout (default ``$PROBEKIT_SENTEVAL``, else whatever is importable);
    ``cpu``: keep the classifier on the CPU (default: when CUDA is not available)."""
    path = path if path is not None else os.environ.get(ENV)
    if path is not None:
        folder = str(Path(path).resolve())
        if not (Path(folder) / "senteval" / "engine.py").is_file():
            raise ProbekitError(f"{folder} is not a SentEval checkout (no senteval/engine.py in it)")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if not hasattr(inspect, "getargspec"):
        inspect.getargspec = inspect.getfullargspec  # type: ignore[attr-defined]
    try:
        senteval = importlib.import_module("senteval")  # an optional peer, imported on request
        classifier = importlib.import_module("senteval.tools.classifier")
        importlib.import_module("senteval.engine")
    except ImportError as e:
        raise ProbekitError(
            f"SentEval is not importable ({e}); pass its checkout's folder (--senteval PATH or ${ENV})"
        ) from None
    if cpu if cpu is not None else not torch.cuda.is_available():
        shim = _cpu_torch()
        classifier.torch, classifier.nn = shim, shim.nn  # type: ignore[attr-defined]
    return senteval


def cache_batcher(cache: LayerCache, layer: int) -> tuple[Callable[..., Any], Callable[..., np.ndarray]]:
    """SentEval's ``prepare`` and ``batcher`` over one layer of a cache: a batch of tokenised sentences
    becomes the cached feature rows of those sentences (float32 [batch, D])."""
    sentences = cache_sentences(cache)
    index: dict[str, tuple[str, int]] = {}
    for split, texts in sentences.items():
        for i, text in enumerate(texts):
            index.setdefault(" ".join(text.split()), (split, i))

    def prepare(params: Any, samples: Any) -> None:
        return None

    def batcher(params: Any, batch: Sequence[Sequence[str]]) -> np.ndarray:
        rows = []
        for words in batch:
            key = " ".join(words)
            if key not in index:
                raise ProbekitError(f"sentence not in cache {cache.path}: {key[:60]!r}")
            split, i = index[key]
            rows.append(np.asarray(cache[split][i, layer], dtype=np.float32))
        return np.stack(rows)

    return prepare, batcher


def model_batcher(
    model: str | Path | Backbone, layer: int, pool: str = "mean", max_length: int = 128, device: str = "auto"
) -> tuple[Callable[..., Any], Callable[..., np.ndarray]]:
    """SentEval's ``prepare`` and ``batcher`` from a model: each batch of tokenised sentences is re-joined with
    spaces and encoded by probekit (``layer`` 0 = embeddings, ``pool`` as ``probekit extract --pool``)."""
    backbone = model if isinstance(model, Backbone) else load_backbone(model, device=device)

    def prepare(params: Any, samples: Any) -> None:
        return None

    def batcher(params: Any, batch: Sequence[Sequence[str]]) -> np.ndarray:
        texts = [" ".join(words) if words else "." for words in batch]
        return encode(backbone, texts, pool=pool, max_length=max_length, batch_size=len(texts))[:, layer]

    return prepare, batcher


def engine_params(
    protocol: str | Protocol, seed: int = 1111, classifier: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SentEval's ``params`` for a protocol: ``senteval-sklearn`` its ``usepytorch=False`` path; a protocol of
    SentEval's PyTorch classifier (``senteval``, ``conneau2018``, ``jawahar2019``) ``usepytorch=True`` with the
    protocol's first classifier settings, or ``classifier`` (e.g. ``{"nhid": 50, "dropout": 0.1}``) over them."""
    if make_engine_protocol(protocol).kind == "linear":
        return {"usepytorch": False, "kfold": 10, "seed": seed, "classifier": {"nhid": 0}}
    clf = {**engine_classifiers(protocol)[0], **(classifier or {})}
    return {"usepytorch": True, "kfold": 10, "seed": seed, "classifier": clf}


def make_engine_protocol(protocol: str | Protocol) -> Protocol:
    """The protocol (a name: with its default options) if it is one of SentEval's two classifiers (scikit-learn's
    logistic regression, its PyTorch MLP); an unknown name is a ``ParamError`` naming ``protocol``."""
    proto = make_protocol(protocol)
    if proto.kind not in ("linear", "mlp"):
        raise ProbekitError(f"the SentEval engine has no {proto.kind!r} classifier (protocol {protocol!r})")
    return proto


def engine_classifiers(protocol: str | Protocol, task: str | None = None) -> list[dict[str, Any]]:
    """SentEval's ``params["classifier"]`` for each option set the protocol tunes on dev, in its order (the engine
    takes one per run; ``senteval-sklearn``: the one ``nhid=0``)."""
    proto = make_engine_protocol(protocol)
    if proto.kind == "linear":
        return [{"nhid": 0}]
    keys = ("nhid", "dropout", "batch_size", "tenacity", "epoch_size", "max_epoch")
    candidates = proto.candidates(task)
    if any(c.get("max_rounds") for c in candidates):
        raise ProbekitError(f"the SentEval engine has no first_round_only (protocol {proto.name}); leave it off")
    return [{"optim": "adam", **{k: c[k] for k in keys}} for c in candidates]


def run_engine(
    cache: LayerCache,
    layers: Sequence[int] | None = None,
    protocol: str | Protocol = "senteval",
    seed: int = 1111,
    senteval_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    classifier: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The original engine on each layer of a cache (the probing task SentEval knows by the cache's task, on the
    data file the cache was extracted from): tidy rows of dev and test ``acc`` (``source="senteval"``).

    A protocol that tunes more than SentEval's L2 grid (``conneau2018``: nhid x dropout) runs the engine once per
    option set and keeps, per layer, the first with the best dev accuracy rounded as SentEval rounds it (its rows
    name the ``nhid`` and ``dropout`` kept); ``classifier`` runs one option set instead. ``protocol``: a name, or a
    :class:`~probekit.probes.protocols.Protocol` with its options (e.g. a smaller ``nhid_grid``)."""
    proto = make_engine_protocol(protocol)
    proto.check_pool(cache.pool, cache.task)
    configs = [classifier] if classifier is not None else engine_classifiers(proto, cache.task)
    runs = [_engine_rows(cache, layers, proto, seed, senteval_path, progress, c) for c in configs]
    if len(runs) == 1:
        return runs[0]
    out = []
    for layer in sorted({r["layer"] for r in runs[0]}):
        picked = [[r for r in run if r["layer"] == layer] for run in runs]
        dev = [round(100 * next(r["value"] for r in rows if r["split"] == "dev"), 2) for rows in picked]
        best = int(np.argmax(dev))  # the first best, as SentEval's own selection
        out += [{**r, "nhid": configs[best]["nhid"], "dropout": configs[best]["dropout"]} for r in picked[best]]
    return out


def _engine_rows(
    cache: LayerCache,
    layers: Sequence[int] | None,
    protocol: Protocol,
    seed: int,
    senteval_path: str | Path | None,
    progress: Callable[[int], None] | None,
    classifier: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One engine run per layer with one classifier setting."""
    if cache.task not in SENTEVAL_NAMES:
        raise ProbekitError(f"{cache.task}: SentEval knows only its ten probing tasks ({', '.join(SENTEVAL_NAMES)})")
    senteval = load_senteval(senteval_path)
    name, fname = SENTEVAL_NAMES[cache.task]
    params = engine_params(protocol, seed, classifier)
    layers = list(range(cache.n_layers)) if layers is None else list(layers)
    data = Path(cache.manifest["data"]["path"])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "probing").mkdir()
        (Path(tmp) / "probing" / fname).symlink_to(data.resolve())
        for layer in layers:
            prepare, batcher = cache_batcher(cache, layer)
            se = senteval.engine.SE({**params, "task_path": tmp}, batcher, prepare)
            res = se.eval(name)
            base = {
                "model": cache.model,
                "task": cache.task,
                "layer": layer,
                "source": "senteval",
                "probe": "senteval-engine",
                "protocol": protocol.name,
                "seed": seed,
                "pool": cache.pool,
                "cache_key": cache.manifest.get("key"),
            }
            for split, acc, n in (("dev", res["devacc"], res["ndev"]), ("test", res["acc"], res["ntest"])):
                low, high = wilson(round(acc * n / 100), n)
                out.append(
                    row(**base, split=split, metric="acc", value=acc / 100, n=n, ci_low=float(low), ci_high=float(high))
                )
            if progress is not None:
                progress(layer)
    return out


def senteval_check(
    caches: Any,
    protocol: str | Protocol = "senteval",
    layers: Sequence[int] | None = None,
    senteval_path: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> Run:
    """probekit's protocol and the original engine on the same caches, layer by layer (probekit seed 0 is
    SentEval's seed 1111, no control): a :class:`~probekit.runs.Run` whose ``results`` hold both as tidy
    rows (``source`` ``probe`` and ``senteval``) and ``details["comparison"]`` a table of dev and test
    accuracy side by side (``probekit``, ``senteval``, ``diff`` in points). ``out``: save the rows there."""
    proto = make_engine_protocol(protocol)  # the protocols the engine has
    load_senteval(senteval_path)  # before any fit: a missing engine is the first thing said
    opened = open_caches(caches)
    plans = []  # checked before any fit too: the layers, the cache's pooling, the settings the engine must have
    for cache in opened:
        chosen = list(range(cache.n_layers)) if layers is None else [int(x) for x in layers]
        bad = [x for x in chosen if not 0 <= x < cache.n_layers]
        if bad:
            raise ParamError("layers", f"{bad} out of range for {cache.task} (layers 0..{cache.n_layers - 1})")
        proto.check_pool(cache.pool, cache.task)
        plans.append((cache, chosen, len(engine_classifiers(proto, cache.task))))
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    timings = {"probekit": 0.0, "senteval": 0.0}
    total = sum(1 + n_configs * len(chosen) for _, chosen, n_configs in plans)  # one fit, then each engine run
    bar = tqdm(total=total, unit="run", disable=not progress, dynamic_ncols=True)
    for cache, chosen, _ in plans:
        bar.set_description(f"{cache.task} probekit")
        t0 = time.perf_counter()
        mine = _probekit_rows(cache, protocol, chosen)
        timings["probekit"] += time.perf_counter() - t0
        bar.update(1)
        bar.set_description(f"{cache.task} senteval")
        t0 = time.perf_counter()
        engine = run_engine(cache, chosen, protocol, senteval_path=senteval_path, progress=lambda _: bar.update(1))
        rows += mine + engine
        timings["senteval"] += time.perf_counter() - t0
    bar.close()
    results = tidy(rows)
    paths: dict[str, Path] = {}
    if out is not None:
        save_results(results, out)
        paths = {"out": Path(out)}
    timings["total"] = time.perf_counter() - start
    return Run(results=results, paths=paths, timings=timings, details={"comparison": comparison(results)})


def _probekit_rows(cache: LayerCache, protocol: str | Protocol, layers: list[int]) -> list[dict[str, Any]]:
    """probekit's fit of seed 0 on the chosen layers only (as the engine runs them), its ``acc`` rows."""
    template = probe_template(device="cpu", control=False, protocol=protocol)
    feats = load_features(cache, torch.device("cpu"))
    lp = fit_one(template, cache, feats, 0, "cpu", layers)
    settings = json.dumps(fit_settings(template, cache.task), sort_keys=True)
    df = tidy(result_rows(lp, cache, feats, settings, make_protocol(protocol).name))
    return df[df["metric"] == "acc"].to_dict("records")


def comparison(results: pd.DataFrame) -> pd.DataFrame:
    """Dev and test accuracy of probekit and the engine side by side per task and layer, with ``diff`` in points."""
    acc = results[results["metric"] == "acc"]
    key = ["task", "layer", "split"]
    mine = acc[acc["source"] == "probe"].set_index(key)["value"].rename("probekit")
    theirs = acc[acc["source"] == "senteval"].set_index(key)["value"].rename("senteval")
    table = pd.concat([mine, theirs], axis=1).dropna().reset_index()
    table["diff"] = 100 * (table["probekit"] - table["senteval"])
    return table.sort_values(key).reset_index(drop=True)
