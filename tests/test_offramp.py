"""Off-ramps on tiny random encoders: the layer-by-layer stepper, real early exit (layer counts
and predictions), DeeBERT stage 2, resumable fine-tuning, and the CLI end to end."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
)
from typer.testing import CliRunner

from probekit import load_backbone, load_results
from probekit.cli import app
from probekit.encoding import encode, tokenize
from probekit.errors import ProbekitError
from probekit.offramp import LayerStepper, OffRampHeads, TrainConfig, early_exit, make_policy, run_offramp, simulate
from probekit.offramp import train as train_mod
from probekit.offramp.heads import record
from probekit.offramp.policies import Policy
from probekit.offramp.train import deebert_stage2, read_checkpoint, train_encoder_with_offramps, trainable_copy
from tests.helpers import make_tiny_bert, random_sentence

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny4"), layers=4, seed=3)


def toy_sst2(root: Path, n_train: int = 60, n_dev: int = 24, seed: int = 0) -> Path:
    """An SST-2-format task (header ``sentence label``) with a planted word signal."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            rows.append(f"{random_sentence(rng, 2, 8)} {'good' if y else 'bad'} {random_sentence(rng, 0, 3)} \t{y}")
        path = root / "glue" / "SST-2" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "make",
    [
        lambda: BertModel(BertConfig(**SMALL)),
        lambda: RobertaModel(RobertaConfig(**SMALL, pad_token_id=1)),
        lambda: ElectraModel(ElectraConfig(**SMALL, embedding_size=16)),  # has an embeddings projection
        lambda: DistilBertModel(
            DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=64)
        ),
    ],
    ids=["bert", "roberta", "electra", "distilbert"],
)
def test_stepper_equals_output_hidden_states(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = model.config.pad_token_id or 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = LayerStepper(model).hidden_states(batch)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[mask.bool()], w[mask.bool()], atol=1e-5, rtol=1e-5)


def test_stepper_rejects_other_architectures() -> None:
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32))
    with pytest.raises(ProbekitError, match="BERT-family encoders .*GPT2Model"):
        LayerStepper(model)


def _exit_setup(model_dir: Path, n: int = 14):  # type: ignore[no-untyped-def]
    """A tiny 4-layer BERT, off-ramps with spread-out outputs, their record and an entropy threshold
    that sends samples out at several layers (in the widest gap of the layer-1 entropies)."""
    bb = load_backbone(model_dir)
    rng = random.Random(1)
    texts = [random_sentence(rng, 1, 12) for _ in range(n)]
    labels = np.array([i % 2 for i in range(n)])
    torch.manual_seed(0)
    heads = OffRampHeads(4, 32, 2, dropout=0.1)
    for ramp in heads.ramps:
        torch.nn.init.normal_(ramp.classifier.weight, std=2.0)
    heads.eval()
    rec = record(heads, encode(bb, texts, pool="cls"), labels)
    from probekit.offramp.policies import entropy

    ent = np.sort(entropy(torch.from_numpy(rec.outputs[:, 0])).numpy())  # layer 1: about half leave there
    gap = int(np.argmax(np.diff(ent[len(ent) // 4 : 3 * len(ent) // 4]))) + len(ent) // 4
    threshold = float((ent[gap] + ent[gap + 1]) / 2)
    return bb, texts, heads, rec, threshold


def test_early_exit_runs_exactly_k_layers_and_matches_the_record(tiny4: Path) -> None:
    bb, texts, heads, rec, threshold = _exit_setup(tiny4)
    policy = make_policy("entropy", 4, 2)
    offline = simulate(policy, rec, threshold)
    assert len(set(offline.tolist())) >= 2, offline  # samples leave at different layers
    calls: list[int] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: calls.append(len(i[0]))) for blk in bb.model.encoder.layer]
    try:
        for i, text in enumerate(texts):  # batch size 1, as in DeeBERT
            calls.clear()
            run = early_exit(bb.model, heads, tokenize(bb.tokenizer, [text]), 0, policy, threshold)
            k = int(offline[i])
            assert run.exit_layers[0] == k
            assert len(calls) == k == run.layer_calls  # exactly k layers ran
            np.testing.assert_allclose(run.outputs[0], rec.outputs[i, k - 1], atol=1e-4)
            assert run.outputs[0].argmax() == rec.predictions()[i, k - 1]
        calls.clear()  # batched: exited samples leave the batch
        run = early_exit(bb.model, heads, tokenize(bb.tokenizer, texts), 0, policy, threshold, batch_size=5)
        assert run.exit_layers.tolist() == offline.tolist()
        assert sum(calls) == int(offline.sum()) == run.layer_calls
        np.testing.assert_allclose(run.outputs, rec.outputs[np.arange(len(texts)), offline - 1], atol=1e-4)
        calls.clear()  # full inference runs every layer for everyone
        full = early_exit(bb.model, heads, tokenize(bb.tokenizer, texts), 0, None, batch_size=5)
        assert sum(calls) == 4 * len(texts) and full.exit_layers.tolist() == [4] * len(texts)
        np.testing.assert_allclose(full.outputs, rec.outputs[:, -1], atol=1e-4)
    finally:
        for h in hooks:
            h.remove()


def _toy_tok(bb, n: int = 24):  # type: ignore[no-untyped-def]
    rng = random.Random(2)
    texts = [random_sentence(rng) for _ in range(n)]
    return texts, tokenize(bb.tokenizer, texts), np.array([i % 2 for i in range(n)])


def test_deebert_stage2_leaves_encoder_and_last_ramp_bit_identical(tiny_model: Path) -> None:
    bb = load_backbone(tiny_model)
    texts, tok, labels = _toy_tok(bb)
    encoder = trainable_copy(bb.model)
    torch.manual_seed(0)
    heads = OffRampHeads(2, 32, 2)
    cfg = TrainConfig(epochs=1, batch_size=8, checkpoint_every=1000)
    train_encoder_with_offramps(encoder, heads, tok, labels, 0, cfg, ramps=[1], progress=False)  # stage 1
    from probekit.backbone import Backbone
    from probekit.data import Split

    tuned = Backbone(model=encoder, tokenizer=bb.tokenizer, name="tuned")
    before_enc = {k: v.clone() for k, v in encoder.state_dict().items()}
    before_heads = {k: v.clone() for k, v in heads.state_dict().items()}
    deebert_stage2(tuned, heads, Split(texts, labels), cfg, progress=False)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before_enc[k]), k
    after = heads.state_dict()
    for k, v in after.items():
        if k.startswith("ramps.1."):
            assert torch.equal(v, before_heads[k]), k
    assert not torch.equal(after["ramps.0.dense.weight"], before_heads["ramps.0.dense.weight"])


def test_finetune_resumes_after_interruption(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = load_backbone(tiny_model)
    _, tok, labels = _toy_tok(bb)
    cfg = TrainConfig(epochs=2, batch_size=8, checkpoint_every=2)

    def fresh():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return trainable_copy(bb.model), OffRampHeads(2, 32, 2)

    enc_a, heads_a = fresh()
    train_encoder_with_offramps(enc_a, heads_a, tok, labels, 0, cfg, progress=False)
    enc_b, heads_b = fresh()
    calls = [0]
    real = train_mod.collate

    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "collate", crash)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_encoder_with_offramps(enc_b, heads_b, tok, labels, 0, cfg, checkpoint=ckpt, progress=False)
    assert read_checkpoint(ckpt)["step"] == 2
    monkeypatch.setattr(train_mod, "collate", real)
    enc_c, heads_c = fresh()
    train_encoder_with_offramps(enc_c, heads_c, tok, labels, 0, cfg, checkpoint=ckpt, progress=False)
    for a, c in ((enc_a, enc_c), (heads_a, heads_c)):
        for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
            assert torch.equal(va, vc), k


def test_cli_end_to_end_frozen(tiny_model: Path, tmp_path: Path) -> None:
    data = toy_sst2(tmp_path / "data")
    out = tmp_path / "res"
    result = CliRunner().invoke(
        app,
        [
            "offramp",
            "--model",
            str(tiny_model),
            "--task",
            "sst2",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--time-n",
            "8",
            "--time-thresholds",
            "2",
            "--measure-batch-size",
            "4",
            "--name",
            "tiny",
            "--figures",
            str(tmp_path / "figs"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    df = load_results(out)
    layers = df[df["source"] == "offramp"]
    assert layers["layer"].tolist() == [1, 2] and set(layers["metric"]) == {"acc"}
    assert set(layers["mode"]) == {"frozen"} and (layers["n"] == 24).all()
    pol = df[df["source"] == "exit-policy"]
    assert set(pol["policy"]) == {"entropy", "confidence", "patience", "lte", "pondernet", "qexit"}
    scores = pol[pol["metric"] == "acc"]
    assert scores["layer"].isna().all() and scores["value"].between(0, 1).all()
    assert scores["expected_saving"].between(0, 0.5).all()  # at most 1 - 1/L
    assert scores["mean_exit_layer"].between(1, 2).all()
    hist = pol[pol["metric"] == "exit_fraction"]
    sums = hist.groupby(["policy", "threshold"])["value"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    timed = scores[scores["measured_saving"].notna()]
    assert set(timed["policy"]) == set(scores["policy"]) and timed["measured_saving_batched"].notna().all()
    deterministic = timed[timed["policy"] != "pondernet"]
    assert (deterministic["online_agreement"] == 1.0).all()
    for name in ("layers", "tradeoff", "exits", "savings"):
        assert (tmp_path / "figs" / f"offramp_sst2_tiny_frozen_{name}.png").is_file(), name
    assert (out / "offramps.safetensors").is_file() and (out / "records.npz").is_file()
    # a second run reuses the feature cache
    caches = list((out / "cache").rglob("manifest.json"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime
    run_offramp(tiny_model, "sst2", out, data_dir=data, measure=False, progress=False, policy_names="entropy")
    assert caches[0].stat().st_mtime == mtime


def test_deebert_and_joint_modes(tiny_model: Path, tmp_path: Path) -> None:
    data = toy_sst2(tmp_path / "data", n_train=40, n_dev=12)
    cfg = TrainConfig(epochs=1, batch_size=8)
    dee = run_offramp(
        tiny_model,
        "sst2",
        tmp_path / "dee",
        mode="deebert",
        data_dir=data,
        train=cfg,
        policy_names="entropy,patience,qexit",
        measure=False,
        progress=False,
    )
    stage1 = read_checkpoint(tmp_path / "dee" / "checkpoint-deebert-stage1")
    for k, v in dee.encoder.state_dict().items():  # stage 2 left the stage-1 encoder as it was
        assert torch.equal(v, stage1["model"][k]), k
    for k, v in dee.heads.ramps[-1].state_dict().items():
        assert torch.equal(v, stage1["heads"][f"ramps.1.{k}"]), k
    assert not torch.equal(dee.heads.ramps[0].dense.weight, stage1["heads"]["ramps.0.dense.weight"])
    joint = run_offramp(
        tiny_model,
        "sst2",
        tmp_path / "joint",
        mode="joint",
        data_dir=data,
        train=cfg,
        policy_names="patience",
        measure=False,
        progress=False,
    )
    frozen = load_backbone(tiny_model).model.state_dict()
    changed = [k for k, v in joint.encoder.state_dict().items() if not torch.equal(v, frozen[k])]
    assert changed  # the encoder was trained
    assert set(joint.results["mode"]) == {"joint"} and set(dee.results["mode"]) == {"deebert"}


def test_cli_user_errors(tiny_model: Path, tmp_path: Path) -> None:
    data = toy_sst2(tmp_path / "data", n_train=10, n_dev=4)
    base = ["offramp", "--model", str(tiny_model), "--data-dir", str(data), "--out", str(tmp_path / "o"), "-q"]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--task", "sst2", "--policies", "entropy,sometimes"])
    assert result.exit_code == 2 and "unknown exit policy 'sometimes'" in result.output
    result = runner.invoke(app, [*base, "--task", "sst2", "--holdout", "0", "--policies", "lte"])
    assert result.exit_code == 2 and "need held-out training examples" in result.output


class LongestLeaveFirst(Policy):
    """Exits, at layer 1, the ``threshold`` first rows of a batch (the longest: batches are length-sorted)."""

    name = "longest-first"

    def start(self, n, device="cpu", seed=0):  # type: ignore[no-untyped-def,override]
        return {"pos": torch.arange(n)}

    def step(self, state, layer, output, hidden, prev, threshold):  # type: ignore[no-untyped-def,override]
        return (state["pos"] < threshold) & (layer == 1)


def test_batched_exit_trims_the_padding_of_the_samples_left(tiny4: Path) -> None:
    """When the longest samples leave, the batch shrinks to the longest one left: outputs do not change."""
    bb, texts, heads, rec, _ = _exit_setup(tiny4)
    tok = tokenize(bb.tokenizer, texts)
    longest = set(np.argsort(-tok.lengths, kind="stable")[:3].tolist())
    rest = sorted(set(range(len(texts))) - longest)
    assert tok.lengths[rest].max() < tok.lengths.max()
    widths: list[int] = []
    hook = bb.model.encoder.layer[1].register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    try:
        run = early_exit(bb.model, heads, tok, 0, LongestLeaveFirst().set_shape(4, 2), 3, batch_size=len(texts))
    finally:
        hook.remove()
    want = np.array([1 if i in longest else 4 for i in range(len(texts))])
    assert run.exit_layers.tolist() == want.tolist()
    assert widths == [int(tok.lengths[rest].max())]  # layer 2 ran on the rest only, padding trimmed
    np.testing.assert_allclose(run.outputs, rec.outputs[np.arange(len(texts)), want - 1], atol=1e-4)


def test_regression_task_stsb(tiny_model: Path, tmp_path: Path) -> None:
    """STS-B: a regression head, Pearson/Spearman, and only the policies that need no class probabilities."""
    rng = random.Random(0)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", 40), ("dev", 12)):
        rows = [header]
        for i in range(n):
            a, b = random_sentence(rng, 2, 6), random_sentence(rng, 2, 6)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.2f}")
        path = tmp_path / "data" / "glue" / "STS-B" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run = run_offramp(
        tiny_model,
        "stsb",
        tmp_path / "out",
        data_dir=tmp_path / "data",
        measure_n=6,
        measure_points=1,
        measure_batch_size=3,
        progress=False,
    )
    df = run.results
    assert run.heads.regression and run.heads.n_out == 1
    assert set(df[df["source"] == "offramp"]["metric"]) == {"pearson", "spearman"}
    pol = df[(df["source"] == "exit-policy") & (df["metric"] != "exit_fraction")]
    assert set(pol["policy"]) == {"patience", "lte", "pondernet", "qexit"}
    assert pol["value"].dropna().between(-1, 1).all()
    timed = pol[pol["measured_saving"].notna()]
    assert (timed[timed["policy"] != "pondernet"]["online_agreement"] == 1.0).all()
