"""Reading a suite file: its top-level keys, the ``[model]`` table and one table per registered step.

Every key of the file is a field of a config dataclass (:class:`SuiteConfig`, :class:`ModelConfig`,
each step's ``Config`` and its components' configs), so the schema is never written twice; an error
names the file and the table and key (``study.toml: [probe] max_length must be a int, not '32'``).
"""

from __future__ import annotations

import importlib
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probekit.config import Config, FieldSpec, fields_of, option
from probekit.data import get_task
from probekit.data.senteval import check_text
from probekit.errors import DataError, ParamError, ProbekitError
from probekit.paths import slug
from probekit.plugins import load_plugins
from probekit.suite.base import STEPS, SuiteStep, ordered_steps


@dataclass(frozen=True)
class SuiteConfig(Config):
    """The top level of a suite file."""

    component = "the top level"
    out: str = option(help="Work folder: finetune/, caches/, results/, timings.json (relative to the file).")
    name: str | None = option(None, "The study's name (default: the file's stem).")
    data_dir: str | None = option(None, "Data directory (relative to the file); --data-dir overrides it.")
    threads: int | None = option(None, "Torch CPU threads (1 is often fastest on a busy CPU).", ge=1)
    title: str | None = option(None, "The report's title.")
    plugins: tuple[str, ...] = option((), "Python modules that register components (probe kinds, steps...).")


@dataclass(frozen=True)
class ModelConfig(Config):
    """The ``[model]`` table: the pre-trained encoder of the study."""

    component = "[model]"
    name: str = option(help="Its name in results; fine-tuned copies are NAME-TASK-sSEED.")
    path: str | None = option(None, "A folder (relative to the file) or a hub id.")
    package: str | None = option(
        None, "A Python package whose get_model_path() gives the folder (used when installed)."
    )

    def check(self) -> None:
        if self.name and slug(self.name) != self.name:
            # the name becomes folder names (results/NAME, NAME-TASK-sSEED): never a path or markup
            raise ParamError(
                "name", f"use only letters, digits, '.', '_' and '-' (e.g. {slug(self.name)!r}), got {self.name!r}"
            )


@dataclass
class Suite:
    """A parsed and checked suite file; paths are absolute."""

    path: Path
    name: str
    out: Path
    model_name: str
    model: str
    steps: dict[str, SuiteStep]
    """Table name -> step, for the tables present, in run order."""
    data_dir: Path | None = None
    threads: int | None = None
    title: str | None = None
    report: Path = field(default=Path())

    @property
    def finetune_dir(self) -> Path:
        return self.out / "finetune"

    @property
    def caches_dir(self) -> Path:
        return self.out / "caches"

    def results_dir(self, model: str) -> Path:
        return self.out / "results" / model

    def table(self, name: str) -> SuiteStep | None:
        return self.steps.get(name)

    @property
    def finetune(self) -> Any:
        step = self.steps.get("finetune")
        return None if step is None else step.config

    def resolve(self, value: str | Path) -> Path:
        """A path of the file, relative to the file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def _python_types(spec: FieldSpec) -> tuple[type, ...]:
    def one(t: Any) -> tuple[type, ...]:
        if t is type(None):
            return ()
        origin = typing.get_origin(t)
        if origin in (typing.Union, types.UnionType):
            return tuple(x for a in typing.get_args(t) for x in one(a))
        if origin is typing.Literal:
            return (str,)
        if origin is tuple:
            return (list,)
        if origin is dict or t is dict:
            return (dict,)
        if t is float:
            return (float, int)
        if t is Path:
            return (str,)
        return (t,)

    return one(spec.type)


def _check_types(path: Path, where: str, table: Mapping[str, Any], configs: list[type[Config]]) -> None:
    """TOML types first (a string where a number belongs), in the file's words."""
    specs: dict[str, FieldSpec] = {}
    for c in configs:  # a step's own field wins over a component's of the same name
        for s in fields_of(c):
            specs.setdefault(s.name, s)
    for key, value in table.items():
        spec = specs.get(key)
        if spec is None:
            continue
        wants = _python_types(spec)
        if wants and ((isinstance(value, bool) and bool not in wants) or not isinstance(value, wants)):
            names = " or ".join(dict.fromkeys(t.__name__ for t in wants))
            raise DataError(path, f"{where}: {key} must be a {names}, not {value!r}")


def table_error(path: Path, where: str, e: ProbekitError, keys: list[str]) -> DataError:
    """A library error about a table, in the file's words: parameters that are keys of the table are named
    as keys, the others (a CLI-only selector such as ``variant``) as their flag."""
    names = {p: (p if p in keys else "--" + p.replace("_", "-")) for p in e.params}
    if isinstance(e, ParamError) and e.detail.startswith(("is not a key", "is not an option")):
        return DataError(path, f"unknown key {e.param!r} in {where}; allowed: {', '.join(sorted(keys))}")
    prefix = "{" + getattr(e, "param", "") + "}: "
    if isinstance(e, ParamError) and e.param in keys and e.template.startswith(prefix):  # "key: what is wrong"
        return DataError(path, f"{where} {e.param} {e.render(names).removeprefix(e.param + ': ')}")
    return DataError(path, f"{where} {e.render(names)}")


def _model_source(path: Path, base: Path, model: ModelConfig) -> str:
    """The model's folder or hub id: the ``package``'s folder when installed, else ``path``."""
    if model.package:
        try:
            module = importlib.import_module(model.package)
            return str(module.get_model_path())
        except ImportError:
            if not model.path:
                raise ProbekitError(
                    f"{path}: [model] package {model.package!r} is not installed and no path is given; "
                    f"install it or add path = ... (a folder or hub id)"
                ) from None
    if not model.path:
        raise DataError(path, "[model] needs path = ... (a folder or hub id) or package = ...")
    local = (base / model.path).resolve() if not Path(model.path).is_absolute() else Path(model.path)
    return str(local) if local.exists() else model.path


def _top(path: Path, doc: Mapping[str, Any]) -> SuiteConfig:
    top = {k: v for k, v in doc.items() if not (k in STEPS or k == "model") or not isinstance(v, dict)}
    _check_types(path, "the top level", top, [SuiteConfig])
    try:
        return SuiteConfig.from_mapping(top)
    except ParamError as e:
        if e.detail.startswith("is not an option"):
            allowed = sorted([*SuiteConfig.field_names(), "model", *STEPS.names()])
            raise DataError(path, f"unknown key {e.param!r} in the top level; allowed: {', '.join(allowed)}") from None
        if e.detail.startswith("is required"):
            raise DataError(path, f"the top level lacks the required key {e.param!r}") from None
        raise DataError(path, f"the top level: {e}") from None


def load_suite(path: str | Path, data_dir: str | Path | None = None, model: str | None = None) -> Suite:
    """Read and check a suite file. ``data_dir`` and ``model`` override the file's."""
    path = Path(path)
    if not path.is_file():
        raise ProbekitError(f"suite file {path} does not exist")
    raw = path.read_bytes()
    check_text(path, raw)
    try:
        doc = tomllib.loads(raw.decode("utf-8-sig"))  # utf-8-sig: a byte-order mark as editors write it
    except tomllib.TOMLDecodeError as e:
        raise DataError(path, f"not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise DataError(path, "not valid UTF-8 text") from None
    if isinstance(doc.get("plugins"), list):  # before the steps are looked up: plugins may add steps
        load_plugins([str(p) for p in doc["plugins"]])
    top = _top(path, doc)
    if not isinstance(doc.get("model"), dict):
        raise DataError(path, "a suite needs a [model] table")
    _check_types(path, "[model]", doc["model"], [ModelConfig])
    try:
        model_cfg = ModelConfig.from_mapping(doc["model"])
    except ParamError as e:
        raise table_error(path, "[model]", e, ModelConfig.field_names()) from None
    steps: dict[str, SuiteStep] = {}
    for name, cls in ordered_steps():
        if cls.required and not isinstance(doc.get(name), dict):
            raise DataError(path, f"a suite needs a [{name}] table")
        if name not in doc and not cls.always:
            continue
        table = doc.get(name, {})
        where = f"[{name}]"
        _check_types(path, where, table, [cls.Config, *cls.components()])
        for need in cls.needs:
            if need not in doc:
                raise DataError(path, f"{where} needs a [{need}] table (its settings are used for the comparison)")
        try:
            steps[name] = cls.from_table(table)
        except ParamError as e:
            if e.detail.startswith("is required"):
                raise DataError(path, f"{where} lacks the required key {e.param!r}") from None
            raise table_error(path, where, e, cls.keys()) from None
    base = path.resolve().parent
    if data_dir is None and top.data_dir is not None:
        data_dir = (base / top.data_dir).resolve()
    suite = Suite(
        path=path.resolve(),
        name=top.name or path.stem,
        out=(base / top.out).resolve(),
        model_name=model_cfg.name,
        model=model or _model_source(path, base, model_cfg),
        steps=steps,
        data_dir=Path(data_dir) if data_dir is not None else None,
        threads=top.threads,
        title=top.title,
    )
    suite.report = suite.out / "report"
    for name, step in steps.items():
        try:
            step.check(suite)
        except ParamError as e:
            raise table_error(path, f"[{name}]", e, type(step).keys()) from None
        except DataError:
            raise
        except ProbekitError as e:
            raise DataError(path, f"[{name}] {e}") from None
    return suite


def check_tasks(section: str, tasks: tuple[str, ...], glue_only: bool) -> None:
    """Every task is known (a GLUE task where ``glue_only``); a ``ParamError`` on ``tasks`` otherwise."""
    if not tasks:
        raise ParamError("tasks", "must be a non-empty list of task names")
    for t in tasks:
        spec = get_task(t)
        if glue_only and spec.format != "glue":
            raise ProbekitError(f"task {t!r} is not a GLUE task")
