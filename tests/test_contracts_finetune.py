"""Contracts every fine-tuning variant keeps (run over every registered one, as scikit-learn's estimator
checks are): it constructs from its config, round-trips it through TOML, changes a tiny BERT into a model
with the layers it announces that saves and reloads, fine-tunes into rows that pass the results schema,
and resumes (a second identical run does no work and gives the same rows)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification
from typer.testing import CliRunner

from probekit.cli import app
from probekit.cli.options import derive
from probekit.errors import ParamError, ResumeError
from probekit.finetune import (
    VARIANTS,
    Grid,
    Variant,
    finetune,
    make_variant,
    option_sources,
    probed_variants,
    variant_order,
)
from probekit.finetune import train as train_module
from probekit.finetune.variants import variant_class
from probekit.fingerprint import STAMP
from probekit.results import load_results, validate
from tests.helpers import make_tiny_bert
from tests.helpers_finetune import FreezeEmbeddings, registered
from tests.test_finetune import write_cola, write_rte

TINY_GRID = Grid((16,), (1e-3,), 1)
FAST = {"max_steps": 2, "max_train_samples": 32, "max_dev_samples": 16, "threads": 1}
QUICK_PARAMS = {"mlm_warmup": 2}
"""Options that keep a variant's run short (those a variant does not have are ignored)."""
N_LAYERS = 3


def example(cls: type[Variant]) -> Variant:
    """``cls`` from its defaults; a required option (the error names it) given the value 1."""
    params = {k: v for k, v in QUICK_PARAMS.items() if k in cls.field_names()}
    try:
        return cls.from_mapping(params)
    except ParamError as e:
        assert e.param in cls.field_names(), f"{cls.name}: the error names {e.param!r}, not one of its options"
        return cls.from_mapping({**params, e.param: 1})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rte(write_cola(tmp_path_factory.mktemp("glue"), n_train=48, n_dev=16))


def task_for(v: Variant) -> str:
    """A task the variant applies to: CoLA, or RTE for the sentence-pair architectures."""
    return "rte" if v.needs_pairs else "cola"


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny3"), layers=N_LAYERS)


def layers_in(path: Path) -> int:
    """Transformer blocks of a saved checkpoint, counted from its weights (not from its config)."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = [k.split(".") for k in f.keys()]  # noqa: SIM118 (no __iter__)
    return 1 + max(int(p[p.index("layer") + 1]) for p in keys if "layer" in p and "encoder" in p)


def check_config(cls: type[Variant]) -> None:
    v = example(cls)
    assert VARIANTS.get(cls.name) is cls and isinstance(v, Variant)
    back = cls.from_mapping(tomllib.loads(v.to_toml()))
    assert back == v and back.slug == v.slug
    assert v.settings() == {"name": cls.name, **tomllib.loads(v.to_toml())}
    assert v.slug == cls.name or v.slug.startswith(cls.name + "-")
    assert variant_class(v.slug) is cls


def check_apply(cls: type[Variant], model_dir: Path, out: Path) -> None:
    v = example(cls)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    saved = v.saved(v.apply(model, seed=0))
    saved.save_pretrained(out)
    assert layers_in(out) == v.n_layers(N_LAYERS)
    assert (v.n_layers(N_LAYERS) == N_LAYERS) == cls.keeps_depth
    reloaded = AutoModel.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == len(reloaded.encoder.layer) == v.n_layers(N_LAYERS)


def check_rows_and_resume(v: Variant, model_dir: Path, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = task_for(v)
    run = finetune(model_dir, task, out, seeds=1, grid=TINY_GRID, variants=[v], data_dir=data, **FAST)
    rows = run.results
    validate(rows)
    [seed] = run.seeds
    m = seed.metrics
    evals = [e for r in m["runs"] for e in r["evals"]]
    assert len(rows) == len(evals) * len(m["metrics"]) > 0
    assert set(rows["source"]) == {"finetune"} and set(rows["probe"]) == {"finetune"}
    assert set(rows["mode"]) == {v.slug} and set(rows["variant"]) == {v.name} and set(rows["split"]) == {"dev"}
    assert rows["layer"].isna().all() and set(rows["finetune_task"]) == {task} and set(rows["task"]) == {task}
    chosen = rows[rows["chosen"]]
    assert sorted(chosen["metric"]) == sorted(m["metrics"])
    assert chosen.set_index("metric").loc[m["metric"], "value"] == pytest.approx(m["chosen"]["value"])
    assert set(rows["n_layers"]) == {v.n_layers(N_LAYERS)} == {layers_in(seed.path)}
    on_disk = load_results(out)
    validate(on_disk)
    assert len(on_disk) == len(rows)

    # resume: the same settings do no work and give the same rows
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(train_module, "run_config", no_training)
    again = finetune(model_dir, task, out, seeds=1, grid=TINY_GRID, variants=[v], data_dir=data, **FAST)
    assert [s.skipped for s in again.seeds] == [True]
    pd.testing.assert_frame_equal(again.results, rows)
    assert len(load_results(out)) == len(rows)  # merged, not appended twice


@pytest.mark.parametrize("name", VARIANTS.names())
def test_variant_config_contract(name: str) -> None:
    check_config(VARIANTS.get(name))


@pytest.mark.parametrize("name", VARIANTS.names())
def test_variant_apply_contract(name: str, tiny3: Path, tmp_path: Path) -> None:
    check_apply(VARIANTS.get(name), tiny3, tmp_path / "saved")


@pytest.mark.parametrize("name", VARIANTS.names())
def test_variant_rows_and_resume_contract(
    name: str, tiny3: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_rows_and_resume(example(VARIANTS.get(name)), tiny3, data, tmp_path, monkeypatch)


def test_vocabulary_is_the_registry() -> None:
    # today's lists (table.py ORDER, suite.py PROBED_VARIANTS), now derived from the classes
    assert variant_order()[:4] == ["plain", "multi-objective", "copy-layers", "drop-layers"]
    assert probed_variants()[:3] == ["plain", "multi-objective", "copy-layers"]
    assert "drop-layers" not in probed_variants()


def test_missing_and_bad_options_name_the_parameter() -> None:
    with pytest.raises(ParamError) as e:
        make_variant("drop-layers")
    assert e.value.param == "drop"
    assert str(e.value) == "variant drop-layers needs drop N (how many top layers to remove)"
    with pytest.raises(ParamError) as e:
        make_variant("copy-layers")
    assert e.value.param == "copy_from" and "--" not in str(e.value)
    with pytest.raises(ParamError, match="mlm_weight: must be > 0"):
        make_variant("multi-objective", mlm_weight=0)
    with pytest.raises(ParamError, match="did you mean 'drop-layers'"):
        make_variant("drop-layer")
    with pytest.raises(ParamError, match="bogus: is not an option of fine-tuning"):
        finetune("unused", "cola", "unused", bogus=1)


def test_other_settings_are_refused_and_fresh_starts_over(tiny3: Path, data: Path, tmp_path: Path) -> None:
    args = (tiny3, "cola", tmp_path)
    kw = {"seeds": 1, "grid": TINY_GRID, "data_dir": data, **FAST}
    finetune(*args, **kw)
    seed_dir = tmp_path / "cola" / "plain" / "seed0"
    with pytest.raises(ResumeError, match=r"other settings \(max_steps 2 -> 3\)") as e:
        finetune(*args, **{**kw, "max_steps": 3})
    assert str(seed_dir) in str(e.value) and "fresh" in str(e.value)
    run = finetune(*args, **{**kw, "max_steps": 3}, fresh=True)
    assert not run.seeds[0].skipped and run.seeds[0].metrics["runs"][0]["steps"] == 3
    assert set(load_results(tmp_path)["step"]) == {3}  # the old seed's rows were replaced


def test_a_seed_made_before_stamps_is_judged_by_its_metrics(tiny3: Path, data: Path, tmp_path: Path) -> None:
    kw = {"seeds": 1, "grid": TINY_GRID, "data_dir": data, **FAST}
    finetune(tiny3, "cola", tmp_path, **kw)
    stamp = tmp_path / "cola" / "plain" / "seed0" / STAMP
    stamp.unlink()  # as today's code leaves a finished seed: best/metrics.json with its settings, no stamp
    with pytest.raises(ResumeError, match="other settings"):
        finetune(tiny3, "cola", tmp_path, **{**kw, "max_length": 16})
    assert finetune(tiny3, "cola", tmp_path, **kw).seeds[0].skipped and stamp.is_file()


def test_rows_of_several_variants_merge(tiny3: Path, data: Path, tmp_path: Path) -> None:
    kw = {"seeds": 1, "grid": TINY_GRID, "data_dir": data, **FAST}
    a = finetune(tiny3, "cola", tmp_path, variants="plain", **kw).results
    b = finetune(tiny3, "cola", tmp_path, variants="drop-layers", drop=1, **kw).results
    finetune(tiny3, "cola", tmp_path, variants="plain", **kw)
    table = load_results(tmp_path)
    assert len(table) == len(a) + len(b)
    assert table.groupby("mode").size().to_dict() == {"plain": len(a), "drop-layers-n1": len(b)}
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == len(table)


def test_a_plugin_variant_is_one_class(tiny3: Path, data: Path, tmp_path: Path, monkeypatch) -> None:
    with registered():
        check_config(FreezeEmbeddings)
        check_apply(FreezeEmbeddings, tiny3, tmp_path / "saved")
        check_rows_and_resume(FreezeEmbeddings(), tiny3, data, tmp_path / "rows", monkeypatch)
        monkeypatch.undo()
        out = tmp_path / "cli"
        base = ["finetune", "-m", str(tiny3), "-o", str(out), "--data-dir", str(data), "-t", "cola", "--seeds", "1"]
        variants = ["--variant", "plain", "--variant", "freeze-embeddings"]
        fast = ["--grid", "quick", "--max-steps", "2", "--max-train-samples", "32", "--threads", "1"]
        result = CliRunner().invoke(app, [*base, *variants, *fast])
        assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert table.index("| plain |") < table.index("| freeze-embeddings |")
    assert set(load_results(out)["mode"]) == {"plain", "freeze-embeddings"}
    # the variant did what it says: the embeddings are the pre-trained ones, the blocks were trained
    before = AutoModel.from_pretrained(tiny3).state_dict()
    after = AutoModel.from_pretrained(out / "cola" / "freeze-embeddings" / "seed0" / "best").state_dict()
    assert torch.equal(before["embeddings.word_embeddings.weight"], after["embeddings.word_embeddings.weight"])
    assert not torch.equal(
        before["encoder.layer.0.attention.self.query.weight"], after["encoder.layer.0.attention.self.query.weight"]
    )
    assert "freeze-embeddings" not in VARIANTS


def test_a_plugin_variant_gets_its_flags() -> None:
    """Registered before a CLI is built (as $PROBEKIT_PLUGINS does for ``probekit``), a variant's options become
    flags of the fine-tuning command (derived from :func:`option_sources`, as ``probekit finetune``'s are)."""

    def command(options: dict | None = None) -> None:
        typer.echo(json.dumps(options, sort_keys=True))

    with registered():
        cli = typer.Typer()
        cli.command()(derive(option_sources, labelled=False)(command))
        cli.command("other")(lambda: None)  # a group, as probekit's app is
        runner = CliRunner()
        help_text = runner.invoke(cli, ["command", "--help"], env={"COLUMNS": "200"}).output
        given = runner.invoke(cli, ["command", "--freeze-below", "1", "--copy-from", "2", "--seeds", "1"]).output
    assert "--freeze-below" in help_text and "--copy-from" in help_text and "--max-steps" in help_text
    assert json.loads(given) == {"copy_from": 2, "freeze_below": 1, "seeds": 1}
