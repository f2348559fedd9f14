"""The suite steps of the pre-trained model's other analyses: ``[mlm]`` (MLM-head probes) and ``[offramp]``
(off-ramps and early exit). Their keys are the fields of the analyses' own configs, so a new option of
``probekit mlm-probe`` or ``probekit offramp`` is a suite key with no edit here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from probekit.backbone import check_device
from probekit.config import Config, option
from probekit.mlm import MLMConfig, mlm_probe
from probekit.mlm.runner import MLMRunConfig
from probekit.offramp import run_offramp
from probekit.offramp.compare import comparison_table, write_comparison
from probekit.offramp.methods import TRAINING_METHODS
from probekit.offramp.run import option_sources
from probekit.paths import slug
from probekit.results import load_results
from probekit.suite.base import STEPS, SuiteRun, SuiteStep
from probekit.suite.file import Suite, check_tasks
from probekit.suite.steps import _data_identity, _identity


@dataclass(frozen=True)
class MLMTable(Config):
    component = "[mlm]"
    corpus: tuple[str, ...] = option(help="SQuAD v1.1 JSON files, text files (one passage per line) or task names.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")

    def check(self) -> None:
        check_device(self.device)


@STEPS.register("mlm")
class MLMStep(SuiteStep):
    """MLM-head probes (embedding dropout) on every layer of the pre-trained model."""

    Config = MLMTable
    order = 30

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        return (MLMConfig, MLMRunConfig)

    def check(self, suite: Suite) -> None:
        cfg: MLMTable = self.config  # type: ignore[assignment]
        self.config = cfg.replace(corpus=tuple(_corpus_path(suite, c) for c in cfg.corpus))
        MLMConfig.from_mapping({k: v for k, v in self.options.items() if k in MLMConfig.field_names()})

    def run(self, run: SuiteRun) -> None:
        s, cfg = run.suite, self.config
        name = s.model_name
        out = s.out / "mlm" / name
        corpus = list(cfg.corpus)  # type: ignore[attr-defined]
        settings = {"model": _identity(s.model), "corpus": corpus, "options": self.options, "name": name}

        def work() -> str:
            result = mlm_probe(
                s.model,
                corpus,
                out,
                data_dir=s.data_dir,
                device=cfg.device,  # type: ignore[attr-defined]
                name=name,
                progress=run.progress,
                **self.options,
            )
            return f"{len(result.results)} rows"

        run.stamped("mlm", name, f"mlm-{name}", settings, work, outputs=lambda _: [out / "results.parquet"])
        run.results.setdefault("mlm", []).append(out)


def _corpus_path(suite: Suite, corpus: str) -> str:
    """A corpus file next to the suite file: its absolute path (a task name stays a name)."""
    candidate = suite.resolve(corpus)
    return str(candidate) if candidate.exists() else corpus


@dataclass(frozen=True)
class OffRampTable(Config):
    component = "[offramp]"
    tasks: tuple[str, ...] = option(help="GLUE tasks (or task files) to train off-ramps on.")
    modes: tuple[str, ...] = option(
        ("frozen",), "Training methods, e.g. frozen, deebert, pabee, berxit, palbert (several: the comparison table)."
    )
    policies: str = option("all", "Comma-separated exit policies (or all).")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")

    def check(self) -> None:
        check_device(self.device)


@STEPS.register("offramp")
class OffRampStep(SuiteStep):
    """Off-ramps at every layer of the pre-trained model, exit policies and measured early exit, per task and
    training method."""

    Config = OffRampTable
    order = 40

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        return [cfg for _, cfg in option_sources()]

    def check(self, suite: Suite) -> None:
        cfg: OffRampTable = self.config  # type: ignore[assignment]
        check_tasks("offramp", cfg.tasks, glue_only=False)
        for mode in cfg.modes:
            TRAINING_METHODS.get(mode)

    def run(self, run: SuiteRun) -> None:
        s, cfg = run.suite, self.config
        for task in cfg.tasks:  # type: ignore[attr-defined]
            modes = [TRAINING_METHODS.canonical(mode) for mode in cfg.modes]  # type: ignore[attr-defined]
            for mode in modes:
                self._one(run, s, task, mode)
            if len(modes) > 1:  # the comparison table of the methods, beside their folders
                folder = s.out / "offramp" / slug(task)
                write_comparison(comparison_table(load_results([folder / m for m in modes])), folder)

    def _one(self, run: SuiteRun, s: Suite, task: str, mode: str) -> None:
        cfg = self.config
        out = s.out / "offramp" / slug(task) / mode
        target = f"{task}/{mode}"
        options: dict[str, Any] = dict(self.options)
        settings = {
            "model": _identity(s.model),
            "data": _data_identity([task], s.data_dir),
            "mode": mode,
            "policies": cfg.policies,  # type: ignore[attr-defined]
            "options": options,
        }

        def work() -> str:
            result = run_offramp(
                s.model,
                task,
                out,
                mode=mode,
                policies=cfg.policies,  # type: ignore[attr-defined]
                data_dir=s.data_dir,
                device=cfg.device,  # type: ignore[attr-defined]
                name=s.model_name,
                progress=run.progress,
                **options,
            )
            return f"{len(result.results)} rows"

        stamp = f"offramp-{task}-{mode}".replace("/", "_")
        run.stamped("offramp", target, stamp, settings, work, outputs=lambda _: [out / "results.parquet"])
        run.results.setdefault("offramp", []).append(out)
