"""The early-exit training methods (issue 14): on a tiny random BERT and a tiny ALBERT (shared layers), every
method's loss falls and its online early exit equals the offline decision for every policy; the PonderNet
objective, Q-exit, PABEE's weighted loss and BERxiT's LTE targets against hand computations; SLF's stage 1
touches only the layer in focus; regression exits; resume across phases and epochs; the comparison table."""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F
from transformers import AlbertConfig, AlbertModel
from typer.testing import CliRunner

from probekit import load_backbone
from probekit.cli import app
from probekit.encoding import collate, tokenize
from probekit.offramp import TRAINING_METHODS, OffRampHeads, early_exit, run_offramp, simulate
from probekit.offramp import train as train_mod
from probekit.offramp.compare import comparison_table
from probekit.offramp.exit_methods import first_tokens, layer_parameters, ponder_objective, slf_phases
from probekit.offramp.halting import Halting, lte_targets, pabee_loss
from probekit.offramp.heads import record
from probekit.offramp.inference import LayerStepper
from probekit.offramp.policies import PolicyConfig, PonderNetPolicy, QExitPolicy, halting_distribution
from probekit.offramp.train import TrainConfig, train_phases, trainable_copy
from probekit.suite import run_suite
from tests.helpers import make_tiny_bert, random_sentence, tiny_tokenizer, tiny_vocab, toy_senteval
from tests.test_offramp import toy_sst2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU

POLICIES = "entropy,confidence,patience,lte,pondernet,qexit"
QUICK = PolicyConfig(epochs=4)  # the post-hoc learned policies: a few epochs
FAST = {"epochs": 3, "batch_size": 8, "lr": 1e-3, "measure": False, "train_n": 40}


def make_tiny_albert(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """A randomly initialised tiny ALBERT (one shared layer group, 16-wide embeddings) with the tiny tokenizer."""
    torch.manual_seed(seed)
    config = AlbertConfig(
        vocab_size=len(tiny_vocab()),
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=layers,
        num_hidden_groups=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    AlbertModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "bert": make_tiny_bert(tmp_path_factory.mktemp("bert3"), layers=3, seed=2),
        "albert": make_tiny_albert(tmp_path_factory.mktemp("albert3")),
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_sst2(tmp_path_factory.mktemp("toy"), n_train=48, n_dev=10)


def test_albert_stepper_equals_output_hidden_states(models: dict[str, Path]) -> None:
    bb = load_backbone(models["albert"])
    tok = tokenize(bb.tokenizer, ["good cat sat", "a bad dog ran far away today"])
    batch = collate(tok, np.arange(2), 0, "cpu")
    with torch.no_grad():
        want = bb.model(**batch, output_hidden_states=True).hidden_states
        got = LayerStepper(bb.model).hidden_states(batch)
    mask = batch["attention_mask"].bool()
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[mask], w[mask], atol=1e-5, rtol=1e-5)


def _falls(history: dict[str, Any], method: str) -> None:
    """The method's own training loss is lower in its last epoch than in its first (per phase for SLF,
    per loss choice for Smart Alternating)."""
    if method == "slf":
        curve = history["slf"][-3:]  # the joint phase (3 epochs) after one epoch per layer in focus
    elif method == "smart-alternating":
        kinds = history["losses"]
        curve = [v for v, k in zip(history["smart-alternating"], kinds, strict=True) if k == kinds[0]]
    elif method == "deebert":
        assert history["stage 2"][-1] < history["stage 2"][0]
        curve = history["stage 1"]
    else:
        (curve,) = [v for k, v in history.items() if k != "losses"]
    assert len(curve) >= 2 and curve[-1] < curve[0], (method, history)


@pytest.mark.parametrize("arch", ["bert", "albert"])
@pytest.mark.parametrize("method", TRAINING_METHODS.names())
def test_every_method_trains_and_exits_online_as_offline(
    method: str, arch: str, models: dict[str, Path], toy: Path, tmp_path: Path
) -> None:
    run = run_offramp(
        models[arch], "sst2", tmp_path / "o", method, data_dir=toy, policies=POLICIES, policy=QUICK, progress=False,
        **FAST,
    )  # fmt: skip
    _falls(run.history, method)
    trained = set(run.settings["trained_policies"])
    want = {"berxit": {"lte"}, "pondernet": {"pondernet", "qexit"}, "palbert": {"pondernet", "qexit"}}
    assert trained == want.get(method, set())
    bb = load_backbone(models[arch])
    data = toy / "glue" / "SST-2" / "dev.tsv"
    texts = [line.rsplit("\t", 1)[0] for line in data.read_text(encoding="utf-8").splitlines()[1:]]
    rec, heads, encoder = run.dev, run.heads, run.encoder
    for name, pol in run.policies.items():
        ts = pol.thresholds()
        for t in sorted({ts[0], ts[len(ts) // 2]}):
            for i, text in enumerate(texts[:4]):  # batch size 1, sample i with seed i
                online = early_exit(encoder, heads, tokenize(bb.tokenizer, [text]), 0, pol, t, seed=i)
                offline = simulate(pol, rec.subset(np.array([i])), t, seed=i)
                assert online.exit_layers[0] == offline[0], (method, name, t, i)
            if not pol.stochastic:
                batched = early_exit(encoder, heads, tokenize(bb.tokenizer, texts), 0, pol, t, batch_size=4)
                assert batched.exit_layers.tolist() == simulate(pol, rec, t).tolist(), (method, name, t)


# ---------------------------------------------------------------- the objectives by hand


class _Forced(Halting):
    """A halting layer whose lambdas are given: [L] (the same for every example)."""

    def __init__(self, lambdas: list[float], hidden: int = 32) -> None:
        super().__init__(hidden)
        self.fixed = torch.tensor(lambdas)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.fixed.expand(len(states), -1).clone()

    def step(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        layer = self.calls % len(self.fixed)
        self.calls += 1
        return self.fixed[layer].expand(len(hidden))

    calls = 0


@pytest.fixture(scope="module")
def tiny_states(models: dict[str, Path]) -> dict[str, Any]:
    bb = load_backbone(models["bert"])
    rng = random.Random(3)
    texts = [random_sentence(rng, 2, 8) for _ in range(8)]
    tok = tokenize(bb.tokenizer, texts)
    batch = collate(tok, np.arange(len(texts)), 0, "cpu")
    with torch.no_grad():
        hs = bb.model(**batch, output_hidden_states=True).hidden_states
    torch.manual_seed(0)
    heads = OffRampHeads(3, 32, 2, dropout=0.0)
    for ramp in heads.ramps:
        torch.nn.init.normal_(ramp.classifier.weight, std=1.0)
    return {"bb": bb, "texts": texts, "hs": hs, "heads": heads.eval(), "y": torch.tensor([0, 1] * 4)}


def test_halting_distribution_sums_to_one() -> None:
    lam = torch.rand(50, 6)
    p = halting_distribution(lam)
    torch.testing.assert_close(p.sum(-1), torch.ones(50))
    assert (p >= 0).all()
    # by hand for one row: lambda_i prod_{j<i} (1 - lambda_j), the last layer the rest
    row, by_hand, survive = lam[0].tolist(), [], 1.0
    for i, v in enumerate(row):
        by_hand.append(survive if i == len(row) - 1 else v * survive)
        survive *= 1 - v
    np.testing.assert_allclose(p[0].numpy(), by_hand, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_forced_halt_at_layer_k(k: int, tiny_states: dict[str, Any]) -> None:
    """lambda = 0 below layer k and 1 at k: every example exits at k (sampling exit and Q-exit, offline and
    online), and the objective is layer k's loss plus beta * KL(one-hot(k) || prior) = -beta log prior_k."""
    heads, hs, y = tiny_states["heads"], tiny_states["hs"], tiny_states["y"]
    lambdas = [0.0] * (k - 1) + [1.0] + [0.5] * (3 - k)
    halting = _Forced(lambdas)
    beta, prior_lambda = 0.3, 0.2
    got = ponder_objective(heads, halting, hs, y, beta, prior_lambda)
    loss_k = F.cross_entropy(heads.ramps[k - 1](hs[k][:, 0]), y).item()
    prior = [prior_lambda * (1 - prior_lambda) ** (i - 1) for i in range(1, 3)] + [(1 - prior_lambda) ** 2]
    assert math.isclose(sum(prior), 1.0)
    assert got.item() == pytest.approx(loss_k - beta * math.log(prior[k - 1]), rel=1e-5)
    rec = record(heads, first_tokens(hs).numpy(), y.numpy())
    bb = tiny_states["bb"]
    for cls, t in ((PonderNetPolicy, prior_lambda), (QExitPolicy, 0.99)):
        pol = cls(PolicyConfig())
        assert pol.adopt(rec, {"halting": halting, "prior_lambda": prior_lambda})
        halting.calls = 0  # the stub counts layers
        assert (simulate(pol, rec, t) == k).all(), cls.name
        for i, text in enumerate(tiny_states["texts"][:3]):
            halting.calls = 0
            online = early_exit(bb.model, heads, tokenize(bb.tokenizer, [text]), 0, pol, t, seed=i)
            assert online.exit_layers[0] == k


def test_qexit_picks_the_first_layer_whose_cdf_reaches_q(tiny_states: dict[str, Any]) -> None:
    heads, hs, y = tiny_states["heads"], tiny_states["hs"], tiny_states["y"]
    halting = _Forced([0.2, 0.5, 0.3])  # p = 0.2, 0.4, 0.4 (the rest); CDF 0.2, 0.6, 1.0
    rec = record(heads, first_tokens(hs).numpy(), y.numpy())
    pol = QExitPolicy(PolicyConfig())
    pol.adopt(rec, {"halting": halting, "prior_lambda": 0.1})
    for q, layer in ((0.1, 1), (0.19, 1), (0.21, 2), (0.59, 2), (0.61, 3), (0.99, 3)):
        halting.calls = 0
        assert (simulate(pol, rec, q) == layer).all(), q


def test_pabee_weighted_loss_equals_a_hand_computation() -> None:
    losses = torch.rand(7, 4, dtype=torch.float64)
    num = sum((j + 1) * losses[:, j].mean().item() for j in range(4))
    assert pabee_loss(losses).item() == pytest.approx(num / (1 + 2 + 3 + 4))


def test_lte_targets_classification_and_regression() -> None:
    out = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.5]]])  # [B=2, L=2, C=2]
    y = torch.tensor([0, 0])
    assert lte_targets(out, y, regression=False).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    g = torch.tensor([[[1.5], [3.0]], [[0.2], [4.9]]])
    yr = torch.tensor([2.0, 5.0])
    want = [[1 - math.tanh(abs(1.5 - 2.0)), 1 - math.tanh(abs(3.0 - 2.0))], [1 - math.tanh(4.8), 1 - math.tanh(0.1)]]
    np.testing.assert_allclose(lte_targets(g, yr, regression=True).numpy(), want, rtol=1e-5, atol=1e-6)


def test_slf_stage1_changes_only_the_layer_in_focus(models: dict[str, Path], tmp_path: Path) -> None:
    bb = load_backbone(models["bert"])
    rng = random.Random(5)
    texts = [random_sentence(rng, 2, 8) for _ in range(16)]
    tok = tokenize(bb.tokenizer, texts)
    labels = np.array([i % 2 for i in range(16)])
    torch.manual_seed(0)
    heads = OffRampHeads(3, 32, 2)
    encoder = trainable_copy(bb.model)
    blocks = layer_parameters(encoder)
    focus = 1  # layer 2
    phase = slf_phases(heads, blocks, focus_epochs=2, epochs=1)[focus]
    before_enc = {k: v.clone() for k, v in encoder.state_dict().items()}
    before_heads = {k: v.clone() for k, v in heads.state_dict().items()}
    cfg = TrainConfig(batch_size=4, lr=1e-3)
    train_phases(encoder, torch.nn.ModuleDict({"heads": heads}), [(list(heads.parameters()), 1e-3)], [phase], tok,
                 labels, 0, cfg, progress=False)  # fmt: skip
    changed = {k for k, v in encoder.state_dict().items() if not torch.equal(v, before_enc[k])}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed), sorted(changed)
    changed = {k for k, v in heads.state_dict().items() if not torch.equal(v, before_heads[k])}
    assert changed and all(k.startswith("ramps.1.") for k in changed), sorted(changed)


# ---------------------------------------------------------------- regression, resume, the table


def _stsb(root: Path) -> Path:
    rng = random.Random(0)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", 40), ("dev", 12)):
        rows = [header]
        for i in range(n):
            a, b = random_sentence(rng, 2, 6), random_sentence(rng, 2, 6)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.2f}")
        path = root / "glue" / "STS-B" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("method", ["pabee", "berxit"])
def test_regression_exits_report_pearson_and_spearman(method: str, models: dict[str, Path], tmp_path: Path) -> None:
    data = _stsb(tmp_path / "data")
    opts = {**FAST, "measure": True, "time_n": 4, "time_thresholds": 2, "measure_batch_size": 2}
    run = run_offramp(models["bert"], "stsb", tmp_path / "o", method, data_dir=data, policies="patience,lte",
                      progress=False, **opts)  # fmt: skip
    df = run.results
    pol = df[(df["source"] == "exit-policy") & (df["metric"] != "exit_fraction")]
    assert set(pol["metric"]) == {"pearson", "spearman"} and set(pol["policy"]) == {"patience", "lte"}
    assert pol["value"].dropna().between(-1, 1).all()
    timed = pol[pol["measured_saving"].notna()]
    assert len(timed) and (timed["online_agreement"] == 1.0).all()
    assert ("lte" in run.settings["trained_policies"]) == (method == "berxit")
    assert set(pol[pol["native"].astype(bool)]["policy"]) == {"patience" if method == "pabee" else "lte"}


@pytest.mark.parametrize(("method", "at"), [("slf", 9), ("smart-alternating", 6), ("palbert", 5)])
def test_resume_across_phases_and_epochs(
    method: str, at: int, models: dict[str, Path], toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after a phase / epoch boundary (SLF's focus phases, Smart Alternating's switch), the rerun
    gives the rows of the uninterrupted run."""
    args = {"data_dir": toy, "policies": "entropy,qexit", "policy": QUICK, "progress": False, "checkpoint_every": 1}
    args.update(FAST)
    whole = run_offramp(models["bert"], "sst2", tmp_path / "whole", method, **args)
    real, calls = train_mod.collate, [0]

    def crash(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "collate", crash)
        with contextlib.suppress(KeyboardInterrupt):
            run_offramp(models["bert"], "sst2", tmp_path / "cut", method, **args)
    assert calls[0] == at  # it was interrupted
    again = run_offramp(models["bert"], "sst2", tmp_path / "cut", method, **args)
    pd.testing.assert_frame_equal(again.results, whole.results)


def test_comparison_table_by_hand() -> None:
    base = {"model": "m", "task": "rte", "split": "dev", "metric": "acc"}
    rows = []
    for seed, (full, score, saving, meas) in enumerate([(0.70, 0.68, 0.5, 0.4), (0.74, 0.70, 0.25, 0.2)]):
        for mode in ("deebert", "pabee"):
            rows.append({**base, "source": "offramp", "mode": mode, "seed": seed, "layer": 1, "value": 0.5})
            rows.append({**base, "source": "offramp", "mode": mode, "seed": seed, "layer": 2, "value": full})
        rows.append({**base, "source": "exit-policy", "mode": "pabee", "policy": "patience", "seed": seed,
                     "layer": None, "value": score, "threshold": 1.0, "chosen": True, "native": True,
                     "expected_saving": saving, "measured_saving": meas, "measured_saving_batched": meas})  # fmt: skip
        rows.append({**base, "source": "exit-policy", "mode": "pabee", "policy": "patience", "seed": seed,
                     "layer": None, "value": 0.1, "threshold": 0.0, "chosen": False, "native": True,
                     "expected_saving": 0.9, "measured_saving": 0.8, "measured_saving_batched": 0.8})  # fmt: skip
    table = comparison_table(pd.DataFrame(rows)).set_index("method")
    plain, pabee = table.loc["plain fine-tuning"], table.loc["pabee"]
    assert plain["score"] == pytest.approx(0.72) and plain["expected_speedup"] == 1.0
    assert pabee["score"] == pytest.approx(0.69) and pabee["score_sd"] == pytest.approx(np.std([0.68, 0.70], ddof=1))
    assert pabee["expected_speedup"] == pytest.approx((2.0 + 4 / 3) / 2)
    assert pabee["measured_speedup"] == pytest.approx((1 / 0.6 + 1 / 0.8) / 2) and pabee["seeds"] == 2


def test_cli_compares_methods_over_seeds(models: dict[str, Path], toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    base = ["offramp", "--model", str(models["bert"]), "--task", "sst2", "--data-dir", str(toy), "--out", str(out)]
    args = [*base, "--method", "deebert,pabee", "--seeds", "0,1", "--epochs", "1", "--batch-size", "8", "-q"]
    args += ["--time-n", "3", "--time-thresholds", "1", "--policies", "entropy,patience", "--time-policies", "native"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "comparison.csv")
    assert {"plain fine-tuning", "deebert", "pabee"} <= set(table["method"]) and (table["seeds"] == 2).all()
    ramps = pd.read_parquet(out / "results.parquet")
    last = ramps[(ramps["source"] == "offramp") & (ramps["mode"] == "deebert") & (ramps["layer"] == 3)]
    timed = ramps[ramps["measured_saving"].notna()]
    assert set(map(tuple, timed[["mode", "policy"]].drop_duplicates().to_numpy())) == {
        ("deebert", "entropy"),
        ("pabee", "patience"),
    }  # --time-policies native: each method's own policy only
    plain = table[table["method"] == "plain fine-tuning"]["score"].item()
    assert plain == pytest.approx(last["value"].mean())
    assert "| pabee | patience | 2 |" in (out / "comparison.md").read_text(encoding="utf-8")
    bad = CliRunner().invoke(app, [*base, "--method", "deebert,pabe", "--no-measure"])
    assert bad.exit_code == 2 and "did you mean 'pabee'" in bad.output, bad.output
    bad = CliRunner().invoke(app, [*base, "--method", "pabee", "--seeds", "0,x"])
    assert bad.exit_code == 2 and "--seeds" in bad.output, bad.output


SUITE = """
name = "cmp"
out = "runs/cmp"
data_dir = "data"
threads = 1

[model]
name = "tiny"
path = "{model}"

[probe]
tasks = ["toy_a.txt"]
max_length = 32

[offramp]
tasks = ["sst2"]
modes = ["deebert", "pabee"]
policies = "entropy,patience"
epochs = 1
batch_size = 8
measure = false
"""


def test_suite_offramp_table_writes_the_comparison(models: dict[str, Path], tmp_path: Path) -> None:
    toy_sst2(tmp_path / "data", n_train=30, n_dev=8)
    toy_senteval(tmp_path / "toy_a.txt", seed=1)
    path = tmp_path / "cmp.toml"
    path.write_text(SUITE.format(model=models["bert"]), encoding="utf-8")
    run = run_suite(path, progress=False)
    assert ("offramp", "ran") in [(s.step, s.status) for s in run.steps]
    table = pd.read_csv(tmp_path / "runs" / "cmp" / "offramp" / "sst2" / "comparison.csv")
    assert {"plain fine-tuning", "deebert", "pabee"} <= set(table["method"])
    page = (tmp_path / "runs" / "cmp" / "report" / "index.html").read_text(encoding="utf-8")
    assert "fig-methods-vs-saving" in page and "offramp-comparison" in page
