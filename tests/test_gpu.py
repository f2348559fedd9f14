"""Every GPU path against the CPU path (issue 16). Marked ``gpu``: skipped with a reason without CUDA;
``make gpu-check`` (``bench/gpu_check.py``) runs them on a GPU machine and records their figures
(``record_property``: max abs diffs, relative errors, accuracy moves) in its report.

Tiny random encoders only (no pretrained weights, no network on a GPU machine). Each test compares the
GPU result with the CPU one, or with an independent computation, so each can fail.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModel

import probekit.encoding as encoding_mod
from probekit.backbone import load_backbone
from probekit.cache import LayerCache
from probekit.encoding import encode, tokenize
from probekit.extraction import extract
from probekit.finetune import Grid, finetune
from probekit.mlm import MLMHeadProbe
from probekit.offramp import OffRamps, make_policy
from probekit.offramp.inference import early_exit
from probekit.probes.layerwise import LayerwiseProbe
from probekit.probes.run import probe
from tests.helpers import WORDS, make_tiny_bert, write_senteval
from tests.test_finetune import write_cola

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
Record = Callable[[str, Any], None]


def planted_task(path: Path, n: tuple[int, int, int] = (400, 150, 250), seed: int = 0) -> Path:
    """Label I when the sentence holds "cat", O otherwise: a random encoder's features carry it."""
    rng = random.Random(seed)
    rows = []
    for tag, count in zip(("tr", "va", "te"), n, strict=True):
        for i in range(count):
            words = [rng.choice(WORDS[4:]) for _ in range(rng.randint(3, 14))]
            if i % 2:
                words[rng.randrange(len(words))] = "cat"
            rows.append((tag, "I" if i % 2 else "O", " ".join(words)))
    return write_senteval(path, rows)


@pytest.fixture(scope="module")
def model4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 64-wide random BERT."""
    return make_tiny_bert(tmp_path_factory.mktemp("gpu-bert"), layers=4, hidden=64)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(300)]


def rel_error_per_layer(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """||x - ref|| / ||ref|| per layer (Frobenius norm over texts and features)."""
    return np.linalg.norm((x - ref).transpose(1, 0, 2).reshape(ref.shape[1], -1), axis=1) / np.linalg.norm(
        ref.transpose(1, 0, 2).reshape(ref.shape[1], -1), axis=1
    )


def test_float32_extraction_matches_cpu(model4: Path, texts: list[str], record_property: Record) -> None:
    cpu = encode(load_backbone(model4, device="cpu", dtype="float32"), texts)
    gpu_bb = load_backbone(model4, device="cuda", dtype="float32")
    assert gpu_bb.device.type == "cuda" and next(gpu_bb.model.parameters()).is_cuda
    gpu = encode(gpu_bb, texts)
    diff = float(np.abs(gpu - cpu).max())
    record_property("float32_max_abs_diff", diff)
    assert diff < 1e-4, diff
    # batch composition does not matter on the GPU either: one text at a time gives the same rows
    single = encode(gpu_bb, texts[:20], batch_size=1)
    assert float(np.abs(single - cpu[:20]).max()) < 1e-4


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_half_precision_extraction_error_and_probe_accuracy(
    model4: Path, tmp_path: Path, dtype: str, bound: float, record_property: Record
) -> None:
    """Per-layer relative error of bf16/fp16 features against float32, and the probe accuracy it moves."""
    task = planted_task(tmp_path / "cat.txt")
    [c32] = extract(
        model4, [task], tmp_path / "c32", device="cuda", dtype="float32", storage_dtype="float32", progress=False
    )
    [c16] = extract(
        model4, [task], tmp_path / "c16", device="cuda", dtype=dtype, storage_dtype="float32", progress=False
    )
    assert c32.manifest["compute_dtype"] == "float32" and c16.manifest["compute_dtype"] == dtype
    assert c16.manifest["device"].startswith("cuda")
    ref, half = np.asarray(c32.features("train")), np.asarray(c16.features("train"))
    rel = rel_error_per_layer(half, ref)
    record_property(f"{dtype}_rel_error_per_layer", [round(float(r), 6) for r in rel])
    assert np.all(rel > 0), "the half-precision run computed exactly float32: it did not run in half precision"
    assert np.all(rel < bound), rel
    acc = {}
    for name, cache in (("f32", c32), ("half", c16)):
        run = probe(cache, device="cpu", control=False, progress=False)
        r = run.results
        acc[name] = r[(r.split == "test") & (r.metric == "acc")].sort_values("layer")["value"].to_numpy()
    moved = 100 * np.abs(acc["half"] - acc["f32"])
    record_property(f"{dtype}_probe_acc_moved_points", [round(float(m), 2) for m in moved])
    assert acc["f32"].max() > 0.7  # the planted signal is found at all
    assert moved.mean() <= 2.0, moved


def test_out_of_memory_backoff_is_exercised(
    model4: Path, monkeypatch: pytest.MonkeyPatch, record_property: Record
) -> None:
    """With the process's GPU memory capped below what the first batch needs, the runner halves the batch
    (the first size fails for real) and still returns the uncapped features."""
    bb = load_backbone(model4, device="cuda", dtype="float32")
    rng = random.Random(2)
    long_texts = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(256)]  # truncated to 128
    tok = tokenize(bb.tokenizer, long_texts, max_length=128)
    idx = np.arange(len(long_texts))
    run = encoding_mod.Runner(bb, tok, "mean", True, torch.float32, encoding_mod.Timings())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    want = run(idx)
    need = torch.cuda.max_memory_allocated() - base
    record_property("first_batch_bytes", int(need))
    assert need > 16 * 2**20, need  # big enough that a cap below it is meaningful
    tried: list[tuple[int, bool]] = []
    inner = encoding_mod.Runner._run

    def spy(self: Any, ids: np.ndarray) -> torch.Tensor:
        try:
            out = inner(self, ids)
        except torch.cuda.OutOfMemoryError:
            tried.append((len(ids), False))
            raise
        tried.append((len(ids), True))
        return out

    monkeypatch.setattr(encoding_mod.Runner, "_run", spy)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (torch.cuda.memory_reserved() + 0.6 * need) / total
    try:
        torch.cuda.set_per_process_memory_fraction(cap)
        got = run(idx)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    record_property("oom_backoff_sizes", tried)
    assert tried[0] == (256, False), tried  # the first batch size failed for real
    assert any(ok for _, ok in tried) and min(n for n, ok in tried if ok) < 256
    assert sum(n for n, ok in tried if ok) == 256  # every text computed exactly once
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def synthetic_features(n: int, layers: int = 4, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with a planted linear signal of varying strength per layer."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, layers, dim)).astype(np.float32)
    for layer in range(layers):
        x[:, layer, 0] += (0.4 + 0.4 * layer) * (2 * y - 1)
    return x, y


def test_probe_accuracy_gpu_matches_cpu(record_property: Record) -> None:
    """The linear protocol (deterministic: L-BFGS, grid, dev selection) gives the same test accuracy on the
    GPU as on the CPU, within 0.1 point; the MLP (random dropout streams differ by device) is close."""
    (x, y), (xd, yd), (xt, yt) = (synthetic_features(n, seed=s) for n, s in ((4000, 0), (2000, 1), (4000, 2)))
    accs: dict[str, dict[str, np.ndarray]] = {}
    for kind, options in (("linear", {}), ("mlp", {"max_epoch": 20})):
        accs[kind] = {}
        for device in ("cpu", "cuda"):
            lp = LayerwiseProbe(kind=kind, device=device, seed=0, **options).fit(x, y, xd, yd)
            assert lp.device_.type == device
            accs[kind][device] = lp.score(xt, yt)
        diff = 100 * np.abs(accs[kind]["cuda"] - accs[kind]["cpu"])
        record_property(f"{kind}_gpu_vs_cpu_points", [round(float(d), 3) for d in diff])
    assert np.all(100 * np.abs(accs["linear"]["cuda"] - accs["linear"]["cpu"]) <= 0.1)
    assert np.all(100 * np.abs(accs["mlp"]["cuda"] - accs["mlp"]["cpu"]) <= 3.0)
    assert accs["linear"]["cpu"][-1] > accs["linear"]["cpu"][0] + 0.05  # the planted signal's gradient shows


def test_probe_runner_on_gpu_same_cache(model4: Path, tmp_path: Path) -> None:
    """``probe`` with features moved to the GPU (``LayerCache.to``) gives the CPU run's rows on the same cache."""
    [cache] = extract(model4, [planted_task(tmp_path / "cat.txt")], tmp_path / "c", device="cpu", progress=False)
    rows = {}
    for device in ("cpu", "cuda"):
        r = probe(cache, device=device, progress=False).results
        rows[device] = r[r.metric.isin(["acc", "control_acc"])].sort_values(["split", "metric", "layer"])
    np.testing.assert_allclose(
        rows["cuda"]["value"].to_numpy(), rows["cpu"]["value"].to_numpy(), atol=1.5 / 150
    )  # one dev (150) or test (250) text


def test_mlm_heads_a_few_steps_match_cpu(model4: Path, texts: list[str], record_property: Record) -> None:
    """Masks and head initialisation come from CPU generators: the GPU's training losses follow the CPU's."""
    losses = {}
    for device in ("cpu", "cuda"):
        bb = load_backbone(model4, device=device, dtype="float32")
        mp = MLMHeadProbe(steps=4, batch_size=16, max_length=32, seed=0).fit(bb, texts)
        assert next(mp.heads_.parameters()).device.type == device
        losses[device] = np.asarray(mp.loss_)
    record_property("mlm_loss_cpu", losses["cpu"].round(5).tolist())
    record_property("mlm_loss_gpu", losses["cuda"].round(5).tolist())
    assert len(losses["cuda"]) == 4 and np.isfinite(losses["cuda"]).all()
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-3)


def test_offramps_and_early_exit_match_cpu(model4: Path, texts: list[str], record_property: Record) -> None:
    bb = load_backbone(model4, device="cpu", dtype="float32")
    states = encode(bb, texts, pool="cls")
    labels = np.array(["cat" in t for t in texts], dtype=np.int64)
    outs, exits = {}, {}
    tok = tokenize(bb.tokenizer, texts[:64])
    for device in ("cpu", "cuda"):
        ramps = OffRamps(epochs=2, batch_size=32, dropout=0.0, device=device).fit(states, labels)
        assert next(ramps.heads_.parameters()).device.type == device
        outs[device] = ramps.outputs(states)
        model = load_backbone(model4, device=device, dtype="float32").model
        policy = make_policy("entropy", bb.n_layers - 1, 2)
        run = early_exit(model, ramps.heads_, tok, int(bb.tokenizer.pad_token_id), policy, 0.5, 8, device=device)
        exits[device] = run.exit_layers
    diff = float(np.abs(outs["cuda"] - outs["cpu"]).max())
    record_property("offramp_outputs_max_abs_diff", diff)
    assert diff < 1e-3, diff
    agree = float((exits["cuda"] == exits["cpu"]).mean())
    record_property("early_exit_layer_agreement", agree)
    assert agree >= 0.95


def test_bf16_finetuning_reloads(model4: Path, tmp_path: Path, record_property: Record) -> None:
    """A few bf16 mixed-precision steps on the GPU: weights change, the checkpoint reloads with AutoModel,
    and probekit extracts from it on the GPU."""
    data = write_cola(tmp_path / "data")
    run = finetune(model4, "cola", tmp_path / "ft", seeds=1, grid=Grid((16,), (1e-3,), 1), data_dir=data, **_gpu_ft())
    [res] = run.seeds
    assert res.metrics["precision"] == "bf16"
    encoder = AutoModel.from_pretrained(res.path)
    before = AutoModel.from_pretrained(model4).state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    change = float((encoder.state_dict()[name] - before[name]).abs().max())
    record_property("bf16_finetune_weight_change", change)
    assert change > 0
    [cache] = extract(res.path, [planted_task(tmp_path / "cat.txt")], tmp_path / "c", device="cuda", progress=False)
    assert isinstance(cache, LayerCache) and np.isfinite(np.asarray(cache.features("test"))).all()


def _gpu_ft() -> dict[str, Any]:
    return {"device": "cuda", "precision": "bf16", "max_steps": 4}


def test_torchrun_one_process_nccl_cache_is_byte_identical(model4: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 1`` on the GPU writes the same bytes as a plain process, and NCCL itself
    runs under that launcher (an all-reduce on the GPU)."""
    task = planted_task(tmp_path / "cat.txt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["-m", "probekit", "extract", "--model", str(model4), "--task", str(task), "--device", "cuda", "--quiet"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29517"]
    for name, cmd in (("plain", [sys.executable, *args]), ("torchrun", [*launcher, *args])):
        done = subprocess.run([*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    [a], [b] = (list((tmp_path / n).glob("*/*/manifest.json")) for n in ("plain", "torchrun"))
    for f in sorted(p.name for p in a.parent.glob("*.npy")):
        assert (a.parent / f).read_bytes() == (b.parent / f).read_bytes(), f
    nccl = (
        "import torch, torch.distributed as d; d.init_process_group('nccl'); t = torch.ones(3, device='cuda'); "
        "d.all_reduce(t); d.barrier(); print('nccl', d.get_backend(), t.tolist()); d.destroy_process_group()"
    )
    script = tmp_path / "nccl.py"
    script.write_text(nccl)
    done = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nccl nccl [1.0, 1.0, 1.0]" in done.stdout
