"""A plugin: a module outside probekit that adds one probe kind, one exit policy, one fine-tuning variant and
one suite step, each in one place (a class registered in its registry). Loaded with
``PROBEKIT_PLUGINS=tests.plugin_example`` or a suite's ``plugins = ["tests.plugin_example"]``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from probekit import analysis
from probekit.config import Config, option
from probekit.finetune.variants import VARIANTS, Variant, encoder_layers, register_variant
from probekit.io import write_json
from probekit.offramp.policies import EXIT_POLICIES, Policy, PolicyConfig
from probekit.results import load_results
from probekit.suite.base import STEPS, Step, SuiteRun, SuiteStep

# ---------------------------------------------------------------- a probe kind
# the plugin's probe kind is the nearest-class-mean probe of tests/helpers_probes.py (registered there, as
# "test-centroid", with its option metric_power): importing it is loading it
from tests.helpers_probes import NAME as PROBE_NAME
from tests.helpers_probes import CentroidProbe

# ---------------------------------------------------------------- an exit policy


@dataclass(frozen=True)
class MarginConfig(PolicyConfig):
    component = "the margin exit policy"
    min_layer: int = option(1, "margin: never exit before this layer.", ge=1)


@EXIT_POLICIES.register("margin")
class MarginPolicy(Policy):
    """Exit when the two most probable classes are at least t apart."""

    name = "margin"
    threshold_name = "t"
    classification_only = True
    default = False  # asked for by name (policies = "margin,..."), not part of "all"
    config_class = MarginConfig

    def thresholds(self) -> list[float]:
        return [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]

    def step(
        self, state: dict, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        top2 = torch.softmax(output.float(), dim=-1).topk(2, dim=-1).values
        ready = layer >= self.options.min_layer  # type: ignore[attr-defined]
        return (top2[:, 0] - top2[:, 1] >= threshold) & ready


# ---------------------------------------------------------------- a fine-tuning variant


@register_variant
@dataclass(frozen=True)
class ReinitTop(Variant):
    """reinit-top: the top blocks start from a fresh initialisation (Zhang et al., 2021)."""

    name: ClassVar[str] = "reinit-top"
    reinit: int = option(1, "reinit-top: how many top blocks to re-initialise.", ge=1)

    @property
    def slug(self) -> str:
        return f"reinit-top-k{self.reinit}"

    def apply(self, model: nn.Module, seed: int = 0) -> nn.Module:
        layers = encoder_layers(model)
        std = float(getattr(model.config, "initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed)
        for layer in list(layers)[len(layers) - self.reinit :]:
            for module in layer.modules():  # BERT's initialisation: N(0, std) weights, zero biases, unit norms
                if isinstance(module, nn.Linear):
                    with torch.no_grad():
                        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        return model


# ---------------------------------------------------------------- a suite step


@dataclass(frozen=True)
class PeaksConfig(Config):
    component = "[peaks]"
    metric: str = option("acc", "Probe metric whose peak layer is listed.")


@STEPS.register("peaks")
class PeaksStep(SuiteStep):
    """Write out/peaks.json: each model's and task's peak layer (after the probes, before the report)."""

    Config = PeaksConfig
    order = 70

    def run(self, run: SuiteRun) -> None:
        folders = [p for p in run.results.get("probe", []) if (p / "results.parquet").is_file()]
        table = analysis.convexity(load_results(folders), metric=self.config.metric)  # type: ignore[attr-defined]
        peaks = {f"{r.model}/{r.task}": int(r.peak_layer) for r in table.itertuples()}
        write_json(run.suite.out / "peaks.json", peaks)
        run.record(Step("peaks", "peaks.json", "ran", 0.0, json.dumps(peaks)))


__all__ = ["PROBE_NAME", "VARIANTS", "CentroidProbe", "MarginPolicy", "PeaksStep", "ReinitTop"]
