"""Contracts of the floors: every registered reader, fetcher, corpus format and pooling is found by
name and alias with a "did you mean" on a typo; each pooling equals a hand computation; the
extraction options are one Config (TOML round trip, errors naming the parameter, the CLI's flags
derived from it); an interrupted cache made with other settings is refused with one line."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from probekit import plot
from probekit.backbone import COMPUTE_DTYPES, load_backbone
from probekit.cache import STORAGE_DTYPES
from probekit.cli import app
from probekit.config import fields_of
from probekit.data import FETCHERS, READERS, Split, Task, TaskData, load_task
from probekit.data.corpus import CORPUS_FORMATS
from probekit.encoding import POOLS, Pooling, encode, tokenize
from probekit.errors import ParamError, ProbekitWarning, ResumeError
from probekit.extraction import ExtractConfig, extract, extract_task, plan_batches
from probekit.plot import offramp as plot_offramp
from probekit.registry import Registry
from tests.helpers import write_senteval

REGISTRIES = {"reader": READERS, "fetcher": FETCHERS, "corpus format": CORPUS_FORMATS, "pooling": POOLS}
REPO = Path(__file__).resolve().parents[1]


def _components() -> list[tuple[str, Registry, str]]:
    return [(what, reg, name) for what, reg in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize(("what", "registry", "name"), _components(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_component_is_found_by_name_alias_and_typo(what: str, registry: Registry, name: str) -> None:
    obj = registry.get(name)
    assert registry.get(name.upper()) is obj and registry.canonical(f" {name.upper()} ") == name
    for alias in registry.entry(name).aliases:
        assert registry.get(alias) is obj
    assert registry.help(name), f"{what} {name!r} has no one-line help"
    with pytest.raises(ParamError, match=f"did you mean '{name}'") as info:
        registry.get(name + "x")
    assert info.value.param == registry.param and "\n" not in str(info.value)


def test_builtin_components_are_registered() -> None:
    assert {"senteval", "glue"} <= set(READERS.names()) and {"senteval", "glue"} <= set(FETCHERS.names())
    assert {"squad", "text", "task"} <= set(CORPUS_FORMATS.names()) and {"mean", "cls", "tokens"} <= set(POOLS.names())


# ------------------------------------------------------------------ pooling against a hand computation


def _by_hand(pool: str, hs: torch.Tensor, special: torch.Tensor, include_special: bool) -> torch.Tensor:
    """hs: [L+1, T, D] of one text, no padding; the textbook definition of each pooling."""
    if pool == "mean":
        keep = torch.ones_like(special) if include_special else ~special
        return hs[:, keep].sum(1) / keep.sum()
    if pool == "cls":
        return hs[:, 0]
    if pool == "tokens":
        return hs.transpose(0, 1)
    raise AssertionError(f"pooling {pool!r} has no hand computation in this test: add one")


@pytest.mark.parametrize("include_special", [True, False])
@pytest.mark.parametrize("pool", POOLS.names())
def test_each_pooling_equals_a_hand_computation(tiny_model: Path, pool: str, include_special: bool) -> None:
    texts = ["a b c", "the cat sat on the mat", "x", "some longer words in this sentence here"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model).eval()
    expected = []
    for text in texts:
        enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask")[0].bool()
        with torch.no_grad():
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states)[:, 0]
        expected.append(_by_hand(pool, hs, special, include_special))
    got = encode(load_backbone(tiny_model), texts, pool=pool, include_special=include_special, batch_size=3)
    want = torch.cat(expected) if POOLS.get(pool).token_level else torch.stack(expected)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ the extraction options


def test_extract_config_round_trips_through_toml() -> None:
    cfg = ExtractConfig(
        pool="cls", max_length=64, batch_size=8, dtype="float32", storage_dtype="float32", unseen_labels="drop"
    )
    assert cfg.batch_size == "8" and cfg.batch == 8
    back = ExtractConfig.from_mapping(tomllib.loads(cfg.to_toml("extract"))["extract"])
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert ExtractConfig().to_dict() == {
        "pool": "mean",
        "max_length": 128,
        "batch_size": "auto",
        "dtype": "auto",
        "storage_dtype": "float16",
        "include_special": True,
        "unseen_labels": "error",
    }
    assert ExtractConfig(batch_size=None).batch is None and ExtractConfig(pool="CLS").pool == "cls"


@pytest.mark.parametrize(
    ("values", "param", "message"),
    [
        ({"max_length": 1}, "max_length", ">= 2, got 1"),
        ({"batch_size": 0}, "batch_size", "positive integer or 'auto'"),
        ({"batch_size": "many"}, "batch_size", "positive integer or 'auto'"),
        ({"pool": "clss"}, "pool", "unknown pooling 'clss' (did you mean 'cls'?)"),
        ({"storage_dtype": "int8"}, "storage_dtype", "float16, float32"),
        ({"dtype": "float64"}, "dtype", "auto, float32, float16, bfloat16"),
        ({"unseen_labels": "keep"}, "unseen_labels", "error, drop"),
        ({"pol": "cls"}, "pol", "is not an option of the extraction"),
    ],
)
def test_extract_config_rejects_bad_values_naming_the_parameter(values: dict, param: str, message: str) -> None:
    with pytest.raises(ParamError) as info:
        ExtractConfig.from_mapping(values)
    assert info.value.param == param and message in str(info.value) and "--" not in str(info.value)


def test_vocabularies_are_written_once() -> None:
    specs = {s.name: s for s in fields_of(ExtractConfig)}
    assert specs["pool"].allowed() == POOLS.names()
    assert tuple(specs["storage_dtype"].allowed()) == STORAGE_DTYPES == ("float16", "float32")
    assert tuple(specs["dtype"].allowed()) == COMPUTE_DTYPES
    assert specs["unseen_labels"].allowed() == ["error", "drop"]


def test_extract_command_derives_its_options_from_the_config(tiny_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for spec in fields_of(ExtractConfig):
        assert "--" + spec.name.replace("_", "-") in result.output, spec.name
    assert "--exclude-special" in result.output and "--fresh" in result.output
    base = ["extract", "--model", str(tiny_model), "--task", "x", "--out", str(tmp_path)]
    for flag, value, shown in [
        ("--max-length", "1", "error: --max-length: must be >= 2, got 1"),
        ("--pool", "max", "error: --pool: unknown pooling 'max'"),
        ("--batch-size", "0", "error: --batch-size: must be a positive integer or 'auto', got '0'"),
    ]:
        result = runner.invoke(app, [*base, flag, value])
        assert result.exit_code == 2 and result.output.startswith(shown), result.output


def test_library_errors_speak_parameter_names(tiny_model: Path, tmp_path: Path) -> None:
    backbone = load_backbone(tiny_model)
    with pytest.raises(ParamError) as info:
        tokenize(backbone.tokenizer, ["a"], max_length=1)
    assert info.value.param == "max_length" and "--" not in str(info.value)
    path = write_senteval(
        tmp_path / "t.txt", [("tr", "a", "x y"), ("tr", "b", "y"), ("va", "a", "z"), ("va", "c", "q"), ("te", "a", "w")]
    )
    with pytest.raises(ParamError) as info:
        load_task(path, unseen_labels="keep")
    assert info.value.param == "unseen_labels"
    with pytest.raises(Exception, match="pass unseen_labels drop") as err:
        load_task(path)
    assert err.value.render({"unseen_labels": "--unseen-labels"}).endswith(
        "(pass --unseen-labels drop to drop such rows)"
    )
    with pytest.warns(ProbekitWarning, match="dropped 1 dev rows"):
        load_task(path, unseen_labels="drop")


# ------------------------------------------------------------------ the cache's resume rule


class Crash(Exception):
    pass


def _crash_after(n: int):  # type: ignore[no-untyped-def]
    seen = [0]

    def on_batch(split: str, b: int) -> None:
        seen[0] += 1
        if seen[0] == n:
            raise Crash

    return on_batch


AS_CLI = {"reader_options": {"unseen_labels": "error"}}  # what extract() and the CLI pass: the same cache


def test_partial_cache_of_another_batch_plan_is_refused_in_one_line(
    tiny_model: Path, toy_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import probekit.extraction as ex

    monkeypatch.setattr(ex, "CHECKPOINT_SECONDS", 0.0)
    backbone = load_backbone(tiny_model)
    data = load_task(toy_task)
    with pytest.raises(Crash):
        extract_task(backbone, data, tmp_path / "c", batch_size=4, progress=False, on_batch=_crash_after(5), **AS_CLI)
    [partial] = (tmp_path / "c").glob("*/*.partial")
    with pytest.raises(ResumeError) as info:
        extract_task(backbone, data, tmp_path / "c", batch_size=8, progress=False, **AS_CLI)
    text = str(info.value)
    assert "\n" not in text and str(partial) in text and "an interrupted extraction" in text
    assert "batch_size 4 -> 8" in text and text.endswith("remove it or rerun with fresh to start over")
    assert partial.is_dir()  # refused: nothing was touched

    result = CliRunner().invoke(
        app, ["extract", "--model", str(tiny_model), "--task", str(toy_task), "--out", str(tmp_path / "c"), "-q"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "batch_size 4 -> null" in result.output and "rerun with --fresh" in result.output

    fresh = extract_task(backbone, data, tmp_path / "c", batch_size=8, progress=False, fresh=True, **AS_CLI)
    [reference] = extract(backbone, [toy_task], tmp_path / "ref", batch_size=8, progress=False)
    assert not partial.exists() and fresh.path == partial.with_name(partial.name.removesuffix(".partial"))
    assert fresh.manifest["checksums"] == reference.manifest["checksums"]


def test_same_plan_resumes_and_a_finished_cache_is_reused_whatever_the_batch_size(
    tiny_model: Path, toy_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import probekit.extraction as ex

    monkeypatch.setattr(ex, "CHECKPOINT_SECONDS", 0.0)
    backbone = load_backbone(tiny_model)
    data = load_task(toy_task)
    with pytest.raises(Crash):
        extract_task(backbone, data, tmp_path, batch_size=4, progress=False, on_batch=_crash_after(3))
    seen: list[tuple[str, int]] = []
    done = extract_task(
        backbone, data, tmp_path, batch_size=4, progress=False, on_batch=lambda s, b: seen.append((s, b))
    )
    lengths = {s: tokenize(backbone.tokenizer, d.texts).lengths for s, d in data.splits.items()}
    assert len(seen) == sum(len(plan_batches(n, 4)) for n in lengths.values()) - 3
    again = extract_task(backbone, data, tmp_path, batch_size=16, progress=False, on_batch=lambda s, b: seen.append(s))
    assert again.path == done.path and len(seen) == sum(len(plan_batches(n, 4)) for n in lengths.values()) - 3


def test_a_partial_without_fingerprint_is_started_over_with_a_warning(
    tiny_model: Path, toy_task: Path, tmp_path: Path
) -> None:
    backbone = load_backbone(tiny_model)
    data = load_task(toy_task)
    [cache] = extract(backbone, [toy_task], tmp_path / "ref", progress=False)
    partial = tmp_path / "c" / cache.path.parent.name / (cache.path.name + ".partial")
    partial.mkdir(parents=True)
    (partial / "progress.json").write_text('{"key": "old", "done": {"train": 3}}')
    with pytest.warns(ProbekitWarning, match="no fingerprint"):
        again = extract_task(backbone, data, tmp_path / "c", progress=False, **AS_CLI)
    assert again.manifest["checksums"] == cache.manifest["checksums"]


# ------------------------------------------------------------------ floors: layering and module-level imports

LAYERS = {
    "data": 1,
    "backbone": 2,
    "encoding": 2,
    "cache": 2,
    "extraction": 2,
    "distributed": 2,
    "plot": 4,
}
HIGHER = {
    1: ("probekit.backbone", "probekit.encoding", "probekit.cache", "probekit.extraction", "probekit.distributed"),
    2: ("probekit.probes", "probekit.mlm", "probekit.offramp", "probekit.finetune", "probekit.plot", "probekit.report"),
    4: ("probekit.report", "probekit.suite", "probekit.cli"),
}


def _my_modules() -> list[Path]:
    pk = REPO / "probekit"
    return [
        *sorted((pk / "data").glob("*.py")),
        *(pk / f"{m}.py" for m in ("backbone", "encoding", "cache", "extraction", "distributed")),
        *sorted((pk / "plot").glob("*.py")),
    ]


@pytest.mark.parametrize("path", _my_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_import_runs_back_up_and_imports_are_module_level(path: Path) -> None:
    rel = path.relative_to(REPO / "probekit").parts
    layer = LAYERS[rel[0].removesuffix(".py")]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "probekit":
            names = [f"probekit.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probekit"):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            assert name != "probekit", f"{path.name}:{node.lineno} imports the package face"
            assert not name.startswith(HIGHER[layer]), f"{path.name}:{node.lineno} imports {name} (a higher layer)"
            if name.startswith("probekit"):
                assert id(node) in top, f"{path.name}:{node.lineno}: a function-local import of {name}"


def test_plot_names_of_today_are_kept() -> None:
    names = ["heatmap", "curves", "delta_heatmap", "finetune_grid", "mlm_curves", "offramp_curves"]
    names += ["quality_vs_saving", "exit_histograms", "saving_calibration", "save", "save_figures", "configs"]
    names += ["band_description", "metric_label", "sentence", "signed"]
    for name in names:
        assert callable(getattr(plot, name)), name
    assert plot.save_figures is plot_offramp.save_figures


# ------------------------------------------------------------------ components from outside the package


def test_a_pooling_and_a_reader_registered_from_outside_are_used(tiny_model: Path, tmp_path: Path) -> None:
    def max_pool(hs, mask, special, include_special):  # type: ignore[no-untyped-def]
        return torch.stack([h.float().masked_fill(~mask.bool()[..., None], -torch.inf).amax(1) for h in hs], dim=1)

    def read_lines(task: Task, path: Path, unseen_labels: str = "error") -> TaskData:
        texts = path.read_text().split("\n")
        split = Split(texts=texts, labels=np.arange(len(texts)) % 2)
        return TaskData(task, path, "x", {"train": split, "dev": split, "test": split}, ["a", "b"])

    POOLS.register("max", Pooling(max_pool), help="Max over the real tokens.")
    READERS.register("lines", read_lines, aliases=("one-per-line",), help="One text per line.")
    try:
        assert ExtractConfig(pool="MAX").pool == "max"
        (tmp_path / "t.txt").write_text("a b\nthe cat sat\nx")
        task = Task(name="t", format="one-per-line", relpath="t.txt", path=tmp_path / "t.txt")
        [cache] = extract(tiny_model, [task], tmp_path / "c", pool="max", storage_dtype="float32", progress=False)
        backbone = load_backbone(tiny_model)
        for i, text in enumerate(["a b", "the cat sat", "x"]):
            enc = backbone.tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                hs = torch.stack(backbone.model(**enc, output_hidden_states=True).hidden_states)[:, 0]
            np.testing.assert_allclose(cache["train"][i], hs.amax(1).numpy(), atol=2e-5, rtol=1e-4)
    finally:
        POOLS.unregister("max")
        READERS.unregister("lines")
