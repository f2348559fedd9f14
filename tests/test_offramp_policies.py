"""Exit policies against hand-computed cases: entropy values, confidence, patience counters,
Q-exit CDFs, PonderNet sampling, the PonderNet objective and DeeBERT's expected saving."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probekit.errors import ProbekitError
from probekit.offramp import expected_saving, make_policy, simulate, sweep
from probekit.offramp.heads import Record
from probekit.offramp.policies import (
    PolicyConfig,
    QExitPolicy,
    entropy,
    exit_histogram,
    geometric_prior,
    halting_distribution,
    parse_policies,
    ponder_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


def record_from_probs(probs: list[list[list[float]]], labels: list[int]) -> Record:
    """A record whose off-ramp outputs are log-probabilities ([N][L][C]); hidden states are zeros."""
    p = np.asarray(probs, dtype=np.float32)
    n, n_layers, _ = p.shape
    return Record(np.zeros((n, n_layers + 1, 4), np.float32), np.log(p), np.asarray(labels), regression=False)


# sample A grows confident, sample B stays unsure
PROBS = [
    [[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]],
    [[0.6, 0.4], [0.45, 0.55], [0.5, 0.5]],
]


def test_entropy_values_and_threshold() -> None:
    h = entropy(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [1 / 3, 1 / 3 + 1e-9]])))
    assert h[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert h[1].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), abs=1e-6)  # 0.3251
    rec = record_from_probs(PROBS, [0, 1])
    pol = make_policy("entropy", 3, 2)
    # H(A) = 0.693, 0.325, 0.056; H(B) = 0.673, 0.688, 0.693
    assert simulate(pol, rec, 0.4).tolist() == [2, 3]
    assert simulate(pol, rec, 0.68).tolist() == [2, 1]
    assert simulate(pol, rec, 0.7).tolist() == [1, 1]
    assert simulate(pol, rec, 0.05).tolist() == [3, 3]  # nothing below S: the last layer
    points = sweep(pol, rec, ["acc"], thresholds=[0.4, 0.7])
    # S=0.4: A exits at 2 (predicts 0, right), B at 3 (ties go to class 0: wrong)
    assert points[0].scores["acc"] == 0.5 and points[0].mean_exit_layer == 2.5
    assert points[1].scores["acc"] == 0.5  # at layer 1: A -> 0 (tie) right, B -> 0 wrong
    assert points[0].expected_saving(3) == pytest.approx(1 - 5 / 6)


def test_confidence_threshold() -> None:
    rec = record_from_probs(PROBS, [0, 1])
    pol = make_policy("confidence", 3, 2)
    assert simulate(pol, rec, 0.95).tolist() == [3, 3]
    assert simulate(pol, rec, 0.9).tolist() == [2, 3]
    assert simulate(pol, rec, 0.55).tolist() == [2, 1]
    assert pol.thresholds()[0] == 0.5 and pol.thresholds()[-1] == 1.0


def test_patience_counters() -> None:
    # predictions over 6 layers: 1 0 0 0 1 1 -> counters 0 0 1 2 0 1
    seq = [1, 0, 0, 0, 1, 1]
    probs = [[[0.2, 0.8] if c else [0.8, 0.2] for c in seq]]
    rec = record_from_probs(probs, [1])
    pol = make_policy("patience", 6, 2)
    assert [simulate(pol, rec, t)[0] for t in (0, 1, 2, 3)] == [1, 3, 4, 6]
    assert pol.thresholds() == [0, 1, 2, 3, 4, 5]


def test_patience_on_regression_uses_a_tolerance() -> None:
    preds = np.array([[1.0, 1.5, 1.55, 1.58, 3.0, 3.0]], np.float32)  # diffs .5 .05 .03 1.42 0
    rec = Record(np.zeros((1, 7, 4), np.float32), preds[..., None], np.array([1.6], np.float32), regression=True)
    pol = make_policy("patience", 6, 0, PolicyConfig(tolerance=0.1))
    assert [simulate(pol, rec, t)[0] for t in (0, 1, 2, 3)] == [1, 3, 4, 6]
    with pytest.raises(ProbekitError, match="regression task has none"):
        make_policy("entropy", 6, 0)


class TableQExit(QExitPolicy):
    """Q-exit with halting probabilities from a table ([N, L]) instead of a trained MLP."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.set_shape(len(table[0]), 2)
        self.table = torch.tensor(table)
        self.net_ = None

    def _lambda_step(self, net, layer, hidden, prev):  # type: ignore[no-untyped-def,override]
        return self.table[: len(hidden), layer - 1]


def test_q_exit_cdf_hand_computed() -> None:
    lam = [[0.2, 0.5, 0.5, 0.3]]
    p = halting_distribution(torch.tensor(lam))
    np.testing.assert_allclose(p.numpy(), [[0.2, 0.4, 0.2, 0.2]], atol=1e-6)  # last layer takes the rest
    rec = record_from_probs([[[0.5, 0.5]] * 4], [0])
    pol = TableQExit(lam)
    # CDF 0.2, 0.6, 0.8, 1.0
    assert [simulate(pol, rec, q)[0] for q in (0.1, 0.5, 0.7, 0.9, 0.99)] == [1, 2, 3, 4, 4]
    state = pol.start(1)
    cdf = []
    for layer in range(1, 5):
        pol.step(state, layer, torch.zeros(1, 2), torch.zeros(1, 4), torch.zeros(1, 4), 2.0)
        cdf.append(state["cdf"].item())
    np.testing.assert_allclose(cdf, [0.2, 0.6, 0.8, 1.0], atol=1e-6)


def test_q_exit_is_deterministic_where_pondernet_sampling_varies() -> None:
    rng = np.random.default_rng(0)
    n, n_layers, dim = 300, 4, 8
    hidden = rng.normal(size=(n, n_layers + 1, dim)).astype(np.float32)
    outputs = rng.normal(size=(n, n_layers, 2)).astype(np.float32)
    rec = Record(hidden, outputs, rng.integers(0, 2, n), regression=False)
    cfg = PolicyConfig(epochs=3)
    q = make_policy("qexit", n_layers, 2, cfg)
    q.fit(rec)
    assert all(np.array_equal(simulate(q, rec, 0.5, seed=s), simulate(q, rec, 0.5)) for s in range(3))
    pn = make_policy("pondernet", n_layers, 2, cfg)
    pn.fit(rec)
    draws = [simulate(pn, rec, 0.1, seed=s) for s in range(3)]
    assert not np.array_equal(draws[0], draws[1])
    assert np.array_equal(simulate(pn, rec, 0.1, seed=7), simulate(pn, rec, 0.1, seed=7))
    # sampling exit: the exit layer is distributed as p(i|x)
    many = Record(np.repeat(hidden[:1], 20000, 0), np.repeat(outputs[:1], 20000, 0), np.zeros(20000, int), False)
    freq = exit_histogram(simulate(pn, many, 0.1, seed=1), n_layers) / 20000
    p = halting_distribution(pn.lambdas(hidden[:1], 0.1))[0].numpy()
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_ponder_loss_and_prior() -> None:
    prior = geometric_prior(0.1, 4)
    np.testing.assert_allclose(prior.numpy(), [0.1, 0.09, 0.081, 0.729], atol=1e-6)
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    at_prior = ponder_loss(torch.full((1, 4), 0.1), losses, beta=0.5, prior_lambda=0.1)
    assert at_prior.item() == pytest.approx(float((prior * losses).sum()), abs=1e-5)  # KL = 0
    lam = torch.tensor([[0.5, 0.5, 0.5, 0.5]])  # p = .5 .25 .125 .125
    p = np.array([0.5, 0.25, 0.125, 0.125])
    kl = float((p * np.log(p / prior.numpy())).sum())
    expected = float((p * np.array([1, 2, 3, 4])).sum()) + 0.5 * kl
    assert ponder_loss(lam, losses, 0.5, 0.1).item() == pytest.approx(expected, abs=1e-5)


def test_learned_policies_learn_a_planted_signal() -> None:
    """The off-ramp is right exactly when hidden dim 0 is positive: LTE must find it."""
    rng = np.random.default_rng(1)
    n, n_layers, dim = 400, 3, 6
    hidden = rng.normal(size=(n, n_layers + 1, dim)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    correct = hidden[:, 1:, 0] > 0
    pred = np.where(correct, labels[:, None], 1 - labels[:, None])
    outputs = np.stack([pred == 0, pred == 1], -1).astype(np.float32) * 4 - 2
    rec = Record(hidden, outputs, labels, regression=False)
    cfg = PolicyConfig(epochs=60, batch_size=64)
    lte = make_policy("lte", n_layers, 2, cfg)
    lte.fit(rec)
    exits = simulate(lte, rec, 0.5)
    acc = (rec.predictions()[np.arange(n), exits - 1] == labels).mean()
    assert acc > 0.8 and exits.mean() < 2.0  # ideal: 7/8 right (all three wrong 1/8), mean exit 1.75
    assert lte.history_["lte"][-1] < lte.history_["lte"][0]
    q = make_policy("qexit", n_layers, 2, cfg)
    q.fit(rec)
    assert q.history_["qexit@0.1"][-1] < q.history_["qexit@0.1"][0]


def test_expected_saving_hand_computed() -> None:
    assert expected_saving(np.array([1, 2, 6, 6]), 6) == pytest.approx(1 - 15 / 24)  # 0.375
    assert expected_saving(np.array([6, 6]), 6) == 0.0
    assert exit_histogram(np.array([1, 2, 6, 6]), 6).tolist() == [1, 1, 0, 0, 0, 2]


def test_policy_names() -> None:
    assert parse_policies(None, regression=False) == ["entropy", "confidence", "patience", "lte", "pondernet", "qexit"]
    assert parse_policies("all", regression=True) == ["patience", "lte", "pondernet", "qexit"]
    assert parse_policies("PABEE, palbert,maxprob,fixed", regression=False) == [
        "patience",
        "qexit",
        "confidence",
        "fixed",
    ]
    with pytest.raises(ProbekitError, match="unknown exit policy 'nope'"):
        parse_policies("entropy,nope", regression=False)
