"""Benchmark: frozen off-ramp training (``fit_heads``) against a bare loop over the same heads.

Six 384-wide off-ramps (MiniLM's shape) on random first-token states, batch 128, one epoch; each
side timed in this process, one thread and two, optionally beside a busy process (``--busy``: what a
shared CPU looks like). The steps per second of both and their ratio are printed.

    python bench/offramp_heads.py                  # 20,000 states
    python bench/offramp_heads.py --n 60000 --busy
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probekit.offramp.heads import OffRampHeads, per_layer_loss  # noqa: E402
from probekit.offramp.train import TrainConfig, fit_heads  # noqa: E402


def bare(x: np.ndarray, y: np.ndarray, batch: int) -> float:
    heads = OffRampHeads(x.shape[1], x.shape[2], 2)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    start, steps = time.perf_counter(), 0
    for idx in torch.randperm(len(x)).split(batch):
        loss = per_layer_loss(heads(xs[idx]), ys[idx], False).mean(0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def probekit_heads(x: np.ndarray, y: np.ndarray, batch: int, threads: int) -> float:
    heads = OffRampHeads(x.shape[1], x.shape[2], 2)
    cfg = TrainConfig(epochs=1, head_batch_size=batch, head_threads=threads)
    start = time.perf_counter()
    fit_heads(heads, x, y, cfg, progress=False)
    return -(-len(x) // batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--busy", action="store_true", help="Run a busy process beside it.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, 6, 384)).astype(np.float32)
    y = rng.integers(0, 2, args.n)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        print(f"{args.n} states, 6 x 384, batch {args.batch_size}{', beside a busy process' if args.busy else ''}")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loop = bare(x, y, args.batch_size)
            ours = probekit_heads(x, y, args.batch_size, threads)
            print(f"threads {threads}: fit_heads {ours:6.1f} steps/s, bare loop {loop:6.1f} steps/s", end="")
            print(f", ratio {ours / loop:.2f}")
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


if __name__ == "__main__":
    main()
