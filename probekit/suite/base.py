"""What a suite step is, the registry of steps, and the state a run shares.

A step is one table of a suite file (``[probe]``, ``[mlm]``, ...) and the work it declares: a
:class:`SuiteStep` subclass registered in :data:`STEPS` under its table's name, with a
:class:`~probekit.config.Config` of its own keys (``Config``) and, optionally, the configs of
the components it runs (``components()``: their options are keys of the table too). Steps run
in registration order. A step skips work whose stamp (:mod:`probekit.fingerprint`) matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from probekit.config import Config, split_options
from probekit.errors import ParamError
from probekit.fingerprint import matches, read_stamp, write_stamp
from probekit.io import read_json, write_json
from probekit.registry import Registry

STAMPS = ".suite"
TIMINGS = "timings.json"


class SuiteStep:
    """One table of a suite file; ``config`` holds its own keys, ``options`` the keys of its components."""

    Config: ClassVar[type[Config]]
    needs: ClassVar[tuple[str, ...]] = ()
    """Tables that must be in the file too."""
    required: ClassVar[bool] = False
    """A suite must have this table."""
    always: ClassVar[bool] = False
    """The step runs (with its defaults) even when its table is absent (the report)."""
    order: ClassVar[int] = 50
    """Steps run in this order (finetune 10, probe 20, mlm 30, offramp 40, report 80, compare 90)."""

    def __init__(self, config: Config, options: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.options = dict(options or {})

    @classmethod
    def components(cls) -> Sequence[type[Config]]:
        """Configs of the components this step runs; their fields are keys of the table too."""
        return ()

    @classmethod
    def keys(cls) -> list[str]:
        names = cls.Config.field_names()
        for c in cls.components():
            names += [n for n in c.field_names() if n not in names]
        return names

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SuiteStep:
        own, rest = split_options(table, cls.Config)
        for key in rest:
            if not any(key in c.field_names() for c in cls.components()):
                raise ParamError(key, f"is not a key of this table; allowed: {', '.join(sorted(cls.keys()))}")
        return cls(cls.Config.from_mapping(own), rest)

    def check(self, suite: Any) -> None:
        """Checks that need the whole suite (other tables, task names); raise ``ParamError``."""

    def run(self, run: SuiteRun) -> None:
        raise NotImplementedError


STEPS: Registry[type[SuiteStep]] = Registry("suite step", "step")
"""Suite tables -> step classes. A plugin registers a step with ``STEPS.register("name")``."""


def ordered_steps() -> list[tuple[str, type[SuiteStep]]]:
    """The registered steps in run order."""
    return sorted(STEPS.items(), key=lambda item: item[1].order)


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
    """The state of one run: the suite, the steps done so far, the models made."""

    suite: Any
    steps: list[Step] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> {"path", "task" (None for the pre-trained model), "variant", "seed"}."""
    results: dict[str, list[Path]] = field(default_factory=dict)
    """Results folders by the step that wrote them (``probe`` per model, ``mlm``, ``offramp``, ``finetune``)."""
    progress: bool = True

    @property
    def ran(self) -> list[Step]:
        return [s for s in self.steps if s.status == "ran"]

    def record(self, step: Step) -> None:
        """Add ``step``; a step that ran has its wall time saved at once in ``out/timings.json``."""
        self.steps.append(step)
        if step.status != "ran":
            return
        path = self.suite.out / TIMINGS
        data = read_json(path) if path.is_file() else {}
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        data[f"{step.step} {step.target}"] = {"seconds": step.seconds, "finished": when, "detail": step.detail}
        write_json(path, data)

    def stamped(
        self,
        step: str,
        target: str,
        stamp: str,
        settings: Mapping[str, Any],
        work: Callable[[], str | None],
        outputs: Callable[[dict[str, Any]], list[Path]] = lambda _: [],
        extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run ``work`` unless the stamp ``out/.suite/<stamp>.json`` has the same fingerprint and ``outputs``
        exist; record the step. ``extra()`` adds data to the stamp (e.g. the caches made). Returns the stamp."""
        path = self.suite.out / STAMPS / f"{stamp}.json"
        if matches(path, settings):
            data = (read_stamp(path) or {}).get("data", {})
            if all(p.exists() for p in outputs(data)):
                self.record(Step(step, target, "skipped"))
                return data
        t0 = time.perf_counter()
        detail = work() or ""
        data = dict(extra()) if extra is not None else {}
        write_stamp(path, settings, data=data)
        self.record(Step(step, target, "ran", round(time.perf_counter() - t0, 2), detail))
        return data


def shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (the report lists its inputs)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
