"""Contract checks over EVERY registered exit policy and off-ramp training method (in the spirit of
scikit-learn's estimator checks): defaults construct, configs round-trip through TOML, a fit on a tiny
input, rows that pass the results schema, online (early-exit inference) == offline (``simulate``) exits,
and resuming after an interruption gives the same rows. Plus the ``OffRamps`` estimator against a planted
signal and the run, and the no-pickle / resume-rule guarantees of the checkpoints."""

from __future__ import annotations

import contextlib
import pickle
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from probekit import load_backbone, results
from probekit.cache import LayerCache, find_caches
from probekit.cli import app
from probekit.config import Config, option
from probekit.encoding import encode, tokenize
from probekit.errors import ParamError, ProbekitError, ResumeError
from probekit.offramp import (
    EXIT_POLICIES,
    TRAINING_METHODS,
    MeasureConfig,
    OffRampConfig,
    OffRampHeads,
    OffRamps,
    Policy,
    PolicyConfig,
    early_exit,
    run_offramp,
    simulate,
)
from probekit.offramp import run as run_mod
from probekit.offramp import train as train_mod
from probekit.offramp.heads import record
from probekit.runs import Run
from tests.helpers import make_tiny_bert, random_sentence
from tests.test_offramp import toy_sst2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


def _toml_round_trip(cfg: Config) -> None:
    back = type(cfg).from_mapping(tomllib.loads(cfg.to_toml()))
    assert back == cfg and back.to_dict() == cfg.to_dict()


# ---------------------------------------------------------------- exit policies


@pytest.fixture(scope="module")
def exit_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny 3-layer BERT, off-ramps with spread-out outputs and their record on 10 texts."""
    bb = load_backbone(make_tiny_bert(tmp_path_factory.mktemp("tiny3"), layers=3, seed=5))
    rng = random.Random(4)
    texts = [random_sentence(rng, 1, 10) for _ in range(10)]
    labels = np.array([i % 2 for i in range(10)])
    torch.manual_seed(1)
    heads = OffRampHeads(3, 32, 2)
    for ramp in heads.ramps:
        torch.nn.init.normal_(ramp.classifier.weight, std=2.0)
    heads.eval()
    rec = record(heads, encode(bb, texts, pool="cls"), labels)
    return {"bb": bb, "texts": texts, "heads": heads, "rec": rec}


@pytest.mark.parametrize("name", EXIT_POLICIES.names())
def test_every_exit_policy_contract(name: str, exit_setup: dict[str, Any]) -> None:
    check_exit_policy(name, exit_setup)


def check_exit_policy(name: str, exit_setup: dict[str, Any]) -> None:
    """The contract of one registered exit policy (also run on a plugin's, below)."""
    cls = EXIT_POLICIES.get(name)
    cfg = cls.config_class()
    _toml_round_trip(cfg)
    policy = cls(cfg.replace(epochs=3))
    assert vars(policy) == {"config": cfg.replace(epochs=3)}  # __init__ only stores its options
    rec = exit_setup["rec"]
    assert policy.fit(rec) is policy
    assert policy.n_layers_ == 3 and policy.n_classes_ == 2
    bb, heads, texts = exit_setup["bb"], exit_setup["heads"], exit_setup["texts"]
    ts = policy.thresholds()
    for t in [ts[0], ts[len(ts) // 2], ts[-1]]:
        offline = simulate(policy, rec, t)
        assert ((offline >= 1) & (offline <= 3)).all()
        for i, text in enumerate(texts):  # batch size 1: sample i runs with seed 0 + i
            online = early_exit(bb.model, heads, tokenize(bb.tokenizer, [text]), 0, policy, t, seed=i)
            assert online.exit_layers[0] == simulate(policy, rec.subset(np.array([i])), t, seed=i)[0], (name, t, i)
            if not policy.stochastic:
                assert online.exit_layers[0] == offline[i], (name, t, i)
        if not policy.stochastic:  # batched: exited samples leave the batch, decisions unchanged
            batched = early_exit(bb.model, heads, tokenize(bb.tokenizer, texts), 0, policy, t, batch_size=4)
            assert batched.exit_layers.tolist() == offline.tolist(), (name, t)


@dataclass(frozen=True)
class MarginConfig(PolicyConfig):
    component: ClassVar[str] = "the margin policy"
    margin_scale: float = option(1.0, "Margin policy: scale of the thresholds.", gt=0)


class MarginPolicy(Policy):
    """Exit when the top-two probability margin reaches m (a plugin's policy with its own option)."""

    name = "margin"
    threshold_name = "m"
    classification_only = True
    config_class = MarginConfig

    def thresholds(self) -> list[float]:
        return [round(self.options.margin_scale * f, 6) for f in (0.0, 0.5, 1.0)]

    def step(self, state, layer, output, hidden, prev, threshold):  # type: ignore[no-untyped-def,override]
        top2 = torch.softmax(output.float(), dim=-1).topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) >= threshold


def test_a_registered_policy_with_its_own_option(
    exit_setup: dict[str, Any], tiny_model: Path, toy: Path, tmp_path: Path
) -> None:
    EXIT_POLICIES.register("margin", MarginPolicy)
    try:
        check_exit_policy("margin", exit_setup)
        run = _run(tiny_model, toy, tmp_path / "o", "frozen", policies="margin,entropy", margin_scale=0.5)
        pol = run.results[(run.results["source"] == "exit-policy") & (run.results["metric"] == "acc")]
        assert sorted(set(pol["policy"])) == ["entropy", "margin"]
        assert sorted(pol[pol["policy"] == "margin"]["threshold"]) == [0.0, 0.25, 0.5]
        assert run.policies["margin"].config.margin_scale == 0.5 and run.settings["policy"]["margin_scale"] == 0.5
    finally:
        EXIT_POLICIES.unregister("margin")


def test_policy_registry_names_aliases_and_errors() -> None:
    assert EXIT_POLICIES.canonical("PABEE") == "patience" and EXIT_POLICIES.canonical("palbert") == "qexit"
    with pytest.raises(ParamError, match="did you mean 'entropy'"):
        EXIT_POLICIES.get("entrop")
    with pytest.raises(ParamError, match="beta: must be >= 0"):
        PolicyConfig(beta=-1)


# ---------------------------------------------------------------- training methods

FAST = {"epochs": 1, "batch_size": 8, "policies": "entropy,lte", "measure": False, "checkpoint_every": 1}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_sst2(tmp_path_factory.mktemp("toy"), n_train=30, n_dev=10)


def _run(model: Path, data: Path, out: Path, method: str, **kw: Any) -> Run:
    return run_offramp(model, "sst2", out, method, data_dir=data, progress=False, **{**FAST, **kw})


def _interrupt(monkeypatch: pytest.MonkeyPatch, module: Any, attr: str, at: int) -> None:
    real = getattr(module, attr)
    calls = [0]

    def crash(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, crash)


@pytest.mark.parametrize("name", TRAINING_METHODS.names())
def test_every_training_method_contract(
    name: str, tiny_model: Path, toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = TRAINING_METHODS.get(name)
    cfg = cls.config_class()
    _toml_round_trip(cfg)
    for c in (OffRampConfig(), MeasureConfig()):
        _toml_round_trip(c)
    assert vars(cls(cfg)).get("config") == cfg
    whole = _run(tiny_model, toy, tmp_path / "whole", name)
    df = whole.results
    results.validate(df)
    assert set(df["mode"]) == {name} and set(df["probe"]) == {"offramp"}
    assert df[df["source"] == "offramp"]["layer"].tolist() == [1, 2]
    assert df[(df["source"] == "exit-policy") & (df["metric"] != "exit_fraction")]["layer"].isna().all()
    assert isinstance(whole, Run) and whole.paths["results"].is_file() and "train" in whole.timings
    assert whole.estimator.heads_ is whole.heads
    # interrupted mid-training (a fine-tuning method stops between checkpoints) and after training: the
    # rerun gives the same rows as the uninterrupted run
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt(m, train_mod, "collate", 3)
        with contextlib.suppress(KeyboardInterrupt):  # frozen never reaches the fine-tuning's collate
            _run(tiny_model, toy, out, name)
    with monkeypatch.context() as m:
        _interrupt(m, run_mod, "record", 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_model, toy, out, name)
    again = _run(tiny_model, toy, out, name)
    pd.testing.assert_frame_equal(again.results, df)


def test_fine_tuning_checkpoints_follow_the_resume_rule(tiny_model: Path, toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "joint"
    _run(tiny_model, toy, out, "joint")
    with pytest.raises(ResumeError, match=r"other settings \(train.epochs 1 -> 2\).*fresh") as err:
        _run(tiny_model, toy, out, "joint", epochs=2)
    assert "\n" not in str(err.value)
    run = _run(tiny_model, toy, out, "joint", epochs=2, fresh=True)
    assert run.settings["train"]["epochs"] == 2
    (out / "checkpoint-joint" / "state" / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ProbekitError, match="checkpoint .* is damaged") as err:
        _run(tiny_model, toy, out, "joint", epochs=2)
    assert "\n" not in str(err.value)
    (out / "checkpoint-joint" / "fingerprint.json").write_text("{", encoding="utf-8")
    with pytest.raises(ProbekitError, match="no readable fingerprint.json"):
        _run(tiny_model, toy, out, "joint", epochs=2)


class _Planted:
    """Unpickling this creates the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("filename", ["checkpoint-joint.pt", "offramps.pt"])
def test_an_old_pickle_checkpoint_is_refused_unread(tiny_model: Path, toy: Path, tmp_path: Path, filename: str) -> None:
    out = tmp_path / "o"
    out.mkdir()
    marker = tmp_path / "pwned"
    (out / filename).write_bytes(pickle.dumps({"key": "x", "model": _Planted(marker)}))
    args = ["offramp", "--model", str(tiny_model), "--task", "sst2", "--data-dir", str(toy), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--mode", "joint", "--epochs", "1", "--no-measure", "-q"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pickle checkpoint" in lines[0] and "--fresh" in lines[0], result.output
    assert not marker.exists()


def test_cli_method_alias_and_options(tiny_model: Path, toy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["offramp", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--mode", "--method", "--epochs", "--head-lr", "--beta", "--prior-lambda", "--time-n", "--fresh"):
        assert flag in help_text, flag
    assert all(n in help_text for n in EXIT_POLICIES.names()) and all(m in help_text for m in TRAINING_METHODS)
    base = ["offramp", "--model", str(tiny_model), "--task", "sst2", "--data-dir", str(toy), "-q", "--no-measure"]
    out = tmp_path / "m"
    result = runner.invoke(
        app, [*base, "--out", str(out), "--method", "frozen", "--epochs", "1", "--policies", "fixed"]
    )
    assert result.exit_code == 0, result.output
    assert set(results.load_results(out)["mode"]) == {"frozen"}
    result = runner.invoke(app, [*base, "--out", str(out), "--method", "frozn"])
    assert result.exit_code == 2 and "did you mean 'frozen'" in result.output
    result = runner.invoke(app, [*base, "--out", str(out), "--epochs", "0"])
    assert result.exit_code == 2 and "--epochs: must be >= 1" in result.output
    with pytest.raises(ParamError, match="is not an option of the off-ramp run"):
        run_offramp(tiny_model, "sst2", out, data_dir=toy, epochz=1)


# ---------------------------------------------------------------- the OffRamps estimator


def test_offramps_estimator_finds_a_planted_layer() -> None:
    """Labels are decodable from layer 2 only (dimension 0's sign); the other layers are noise."""
    rng = np.random.default_rng(0)
    n, d = 300, 8
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 4, d)).astype(np.float32)  # embeddings + 3 layers
    x[:, 2, 0] = np.where(y == 1, 1.0, -1.0) + 0.1 * rng.normal(size=n)
    ramps = OffRamps(epochs=30, batch_size=32, lr=1e-2)
    assert ramps.get_params()["epochs"] == 30 and not hasattr(ramps, "heads_")
    assert ramps.fit(x[:200], y[:200]) is ramps
    assert ramps.n_layers_ == 3 and ramps.n_classes_ == 2
    acc = ramps.score(x[200:], y[200:])
    assert acc.shape == (3,) and acc[1] > 0.95 and acc[0] < 0.75 and acc[2] < 0.75
    by_hand = (ramps.predict(x[200:]) == y[200:, None]).mean(0)
    np.testing.assert_allclose(acc, by_hand)
    df = results.tidy(ramps.rows(x[200:], y[200:], model="toy", task="planted"))
    results.validate(df)
    assert df["layer"].tolist() == [1, 2, 3] and set(df["mode"]) == {"frozen"}
    np.testing.assert_allclose(df["value"], acc)


def test_offramps_estimator_on_a_cache_equals_the_frozen_run(tiny_model: Path, toy: Path, tmp_path: Path) -> None:
    run = run_offramp(tiny_model, "sst2", tmp_path / "o", data_dir=toy, policies="fixed", measure=False, progress=False)
    (path,) = find_caches(tmp_path / "o" / "cache")
    cache = LayerCache.open(path)
    est = OffRamps(n_classes=2).fit(cache)  # the cache's train split and labels, the run's defaults
    layers = run.results[run.results["source"] == "offramp"]
    np.testing.assert_allclose(est.score(cache, split="dev"), layers["value"].to_numpy())
    again = run_offramp(
        tiny_model, "sst2", tmp_path / "e", OffRamps(), data_dir=toy, policies="fixed", measure=False, progress=False
    )
    pd.testing.assert_series_equal(
        again.results["value"], run.results["value"], check_names=False
    )  # an estimator object as the method
