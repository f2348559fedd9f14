"""BERTer's fine-tuning methods and the convexity paper's multi-objective as written, on a tiny random BERT:
SMART, Siamese, embed-then-concat, multi-objective (both rows), the optimisers and the paper's checkpoint rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, matthews_corrcoef
from transformers import AutoModel, BertForMaskedLM
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.encoding import tokenize
from probekit.errors import ParamError
from probekit.finetune import Grid, MultiObjective, finetune, finetune_multitask, make_variant
from probekit.finetune.batches import SidesDataset, TextDataset
from probekit.finetune.multitask import epoch_plan
from probekit.finetune.siamese import best_threshold, cross_fitted
from probekit.finetune.smart import _rng_state, divergence, symmetric_kl
from probekit.finetune.train import load_classifier, load_tokenizer
from tests.helpers import make_tiny_bert, tiny_bert_config, tiny_tokenizer, toy_senteval
from tests.test_finetune import write_cola, write_rte

GRID = Grid((16,), (1e-3,), 1)
FAST = {"max_train_samples": 32, "max_dev_samples": 16, "threads": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rte(write_cola(tmp_path_factory.mktemp("glue"), n_train=48, n_dev=16))


def _batch(model_dir: Path, data: Path, task: str = "cola", n: int = 8) -> tuple[dict, object]:
    td = probekit.load_task(task, data)
    tok = load_tokenizer(str(model_dir))
    split = td.splits["train"]
    toks = tokenize(tok, split.texts[:n], split.text_pairs[:n] if split.text_pairs else None, 32)
    return TextDataset(toks, split.labels[:n], tok.pad_token_id).collate(range(n)), td


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- SMART


def test_smart_regulariser_is_zero_without_perturbation_positive_with_and_passes_gradcheck(
    tiny_model: Path, data: Path
) -> None:
    batch, td = _batch(tiny_model, data)
    labels = batch.pop("labels")
    model = make_variant("smart").apply(load_classifier(str(tiny_model), td, seed=0))
    model.train()  # dropout on: the replayed random state makes both passes use the same masks
    state = _rng_state(torch.device("cpu"))
    clean = model.inner(**batch).logits
    shape = (*batch["input_ids"].shape, model.config.hidden_size)
    zero = model.perturbed_logits(batch, [torch.zeros(shape)], state)
    assert divergence(zero, clean).item() == 0.0
    moved = model.perturbed_logits(batch, [torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5], state)
    assert divergence(moved, clean).item() > 1e-6
    # the symmetric KL against a hand formula
    p, q = F.softmax(moved.double(), -1), F.softmax(clean.double(), -1)
    by_hand = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert divergence(moved, clean).item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert labels is not None

    # the regulariser's gradient with respect to the perturbation, against finite differences (float64, eval)
    model.double().eval()
    batch = {k: v[:2] for k, v in batch.items()}
    shape = (*batch["input_ids"].shape, model.config.hidden_size)
    target = model.inner(**batch).logits.detach()
    delta = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.1).requires_grad_()

    def reg(d: torch.Tensor) -> torch.Tensor:  # symmetric_kl in float64 (divergence() casts to float32)
        lp, lq = F.log_softmax(model.perturbed_logits(batch, [d], state), -1), F.log_softmax(target, -1)
        return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()

    assert torch.autograd.gradcheck(reg, (delta,), eps=1e-6, atol=1e-5, fast_mode=True)
    got = symmetric_kl(model.perturbed_logits(batch, [delta], state), target).item()
    assert got == pytest.approx(reg(delta).item(), rel=1e-5)


def test_smart_with_lambda_zero_is_plain_training_bit_for_bit(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    kw = {"seeds": 1, "grid": GRID, "data_dir": data, "max_steps": 3, **FAST}
    plain = finetune(tiny_model, "cola", tmp_path / "a", variants="plain", **kw).seeds[0]
    zero = finetune(tiny_model, "cola", tmp_path / "b", variants="smart", lambda_s=0.0, **kw).seeds[0]
    on = finetune(tiny_model, "cola", tmp_path / "c", variants="smart", lambda_s=5.0, smart_epsilon=1e-2, **kw).seeds[0]
    a, b, c = _weights(plain.path), _weights(zero.path), _weights(on.path)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the regulariser does change training
    assert zero.metrics["settings"]["variant"]["lambda_s"] == 0.0
    bregman = finetune(tiny_model, "cola", tmp_path / "d", variants="smart", smart_bregman=True, **kw).seeds[0]
    assert bregman.variant == "smart-bregman" and "teacher" not in " ".join(_weights(bregman.path))


# ---------------------------------------------------------------- Siamese, embed-then-concat


def test_siamese_towers_share_weights_cosine_by_hand_checkpoint_extracts(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    td = probekit.load_task("rte", data)
    tok = load_tokenizer(str(tiny_model))
    split = td.splits["train"]
    variant = make_variant("siamese")
    model = variant.apply(load_classifier(str(tiny_model), td, seed=0))
    ds = variant.dataset(tok, split, 32, tok.pad_token_id, train=True)
    assert isinstance(ds, SidesDataset)
    batch = ds.collate(range(6))
    model.eval()
    out = model(**batch)
    # by hand: each sentence alone through the plain encoder, mean over its real tokens, cosine
    enc = AutoModel.from_pretrained(tiny_model).eval()
    cos = []
    for a, b in zip(split.texts[:6], split.text_pairs[:6], strict=True):
        u, v = (enc(**tok(s, return_tensors="pt")).last_hidden_state[0].mean(0).detach().numpy() for s in (a, b))
        cos.append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    np.testing.assert_allclose(out.logits.detach().numpy(), cos, atol=1e-5)
    # one encoder for both towers: the gradient of each tower's loss reaches the same parameters
    model.train()
    model(**batch).loss.backward()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.encoder.parameters())
    emb = model.encoder.embeddings.word_embeddings.weight.grad
    second_only = set(batch["pair_input_ids"].unique().tolist()) - set(batch["input_ids"].unique().tolist())
    assert emb is not None and all(emb[i].abs().sum() > 0 for i in second_only)

    run = finetune(tiny_model, "rte", tmp_path / "ft", seeds=1, grid=GRID, variants="siamese", data_dir=data, **FAST)
    best = run.seeds[0].path
    assert run.seeds[0].metrics["metric"] == "acc"
    assert AutoModel.from_pretrained(best).config.num_hidden_layers == 2
    with safe_open(str(best / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("classifier") for k in f.keys())  # noqa: SIM118 (no __iter__)
    [cache] = probekit.extract(best, [toy_senteval(tmp_path / "toy.txt")], tmp_path / "caches", progress=False)
    assert cache["train"].shape == (40, 3, 32)
    # composed with SMART: the perturbation reaches both towers (two embedding calls per pass)
    both = finetune(
        tiny_model, "rte", tmp_path / "ft", seeds=1, grid=GRID, variants="smart+siamese", data_dir=data, **FAST
    ).seeds[0]
    assert both.variant == "smart+siamese" and AutoModel.from_pretrained(both.path).config.num_hidden_layers == 2
    assert not all(
        torch.equal(a, b) for a, b in zip(_weights(best).values(), _weights(both.path).values(), strict=True)
    )
    with pytest.raises(ParamError, match="do not compose"):
        make_variant("siamese+embed-then-concat")
    with pytest.raises(ParamError, match="siamese needs a sentence-pair task; cola"):
        finetune(tiny_model, "cola", tmp_path / "x", seeds=1, grid=GRID, variants="siamese", data_dir=data, **FAST)


def test_siamese_threshold_is_cross_fitted() -> None:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, 40)
    y = (cos + rng.normal(0, 0.3, 40) > 0.1).astype(int)
    t = best_threshold(cos, y, accuracy_score)
    grid = np.sort(np.concatenate([cos - 1e-9, cos + 1e-9, [-2.0, 2.0]]))  # brute force
    assert accuracy_score(y, cos > t) == pytest.approx(max(accuracy_score(y, cos > g) for g in grid))
    pred = cross_fitted(cos, y, accuracy_score)
    even, odd = np.arange(0, 40, 2), np.arange(1, 40, 2)
    np.testing.assert_array_equal(pred[even], cos[even] > best_threshold(cos[odd], y[odd], accuracy_score))
    np.testing.assert_array_equal(pred[odd], cos[odd] > best_threshold(cos[even], y[even], accuracy_score))


def test_embed_then_concat_embeds_each_sentence_alone(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    td = probekit.load_task("rte", data)
    tok = load_tokenizer(str(tiny_model))
    split = td.splits["train"]
    model = load_classifier(str(tiny_model), td, seed=0).eval()
    batch = make_variant("embed-then-concat").dataset(tok, split, 32, tok.pad_token_id, train=True).collate(range(4))
    emb = model.base_model.embeddings
    joint = emb(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], token_type_ids=batch["token_type_ids"]
    )
    for row, (a, b) in enumerate(zip(split.texts[:4], split.text_pairs[:4], strict=True)):
        ia, ib = (tok(s, return_tensors="pt")["input_ids"] for s in (a, b))
        na, nb = ia.shape[1], ib.shape[1]
        torch.testing.assert_close(joint[row, :na], emb(input_ids=ia)[0])
        torch.testing.assert_close(joint[row, na : na + nb], emb(input_ids=ib)[0])
        assert batch["attention_mask"][row].sum() == na + nb
    typed = make_variant("embed-then-concat", concat_token_types="pair").dataset(
        tok, split, 32, tok.pad_token_id, train=True
    )
    t = typed.collate(range(4))
    na = len(tok(split.texts[0])["input_ids"])
    assert t["token_type_ids"][0, :na].sum() == 0 and t["token_type_ids"][0, na:].max() == 1
    run = finetune(tiny_model, "rte", tmp_path, seeds=1, grid=GRID, variants="embed-then-concat", data_dir=data, **FAST)
    assert AutoModel.from_pretrained(run.seeds[0].path).config.num_hidden_layers == 2


# ---------------------------------------------------------------- multi-objective


def test_multi_objective_splits_every_batch(tiny_model: Path, data: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, set, set]] = []
    forward = MultiObjective.forward

    def spy(self: MultiObjective, *args: object, **kwargs: object) -> object:
        out = forward(self, *args, **kwargs)
        if self.training:
            mlm, cls = (set(x.tolist()) for x in self.last_split)
            seen.append((len(kwargs["labels"]), mlm, cls))
        return out

    monkeypatch.setattr(MultiObjective, "forward", spy)
    for name in ("multi-objective", "multi-objective-extra-layer"):
        seen.clear()
        run = finetune(tiny_model, "cola", tmp_path / name, seeds=1, grid=GRID, variants=name, data_dir=data, **FAST)
        assert len(seen) == 2  # 32 examples, batches of 16
        for n, mlm, cls in seen:
            assert not mlm & cls and mlm | cls == set(range(n)) and len(mlm) == n // 2
        assert len({frozenset(m) for _, m, _ in seen}) == 2  # drawn anew per batch
        m = run.seeds[0].metrics
        assert m["runs"][0]["mlm_head"].startswith("random")  # the tiny BertModel has no MLM head
        with safe_open(str(run.seeds[0].path / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        assert not any("extra" in k or "mlm" in k for k in keys)
        assert 1 + max(int(k.split(".")[3]) for k in keys if ".layer." in k) == 2


def test_multi_objective_starts_from_the_pretrained_mlm_head(tmp_path: Path, data: Path) -> None:
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config())
    with torch.no_grad():
        for p in mlm.cls.parameters():
            p.add_(torch.randn_like(p))  # distinguishable from any fresh initialisation
    mlm.save_pretrained(tmp_path / "mlm")
    tiny_tokenizer().save_pretrained(tmp_path / "mlm")
    td = probekit.load_task("cola", data)
    saved = load_file(str(tmp_path / "mlm" / "model.safetensors"))
    for name in ("multi-objective", "multi-objective-extra-layer"):
        model = make_variant(name).apply(load_classifier(str(tmp_path / "mlm"), td, seed=0))
        assert model.head_source.startswith("pre-trained")
        head = model.mlm_head
        pre = "cls.predictions."
        torch.testing.assert_close(head.dense_weight[0], saved[pre + "transform.dense.weight"])
        torch.testing.assert_close(head.norm_weight[0], saved[pre + "transform.LayerNorm.weight"])
        torch.testing.assert_close(head.bias[0], saved[pre + "bias"])
        # the head predicts as BertForMaskedLM's own head does (same transform, tied decoder)
        h = torch.randn(5, 32)
        ours = head.transform(h.unsqueeze(0))[0] @ mlm.get_input_embeddings().weight.T + head.bias[0]
        torch.testing.assert_close(ours, mlm.cls(h), atol=1e-5, rtol=1e-5)
    fresh = make_variant("multi-objective").apply(load_classifier(str(make_tiny_bert(tmp_path / "b")), td, seed=0))
    assert fresh.head_source.startswith("random")


# ---------------------------------------------------------------- optimisers and the checkpoint rule


def test_optimizers_and_the_papers_checkpoint_rule(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    kw = {"seeds": 1, "data_dir": data, **FAST}
    runs = {
        o: finetune(tiny_model, "cola", tmp_path / o, grid=GRID, optimizer=o, max_steps=2, **kw).seeds[0]
        for o in ("adamw", "sgd", "rmsprop")
    }
    assert {o: r.metrics["hyperparameters"]["optimizer"] for o, r in runs.items()} == {o: o for o in runs}
    w = {o: _weights(r.path)["bert.encoder.layer.0.attention.self.query.weight"] for o, r in runs.items()}
    assert not torch.equal(w["adamw"], w["sgd"]) and not torch.equal(w["adamw"], w["rmsprop"])

    kw["logging_steps"] = 1
    paper = finetune(tiny_model, "cola", tmp_path / "paper", grid=Grid((16,), (1e-2,), 4), select="paper", **kw)
    m = paper.seeds[0].metrics
    assert m["select"]["rule"] == "paper" and "not below the training score" in m["select"]["reading"]
    evals = m["runs"][0]["evals"]
    assert len(evals) == 4 and all("train_mcc" in e for e in evals)
    admitted = [e for e in evals if e["mcc"] >= e["train_mcc"]]
    expect = max(admitted or evals, key=lambda e: e["mcc"])
    assert m["chosen"]["step"] == expect["step"] and m["chosen"]["value"] == expect["mcc"]
    best = finetune(tiny_model, "cola", tmp_path / "best", grid=Grid((16,), (1e-2,), 4), **kw).seeds[0].metrics
    assert best["select"]["rule"] == "best-dev" and "train_mcc" not in best["runs"][0]["evals"][0]
    assert best["chosen"]["value"] == max(e["mcc"] for e in best["runs"][0]["evals"])
    # scoring the training subset draws no random numbers: the rule changes which checkpoint, not the training
    assert best["runs"][0]["train_loss"] == m["runs"][0]["train_loss"]


# ---------------------------------------------------------------- multi-task


def test_multitask_every_head_trains_and_each_task_is_scored_on_its_own_dev_set(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    assert [t for t, _ in epoch_plan([48, 16], 16, "round-robin", 0, 0)] == [0, 1, 0, 1, 0, 1]
    assert sorted(t for t, _ in epoch_plan([48, 16], 16, "proportional", 0, 0)) == [0, 0, 0, 1]
    run = finetune_multitask(
        tiny_model, ["cola", "rte"], tmp_path, seeds=1, grid=Grid((16,), (1e-3,), 2), data_dir=data, threads=1
    )
    [seed] = run.seeds
    m = seed.metrics
    r = m["runs"][0]
    assert r["plan"] == {"cola": 6, "rte": 6} and r["batches_per_task"] == r["plan"]  # 3 rounds x 2 epochs
    assert [e["epoch"] for e in r["evals"]] == [1.0, 2.0]
    # by hand: the saved encoder and heads on each task's own dev set, scored with scikit-learn
    enc = AutoModel.from_pretrained(seed.path).eval()
    heads = load_file(str(seed.path / "heads.safetensors"))
    tok = tiny_tokenizer()
    for task, score in (("cola", matthews_corrcoef), ("rte", accuracy_score)):
        dev = probekit.load_task(task, data).splits["dev"]
        enc_in = tok(dev.texts, dev.text_pairs, padding=True, return_tensors="pt")
        with torch.no_grad():
            pooled = enc(**enc_in).pooler_output
        pred = (pooled @ heads[f"head.{task}.weight"].T + heads[f"head.{task}.bias"]).argmax(-1).numpy()
        metric = m["tasks"][task]["metric"]
        assert m["chosen"][f"{task}_{metric}"] == pytest.approx(score(dev.labels, pred), abs=1e-6)
    rows = run.results
    assert set(rows["finetune_task"]) == {"cola", "rte"} and set(rows["variant"]) == {"multitask"}
    with pytest.raises(ParamError, match="two or more tasks"):
        finetune_multitask(tiny_model, ["cola"], tmp_path / "x", data_dir=data)
    again = finetune_multitask(
        tiny_model, ["cola", "rte"], tmp_path, seeds=1, grid=Grid((16,), (1e-3,), 2), data_dir=data, threads=1
    )
    assert again.seeds[0].skipped
    base = ["finetune", "-m", str(tiny_model), "-o", str(tmp_path / "cli"), "--data-dir", str(data)]
    flags = ["-t", "cola", "-t", "rte", "--multitask", "--task-sampling", "proportional", "--seeds", "1"]
    cli = CliRunner().invoke(
        app, [*base, *flags, "--grid", "quick", "--epochs", "1", "--max-train-samples", "16", "--threads", "1"]
    )
    assert cli.exit_code == 0, cli.output
    assert "multi-task checkpoints" in cli.output and (tmp_path / "cli" / "multitask-cola+rte").is_dir()
