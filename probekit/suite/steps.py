"""The built-in suite steps, one per table, in run order: ``[finetune]``, ``[probe]`` (extract, then
probe every model), ``[mlm]``, ``[offramp]``, ``[report]`` and ``[compare]`` (then the report again).

Each step's keys are its ``Config``'s fields plus its components' options; each piece of work is
skipped when its stamp under ``out/.suite/`` has the same fingerprint (the inputs' identities and
the settings) and its outputs exist, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probekit import extraction, probes, report
from probekit.backbone import check_device
from probekit.config import Config, option
from probekit.data import get_task, locate
from probekit.errors import ProbekitError
from probekit.extraction import ExtractConfig
from probekit.finetune import (
    GRIDS,
    TrainOptions,
    Variant,
    make_variant,
    option_sources,
    probed_variants,
)
from probekit.finetune import finetune as finetune_runner
from probekit.finetune.variants import variant_options
from probekit.io import atomic_path, read_json, sha256_file
from probekit.probes import PROBE_KINDS
from probekit.probes.layerwise import kind_config
from probekit.probes.protocols import PROTOCOLS
from probekit.probes.run import probe_template
from probekit.report import MARKER, ReportConfig
from probekit.suite.base import STAMPS, STEPS, Step, SuiteRun, SuiteStep, shown
from probekit.suite.file import Suite, check_tasks


def _seeds(value: int | Sequence[int]) -> list[int]:
    return list(range(value)) if isinstance(value, int) else [int(s) for s in value]


def _per_task(value: Any, task: str) -> Any:
    return value.get(task) if isinstance(value, dict) else value


def _identity(source: str) -> Any:
    """What a model's stamp depends on: its files' sizes and times (a folder), or its hub id."""
    p = Path(source)
    if not p.is_dir():
        return source
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())


def _data_identity(tasks: Sequence[str], data_dir: Path | None) -> list[Any]:
    out = []
    for t in tasks:
        where = locate(get_task(t), data_dir)
        files = sorted(where.rglob("*")) if where.is_dir() else [where]
        out.append([t, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]])
    return out


# ---------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class FinetuneTable(Config):
    component = "[finetune]"
    tasks: tuple[str, ...] = option(help="GLUE tasks to fine-tune on.")
    variants: tuple[str, ...] = option(("plain",), "Fine-tuned and probed variants (they keep the model's depth).")
    max_train_samples: int | dict[str, int] | None = option(None, "A number for every task, or per task.", ge=1)
    max_dev_samples: int | dict[str, int] | None = option(None, "A number for every task, or per task.", ge=1)


@dataclass(frozen=True)
class CompareTable(Config):
    component = "[compare]"
    variants: tuple[str, ...] = option(help="Variants fine-tuned for the comparison table (a+b composes).")
    tasks: tuple[str, ...] | None = option(None, "GLUE tasks (default: [finetune]'s).")
    probe: bool = option(
        True,
        "Also extract and probe every compared checkpoint that keeps the model's depth (the 'which method "
        "forgets least' study); false: the comparison table only.",
    )


def _variant_options() -> list[type[Config]]:
    return [cfg for _, cfg in variant_options()]


def _finetune(run: SuiteRun, step: str, variants: Sequence[Variant], tasks: Sequence[str], probed: bool) -> None:
    """Fine-tune every task x variant with the [finetune] settings; ``finetune`` itself skips finished
    seeds and refuses outputs made with other settings."""
    s: Suite = run.suite
    ft: FinetuneStep = s.steps["finetune"]  # type: ignore[assignment]
    variant_keys = {k for c in _variant_options() for k in c.field_names()}
    train = {k: v for k, v in ft.options.items() if k not in variant_keys}
    for variant in variants:  # variant by variant: each finished variant completes a row of the comparison
        for task in tasks:
            t0 = time.perf_counter()
            res = finetune_runner(
                s.model,
                task,
                s.finetune_dir,
                variants=[variant],
                strict=False,
                max_train_samples=_per_task(ft.config.max_train_samples, task),  # type: ignore[attr-defined]
                max_dev_samples=_per_task(ft.config.max_dev_samples, task),  # type: ignore[attr-defined]
                data_dir=s.data_dir,
                progress=run.progress,
                **train,
            )
            seeds = res.seeds
            if not seeds:  # the variant does not apply to this task (a pair architecture on one sentence)
                run.record(Step(step, f"{task}/{variant.slug}", "skipped", 0.0, "does not apply to this task"))
                continue
            skipped = all(r.skipped for r in seeds)
            detail = ", ".join(f"seed {r.seed}: {r.metrics['metric']} {100 * r.value:.1f}" for r in seeds)
            seconds = 0.0 if skipped else round(time.perf_counter() - t0, 2)
            run.record(Step(step, f"{task}/{variant.slug}", "skipped" if skipped else "ran", seconds, detail))
            run.results.setdefault("finetune", [s.finetune_dir])
            if probed and variant.keeps_depth:
                suffix = "" if variant.name == "plain" else f"-{variant.slug}"
                for r in seeds:
                    run.models[f"{s.model_name}-{task}{suffix}-s{r.seed}"] = {
                        "path": str(r.path),
                        "task": task,
                        "variant": variant.slug,
                        "seed": r.seed,
                    }


@STEPS.register("finetune")
class FinetuneStep(SuiteStep):
    """Fine-tune the model on GLUE tasks; every best checkpoint is then extracted and probed."""

    Config = FinetuneTable
    order = 10

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        return [cfg for _, cfg in option_sources()]

    def check(self, suite: Suite) -> None:
        cfg: FinetuneTable = self.config  # type: ignore[assignment]
        probed = probed_variants()
        bad = [v for v in cfg.variants if v not in probed]
        if bad:
            raise ProbekitError(
                f"variants {bad}: the probed variants must keep the model's depth "
                f"({', '.join(probed)}); put drop-layers under [compare] for the comparison table"
            )
        check_tasks("finetune", cfg.tasks, glue_only=True)
        grid = self.options.get("grid", "default")
        if isinstance(grid, str) and grid not in GRIDS:
            raise ProbekitError(f"grid {grid!r} is not one of {', '.join(GRIDS.names())}")
        TrainOptions.from_mapping({k: v for k, v in self.options.items() if k in TrainOptions.field_names()})
        self.variants = [make_variant(v, **self.options) for v in cfg.variants]

    def run(self, run: SuiteRun) -> None:
        _finetune(run, "finetune", self.variants, self.config.tasks, probed=True)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- extraction and probing


@dataclass(frozen=True)
class ProbeTable(Config):
    component = "[probe]"
    tasks: tuple[str, ...] = option(help="SentEval tasks (or SentEval-format files, relative to the suite file).")
    kind: str = option("linear", "Probe kind (with a protocol: the protocol's).", choices=PROBE_KINDS.names)
    protocol: str | None = option(None, "Protocol preset (sets the kind and its options).", choices=PROTOCOLS.names)
    seeds: int | tuple[int, ...] = option(1, "A count (seeds 0..n-1) or a list.", ge=0)
    control: bool = option(True, "Shuffled-label control probe.")
    grid: tuple[float, ...] | None = option(None, "Regularisation grid (default: the kind's).", gt=0)
    options: dict[str, Any] = option(default_factory=dict, help="The probe kind's options, e.g. { max_iter = 1000 }.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")

    def check(self) -> None:
        check_device(self.device)


def _extract_keys() -> list[str]:
    """The extraction options a [probe] table takes (``batch_size`` there is the probe's, as for the MLP)."""
    return [k for k in ExtractConfig.field_names() if k != "batch_size"]


@STEPS.register("probe")
class ProbeStep(SuiteStep):
    """Extract every model (the pre-trained one and each fine-tuned checkpoint) on the probing tasks, then
    probe every layer of every model. Its keys: its own, the extraction's (``pool``, ``max_length``,
    ``unseen_labels``...) and the probe kinds' options (``max_iter``, ``nhid``...)."""

    Config = ProbeTable
    required = True
    order = 20

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        kinds = [k.Config for _, k in PROBE_KINDS.items()]
        protocols = [p.Config for _, p in PROTOCOLS.items() if p.Config.field_names()]
        return (*dict.fromkeys(kinds + protocols), ExtractConfig)

    def check(self, suite: Suite) -> None:
        cfg: ProbeTable = self.config  # type: ignore[assignment]
        tasks = tuple(_task_file(suite, t) for t in cfg.tasks)
        self.config = cfg.replace(tasks=tasks)
        check_tasks("probe", tasks, glue_only=False)
        self.extract_options = {k: v for k, v in self.options.items() if k in _extract_keys()}
        self.probe_options = {**cfg.options, **{k: v for k, v in self.options.items() if k not in _extract_keys()}}
        ExtractConfig.from_mapping(self.extract_options)
        if cfg.protocol is None:
            kind_config(cfg.kind, cfg.grid, **self.probe_options)
            return
        kind = None if cfg.kind == "linear" else cfg.kind  # the table's default: the protocol's kind
        template = probe_template(kind, grid=cfg.grid, protocol=cfg.protocol, **self.probe_options)
        self.config = self.config.replace(kind=template.kind)  # type: ignore[attr-defined]

    def run(self, run: SuiteRun) -> None:
        for name, m in run.models.items():
            self._extract(run, name, m["path"])
        for name in run.models:
            self._probe(run, name)

    def _extract(self, run: SuiteRun, name: str, source: str) -> None:
        s, pr = run.suite, self.config
        extract_cfg = ExtractConfig.from_mapping(self.extract_options)
        settings = {
            "model": _identity(source),
            "tasks": list(pr.tasks),
            "data": _data_identity(pr.tasks, s.data_dir),
            **{k: v for k, v in extract_cfg.to_dict().items() if k != "batch_size"},
            "name": name,
            "caches": str(s.caches_dir),
        }
        made: list[str] = []

        def work() -> str:
            caches = extraction.extract(
                source,
                list(pr.tasks),
                s.caches_dir,
                data_dir=s.data_dir,
                name=name,
                progress=run.progress,
                **self.extract_options,
            )
            made[:] = [str(c.path) for c in caches]
            return f"{len(caches)} caches"

        run.stamped(
            "extract",
            name,
            f"extract-{name}",
            settings,
            work,
            outputs=lambda data: [Path(c) / "manifest.json" for c in data.get("caches", [])],
            extra=lambda: {"caches": made},
        )

    def _probe(self, run: SuiteRun, name: str) -> None:
        s, pr = run.suite, self.config
        stamp = read_json(s.out / ".suite" / f"extract-{name}.json")
        caches = stamp.get("data", {}).get("caches", [])
        options = {
            "kind": pr.kind,
            "seeds": _seeds(pr.seeds),
            "grid": list(pr.grid) if pr.grid is not None else None,
            "control": pr.control,
            "options": dict(self.probe_options),
            "device": pr.device,
            **({"protocol": pr.protocol} if pr.protocol is not None else {}),
        }
        settings = {"caches": [read_json(Path(c) / "manifest.json")["key"] for c in caches], **options}
        out = s.results_dir(name)

        def work() -> str:
            result = probes.probe(
                caches,
                kind=options["kind"],
                seeds=options["seeds"],
                grid=options["grid"],
                control=options["control"],
                device=options["device"],
                out=out,
                progress=run.progress,
                protocol=options.get("protocol"),
                **options["options"],
            )
            return f"{len(result.results)} rows"

        run.stamped("probe", name, f"probe-{name}", settings, work, outputs=lambda _: [out / "results.parquet"])
        run.results.setdefault("probe", []).append(out)


def _task_file(suite: Suite, task: str) -> str:
    """A probing task that is not a registered name but a file next to the suite: its absolute path."""
    try:
        get_task(task)
        return task
    except ProbekitError:
        candidate = suite.resolve(task)
        return str(candidate) if candidate.is_file() else task


# ---------------------------------------------------------------- the report and the comparison


@dataclass(frozen=True)
class ReportTable(Config):
    component = "[report]"
    out: str | None = option(None, "The report folder (default: <out>/report), relative to the suite file.")


@STEPS.register("report")
class ReportStep(SuiteStep):
    """Write the report: the fine-tuned models against the pre-trained one (or the pre-trained one alone),
    with every other analysis's results and the fine-tuning comparison table."""

    Config = ReportTable
    order = 80
    always = True

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        return (ReportConfig,)

    def check(self, suite: Suite) -> None:
        if self.config.out is not None:  # type: ignore[attr-defined]
            suite.report = suite.resolve(self.config.out)  # type: ignore[attr-defined]
        ReportConfig.from_mapping(self.options)

    def run(self, run: SuiteRun) -> None:
        s = run.suite
        if "compare" in s.steps and (s.out / STAMPS / "report-compare.json").is_file():
            # a re-run: the [compare] step, which comes last, writes (or keeps) the report with all its models
            run.record(Step("report", str(shown(s.report)), "skipped", 0.0, "the [compare] step writes the report"))
            return
        write_report(run, ReportConfig.from_mapping(self.options))


def write_report(run: SuiteRun, opts: ReportConfig, stamp: str = "report") -> None:
    """Write the suite's report (stamped as ``stamp``: the [compare] step's report, made after its models, has
    its own stamp, so that neither report's settings undo the other's on a re-run)."""
    s = run.suite
    base = s.results_dir(s.model_name)
    tuned = {n: m for n, m in run.models.items() if m["task"] is not None}
    mapping = {n: m["task"] for n, m in tuned.items()}
    methods = {n: m["variant"] for n, m in tuned.items() if m.get("variant")}
    others = [p for key in ("mlm", "offramp") for p in run.results.get(key, [])]
    files = [base / "results.parquet"] + [s.results_dir(n) / "results.parquet" for n in tuned]
    files += [p / "results.parquet" for p in others]
    comparison = s.finetune_dir / "comparison.csv"
    settings = {
        "results": [sha256_file(f) for f in files if f.is_file()],
        "comparison": sha256_file(comparison) if comparison.is_file() else None,
        "finetune_tasks": mapping,
        **({"finetune_methods": methods} if len(set(methods.values())) > 1 else {}),
        "options": opts.to_dict(),
        "title": s.title,
    }

    def work() -> str:
        # with fine-tuned models, the pre-trained one is the baseline of the deltas; else it is shown alone
        inputs = [shown(s.results_dir(n)) for n in tuned] or [shown(base)]
        report.build_report(
            inputs + [shown(p) for p in others],
            s.report,
            baseline=shown(base) if tuned else None,
            finetune_tasks=mapping or None,
            finetune_methods=methods if len(set(methods.values())) > 1 else None,
            split=opts.split,
            metric=opts.metric,
            top=opts.top,
            title=opts.title or s.title or (f"{s.name}: fine-tuned vs pre-trained {s.model_name}" if tuned else s.name),
        )
        for suffix in ("csv", "md"):
            src = s.finetune_dir / f"comparison.{suffix}"
            if src.is_file():
                with atomic_path(s.report / f"finetune.{suffix}") as tmp:
                    shutil.copyfile(src, tmp)
        return str(shown(s.report / "index.html"))

    run.stamped("report", str(shown(s.report)), stamp, settings, work, outputs=lambda _: [s.report / MARKER])


@STEPS.register("compare")
class CompareStep(SuiteStep):
    """Other fine-tuning methods (the convexity paper's fixes, BERTer's), fine-tuned with the [finetune] settings
    for the comparison table and (``probe = true``, the default) extracted and probed like the [finetune]
    checkpoints, so the report says which method forgets least; runs last, then the report again."""

    Config = CompareTable
    needs = ("finetune",)
    order = 90

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        return _variant_options()

    def check(self, suite: Suite) -> None:
        cfg: CompareTable = self.config  # type: ignore[assignment]
        if cfg.tasks is not None:
            check_tasks("compare", cfg.tasks, glue_only=True)
        self.variants = [make_variant(v, **self.options) for v in cfg.variants]

    def run(self, run: SuiteRun) -> None:
        cfg: CompareTable = self.config  # type: ignore[assignment]
        tasks = cfg.tasks or run.suite.steps["finetune"].config.tasks  # type: ignore[attr-defined]
        before = set(run.models)
        probe = run.suite.steps.get("probe")
        _finetune(run, "compare", self.variants, tasks, probed=cfg.probe and probe is not None)
        new = [n for n in run.models if n not in before]
        if isinstance(probe, ProbeStep):  # the study: every compared method is probed as the others were
            for name in new:
                probe._extract(run, name, run.models[name]["path"])
            for name in new:
                probe._probe(run, name)
        step = run.suite.steps.get("report")
        write_report(run, ReportConfig.from_mapping(step.options if step else {}), stamp="report-compare")
