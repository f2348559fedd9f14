"""The GPU path checked in one run (``make gpu-check``): the GPU tests, then the GPU benchmarks, one record.

On a machine with one CUDA GPU and no network, in a few minutes:

1. the test suite's GPU tests (``tests/test_gpu.py``, marker ``gpu``): every GPU path against the CPU path
   (extraction in float32 / bf16 / fp16, out-of-memory back-off under a capped memory fraction, probe
   accuracy GPU vs CPU, MLM heads and off-ramps a few steps, bf16 fine-tuning that reloads, torchrun with
   NCCL), each test's figures recorded;
2. the benchmarks: extraction of 100k sentences of SentEval's token lengths through all 13 layers of a
   randomly initialised BERT-base (sentences/s, seconds, and the floor the FLOPs imply at the measured
   bf16 matrix-product rate); the full-size probe (100k x 13 x 768, the whole grid and the control, the
   linear protocol with 2 and 20 classes, the MLP for a few epochs); MLM-head throughput (all 13 heads,
   one pass); early exit, measured against expected savings at batch 1 and batched;
3. ``reports/gpu/<date>-<gpu>.json`` and ``.md`` (versions, device, every figure, pass/fail of every check)
   and a one-screen summary. Exit status 0 when every check passed, 1 otherwise; 2 (one line) without CUDA.

Targets printed against: 100k x 13 layers of BERT-base extraction in under 10 s; a full-size task probed
in under 5 s.

    python bench/gpu_check.py                  # everything (make gpu-check)
    python bench/gpu_check.py --skip-tests     # the benchmarks only
    python bench/gpu_check.py --n 20000        # a smaller extraction benchmark
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# SentEval's token lengths (specials included): MiniLM's (BERT's uncased WordPiece) tokenizer over the shared
# sample of the ten probing tasks, 23,199 sentences, mean 17.5 tokens
SENTEVAL_LENGTHS = {
    7: 716, 8: 944, 9: 1191, 10: 1231, 11: 1140, 12: 1231, 13: 1222, 14: 1198, 15: 1254, 16: 1248, 17: 1186,
    18: 1122, 19: 1097, 20: 1025, 21: 863, 22: 844, 23: 788, 24: 771, 25: 685, 26: 622, 27: 512, 28: 569,
    29: 513, 30: 458, 31: 317, 32: 206, 33: 126, 34: 69, 35: 27, 36: 13, 37: 9, 38: 2,
}  # fmt: skip
TARGETS = {"extraction_s": 10.0, "probe_s": 5.0}
DEVICE = "cuda"
"""Where the benchmarks run; ``--device cpu`` only smoke-tests this script (tiny sizes) on a machine without CUDA."""
NO_CUDA = "error: no CUDA GPU here (torch.cuda.is_available() is False); run make gpu-check on a machine with one"


def _vendored_platformdirs() -> str | None:
    """A GPU image may lack platformdirs (probekit.data needs it); pip vendors a copy: its folder, or None."""
    try:
        import platformdirs  # noqa: F401
    except ImportError:
        try:
            import pip

            return str(Path(pip.__file__).parent / "_vendor")
        except ImportError:
            return None
    return None


# ---------------------------------------------------------------- the GPU tests


def run_tests(timeout: int, env: dict[str, str]) -> list[dict[str, Any]]:
    """``pytest -m gpu tests/test_gpu.py``: one record per test (outcome, seconds, recorded figures)."""
    xml = Path(tempfile.mkdtemp()) / "gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += ["-o", "timeout=300", f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        return [{"name": "gpu tests", "outcome": "failed", "seconds": timeout, "message": f"timed out ({timeout} s)"}]
    if not xml.is_file():
        return [{"name": "gpu tests", "outcome": "failed", "seconds": 0, "message": tail}]
    checks = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "")[:600]
        props = {p.get("name"): _value(p.get("value")) for p in case.iter("property")}
        checks.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "figures": props,
                "message": message,
            }
        )
    if not checks:
        checks.append({"name": "gpu tests", "outcome": "failed", "seconds": 0, "message": tail})
    return checks


def _value(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except ValueError:
        try:
            return ast.literal_eval(text or "None")  # pytest writes str(value): tuples, True...
        except (ValueError, SyntaxError):
            return text


# ---------------------------------------------------------------- the benchmarks


def pseudo_tokenizer() -> Any:
    """A BERT-size (30,522) vocabulary of pseudo-words ``w0 w1 ...``, each one token."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(specials + [f"w{i}" for i in range(30522 - 5)])})


def senteval_length_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts whose token counts follow SentEval's (``SENTEVAL_LENGTHS``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.array(list(SENTEVAL_LENGTHS))
    p = np.array(list(SENTEVAL_LENGTHS.values()), dtype=float)
    drawn = rng.choice(lengths, size=n, p=p / p.sum()) - 2  # words = tokens - [CLS] - [SEP]
    words = rng.integers(0, 30517, size=int(drawn.sum()))
    out, at = [], 0
    for k in drawn:
        out.append(" ".join(f"w{w}" for w in words[at : at + k]))
        at += k
    return out


def sync() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


def matmul_tflops() -> float:
    """The bf16 matrix-product rate this GPU reaches (8192^3, mean of 10 after 3 warm-ups), TFLOP/s."""
    import torch

    size = 8192 if DEVICE != "cpu" else 512
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 10 * 2 * size**3 / (time.perf_counter() - t0) / 1e12


def bert_base(dtype: Any) -> Any:
    import torch
    from transformers import BertConfig, BertModel

    from probekit.backbone import Backbone

    torch.manual_seed(0)
    model = BertModel(BertConfig())
    return Backbone(model, pseudo_tokenizer(), name="bert-base-random", device=torch.device(DEVICE), dtype=dtype)


def bench_extraction(n: int, work: Path, peak_tflops: float) -> dict[str, Any]:
    """``extract_task`` of a SentEval-format file of ``n`` lines through random BERT-base on the GPU."""
    import numpy as np
    import torch

    from probekit.data import load_task
    from probekit.extraction import extract_task

    bb = bert_base(torch.bfloat16)
    texts = senteval_length_texts(n)
    n_tr, n_va = n * 8 // 10, n // 10
    tags = ["tr"] * n_tr + ["va"] * n_va + ["te"] * (n - n_tr - n_va)
    path = work / "synthetic_100k.txt"
    path.write_text(
        "".join(f"{t}\t{'OI'[i % 2]}\t{x}\n" for i, (t, x) in enumerate(zip(tags, texts, strict=True))), "utf-8"
    )
    warm = work / "warm.txt"
    warm.write_text(
        "".join(
            f"{t}\t{'OI'[i % 2]}\t{x}\n"
            for i, (t, x) in enumerate(
                zip(["tr", "va", "te"] * 700, texts[: max(30, min(2100, n // 10))], strict=False)
            )
        )
    )
    extract_task(bb, load_task(warm), work / "warm-cache", progress=False)  # CUDA context, kernels, allocator
    data = load_task(path)
    sync()
    t0 = time.perf_counter()
    cache = extract_task(bb, data, work / "cache", progress=False)
    wall = time.perf_counter() - t0
    tm = cache.manifest["timings"]
    gpu_s = tm["forward"] + tm["pool"]
    # FLOPs of the real (unpadded) tokens: per layer and token 24 d^2 (QKV, output, FFN) + 4 s d (attention);
    # every pseudo-word is one token, so a text's tokens are its words + [CLS] and [SEP]
    d, layers = 768, 12
    lens = np.array([len(t.split()) + 2 for t in texts])
    flops = float(layers * (24 * d * d * lens.sum() + 4 * d * (lens.astype(float) ** 2).sum()))
    floor = flops / (peak_tflops * 1e12)
    return {
        "sentences": n,
        "mean_tokens": float(lens.mean()),
        "compute_dtype": cache.manifest["compute_dtype"],
        "storage_dtype": cache.manifest["storage_dtype"],
        "wall_s": wall,
        "forward_pool_s": gpu_s,
        "timings": tm,
        "sent_per_s_wall": n / wall,
        "sent_per_s_gpu": n / gpu_s,
        "tflop": flops / 1e12,
        "flop_floor_s": floor,
        "achieved_tflops": flops / gpu_s / 1e12,
        "peak_rss_gib": _rss_gib(),
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE != "cpu" else None,
    }


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_probe(n: int = 100_000, n_eval: int = 10_000) -> dict[str, Any]:
    """The full-size probe on the GPU: 100k train, 10k dev, 10k test, 13 x 768, planted signal."""
    import torch

    from probekit.probes.layerwise import LayerwiseProbe

    def task(classes: int, n: int, seed: int) -> tuple[Any, Any]:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        y = torch.randint(0, classes, (n,), device=DEVICE, generator=g)
        x = torch.randn((n, 13, 768), device=DEVICE, generator=g)
        centres = torch.randn((classes, 768), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        x += 0.05 * torch.arange(13, device=DEVICE)[None, :, None] * centres[y][:, None, :]
        return x, y

    out: dict[str, Any] = {}
    small = task(2, 2000, 9)
    LayerwiseProbe(kind="linear", device=DEVICE).fit(small[0], small[1], small[0], small[1])  # warm-up
    for name, classes, kind, options in (
        ("linear_2_classes", 2, "linear", {}),
        ("linear_20_classes", 20, "linear", {}),
        ("mlp_2_classes_4_epochs", 2, "mlp", {"max_epoch": 4, "epoch_size": 4}),
    ):
        (x, y), (xd, yd), (xt, yt) = task(classes, n, 1), task(classes, n_eval, 2), task(classes, n_eval, 3)
        sync()
        t0 = time.perf_counter()
        lp = LayerwiseProbe(kind=kind, device=DEVICE, control=True, **options).fit(x, y, xd, yd)
        acc = lp.score(xt, yt)
        control = lp.score(xt, yt, control=True)
        sync()
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "shape": f"{n}x13x768 (+{n_eval} dev, {n_eval} test)",
            "grid": list(map(float, lp.estimator_.grid)),
            "control": True,
            "test_acc_first_last_layer": [float(acc[0]), float(acc[-1])],
            "control_acc_mean": float(control.mean()),
            "not_converged": int(lp.not_converged_),
        }
        del x, xd, xt, lp
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    return out


def bench_mlm(steps: int = 20) -> dict[str, Any]:
    """All 13 MLM heads of random BERT-base trained from one frozen forward pass per batch."""
    import torch

    from probekit.data.corpus import window_passages
    from probekit.mlm import MLMHeadProbe

    bb = bert_base(torch.bfloat16)
    windows = window_passages(bb.tokenizer, senteval_length_texts(20_000, seed=5), 128)
    MLMHeadProbe(steps=2, batch_size=32, max_length=128).fit(bb, windows)  # warm-up
    sync()
    probe = MLMHeadProbe(steps=steps, batch_size=32, max_length=128).fit(bb, windows)
    t = probe.timings_
    return {
        "heads": len(probe.layers_),
        "steps": steps,
        "batch": 32,
        "window": 128,
        "tokens": probe.tokens_,
        "tokens_per_s": probe.tokens_ / t["total"],
        "timings": t,
        "loss_first_last": [probe.loss_[0], probe.loss_[-1]],
    }


def bench_early_exit(n: int = 100) -> dict[str, Any]:
    """Every sample forced out at layer k (the fixed policy) against full inference, random BERT-base, fp32."""
    import torch
    from transformers import BertConfig, BertModel

    from probekit.encoding import tokenize
    from probekit.offramp import OffRampHeads, make_policy
    from probekit.offramp.inference import measure, warm_up

    torch.manual_seed(0)
    model = BertModel(BertConfig()).to(DEVICE).eval()
    tok = tokenize(pseudo_tokenizer(), senteval_length_texts(n, seed=7))
    heads = OffRampHeads(12, 768, 2).to(DEVICE).eval()
    fixed = make_policy("fixed", 12, 2)
    warm_up(model, heads, tok, 0, (1, 32), device=DEVICE)
    rows = []
    for k in (1, 3, 6, 9, 12):
        one, many = (measure(model, heads, tok, 0, fixed, k, bs, device=DEVICE, repeats=2) for bs in (1, 32))
        rows.append(
            {
                "exit_layer": k,
                "expected": 1 - k / 12,
                "batch_1": one.measured_saving,
                "batched_32": many.measured_saving,
                "full_s_batch_1": one.full_seconds,
                "full_s_batched": many.full_seconds,
            }
        )
    return {"sentences": n, "rows": rows}


def section(name: str, fn: Callable[[], Any], log: Callable[[str], None]) -> Any:
    """Run one benchmark; its failure is recorded (with the traceback's end) instead of ending the run."""
    t0 = time.perf_counter()
    log(f"bench {name} ...")
    try:
        result = fn()
        ok = True
    except Exception as e:  # one broken benchmark must not lose the others' figures
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        ok = False
    log(f"bench {name}: {'done' if ok else 'FAILED ' + result['error']} ({time.perf_counter() - t0:.1f} s)")
    return result


# ---------------------------------------------------------------- the record


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    from probekit._version import __version__

    return {
        "probekit": __version__,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def device_info() -> dict[str, Any]:
    import torch

    if DEVICE == "cpu":
        return {"name": f"cpu-smoke-{platform.machine()}", "count": 0}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "count": torch.cuda.device_count(),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def targets(bench: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ext = bench.get("extraction", {})
    if "forward_pool_s" in ext:
        scale = 100_000 / ext["sentences"]
        out.append(_target("100k x 13 layers extraction, GPU part (s)", ext["forward_pool_s"] * scale, "extraction_s"))
        out.append(
            _target("100k x 13 layers extraction, whole extract_task (s)", ext["wall_s"] * scale, "extraction_s")
        )
    for name, r in bench.get("probe", {}).items():
        if isinstance(r, dict) and "seconds" in r and name.startswith("linear"):
            out.append(_target(f"full-size probe, {name.replace('_', ' ')} (s)", r["seconds"], "probe_s"))
    return out


def _target(name: str, value: float, key: str) -> dict[str, Any]:
    return {"name": name, "value": round(value, 3), "target": TARGETS[key], "met": value < TARGETS[key]}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check {report['date']}: {report['device']['name']}", ""]
    lines += ["| version | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["versions"].items()] + [""]
    lines += ["## Checks (tests/test_gpu.py)", "", "| check | outcome | s | figures |", "|---|---|---|---|"]
    for c in report["checks"]:
        figs = "; ".join(f"{k}={v}" for k, v in c.get("figures", {}).items()) or c.get("message", "")[:200]
        lines.append(f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {figs} |")
    lines += ["", "## Targets", "", "| | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | < {t['target']} | {t['met']} |" for t in report["targets"]]
    lines += ["", "## Benchmarks", "", "```json", json.dumps(report["bench"], indent=1, default=str)[:20000], "```"]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    checks = report["checks"]
    passed = sum(c["outcome"] == "passed" for c in checks)
    out = [f"GPU check {report['date']} on {report['device']['name']} (torch {report['versions']['torch']})"]
    out.append(f"checks: {passed}/{len(checks)} passed")
    out += [f"  FAILED {c['name']}: {c.get('message', '')[:150]}" for c in checks if c["outcome"] == "failed"]
    b = report["bench"]
    ext = b.get("extraction", {})
    if "wall_s" in ext:
        out.append(
            f"extraction {ext['sentences']:,} sentences x 13 layers (BERT-base, {ext['compute_dtype']}): "
            f"GPU part {ext['forward_pool_s']:.2f} s ({ext['sent_per_s_gpu']:,.0f} sent/s), whole "
            f"{ext['wall_s']:.2f} s; FLOP floor {ext['flop_floor_s']:.2f} s at {b.get('matmul_tflops', 0):.0f} TFLOP/s"
        )
    for name, r in b.get("probe", {}).items():
        if isinstance(r, dict) and "seconds" in r:
            out.append(f"probe {name}: {r['seconds']:.2f} s")
    mlm = b.get("mlm", {})
    if "tokens_per_s" in mlm:
        out.append(f"MLM heads ({mlm['heads']}, one pass): {mlm['tokens_per_s']:,.0f} tokens/s")
    for r in b.get("early_exit", {}).get("rows", []):
        out.append(
            f"early exit k={r['exit_layer']:>2}: expected {r['expected']:.3f}, batch 1 {r['batch_1']:.3f}, "
            f"batched {r['batched_32']:.3f}"
        )
    for name in ("extraction", "probe", "mlm", "early_exit"):
        if isinstance(b.get(name), dict) and "error" in b[name]:
            out.append(f"bench {name} FAILED: {b[name]['error'][:150]}")
    out += [
        f"target {t['name']}: {t['value']} vs < {t['target']}: {'met' if t['met'] else 'MISSED'}"
        for t in report["targets"]
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "gpu", help="report folder (%(default)s)")
    ap.add_argument("--n", type=int, default=100_000, help="sentences in the extraction benchmark (%(default)s)")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--skip-bench", action="store_true", help="tests only")
    ap.add_argument("--test-timeout", type=int, default=300, help="seconds for the GPU tests (%(default)s)")
    ap.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test this script, tiny sizes, no tests"
    )
    args = ap.parse_args(argv)

    import torch

    global DEVICE
    DEVICE = args.device
    smoke = DEVICE == "cpu"
    if not smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    env = dict(os.environ)
    vendored = _vendored_platformdirs()
    if vendored:  # after everything installed: only what is missing is found there
        sys.path.append(vendored)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", ""), vendored) if p)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": device_info(),
        "checks": [],
        "bench": {},
    }
    if not args.skip_tests and not smoke:
        log("gpu tests ...")
        report["checks"] = run_tests(args.test_timeout, env)
        log(f"gpu tests: {sum(c['outcome'] == 'passed' for c in report['checks'])}/{len(report['checks'])} passed")
    if not args.skip_bench:
        with tempfile.TemporaryDirectory() as tmp:
            b = report["bench"]
            b["matmul_tflops"] = section("matmul", matmul_tflops, log)
            peak = b["matmul_tflops"] if isinstance(b["matmul_tflops"], float) else 790.0
            b["extraction"] = section("extraction", lambda: bench_extraction(args.n, Path(tmp), peak), log)
            b["probe"] = section("probe", lambda: bench_probe(*((2000, 500) if smoke else ())), log)
            b["mlm"] = section("mlm", lambda: bench_mlm(2 if smoke else 20), log)
            b["early_exit"] = section("early_exit", lambda: bench_early_exit(8 if smoke else 100), log)
    report["targets"] = targets(report["bench"])
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in report["device"]["name"]).strip("-").lower()
    stem = args.out / f"{report['date']}-{slug}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    print(summary(report))
    print(f"report: {stem}.json, {stem}.md ({report['seconds']:.0f} s)")
    failed = any(c["outcome"] == "failed" for c in report["checks"])
    failed |= any(isinstance(v, dict) and "error" in v for v in report["bench"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
