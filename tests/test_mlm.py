"""MLM-head probes: embedding dropout, the chunked loss and top-k against direct computations,
a planted copy layer, one forward per batch, frozen encoder, checkpoint/resume, the CLI,
and the real encoder."""

from __future__ import annotations

import functools
import json
import random
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probekit.mlm as mlm
from probekit import load_backbone, load_results
from probekit.backbone import Backbone, weights_fingerprint
from probekit.cli import app
from probekit.data.corpus import read_corpus, split_passages, window_passages
from probekit.encoding import plan_batches
from probekit.errors import ProbekitError
from probekit.mlm import MLMHeadProbe, embedding_dropout, streaming_topk, tied_cross_entropy
from tests.helpers import random_sentence, tiny_tokenizer

runner = CliRunner()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_sentence(rng) for _ in range(n)]


class StandIn(torch.nn.Module):
    """An 'encoder' whose hidden state ``copy_layer`` is exactly its input word embeddings and
    whose other layers are fresh random noise, whatever the input."""

    def __init__(self, vocab: int, dim: int = 32, copy_layer: int = 1, n_layers: int = 3) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=n_layers - 1, hidden_size=dim)
        self.word_embeddings = torch.nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.word_embeddings.weight.copy_(torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0)))
        self.copy_layer, self.n_layers = copy_layer, n_layers

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.word_embeddings

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=True, return_dict=True
    ):  # type: ignore[no-untyped-def]
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        hs = tuple(x if k == self.copy_layer else torch.randn_like(x) for k in range(self.n_layers))
        return types.SimpleNamespace(hidden_states=hs)


def mlm_cli(model: Path, corpus: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    args = ["mlm-probe", "--model", str(model), "--corpus", str(corpus), "--out", str(out), *extra]
    return runner.invoke(app, args)


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[int]:
    calls = [0]
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return calls


# ---------------------------------------------------------------- embedding dropout


def test_embedding_dropout_ratios_choice_and_specials() -> None:
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(64, 50, 16, generator=g) + 3.0  # no zero entries by chance
    candidates = torch.ones(64, 50, dtype=torch.bool)
    candidates[:, 0] = candidates[:, -1] = False  # [CLS] / [SEP]
    candidates[:5, 30:] = False  # padding

    out, chosen = embedding_dropout(embeds, candidates, 0.15, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, embeds)
    assert not (chosen & ~candidates).any()  # special and padding positions are never chosen
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.15) < 0.02

    out, chosen = embedding_dropout(embeds, candidates, 0.15, 1.0, torch.Generator().manual_seed(1))
    assert chosen.any() and (out[chosen] == 0).all()
    assert torch.equal(out[~chosen], embeds[~chosen])

    out, chosen = embedding_dropout(embeds, candidates, 0.3, 0.4, torch.Generator().manual_seed(2))
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.3) < 0.02
    assert not (chosen & ~candidates).any()
    kept = out[chosen] != 0
    assert abs(1 - kept.float().mean().item() - 0.4) < 0.02  # dimensions dropped with p = 0.4
    torch.testing.assert_close(out[chosen][kept], embeds[chosen][kept] / 0.6)  # inverted-dropout scaling
    assert torch.equal(out[~chosen], embeds[~chosen])
    # the same generator seed gives the same corruption
    again, chosen2 = embedding_dropout(embeds, candidates, 0.3, 0.4, torch.Generator().manual_seed(2))
    assert torch.equal(again, out) and torch.equal(chosen2, chosen)


def test_training_inputs_are_the_corrupted_word_embeddings(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the encoder receives: inputs_embeds = word embeddings, zero at chosen positions (ratio 1)."""
    from transformers.models.bert import modeling_bert

    backbone = load_backbone(tiny_model, device="cpu")
    seen: list[dict] = []
    original = modeling_bert.BertModel.forward

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertModel, "forward", forward)
    MLMHeadProbe(steps=1, batch_size=8, mask_ratio=0.5, dropout_ratio=1.0).fit(backbone, sentences(8))
    [kw] = seen
    assert "input_ids" not in kw and kw["inputs_embeds"].shape[-1] == 32
    emb = backbone.model.get_input_embeddings().weight
    x, real = kw["inputs_embeds"], kw["attention_mask"].bool()
    zero = (x == 0).all(-1)
    lengths = real.sum(1)
    inner = real.clone()
    inner[:, 0] = False
    inner[torch.arange(len(x)), lengths - 1] = False  # [CLS] and [SEP]
    assert not (zero & real & ~inner).any()  # special tokens are never chosen (padding rows are zero anyway)
    assert 0.3 < zero[inner].float().mean() < 0.7  # mask_ratio 0.5
    # every other real position carries exactly its token's word embedding
    ids = torch.cdist(x[real & ~zero], emb).argmin(-1)
    assert torch.equal(x[real & ~zero], emb[ids])


# ---------------------------------------------------------------- chunked vocabulary projection


def test_chunked_loss_gradients_and_topk_equal_direct_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlm.kernels, "LOGITS_BUDGET", 3 * 10 * 300)  # force several vocabulary chunks
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3, 1000, dtype=torch.float64, generator=g, requires_grad=True)
    decoder = torch.randn(1000, 8, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 1000, (10,), generator=g)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert mlm.vocab_chunk(3, 10, 1000) < 1000 and mlm.vocab_chunk(3, 10, 1000, torch.device("cpu")) < 1000

    loss = tied_cross_entropy(t, bias, decoder, targets)
    (loss * weights).sum().backward()
    grad_t, grad_b = t.grad.clone(), bias.grad.clone()
    t.grad = bias.grad = None
    logits = t @ decoder.T + bias[:, None]
    direct = torch.stack([torch.nn.functional.cross_entropy(logits[i], targets) for i in range(3)])
    (direct * weights).sum().backward()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(grad_t, t.grad)
    torch.testing.assert_close(grad_b, bias.grad)
    top = streaming_topk(t.detach(), bias.detach(), decoder, 5)
    assert torch.equal(top, logits.detach().topk(5, -1).indices)


# ---------------------------------------------------------------- what the heads learn


def test_planted_copy_layer_is_near_perfect_and_random_layers_near_chance() -> None:
    tok = tiny_tokenizer()
    backbone = Backbone(model=StandIn(len(tok), copy_layer=1), tokenizer=tok, name="stand-in")
    texts = sentences(400)
    probe = MLMHeadProbe(steps=60, batch_size=16, mask_ratio=0.5, dropout_ratio=0.3, lr=1e-2).fit(backbone, texts[:300])
    scores = probe.evaluate(backbone, texts[300:]).set_index("layer")
    # chance: the most frequent token of the held-out text (30 words, uniform)
    ids = [i for w in window_passages(tok, texts[300:]).input_ids for i in w[1:-1]]
    chance = np.bincount(ids).max() / len(ids)
    assert scores.loc[1, "acc"] > 0.97 and scores.loc[1, "top5"] > 0.99
    for layer in (0, 2):
        assert scores.loc[layer, "acc"] < chance + 0.05
    assert scores["n"].iloc[0] == len(ids)


def test_one_forward_per_batch_and_only_heads_change(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.bert import modeling_bert

    backbone = load_backbone(tiny_model, device="cpu")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    fingerprint = backbone.fingerprint
    calls = count_calls(monkeypatch, modeling_bert.BertModel)
    texts = sentences(120)
    probe = MLMHeadProbe(steps=7, batch_size=10)
    vocab = backbone.config.vocab_size
    init = mlm.MLMHeads(3, 32, vocab, seed=probe.seed).state_dict()
    probe.fit(backbone, texts[:100])
    assert calls[0] == 7  # one pass per step serves all three heads
    assert probe.heads_ is not None and probe.layers_ == [0, 1, 2]
    assert probe.heads_.dense_weight.shape == (3, 32, 32) and probe.heads_.bias.shape == (3, vocab)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not v.requires_grad for v in backbone.model.parameters())
    assert weights_fingerprint(backbone.model) == fingerprint
    trained = probe.heads_.state_dict()
    assert all(not torch.equal(init[k], trained[k]) for k in init)  # every head parameter learned
    calls[0] = 0
    held = window_passages(backbone.tokenizer, texts[100:])
    scores = probe.evaluate(backbone, held)
    assert calls[0] == len(plan_batches(held.lengths, max_tokens=4096))
    assert list(scores["layer"]) == [0, 1, 2] and ((scores["acc"] >= 0) & (scores["top5"] <= 1)).all()
    assert (scores["top5"] >= scores["acc"]).all()


def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    backbone = load_backbone(tiny_model, device="cpu")
    texts = sentences(90)
    settings = {"steps": 8, "batch_size": 8}
    every_step = {"checkpoint_seconds": 0.0}
    whole = MLMHeadProbe(**settings).fit(backbone, texts[:70], checkpoint=tmp_path / "a.safetensors", **every_step)

    class Crash(Exception):
        pass

    def crash_at_3(step: int) -> None:
        if step == 3:
            raise Crash

    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(Crash):
        MLMHeadProbe(**settings).fit(backbone, texts[:70], checkpoint=ckpt, **every_step, on_step=crash_at_3)
    resumed = MLMHeadProbe(**settings).fit(backbone, texts[:70], checkpoint=ckpt, **every_step)
    assert resumed.resumed_from_ == 3 and len(resumed.loss_) == 5
    assert resumed.loss_ == whole.loss_[3:]
    for k, v in whole.heads_.state_dict().items():
        assert torch.equal(v, resumed.heads_.state_dict()[k]), k
    pd.testing.assert_frame_equal(whole.evaluate(backbone, texts[70:]), resumed.evaluate(backbone, texts[70:]))
    # a finished checkpoint is only loaded; other settings refuse it
    again = MLMHeadProbe(**settings).fit(backbone, texts[:70], checkpoint=ckpt, **every_step)
    assert again.resumed_from_ == 8 and again.loss_ == []
    with pytest.raises(ProbekitError, match="other settings"):
        MLMHeadProbe(**{**settings, "dropout_ratio": 0.9}).fit(backbone, texts[:70], checkpoint=ckpt, **every_step)


# ---------------------------------------------------------------- the command


def test_cli_end_to_end_with_resume_and_sweep(tiny_model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(150)) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    opts = ["--steps", "6", "--batch-size", "16", "--heldout", "20", "--quiet"]
    result = mlm_cli(tiny_model, corpus, out, *opts)
    assert result.exit_code == 0, result.output
    assert "mlm_acc" in result.output and "held-out MLM-head accuracy per layer" in result.output
    df = load_results(out)
    assert len(df) == 3 * 3 + 2 and sorted(set(df["layer"].dropna())) == [0, 1, 2]
    assert set(df["metric"]) == {"mlm_acc", "mlm_top5", "mlm_masked_acc", "mlm_dip_layer", "mlm_recovery"}
    assert df.loc[df["metric"].isin(["mlm_dip_layer", "mlm_recovery"]), "layer"].isna().all()
    assert "recovery acc(L) - acc(L-1)" in result.output
    assert (df["source"] == "mlm-probe").all() and (df["probe"] == "mlm-head").all()
    assert (df["split"] == "heldout").all() and (df["task"] == "corpus").all()
    per_layer = df[df["metric"].isin(["mlm_acc", "mlm_top5"])]
    assert ((per_layer["ci_low"] <= per_layer["value"]) & (per_layer["value"] <= per_layer["ci_high"])).all()
    assert per_layer["n"].nunique() == 1 and per_layer["n"].iloc[0] > 0
    settings = json.loads(df["settings"].iloc[0])
    assert settings["mask_ratio"] == 0.15 and settings["dropout_ratio"] == mlm.DEFAULT_DROPOUT_RATIO
    assert settings["steps"] == 6 and settings["n_heldout_passages"] == 20 and settings["chosen_by"] == "given"
    assert len(list((out / "checkpoints").glob("heads-*.safetensors"))) == 1
    # the same command again: nothing left to train, the same numbers
    result = mlm_cli(tiny_model, corpus, out, *opts)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "mlm_run.json").read_text())["resumed_from"] == 6
    pd.testing.assert_frame_equal(load_results(out), df)

    sweep_out = tmp_path / "sweep"
    sweep = ["--sweep-mask-ratios", "0.15,0.3", "--sweep-dropout-ratios", "0.5,1"]
    result = mlm_cli(tiny_model, corpus, sweep_out, *opts, *sweep)
    assert result.exit_code == 0, result.output
    sweep_df = pd.read_csv(sweep_out / "sweep.csv")
    assert len(sweep_df) == 4 and sweep_df["chosen"].sum() == 1
    assert {"acc_l0", "acc_l2", "mean_acc", "mean_masked_acc", "criterion"} <= set(sweep_df.columns)
    best = sweep_df[sweep_df["chosen"]].iloc[0]
    assert best["criterion"] == sweep_df["criterion"].max()
    settings = json.loads(load_results(sweep_out)["settings"].iloc[0])
    assert settings["chosen_by"] == "sweep"
    assert (settings["mask_ratio"], settings["dropout_ratio"]) == (best["mask_ratio"], best["dropout_ratio"])
    # the sweep trained on part of the training passages, the final heads on all of them: 4 + 1 checkpoints
    assert len(list((sweep_out / "checkpoints").glob("*.safetensors"))) == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b'{"data": [', "malformed JSON"), (b"ok\n\xff\xfe\n", "not valid UTF-8")],
)
def test_cli_bad_corpus_is_one_line_exit_2(tiny_model: Path, tmp_path: Path, content: bytes, message: str) -> None:
    corpus = tmp_path / ("bad.json" if content.startswith(b"{") else "bad.txt")
    corpus.write_bytes(content)
    result = mlm_cli(tiny_model, corpus, tmp_path / "o", "--steps", "1")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_rejects_steps_and_epochs_together(tiny_model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(30)), encoding="utf-8")
    result = mlm_cli(tiny_model, corpus, tmp_path / "o", "--steps", "2", "--epochs", "1")
    assert result.exit_code == 2 and "not both" in result.output


# ---------------------------------------------------------------- the real encoder


@pytest.mark.slow
def test_minilm_on_shared_sentences(minilm: Path, shared_data: Path, tmp_path: Path) -> None:
    """A few thousand real sentences, a few steps: only robust facts (the vocabulary is 30k, so
    the full-softmax heads dominate the time; held-out text is kept small)."""
    run = mlm.mlm_probe(
        minilm,
        ["past_present", "subj_number"],
        tmp_path / "run",
        data_dir=shared_data,
        steps=15,
        batch_size=32,
        heldout=30,
        max_length=64,
        device="cpu",
        name="minilm",
        progress=False,
    )
    df = run.results
    acc = df[df["metric"] == "mlm_acc"].set_index("layer")["value"]
    top5 = df[df["metric"] == "mlm_top5"].set_index("layer")["value"]
    assert list(acc.index) == list(range(7))  # embeddings + 6 blocks
    assert ((acc >= 0) & (acc <= 1)).all() and (top5 >= acc).all()
    backbone = load_backbone(minilm, device="cpu")
    _, held = split_passages(read_corpus(["past_present", "subj_number"], shared_data).passages, 30, 0)
    ids = [i for w in window_passages(backbone.tokenizer, held, 64).input_ids for i in w[1:-1]]
    assert df["n"].iloc[0] == len(ids)
    chance = np.bincount(ids).max() / len(ids)  # always naming the most frequent token
    assert acc[0] > max(0.3, 3 * chance)  # the embedding layer: far above chance after a few steps
    settings = json.loads(df["settings"].iloc[0])
    assert settings["corpus"] == "past_present+subj_number" and settings["n_heldout_passages"] == 30
    assert settings["n_train_passages"] > 3000
