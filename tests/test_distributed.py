"""Sharded extraction under torchrun (Gloo on CPU): identical caches, resume after a killed rank."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from probekit import extract
from probekit.distributed import assign_batches

pytestmark = pytest.mark.slow


def extract_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "-m",
        "probekit",
        "extract",
        "--model",
        str(model),
        "--name",
        "tiny",
        "--task",
        "BShift",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--quiet",
    ]


def torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cache_files(out: Path) -> dict[str, bytes]:
    [cache] = list((out / "tiny").iterdir())
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*.npy"))}


@pytest.fixture(scope="module")
def reference(tiny_model: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("single")
    extract(tiny_model, ["BShift"], out, data_dir=shared_data, name="tiny", progress=False)
    return cache_files(out)


@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_cache_is_byte_identical(
    nproc: int, reference: dict[str, bytes], tiny_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    torchrun(nproc, extract_args(tiny_model, shared_data, tmp_path))
    assert cache_files(tmp_path) == reference
    [cache] = list((tmp_path / "tiny").iterdir())
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == list(range(nproc))
    assert sum(s["splits"]["train"]["n"] for s in manifest["shards"]) == 1125
    assert not list(tmp_path.glob("tiny/*.shards"))  # shards are removed once merged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_resumes_only_its_shard(
    reference: dict[str, bytes], tiny_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "PROBEKIT_CHECKPOINT_SECONDS": "0",
        "PROBEKIT_FAULT": "1:3",
    }  # rank 1 is SIGKILLed after 3 batches
    ranks = [
        subprocess.Popen(
            [sys.executable, *extract_args(tiny_model, shared_data, tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in range(2)
    ]
    assert ranks[1].wait(timeout=120) == -9
    shards = next((tmp_path / "tiny").glob("*.shards")) / "w2"
    deadline = time.time() + 120
    while not (shards / "r0" / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    ranks[0].kill()  # what torchrun does to the survivors when a rank dies
    ranks[0].wait()
    r0_manifest = (shards / "r0" / "manifest.json").read_text()
    progress = json.loads((shards / "r1.partial" / "progress.json").read_text())
    assert sum(progress["done"].values()) == 3
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.suffix not in (".shards", ".lock")]

    # a re-run with another batch plan must not merge rank 0's finished shard of the old plan
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "tiny", other / "tiny")
    torchrun(2, [*extract_args(tiny_model, shared_data, other), "--batch-size", "16"])
    [replanned] = [p for p in (other / "tiny").iterdir() if p.is_dir()]
    feats = np.load(replanned / "train.features.npy").astype(np.float32)
    ref = np.load(io.BytesIO(reference["train.features.npy"])).astype(np.float32)
    assert (np.abs(feats).sum(axis=(1, 2)) > 0).all()  # no row left unwritten
    np.testing.assert_allclose(feats, ref, atol=1e-2)  # the same features, whatever the batches

    torchrun(2, extract_args(tiny_model, shared_data, tmp_path))
    assert cache_files(tmp_path) == reference
    [cache] = [p for p in (tmp_path / "tiny").iterdir() if p.is_dir()]
    shard_info = json.loads((cache / "manifest.json").read_text())["shards"]
    before = json.loads(r0_manifest)
    assert shard_info[0]["seconds"] == before["seconds"]  # rank 0's shard was reused as it was
    r1 = shard_info[1]
    assert sum(s["resumed_at_batch"] for s in r1["splits"].values()) == 3
    assert r1["computed_batches"] == sum(s["batches"] for s in r1["splits"].values()) - 3


def test_assignment_balances_length() -> None:
    costs = [("train", b, c) for b, c in enumerate([100, 90, 50, 40, 30, 20, 10, 10])]
    shares = assign_batches(costs, 2)
    loads = [sum(costs[b][2] for _, b in share) for share in shares]
    assert sorted(b for share in shares for _, b in share) == list(range(8))
    assert abs(loads[0] - loads[1]) <= 10
    assert all(share == sorted(share) for share in shares)


def test_probe_spreads_caches_over_ranks(tiny_model: Path, tmp_path: Path) -> None:
    from probekit import load_results, probe
    from tests.helpers import toy_senteval

    tasks = [toy_senteval(tmp_path / f"task{i}.txt", n=(60, 20, 20), seed=i) for i in range(3)]
    extract(tiny_model, tasks, tmp_path / "caches", name="tiny", progress=False)
    single = probe(tmp_path / "caches", progress=False).results
    torchrun(2, ["-m", "probekit", "probe", str(tmp_path / "caches"), "--out", str(tmp_path / "res"), "--quiet"])
    multi = load_results(tmp_path / "res")
    key = ["task", "layer", "split", "metric", "seed"]
    a = single.sort_values(key).reset_index(drop=True)
    b = multi.sort_values(key).reset_index(drop=True)
    assert len(b) == len(a) and set(b["task"]) == {"task0", "task1", "task2"}
    assert (a[key] == b[key]).all().all()
    assert (a["value"] - b["value"]).abs().max() < 1e-9  # same fits, whichever rank ran them
    assert not (tmp_path / "res" / ".parts").exists()
