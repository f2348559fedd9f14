"""SentEval, exactly: the original engine (../shared/third_party/SentEval) run inside the tests as the reference.

- the batched ``senteval`` protocol against a per-layer, per-L2 loop of SentEval's classifier written plainly here;
- the compatibility shim: SentEval's own ``SE(...).eval("BigramShift")`` on the CPU with a probekit batcher;
- parity on real MiniLM features of three shared tasks, every layer, subsampled to 200 train / 100 dev / 200 test
  rows per task (the first rows of each split of the shared sample) to keep the engine's time short;
- the protocol presets: ``jawahar2019`` refuses a mean-pooled cache, the ``protocol`` column and its migration.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import probekit
from probekit.cache import LayerCache
from probekit.cli import app
from probekit.errors import ConvergenceWarning, ProbekitError
from probekit.extraction import extract
from probekit.probes.layerwise import LayerwiseProbe
from probekit.probes.order import cache_order
from probekit.probes.predictions import load_predictions
from probekit.probes.protocols import make_protocol
from probekit.results import load_results, validate
from probekit.senteval import cache_batcher, load_senteval, model_batcher, run_engine
from probekit.suite import load_suite
from tests.helpers import run_probe_suite, senteval_classifier, toy_senteval

REPO = Path(__file__).resolve().parents[1]
PARITY_TASKS = ("bigram_shift", "past_present", "subj_number")
SAMPLE = {"tr": 200, "va": 100, "te": 200}


@pytest.fixture(scope="session")
def senteval_path() -> Path:
    path = Path(os.environ.get("PROBEKIT_SENTEVAL", REPO.parent / "shared" / "third_party" / "SentEval"))
    if not (path / "senteval" / "engine.py").is_file():
        pytest.skip(f"SentEval's code not found at {path} (set PROBEKIT_SENTEVAL)")
    return path


# ---------------------------------------------------------------- the batched protocol against a plain loop


def plain_senteval(x, y, xd, yd, xt, yt, l2: float, seed: int = 1111) -> tuple[float, float]:
    """SentEval's classifier written out (:func:`tests.helpers.senteval_classifier`): best dev and its test accuracy."""
    best, model = senteval_classifier(x, y, xd, yd, l2, int(y.max()) + 1, seed)
    with torch.no_grad():
        return best, float((model(xt).argmax(1) == yt).float().mean())


def test_batched_senteval_protocol_equals_a_plain_per_layer_per_l2_loop() -> None:
    rng = np.random.default_rng(0)
    n, d, k, layers = (240, 80, 160), 12, 3, 3
    centres = rng.normal(size=(k, d))
    splits = []
    for m in n:
        y = rng.integers(0, k, m)
        x = np.stack([centres[y] * s + rng.normal(size=(m, d)) for s in (0.2, 0.5, 1.0)], axis=1)  # [m, L, D]
        splits.append((x.astype(np.float32), y))
    (x, y), (xd, yd), (xt, yt) = splits
    order = rng.permutation(n[0])  # SentEval's row order: row order[j] is its j-th
    grid = (1e-5, 1e-4, 1e-3, 1e-2)
    lp = LayerwiseProbe(kind="mlp", nhid=0, grid=grid, control=False, device="cpu").fit(x, y, xd, yd, order=order)
    test = lp.score(xt, yt)
    for layer in range(layers):
        t = [torch.from_numpy(a) for a in (x[order, layer], y[order], xd[:, layer], yd, xt[:, layer], yt)]
        runs = [plain_senteval(*t, l2=l2) for l2 in grid]
        dev = [round(100 * r[0], 2) for r in runs]
        best = int(np.argmax(dev))  # SentEval: the first best rounded dev score
        assert lp.best_reg_[layer] == grid[best], (layer, dev, lp.dev_scores_[layer])
        assert abs(100 * test[layer] - 100 * runs[best][1]) <= 0.5
        np.testing.assert_allclose(100 * lp.dev_scores_[layer, 0], [100 * r[0] for r in runs], atol=0.5)


def test_the_step_s_cpu_product_is_a_batched_matrix_product() -> None:
    from probekit.probes.mlp import batched_matmul

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 7, 5)), rng.normal(size=(3, 7, 4))
    want = np.einsum("lbd,lbk->ldk", a, b)  # a transposed: the gradient's product, a strided view
    for dtype in (torch.float32, torch.float64, torch.bfloat16):  # bfloat16: NumPy has none, torch's own bmm
        at, bt = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
        got = batched_matmul(at.transpose(1, 2), bt).double().numpy()
        np.testing.assert_allclose(got, want, rtol=0.05 if dtype == torch.bfloat16 else 1e-5, atol=0.05)


def test_the_logistic_step_trains_on_one_thread_and_gives_the_threads_back() -> None:
    """Torch's and OpenBLAS's thread pools spin against each other on thousands of tiny products (51.6 s against
    2.9 s for one task on the 2-core CPU): the logistic step runs on one thread of each, read off the libraries
    (threadpoolctl) while it trains; the MLP (torch's autograd, faster on more threads) and the caller keep theirs."""
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 2, 8)).astype(np.float32), rng.integers(0, 2, 60)

    def blas() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    for nhid, want in ((0, 1), (5, 2)):
        seen: list[tuple[int, set[int]]] = []
        before = torch.get_num_threads()
        with threadpool_limits(2, user_api="blas"):
            torch.set_num_threads(2)
            try:
                probe = LayerwiseProbe(kind="mlp", nhid=nhid, grid=(1e-3,), device="cpu", control=False)
                record = lambda e, r, seen=seen: seen.append((torch.get_num_threads(), blas()))  # noqa: E731
                probe.fit(x, y, x[:20], y[:20], callback=record)
                after = (torch.get_num_threads(), blas())
            finally:
                torch.set_num_threads(before)
        assert seen and all(t == want and b == {want} for t, b in seen), (nhid, seen)
        assert after == (2, {2})


@pytest.mark.parametrize("path", ["numpy", "torch", "optimizer"])
@pytest.mark.parametrize("k", [2, 3])
def test_the_logistic_step_is_adam_on_the_mean_cross_entropy_with_coupled_decay(path: str, k: int) -> None:
    """The written-out step (NumPy on the CPU, torch elsewhere, torch.optim.Adam without the fused kernel) against
    autograd on each problem's mean cross-entropy plus its own L2 as Adam's weight_decay, problem by problem; a layer
    left out by ``keep`` (its problems stopped) keeps the state it had, the others train on."""
    from probekit.probes.mlp import _LinearStep

    rng = np.random.default_rng(2)
    n_layers, n, d, decays = 3, 50, 6, (1e-3, 1e-1)
    x = torch.from_numpy(rng.normal(size=(n_layers, n, d)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, k, n))
    w0 = torch.from_numpy(rng.normal(size=(n_layers, d, len(decays) * k)).astype(np.float32))
    b0 = torch.from_numpy(rng.normal(size=(n_layers, 1, len(decays) * k)).astype(np.float32))
    onehot = F.one_hot(y, k).float().repeat(1, len(decays))
    decay = torch.tensor(decays).repeat_interleave(k)[None, None]
    step = _LinearStep([w0.clone(), b0.clone()], decay, 1e-2, k, x, onehot, use_numpy=path == "numpy")
    assert step.numpy == (path == "numpy")
    if path == "optimizer":
        step.opt = torch.optim.Adam([step.buf], lr=1e-2)
    batches = [torch.from_numpy(rng.permutation(n)[:16]) for _ in range(5)]
    for i, idx in enumerate(batches):
        if i == 3:
            step.keep(torch.tensor([True, False, True]))  # layer 1 stops after 3 steps
        step(idx)
    step.sync()
    for layer in range(n_layers):
        steps = 3 if layer == 1 and path != "optimizer" else 5  # torch's optimiser keeps every layer (documented)
        for q, wd in enumerate(decays):
            cols = slice(q * k, (q + 1) * k)
            w = w0[layer, :, cols].clone().requires_grad_()
            b = b0[layer, 0, cols].clone().requires_grad_()
            opt = torch.optim.Adam([w, b], lr=1e-2, weight_decay=wd)
            for idx in batches[:steps]:
                opt.zero_grad()
                F.cross_entropy(x[layer, idx] @ w + b, y[idx]).backward()
                opt.step()
            torch.testing.assert_close(step.params[0][layer, :, cols], w.detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(step.params[1][layer, 0, cols], b.detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the engine itself


def test_senteval_engine_runs_on_cpu_with_a_probekit_batcher(
    senteval_path: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """SentEval's own SE(params, batcher, prepare).eval("BigramShift") on Python 3.11+ without CUDA, fed from a
    probekit cache; its numbers are the ``senteval`` protocol's (same seed)."""
    data = toy_senteval(tmp_path / "tasks" / "probing" / "bigram_shift.txt", n=(80, 30, 40))
    (cache,) = extract(tiny_model, [data], out=tmp_path / "caches", progress=False, device="cpu")
    senteval = load_senteval(senteval_path)
    prepare, batcher = cache_batcher(cache, 2)
    params = {"task_path": str(tmp_path / "tasks"), "usepytorch": True, "kfold": 10}
    params["classifier"] = {"nhid": 0, "optim": "adam", "batch_size": 64, "tenacity": 5, "epoch_size": 4}
    res = senteval.engine.SE(params, batcher, prepare).eval("BigramShift")
    assert res["ndev"] == 30 and res["ntest"] == 40
    lp = LayerwiseProbe(kind="mlp", nhid=0, control=False, device="cpu")
    lp.fit(
        cache["train"], cache.labels("train"), cache["dev"], cache.labels("dev"), layers=[2], order=cache_order(cache)
    )
    assert abs(100 * lp.dev_scores_[0, 0].max() - res["devacc"]) <= 0.5
    assert abs(100 * lp.score(cache["test"], cache.labels("test"))[0] - res["acc"]) <= 0.5


# ---------------------------------------------------------------- parity on real features


@pytest.fixture(scope="session")
def parity_caches(minilm: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LayerCache]:
    root = tmp_path_factory.mktemp("senteval-parity")
    files = []
    for task in PARITY_TASKS:
        kept, seen = [], dict.fromkeys(SAMPLE, 0)
        for line in (shared_data / "senteval" / "probing" / f"{task}.txt").read_text(encoding="utf-8").splitlines():
            tag = line.split("\t")[0]
            if seen[tag] < SAMPLE[tag]:
                kept.append(line)
                seen[tag] += 1
        path = root / "probing" / f"{task}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(kept) + "\n", encoding="utf-8")
        files.append(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract(minilm, files, out=root / "caches", progress=False, device="cpu", batch_size=64)
    finally:
        torch.set_num_threads(threads)


_ENGINE: dict[tuple[str, str], dict[int, float]] = {}


def engine_test(cache: LayerCache, protocol: str, senteval_path: Path) -> dict[int, float]:
    key = (str(cache.path), protocol)
    if key not in _ENGINE:
        rows = run_engine(cache, None, protocol, senteval_path=senteval_path)
        _ENGINE[key] = {r["layer"]: r["value"] for r in rows if r["split"] == "test"}
    return _ENGINE[key]


def _diffs(cache: LayerCache, protocol: str, senteval_path: Path) -> np.ndarray:
    theirs = engine_test(cache, protocol, senteval_path)
    res = probekit.probe(cache, seeds=[0], control=False, progress=False, device="cpu", protocol=protocol).results
    test = res[(res["metric"] == "acc") & (res["split"] == "test")]
    assert set(test["protocol"]) == {protocol} and sorted(test["layer"]) == list(range(cache.n_layers))
    return np.array([100 * (v - theirs[int(layer)]) for layer, v in zip(test["layer"], test["value"], strict=True)])


def test_senteval_sklearn_protocol_matches_the_engine_on_minilm(
    parity_caches: list[LayerCache], senteval_path: Path
) -> None:
    diffs = np.concatenate([_diffs(c, "senteval-sklearn", senteval_path) for c in parity_caches])
    assert len(diffs) == 3 * 7
    assert np.abs(diffs).mean() <= 0.5, diffs


def test_senteval_protocol_matches_the_engine_on_minilm(parity_caches: list[LayerCache], senteval_path: Path) -> None:
    diffs = np.concatenate([_diffs(c, "senteval", senteval_path) for c in parity_caches])
    assert len(diffs) == 3 * 7
    assert np.abs(diffs).mean() <= 1.0 and np.abs(diffs).max() <= 3.0, diffs


def test_conneau2018_within_the_engine_s_seed_spread(parity_caches: list[LayerCache], senteval_path: Path) -> None:
    """Conneau et al.'s tuning (here nhid 50 x dropout 0/0.1 x L2, on past_present's layers 1 and 5 to keep the
    engine's time short): the engine run once per configuration and seed (1111, 1112, 1113), the best dev kept."""
    cache = next(c for c in parity_caches if c.task == "past_present")
    layers = [1, 5]
    configs = [{"nhid": 50, "dropout": 0.0}, {"nhid": 50, "dropout": 0.1}]
    engine = np.zeros((3, len(layers)))
    for s in range(3):
        runs = [run_engine(cache, layers, "senteval", 1111 + s, senteval_path, classifier=c) for c in configs]
        for j, layer in enumerate(layers):
            picked = [{r["split"]: r["value"] for r in run if r["layer"] == layer} for run in runs]
            best = int(np.argmax([round(100 * p["dev"], 2) for p in picked]))
            engine[s, j] = 100 * picked[best]["test"]
    res = probekit.probe(
        cache, seeds=[0], control=False, progress=False, device="cpu", protocol="conneau2018",
        nhid_grid=[50], dropout_grid=[0.0, 0.1],
    ).results  # fmt: skip
    test = res[(res["metric"] == "acc") & (res["split"] == "test")].set_index("layer")
    ours = 100 * test.loc[layers, "value"].to_numpy()
    one = 100 / SAMPLE["te"]  # one test example
    assert ((ours >= engine.min(0) - one) & (ours <= engine.max(0) + one)).all(), (ours, engine)
    assert np.abs(ours - engine[0]).max() <= 0.5  # the same seed: SentEval's numbers
    assert set(test["dropout"]) <= {0.0, 0.1} and "nhid" not in test.columns  # the options tuned: dropout
    # run_engine with the protocol itself (what senteval-check runs) keeps, per layer, the option set selected above
    tuned = make_protocol("conneau2018", nhid_grid=[50], dropout_grid=[0.0, 0.1])
    rows = run_engine(cache, layers, tuned, 1111, senteval_path)
    got = {r["layer"]: r for r in rows if r["split"] == "test"}
    np.testing.assert_allclose([100 * got[x]["value"] for x in layers], engine[0])
    assert all(got[x]["protocol"] == "conneau2018" and got[x]["nhid"] == 50 for x in layers)


# ---------------------------------------------------------------- presets, column, CLI


def test_jawahar2019_refuses_a_mean_pooled_cache_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    (cache,) = extract(tiny_model, [toy_senteval(tmp_path / "toy.txt")], out=tmp_path / "c", progress=False)
    result = CliRunner().invoke(app, ["probe", str(cache.path), "-o", str(tmp_path / "r"), "--protocol", "jawahar2019"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--pool cls" in result.output and "mean-pooled" in result.output
    assert not (tmp_path / "r" / "results.parquet").exists()
    result = CliRunner().invoke(
        app, ["probe", str(cache.path), "-o", str(tmp_path / "r"), "--protocol", "senteval", "--probe", "linear"]
    )
    assert result.exit_code == 2 and "error: --probe: the senteval protocol trains the mlp probe" in result.output


def test_jawahar2019_first_round_only_trains_one_round(tiny_model: Path, tmp_path: Path) -> None:
    (cache,) = extract(tiny_model, [toy_senteval(tmp_path / "t.txt")], out=tmp_path / "c", pool="cls", progress=False)
    run = probekit.probe(cache, protocol="jawahar2019", first_round_only=True, device="cpu", progress=False)
    assert run.estimator.kind_ == "mlp" and (run.estimator.n_iter_ == 4).all()  # one epoch_size round
    assert set(run.results["protocol"]) == {"jawahar2019"}
    assert '"protocol_first_round_only": true' in run.results["settings"].iloc[0]


def test_old_tables_migrate_linear_rows_to_senteval_sklearn(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"model": "m", "task": "t", "layer": [1, 1], "split": "test", "metric": "acc", "value": [0.5, 0.6]}
        | {"source": "probe", "probe": ["linear", "mlp"]}
    )
    df.to_csv(tmp_path / "results.csv", index=False)
    back = load_results(tmp_path / "results.csv")
    assert back["protocol"].tolist()[0] == "senteval-sklearn" and pd.isna(back["protocol"].tolist()[1])


def test_model_batcher_encodes_what_the_cache_holds(tiny_model: Path, tmp_path: Path) -> None:
    """The batcher made from a model gives the features probekit's extraction cached for the same sentences."""
    data = toy_senteval(tmp_path / "toy.txt")
    (cache,) = extract(tiny_model, [data], out=tmp_path / "c", progress=False, device="cpu", storage_dtype="float32")
    words = [line.split("\t")[-1].split() for line in data.read_text(encoding="utf-8").splitlines()[:5]]
    _, from_model = model_batcher(tiny_model, 1, device="cpu")
    _, from_cache = cache_batcher(cache, 1)
    np.testing.assert_allclose(from_model(None, words), from_cache(None, words), atol=1e-5)


@pytest.mark.parametrize("name", ["senteval-sklearn", "senteval", "conneau2018", "jawahar2019"])
def test_every_protocol_fits_writes_valid_rows_and_resumes(name: str, tiny_model: Path, tmp_path: Path) -> None:
    (cache,) = extract(tiny_model, [toy_senteval(tmp_path / "t.txt")], out=tmp_path / "c", pool="cls", progress=False)
    opts = {} if name == "senteval-sklearn" else {"max_epoch": 8}  # a short run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        run = probekit.probe(cache, protocol=name, device="cpu", progress=False, out=tmp_path / "r", **opts)
        validate(run.results)
        assert set(run.results["protocol"]) == {name} and run.details["fitted"] == 1
        again = probekit.probe(cache, protocol=name, device="cpu", progress=False, out=tmp_path / "r", **opts)
    assert again.details["reused"] == 1 and again.details["fitted"] == 0
    if name != "senteval-sklearn":
        assert set(run.results["probe"]) == {"mlp"}


def test_protocols_of_one_kind_keep_their_own_predictions(tiny_model: Path, tmp_path: Path) -> None:
    """conneau2018 and jawahar2019 are both MLP probes: one OUT keeps a predictions file per protocol, and
    each file's per-layer test accuracy is the one its rows report."""
    (cache,) = extract(tiny_model, [toy_senteval(tmp_path / "t.txt")], out=tmp_path / "c", pool="cls", progress=False)
    out = tmp_path / "r"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in ("conneau2018", "jawahar2019"):
            probekit.probe(cache, protocol=name, device="cpu", progress=False, out=out, max_epoch=4)
    preds = {p.probe: p for p in load_predictions(out)}
    assert set(preds) == {"conneau2018", "jawahar2019"}
    rows = load_results(out)
    for name, p in preds.items():
        acc = rows[(rows["protocol"] == name) & (rows["split"] == "test") & (rows["metric"] == "acc")]
        by_layer = acc.set_index("layer")["value"]
        assert p.accuracy("test") == pytest.approx(by_layer.loc[p.layers].to_numpy())


def test_a_suite_probes_with_a_protocol(tiny_model: Path, tmp_path: Path) -> None:
    probe_rows = run_probe_suite(tmp_path, tiny_model, 'protocol = "senteval"\nmax_epoch = 8\n')
    assert set(probe_rows["protocol"]) == {"senteval"} and set(probe_rows["probe"]) == {"mlp"}
    suite = tmp_path / "study.toml"
    bad = suite.read_text(encoding="utf-8").replace('protocol = "senteval"', 'protocol = "senteval"\nkind = "linear2"')
    suite.write_text(bad, encoding="utf-8")
    with pytest.raises(ProbekitError, match="kind"):
        load_suite(suite)


def test_senteval_check_cli_prints_both_and_writes_tidy_rows(
    senteval_path: Path, tiny_model: Path, tmp_path: Path
) -> None:
    data = toy_senteval(tmp_path / "d" / "bigram_shift.txt", n=(60, 20, 30))
    (cache,) = extract(tiny_model, [data], out=tmp_path / "c", progress=False, device="cpu")
    args = ["senteval-check", str(cache.path), "--layers", "1,2", "--senteval", str(senteval_path), "-q"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "probekit vs SentEval" in result.output and "mean |diff|" in result.output
    rows = load_results(tmp_path / "r")
    validate(rows)
    assert set(rows["source"]) == {"probe", "senteval"} and set(rows["layer"]) == {1, 2}
    assert set(rows["protocol"]) == {"senteval"}
    # probekit fitted the chosen layers only, with the numbers of its all-layer fit on them
    full = probekit.probe(cache, seeds=[0], control=False, device="cpu", protocol="senteval", progress=False).results
    key = ["layer", "split", "metric"]
    mine = rows[rows["source"] == "probe"].set_index(key)["value"].sort_index()
    want = full[full["layer"].isin([1, 2]) & (full["metric"] == "acc")].set_index(key)["value"].sort_index()
    pd.testing.assert_series_equal(mine, want)
    bad = CliRunner().invoke(app, [*args[:2], "--layers", "9", "--senteval", str(senteval_path)])
    assert bad.exit_code == 2 and "--layers" in bad.output and bad.output.count("\n") == 1
    missing = CliRunner().invoke(app, ["senteval-check", str(cache.path), "--senteval", str(tmp_path)])
    assert missing.exit_code == 2 and "not a SentEval checkout" in missing.output
    cls_only = CliRunner().invoke(app, [*args[:2], "--protocol", "jawahar2019", "--senteval", str(senteval_path)])
    assert cls_only.exit_code == 2 and "--pool cls" in cls_only.output and cls_only.output.count("\n") == 1
