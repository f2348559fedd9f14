"""Contract tests of the MLM-head probe: the estimator dialect, its config (defaults, validation, TOML),
fitting a tiny BERT, ``score`` against a direct computation, rows that pass the results schema,
interrupt-and-resume through the resume kernel, ``mlm_probe`` returning a ``Run`` and the derived CLI."""

from __future__ import annotations

import dataclasses
import random
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer.main
from typer.testing import CliRunner

import probekit.mlm.estimator as estimator
from probekit import load_backbone
from probekit.backbone import Backbone
from probekit.cli import app
from probekit.config import fields_of
from probekit.data.corpus import window_passages
from probekit.errors import ParamError, ProbekitError, ResumeError
from probekit.fingerprint import STAMP, read_stamp
from probekit.mlm import MLMConfig, MLMHeadProbe, MLMRunConfig, mlm_probe
from probekit.mlm import kernels as kernels
from probekit.results import tidy, validate
from probekit.runs import Run
from tests.helpers import random_sentence

runner = CliRunner()
FEW = {"steps": 4, "batch_size": 8}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_sentence(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def backbone(tiny_model: Path) -> Backbone:
    return load_backbone(tiny_model, device="cpu")


# ---------------------------------------------------------------- the config and the estimator's parameters


def test_constructs_from_defaults_and_stores_parameters_only() -> None:
    probe = MLMHeadProbe()
    assert probe.get_config() == MLMConfig()
    assert probe.mask_ratio == kernels.DEFAULT_MASK_RATIO and probe.dropout_ratio == kernels.DEFAULT_DROPOUT_RATIO
    assert (probe.steps, probe.epochs, probe.batch_size, probe.lr, probe.max_length) == (None, None, 32, 2e-3, 128)
    assert not [k for k in vars(probe) if k.endswith("_")]  # nothing learned before fit
    # __init__ does not validate values (fit does), and the parameters round-trip through get_params
    bad = MLMHeadProbe(mask_ratio=7.0)
    assert bad.mask_ratio == 7.0
    assert (
        MLMHeadProbe(**MLMHeadProbe(steps=3, lr=0.1).get_params()).get_params()
        == MLMHeadProbe(steps=3, lr=0.1).get_params()
    )
    cfg = MLMConfig(mask_ratio=0.3, steps=5)
    assert MLMHeadProbe(cfg).get_config() == cfg and MLMHeadProbe(cfg, steps=6).get_config().steps == 6
    assert MLMHeadProbe(config=cfg).get_params() == MLMHeadProbe(cfg).get_params()
    assert MLMHeadProbe(steps=2).clone(dropout_ratio=1.0).get_params() == {
        **MLMHeadProbe().get_params(),
        "steps": 2,
        "dropout_ratio": 1.0,
    }


def test_config_round_trips_through_toml() -> None:
    for cfg in (
        MLMConfig(),
        MLMConfig(mask_ratio=0.5, dropout_ratio=1.0, epochs=2.5, layers=(0, 2), lr=1e-3, seed=3, max_length=64),
    ):
        back = MLMConfig.from_mapping(tomllib.loads(cfg.to_toml()))
        assert back == cfg
        assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    run_cfg = MLMRunConfig(heldout=20, sweep_mask_ratios=(0.15, 0.3), sweep_dropout_ratios=(0.5, 1), sweep_steps=3)
    back = MLMRunConfig.from_mapping(tomllib.loads(run_cfg.to_toml("mlm"))["mlm"])
    assert back == run_cfg and back.sweep_dropout_ratios == (0.5, 1.0) and back.heldout == 20.0
    # every option has a one-line help text (the CLI and the suite schema show it)
    assert all(s.help and "\n" not in s.help for c in (MLMConfig, MLMRunConfig) for s in fields_of(c))


@pytest.mark.parametrize(
    ("options", "param", "detail"),
    [
        ({"mask_ratio": 0.0}, "mask_ratio", "in (0, 1]"),
        ({"mask_ratio": 1.5}, "mask_ratio", "in (0, 1]"),
        ({"dropout_ratio": -0.1}, "dropout_ratio", "in [0, 1]"),
        ({"steps": 0}, "steps", ">= 1"),
        ({"epochs": 0.0}, "epochs", "> 0"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"steps": 2, "epochs": 1.0}, "steps", "not both"),
        ({"layers": "0,x"}, "layers", "number (int)"),
    ],
)
def test_bad_options_are_param_errors_naming_the_parameter(options: dict, param: str, detail: str) -> None:
    with pytest.raises(ParamError) as info:
        MLMHeadProbe(**options).get_config()
    assert info.value.param == param and detail in str(info.value)
    assert "--" not in str(info.value)  # the library speaks parameter names, never flags
    with pytest.raises(ParamError, match="is not an option"):
        MLMHeadProbe(mask=0.3)


# ---------------------------------------------------------------- fit, score, rows


def direct_scores(probe: MLMHeadProbe, backbone: Backbone, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Accuracy and top-5 accuracy per layer, one window at a time with the full [tokens, vocabulary] logits
    (no padding, no vocabulary blocks, no streaming top-k)."""
    tok = window_passages(backbone.tokenizer, texts, probe.max_length)
    emb = backbone.model.get_input_embeddings().weight.detach().float()
    hits = np.zeros((len(probe.layers_), 2))
    n = 0
    with torch.no_grad():
        for ids, special in zip(tok.input_ids, tok.special, strict=True):
            x = torch.tensor([ids])
            hs = backbone.model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states
            real = ~torch.tensor(special, dtype=torch.bool)
            t = probe.heads_.transform(torch.stack([hs[layer][0][real].float() for layer in probe.layers_]))
            target = x[0][real]
            for k in range(len(probe.layers_)):
                logits = t[k] @ emb.T + probe.heads_.bias[k]
                top = logits.topk(5, -1).indices
                hits[k, 0] += int((top[:, 0] == target).sum())
                hits[k, 1] += int((top == target[:, None]).any(-1).sum())
            n += int(real.sum())
    return hits[:, 0] / n, hits[:, 1] / n, n


def test_fit_returns_self_and_score_is_one_number_per_layer(backbone: Backbone) -> None:
    texts = sentences(60)
    probe = MLMHeadProbe(**FEW, lr=1e-2)
    assert probe.fit(backbone, texts[:45]) is probe
    assert probe.layers_ == list(range(backbone.n_layers)) and probe.steps_ == 4 and len(probe.loss_) == 4
    assert probe.config_ == MLMConfig(**FEW, lr=1e-2) and probe.resumed_from_ == 0
    scores = probe.score(backbone, texts[45:])
    assert isinstance(scores, np.ndarray) and scores.shape == (backbone.n_layers,)
    acc, top5, n = direct_scores(probe, backbone, texts[45:])
    np.testing.assert_allclose(scores, acc, atol=1e-6)
    table = probe.evaluate(backbone, texts[45:])
    np.testing.assert_allclose(table["top5"], top5, atol=1e-6)
    assert (table["n"] == n).all()
    # a chosen subset of layers: heads for those only, in that order
    some = MLMHeadProbe(**FEW, layers=[2, 0]).fit(backbone, texts[:45])
    assert some.layers_ == [2, 0] and some.score(backbone, texts[45:]).shape == (2,)
    with pytest.raises(ParamError, match="layers"):
        MLMHeadProbe(**FEW, layers=[0, 9]).fit(backbone, texts[:45])
    with pytest.raises(ProbekitError, match="call fit first"):
        MLMHeadProbe().score(backbone, texts[45:])


def test_rows_pass_the_results_schema(backbone: Backbone) -> None:
    texts = sentences(50)
    probe = MLMHeadProbe(**FEW).fit(backbone, texts[:40])
    rows = probe.rows(backbone, texts[40:], task="toy", data_sha256="abc")
    df = tidy(rows)
    validate(df)
    assert len(df) == 2 * backbone.n_layers and set(df["metric"]) == {"mlm_acc", "mlm_top5"}
    assert sorted(set(df["layer"])) == list(range(backbone.n_layers))  # 0 = embeddings, as the probes'
    assert (df["source"] == "mlm-probe").all() and (df["probe"] == "mlm-head").all() and (df["task"] == "toy").all()
    assert ((df["ci_low"] <= df["value"]) & (df["value"] <= df["ci_high"])).all()
    acc = df[df["metric"] == "mlm_acc"].sort_values("layer")["value"].to_numpy()
    np.testing.assert_allclose(acc, direct_scores(probe, backbone, texts[40:])[0], atol=1e-6)


# ---------------------------------------------------------------- resume


def test_interrupt_and_resume_gives_the_rows_of_an_uninterrupted_run(backbone: Backbone, tmp_path: Path) -> None:
    texts = sentences(60)
    train, held = texts[:50], texts[50:]
    opts = {"steps": 6, "batch_size": 8, "seed": 4}
    whole = MLMHeadProbe(**opts).fit(backbone, train)

    class Crash(Exception):
        pass

    def crash(step: int) -> None:
        if step == 4:
            raise Crash

    ckpt = tmp_path / "heads.safetensors"
    with pytest.raises(Crash):
        MLMHeadProbe(**opts).fit(backbone, train, checkpoint=ckpt, checkpoint_seconds=0.0, on_step=crash)
    resumed = MLMHeadProbe(**opts).fit(backbone, train, checkpoint=ckpt, checkpoint_seconds=0.0)
    assert resumed.resumed_from_ == 4 and resumed.loss_ == whole.loss_[4:]
    assert resumed.rows(backbone, held) == whole.rows(backbone, held)
    # other settings: refused, naming the differing setting; fresh starts over
    with pytest.raises(ResumeError, match=r"other settings \(dropout_ratio 0.3 -> 1.0\)"):
        MLMHeadProbe(**opts, dropout_ratio=1.0).fit(backbone, train, checkpoint=ckpt)
    with pytest.raises(ResumeError, match=r"made from other inputs \(its data fingerprint differs\)"):
        MLMHeadProbe(**opts).fit(backbone, train[:-1], checkpoint=ckpt)
    redo = MLMHeadProbe(**opts, dropout_ratio=1.0).fit(backbone, train, checkpoint=ckpt, fresh=True)
    assert redo.resumed_from_ == 0
    assert redo.rows(backbone, held) == MLMHeadProbe(**opts, dropout_ratio=1.0).fit(backbone, train).rows(
        backbone, held
    )


def test_runner_resumes_after_a_crash_and_refuses_other_settings(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(80)) + "\n", encoding="utf-8")
    opts = {"steps": 5, "batch_size": 8, "heldout": 10, "progress": False, "checkpoint_seconds": 0.0}
    whole = mlm_probe(tiny_model, corpus, tmp_path / "whole", **opts)

    lr = estimator.MLMHeadProbe._lr

    class Crash(Exception):
        pass

    def crash_at_3(cfg: MLMConfig, step: int, total: int) -> float:
        if step == 3:
            raise Crash
        return lr(cfg, step, total)

    monkeypatch.setattr(estimator.MLMHeadProbe, "_lr", staticmethod(crash_at_3))
    with pytest.raises(Crash):
        mlm_probe(tiny_model, corpus, tmp_path / "cut", **opts)
    monkeypatch.undo()
    again = mlm_probe(tiny_model, corpus, tmp_path / "cut", **opts)
    assert again.info["resumed_from"] == 3
    same = ["model", "task", "layer", "split", "metric", "value", "n", "ci_low", "ci_high", "seed", "data_sha256"]
    pd.testing.assert_frame_equal(again.results[same], whole.results[same])
    stamp = read_stamp(tmp_path / "cut")
    assert stamp is not None and stamp["settings"]["probe"]["steps"] == 5
    with pytest.raises(ResumeError, match=r"other settings \(probe.steps 5 -> 6\)"):
        mlm_probe(tiny_model, corpus, tmp_path / "cut", **{**opts, "steps": 6})
    redo = mlm_probe(tiny_model, corpus, tmp_path / "cut", **{**opts, "steps": 6}, fresh=True)
    assert redo.info["resumed_from"] == 0 and len(list((tmp_path / "cut" / "checkpoints").iterdir())) == 1


# ---------------------------------------------------------------- the runner and the command


def test_mlm_probe_returns_a_run(tiny_model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(60)) + "\n", encoding="utf-8")
    given = MLMHeadProbe(batch_size=8, steps=1)
    run = mlm_probe(tiny_model, corpus, tmp_path / "run", given, steps=3, heldout=10, progress=False)
    assert isinstance(run, Run) and run.estimator is run.probe and run.sweep is None
    assert given.steps == 1 and not hasattr(given, "heads_")  # the given estimator is a template, not mutated
    assert run.probe.steps_ == 3 and run.probe.config_.batch_size == 8
    validate(run.results)
    assert run.out == tmp_path / "run" and all(p.exists() for p in run.paths.values())
    assert (tmp_path / "run" / STAMP).is_file() and run.paths["checkpoint"].suffix == ".safetensors"
    assert {"load", "fit", "score", "total"} <= set(run.timings)
    with pytest.raises(ParamError, match="is not an option of mlm_probe"):
        mlm_probe(tiny_model, corpus, tmp_path / "x", mask=0.2)
    with pytest.raises(ParamError, match="sweep_mask_ratios"):
        mlm_probe(tiny_model, corpus, tmp_path / "x", sweep_mask_ratios=(0.2, 2.0))


OLD_FLAGS = (
    "--mask-ratio",
    "--dropout-ratio",
    "--steps",
    "--epochs",
    "--batch-size",
    "--lr",
    "--max-length",
    "--heldout",
    "--seed",
    "--sweep-mask-ratios",
    "--sweep-dropout-ratios",
    "--sweep-steps",
    "--corpus-format",
    "--data-dir",
    "--device",
    "--dtype",
    "--name",
    "--trust-remote-code",
    "--quiet",
    "--model",
    "--corpus",
    "--out",
    "--fresh",
)


def test_cli_flags_are_derived_and_errors_name_flags(tiny_model: Path, tmp_path: Path) -> None:
    params = {o for p in typer.main.get_command(app).commands["mlm-probe"].params for o in p.opts}
    assert set(OLD_FLAGS) <= params and "-q" in params
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(30)), encoding="utf-8")
    base = ["mlm-probe", "--model", str(tiny_model), "--corpus", str(corpus), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*base, "--mask-ratio", "2"])
    assert result.exit_code == 2 and "--mask-ratio: must be in (0, 1], got 2" in result.output
    result = runner.invoke(app, [*base, "--sweep-mask-ratios", "0.15,x"])
    assert result.exit_code == 2 and "--sweep-mask-ratios" in result.output and "sweep_mask_ratios" not in result.output
    result = runner.invoke(app, [*base, "--corpus-format", "pdf"])
    assert result.exit_code == 2 and "--corpus-format" in result.output
    ok = runner.invoke(app, [*base, "--steps", "1", "--batch-size", "4", "--heldout", "5", "-q"])
    assert ok.exit_code == 0, ok.output
    result = runner.invoke(app, [*base, "--steps", "2", "--batch-size", "4", "--heldout", "5", "-q"])
    assert result.exit_code == 2 and "other settings (probe.steps 1 -> 2)" in result.output
    assert "--fresh" in result.output and len(result.output.strip().splitlines()) == 1
    ok = runner.invoke(app, [*base, "--steps", "2", "--batch-size", "4", "--heldout", "5", "-q", "--fresh"])
    assert ok.exit_code == 0, ok.output


def test_kernels_keep_their_public_names() -> None:
    import probekit.mlm as mlm

    for name in ("DEFAULT_DROPOUT_RATIO", "DEFAULT_MASK_RATIO", "MLMHeads", "embedding_dropout", "generator"):
        assert getattr(mlm, name) is getattr(kernels, name)
    assert mlm._generator is kernels.generator  # the former private name, still imported by fine-tuning
    a, b = kernels.generator(0, 1, 2), kernels.generator(0, 1, 2)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    with pytest.raises(ProbekitError) as info:
        kernels.embedding_dropout(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), 1.5, 0.0)
    assert info.value.params == ("mask_ratio", "dropout_ratio") and "--" not in str(info.value)
