"""The MLM-head probe without selection on its own test set: the sweep's validation split, passage-level
intervals against the normal approximation over passages, the dip-and-recovery statistic by hand, heads
for factorised embeddings (tiny random ALBERT and ELECTRA through ``mlm-probe``) and the config's activation."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel

import probekit.mlm.runner as mlm_runner
from probekit import load_backbone, load_results
from probekit.data.corpus import window_passages
from probekit.mlm import mlm_probe
from probekit.mlm.intervals import dip_recovery, passage_intervals
from probekit.mlm.kernels import MLMHeads
from probekit.report import build_report
from tests.helpers import random_sentence, tiny_tokenizer, tiny_vocab
from tests.test_mlm import mlm_cli, sentences


def test_heldout_passages_never_enter_the_ratio_choice(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(120, seed=5)) + "\n", encoding="utf-8")
    seen: list[list[tuple[int, ...]]] = []
    sweep = mlm_runner.sweep_ratios

    def spy(backbone, train, heldout, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend([[tuple(ids) for ids in train.input_ids], [tuple(ids) for ids in heldout.input_ids]])
        return sweep(backbone, train, heldout, *args, **kwargs)

    monkeypatch.setattr(mlm_runner, "sweep_ratios", spy)
    run = mlm_probe(tiny_model, corpus, tmp_path / "out", steps=2, batch_size=16, heldout=20, validation=15,
                    sweep_mask_ratios=(0.15, 0.3), sweep_dropout_ratios=(1.0,), progress=False)  # fmt: skip
    parts = run.details["passages"]
    held = set(parts["heldout"])
    assert len(held) == 20 and len(parts["sweep_validation"]) == 15
    assert not held & set(parts["sweep_train"]) and not held & set(parts["sweep_validation"])
    assert set(parts["sweep_validation"]) | set(parts["sweep_train"]) == set(parts["train"])
    # the windows the sweep trained and chose on: none of them is a held-out window
    tok = load_backbone(tiny_model, device="cpu").tokenizer
    held_windows = {tuple(ids) for ids in window_passages(tok, parts["heldout"], 128).input_ids}
    assert seen and all(not held_windows & set(windows) for windows in seen)
    assert json.loads(run.results["settings"].iloc[0])["sweep"]["n_validation_passages"] == 15
    report = build_report(tmp_path / "out", tmp_path / "report")
    assert "mlm-dip" in json.loads((report / "report.json").read_text())["sections"]
    assert "recovery" in (report / "summary.md").read_text()


def test_passage_intervals_follow_the_passages_not_the_tokens() -> None:
    rng = np.random.default_rng(0)
    passages, tokens = 200, 10
    hit = rng.random(passages) < 0.5  # a passage's tokens are all right or all wrong
    hits = np.repeat(hit.astype(float), tokens)[None]  # [1 layer, windows]: one window per token here
    groups = np.repeat(np.arange(passages), tokens)
    low, high = passage_intervals(hits, np.ones(hits.shape[1]), groups, n_boot=4000, seed=1)[0]
    p = hit.mean()
    se = math.sqrt(p * (1 - p) / passages)  # binomial over passages; tokens would give sqrt(10) x narrower
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.12)
    assert low < p < high


def test_dip_and_recovery_by_hand() -> None:
    acc = np.array([0.9, 0.85, 0.8, 0.6, 0.7])  # layers 0..4: minimum of the upper half at 3, then up
    n = np.full(50, 20)  # 50 windows (passages) of 20 tokens
    hits = np.round(acc[:, None] * n[None]).astype(float)
    stat = dip_recovery(hits, n, np.arange(50), [0, 1, 2, 3, 4], n_boot=500)
    assert stat is not None and stat["dip_layer"] == 3
    assert stat["recovery"] == pytest.approx(0.1)
    assert stat["ci_low"] == pytest.approx(0.1) and stat["ci_high"] == pytest.approx(0.1)  # no passage variation
    assert dip_recovery(hits[[0, 2]], n, np.arange(50), [0, 2]) is None  # L-1 not probed


def test_head_activation_comes_from_the_config() -> None:
    torch.manual_seed(0)
    heads = MLMHeads(2, 8, 11, embedding_size=4, activation="relu")
    h = torch.randn(2, 5, 8)
    x = torch.baddbmm(heads.dense_bias.unsqueeze(1), h, heads.dense_weight.transpose(1, 2))
    want = F.layer_norm(torch.relu(x), (4,), eps=heads.eps)  # norm weights are 1, biases 0 at init
    torch.testing.assert_close(heads.transform(h), want)
    assert heads.dense_weight.shape == (2, 4, 8)


@pytest.mark.parametrize("family", ["albert", "electra"])
def test_factorised_embedding_encoders_run_through_mlm_probe(family: str, tmp_path: Path) -> None:
    config = AutoConfig.for_model(
        family, vocab_size=len(tiny_vocab()), hidden_size=32, embedding_size=16, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / family)
    tiny_tokenizer().save_pretrained(tmp_path / family)
    rng = random.Random(3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(random_sentence(rng) for _ in range(60)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = mlm_cli(tmp_path / family, corpus, out, "--steps", "2", "--batch-size", "8", "--heldout", "10", "-q")
    assert result.exit_code == 0, result.output
    df = load_results(out)
    assert sorted(df.loc[df["metric"] == "mlm_acc", "layer"]) == [0, 1, 2]
    [ckpt] = (out / "checkpoints").glob("heads-*.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        assert tuple(f.get_tensor("heads.dense_weight").shape) == (3, 16, 32)  # hidden 32 -> embedding 16
