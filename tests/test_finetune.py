"""Fine-tuning: a tiny random BERT trained a few steps on a tiny GLUE-format task; the variants."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.encoding import tokenize
from probekit.errors import ProbekitError
from probekit.finetune import Grid, MultiObjective, apply_variant, encoder_layers, finetune, make_variant
from probekit.finetune.train import TextDataset, load_classifier, load_tokenizer
from tests.helpers import make_tiny_bert, toy_senteval

FAST = Grid((16,), (1e-2,), 3)
POS = ["cat", "dog", "sat", "ran", "mat"]
NEG = ["red", "blue", "big", "small", "quickly"]


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))


def write_cola(root: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """A CoLA-format task (no header: source, label, original label, sentence) a tiny model can learn."""
    rng = random.Random(seed)
    folder = root / "glue" / "CoLA"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [(i % 2, sentence(rng, POS if i % 2 else NEG)) for i in range(n)]
        (folder / name).write_text("".join(f"src\t{y}\t\t{s}\n" for y, s in rows), encoding="utf-8")
    return root


def write_rte(root: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    """An RTE-format pair task a tiny model can learn: the second sentence repeats the first's words (entailment)
    or uses the other word list (not_entailment)."""
    rng = random.Random(seed)
    folder = root / "glue" / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel\n"]
        for i in range(n):
            a = sentence(rng, POS)
            b = sentence(rng, POS) if i % 2 else sentence(rng, NEG)
            rows.append(f"{i}\t{a}\t{b}\t{'entailment' if i % 2 else 'not_entailment'}\n")
        (folder / name).write_text("".join(rows), encoding="utf-8")
    return root


def write_stsb(root: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "glue" / "STS-B"
    folder.mkdir(parents=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for name in ("train.tsv", "dev.tsv"):
        rows = [
            f"{i}\tg\tf\ty\t{i}\ts\ts\t{sentence(rng, POS)}\t{sentence(rng, NEG)}\t{rng.uniform(0, 5):.2f}\n"
            for i in range(n)
        ]
        (folder / name).write_text(head + "".join(rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cola(tmp_path_factory.mktemp("glue-data"))


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer tiny BERT (copy-layers needs layers above the copied one)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny3"), layers=3)


def test_loss_falls_checkpoint_reloads_and_extracts(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    run = finetune(tiny_model, "cola", out, seeds=1, grid=FAST, data_dir=data, logging_steps=1, threads=1)
    [res] = run.seeds
    m = res.metrics
    losses = [r["loss"] for r in m["runs"][0]["train_loss"]]
    assert len(losses) == 18  # 96 / 16 = 6 steps x 3 epochs
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert [e["epoch"] for e in m["runs"][0]["evals"]] == [1.0, 2.0, 3.0]
    assert m["metric"] == "mcc" and m["chosen"]["value"] == max(e["mcc"] for e in m["runs"][0]["evals"])
    assert m["chosen"]["value"] > 0.5  # the task is easy
    assert m["seed"] == 0 and m["chosen"]["batch_size"] == 16 and m["wall_s"] > 0
    assert res.path == out / "cola" / "plain" / "seed0" / "best"
    assert not (out / "cola" / "plain" / "seed0" / "runs" / "bs16-lr1e-2" / "checkpoints").exists()

    # a standard checkpoint: AutoModel gives the encoder with the trained weights
    encoder = AutoModel.from_pretrained(res.path)
    classifier = AutoModelForSequenceClassification.from_pretrained(res.path)
    assert encoder.config.num_hidden_layers == 2
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, classifier.base_model.state_dict()[name])
    original = AutoModel.from_pretrained(tiny_model).state_dict()
    assert not torch.equal(
        original["encoder.layer.0.attention.self.query.weight"],
        encoder.state_dict()["encoder.layer.0.attention.self.query.weight"],
    )
    assert classifier.config.id2label == {0: "0", 1: "1"}
    # ... that probekit extracts
    [cache] = probekit.extract(
        res.path, [toy_senteval(tmp_path / "toy.txt")], tmp_path / "caches", name="tiny-cola", progress=False
    )
    assert cache.model == "tiny-cola" and cache["train"].shape == (40, 3, 32)

    # a second run does nothing; other settings are refused
    again = finetune(tiny_model, "cola", out, seeds=1, grid=FAST, data_dir=data)
    assert again.seeds[0].skipped and again.seeds[0].metrics == m
    with pytest.raises(ProbekitError, match="other settings"):
        finetune(tiny_model, "cola", out, seeds=1, grid=FAST, data_dir=data, epochs=2)
    assert "| plain | " in (out / "comparison.md").read_text()


def test_interrupted_run_resumes(tiny_model: Path, data: Path, tmp_path: Path, monkeypatch) -> None:
    from probekit.finetune import train

    real = train._summarize

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_summarize", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model, "cola", tmp_path, seeds=1, grid=Grid((32,), (1e-3,), 2), data_dir=data, threads=1)
    run_dir = tmp_path / "cola" / "plain" / "seed0" / "runs" / "bs32-lr1e-3"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    monkeypatch.setattr(train, "_summarize", real)
    run = finetune(tiny_model, "cola", tmp_path, seeds=1, grid=Grid((32,), (1e-3,), 2), data_dir=data, threads=1)
    r = run.seeds[0].metrics["runs"][0]
    assert r["resumed"] and r["steps"] == 6 and len(r["evals"]) == 2


def test_copy_layers_copies_weights(tiny3: Path, data: Path) -> None:
    task = probekit.load_task("cola", data)
    model = apply_variant(load_classifier(str(tiny3), task, seed=0), make_variant("copy-layers", copy_from=1))
    layers = encoder_layers(model)
    assert len(layers) == 3
    for j in (1, 2):
        for (name, a), (_, b) in zip(layers[0].state_dict().items(), layers[j].state_dict().items(), strict=True):
            assert torch.equal(a, b), (j, name)
            assert a.data_ptr() != b.data_ptr()  # copies, not shared weights
    with pytest.raises(ProbekitError, match="K must be in 1..2"):
        apply_variant(load_classifier(str(tiny3), task, seed=0), make_variant("copy-layers", copy_from=3))


def test_variants_saved_layer_counts(tiny3: Path, data: Path, tmp_path: Path) -> None:
    run = finetune(
        tiny3,
        "cola",
        tmp_path,
        seeds=1,
        grid=FAST,
        data_dir=data,
        max_steps=3,
        threads=1,
        variants=["drop-layers", "copy-layers", "multi-objective", "multi-objective-extra-layer"],
        drop=2,
        copy_from=2,
    )
    got = {r.variant: r.path for r in run.seeds}
    assert set(got) == {"drop-layers-n2", "copy-layers-k2", "multi-objective", "multi-objective-extra-layer"}
    expect = {"drop-layers-n2": 1, "copy-layers-k2": 3, "multi-objective": 3, "multi-objective-extra-layer": 3}
    for variant, path in got.items():
        encoder = AutoModel.from_pretrained(path)
        assert encoder.config.num_hidden_layers == expect[variant] == len(encoder.encoder.layer), variant
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert not any("extra" in k or "mlm" in k for k in keys), variant
        assert max(int(k.split(".")[3]) for k in keys if ".layer." in k) == expect[variant] - 1
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {v} |" in table for v in expect)


def test_multi_objective_adds_an_mlm_loss_over_the_extra_layer(tiny_model: Path, data: Path) -> None:
    task = probekit.load_task("cola", data)
    tok = load_tokenizer(str(tiny_model))
    model = apply_variant(
        load_classifier(str(tiny_model), task, seed=0), make_variant("multi-objective-extra-layer", mask_ratio=0.5)
    )
    assert isinstance(model, MultiObjective) and len(encoder_layers(model.classifier)) == 2
    split = task.splits["train"]
    tokens = tokenize(tok, split.texts[:8], None, 32)
    batch = TextDataset(tokens, split.labels[:8], tok.pad_token_id, keep_special=True).collate(range(8))
    assert "special_tokens_mask" in batch
    model.train()
    torch.manual_seed(0)
    out = model(**batch)
    _, cls_rows = model.last_split
    plain = {k: v[cls_rows] for k, v in batch.items() if k != "special_tokens_mask"}
    torch.manual_seed(0)
    cls_loss = model.classifier(**plain).loss
    assert out.loss > cls_loss + 1.0  # + the MLM loss (about log(vocab) at the start)
    out.loss.backward()
    assert model.extra_layer.attention.self.query.weight.grad.abs().sum() > 0
    assert model.mlm_head.dense_weight.grad.abs().sum() > 0
    model.eval()
    every = {k: v for k, v in batch.items() if k != "special_tokens_mask"}
    assert torch.allclose(model(**batch).loss, model.classifier(**every).loss)  # eval: classification only

    # the warm-up trains the extra layer and the head only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = model.warm_up([batch] * 30, lr=1e-2)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"extra_layer", "mlm_head"}


def test_regression_task(tiny_model: Path, tmp_path: Path) -> None:
    data = write_stsb(tmp_path / "data")
    run = finetune(tiny_model, "stsb", tmp_path / "ft", seeds=1, grid=FAST, data_dir=data, max_steps=2, threads=1)
    m = run.seeds[0].metrics
    assert m["metric"] == "pearson" and set(m["metrics"]) == {"pearson", "spearman"}
    config = AutoModelForSequenceClassification.from_pretrained(run.seeds[0].path).config
    assert config.num_labels == 1 and config.problem_type == "regression"


runner = CliRunner()


def test_cli_help_and_errors(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", "--help"])
    assert result.exit_code == 0 and "--variant" in result.output and "--copy-from" in result.output
    base = ["finetune", "-m", str(tiny_model), "-o", str(tmp_path), "--data-dir", str(data)]
    result = runner.invoke(app, [*base, "-t", "cola", "--variant", "drop-layers"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --variant drop-layers needs --drop N (how many top layers to remove)"
    result = runner.invoke(app, [*base, "-t", "cola", "--variant", "drop-layers", "--drop", "5"])
    assert result.exit_code == 2 and "N must be in 1..1" in result.output
    result = runner.invoke(app, [*base, "-t", "bigram_shift"])
    assert result.exit_code == 2 and "not a GLUE task" in result.output
    # a run from the CLI, as a user would: a checkpoint, its metrics and the comparison table
    result = runner.invoke(app, [*base, "-t", "cola", "--grid", "quick", "--seeds", "1", "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    best = tmp_path / "cola" / "plain" / "seed0" / "best"
    assert (best / "model.safetensors").is_file() and (best / "metrics.json").is_file()
    assert AutoModel.from_pretrained(best).config.num_hidden_layers == 2
    assert "| plain |" in (tmp_path / "comparison.md").read_text()
