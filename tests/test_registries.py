"""Every registry, every registered component: named, described, found by any spelling, and (where it has options)
constructed from its defaults with a config that round-trips through TOML. Per-kind behaviour (fitting, rows,
resume) is in tests/test_contracts_*.py."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from probekit.config import MISSING, Config, fields_of
from probekit.data import FETCHERS, READERS
from probekit.data.corpus import CORPUS_FORMATS
from probekit.encoding import POOLS
from probekit.errors import ParamError
from probekit.finetune import GRIDS
from probekit.finetune.variants import VARIANTS
from probekit.offramp.methods import TRAINING_METHODS
from probekit.offramp.policies import EXIT_POLICIES
from probekit.probes import PROBE_KINDS
from probekit.probes.protocols import PROTOCOLS
from probekit.registry import Registry
from probekit.report import SECTIONS
from probekit.suite import STEPS

REGISTRIES: dict[str, Registry[Any]] = {
    "probe kinds": PROBE_KINDS,
    "probe protocols": PROTOCOLS,
    "exit policies": EXIT_POLICIES,
    "off-ramp training methods": TRAINING_METHODS,
    "fine-tuning variants": VARIANTS,
    "fine-tuning grids": GRIDS,
    "pooling": POOLS,
    "data readers": READERS,
    "data fetchers": FETCHERS,
    "corpus formats": CORPUS_FORMATS,
    "report sections": SECTIONS,
    "suite steps": STEPS,
}
COMPONENTS = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


def configs_of(obj: Any) -> list[type[Config]]:
    """The config classes a component carries (its own options; a suite step's table and components)."""
    found: list[Any] = []
    if isinstance(obj, type) and issubclass(obj, Config):
        found.append(obj)
    for attr in ("Config", "config_class"):
        value = getattr(obj, attr, None)
        if isinstance(value, type) and issubclass(value, Config):
            found.append(value)
    if hasattr(obj, "components"):
        found += list(obj.components())
    return list(dict.fromkeys(found))


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_every_component_is_named_described_and_found(kind: str, name: str) -> None:
    reg = REGISTRIES[kind]
    assert reg.help(name), f"{kind} {name!r} has no one-line help"
    assert reg.get(name.upper()) is reg.get(name) and reg.canonical(name.replace("-", "_")) == name
    with pytest.raises(ParamError, match=f"did you mean {name!r}") as err:
        reg.get(name + "x")
    assert err.value.param == reg.param


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_every_config_builds_from_defaults_and_round_trips_through_toml(kind: str, name: str) -> None:
    for cfg in configs_of(REGISTRIES[kind].get(name)):
        made = _build(cfg)
        assert cfg.from_mapping(tomllib.loads(made.to_toml())) == made, cfg
        for spec in fields_of(cfg):
            assert spec.help, f"{cfg.__name__}.{spec.name} has no help"


def _build(cfg: type[Config]) -> Config:
    """The config from its defaults, with example values for what it requires (a field without a default, or one
    its checks ask for, such as copy-layers' ``copy_from``)."""
    values = {f.name: _example(cfg, f.name) for f in fields_of(cfg) if f.default is MISSING}
    for _ in range(5):
        try:
            return cfg.from_mapping(values)
        except ParamError as e:
            if e.param in values or e.param not in cfg.field_names():
                raise
            values[e.param] = _example(cfg, e.param)
    return cfg.from_mapping(values)


def _example(cfg: type[Config], field: str) -> Any:
    """A value for a required field: its type's simplest valid value (tasks, corpus: a task name)."""
    spec = next(f for f in fields_of(cfg) if f.name == field)
    if spec.element is not None:
        return ["cola"] if spec.element is str else [1]
    if spec.type is int or (spec.optional and spec.type is int):
        return max(1, int(spec.bounds.get("ge", 1)))
    return "plain" if field == "variants" else "x"


def test_registries_are_distinct_and_select_by_one_parameter() -> None:
    params = {kind: reg.param for kind, reg in REGISTRIES.items()}
    assert len(set(map(id, REGISTRIES.values()))) == len(REGISTRIES)
    assert params["probe kinds"] == "kind" and params["exit policies"] == "policy" and params["pooling"] == "pool"
