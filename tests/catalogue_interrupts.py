"""Catalogue rows (tests/catalogue.py) of the interruptions share: an output folder another process is writing,
and caches that must not be trusted (a label id out of range, arrays that do not match their manifest)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.catalogue import Case
from tests.helpers import make_tiny_bert, toy_senteval

HELD: list[int] = []
"""File descriptors of the locks the rows hold (as another probekit process would) while the command runs."""


def _hold(folder: str, inputs: tuple[str, ...] = ()) -> Callable[[Path], None]:
    """Hold the lock of ``tmp/folder`` (probekit.io.exclusive's lock file) as a running probekit would; make the
    ``inputs`` folders, so that the command gets as far as its output."""

    def setup(tmp: Path) -> None:
        for name in inputs:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp / f".{folder}.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        HELD.append(fd)

    return setup


def _cache(tmp: Path) -> Path:
    """A real cache of a tiny model under ``tmp/caches``; returns its folder."""
    from probekit.extraction import extract  # deferred: building the catalogue imports no torch

    model = make_tiny_bert(tmp / "tiny model")
    [cache] = extract(model, [toy_senteval(tmp / "toy.txt", n=(20, 6, 6))], tmp / "caches", progress=False)
    return cache.path


def _label_out_of_range(tmp: Path) -> None:
    path = _cache(tmp) / "test.labels.npy"
    labels = np.load(path)
    labels[0] = 7  # the task has 2 classes
    np.save(path, labels)


def _truncated_features(tmp: Path) -> None:
    path = _cache(tmp) / "train.features.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _manifest_count(tmp: Path) -> None:
    path = _cache(tmp) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["dev"]["n"] += 1
    path.write_text(json.dumps(manifest))


_RESULTS = ["--out", "{tmp}/results", "--device", "cpu", "--quiet"]
_LOCKED = "is being written by another probekit process (pid 4242); wait for it or choose another --out"

CASES: list[Case] = [
    Case("lock-held-probe", ["probe", "{tmp}/caches", "--out", "{tmp}/out"], _LOCKED, _hold("out")),
    Case(
        "lock-held-mlm-probe",
        ["mlm-probe", "-m", "{model}", "-c", "{tmp}/c.txt", "-o", "{tmp}/out"],
        _LOCKED,
        _hold("out"),
    ),
    Case("lock-held-offramp", ["offramp", "-m", "{model}", "-t", "sst2", "-o", "{tmp}/out"], _LOCKED, _hold("out")),
    Case("lock-held-finetune", ["finetune", "-m", "{model}", "-t", "cola", "-o", "{tmp}/out"], _LOCKED, _hold("out")),
    Case("lock-held-report", ["report", "{tmp}/tables", "--out", "{tmp}/out"], _LOCKED, _hold("out", ("tables",))),
    Case(
        "cache-label-id-out-of-range",
        ["probe", "{tmp}/caches", *_RESULTS],
        "test.labels.npy holds label id 7, but the task has 2 classes (ids 0..1)",
        _label_out_of_range,
    ),
    Case(
        "cache-features-truncated",
        ["probe", "{tmp}/caches", *_RESULTS],
        "train.features.npy is not a readable array",
        _truncated_features,
    ),
    Case(
        "cache-manifest-count-edited",
        ["probe", "{tmp}/caches", *_RESULTS],
        "dev has 6 labels, manifest says 7",
        _manifest_count,
    ),
]
