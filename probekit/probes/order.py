"""SentEval's train row order, recovered from the data file a cache was extracted from.

SentEval's ``probing.py`` sorts each split by (number of words, label id) before embedding it
(stably: Python's ``sorted``), and every epoch's ``np.random.permutation`` indexes that sorted
order. A cache keeps the file's order; the ``senteval`` protocols pass :func:`senteval_order`
to the MLP probe so that the same seed draws the same mini-batches as SentEval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from probekit.cache import LayerCache
from probekit.data import get_task
from probekit.data.senteval import read_senteval
from probekit.errors import ProbekitError
from probekit.io import sha256_file

SPLITS = ("train", "dev", "test")


def senteval_order(texts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """Row indices in SentEval's training order: sorted by (number of words, label id), ties in file order."""
    return np.array(sorted(range(len(texts)), key=lambda i: (len(texts[i].split()), int(labels[i]))), dtype=np.int64)


def cache_sentences(cache: LayerCache) -> dict[str, list[str]]:
    """The sentences of each split of a cache, in its row order, read from the data file its manifest names
    (refused when that file is gone or changed since the extraction)."""
    data = cache.manifest.get("data") or {}
    path = Path(data.get("path") or "")
    if not data.get("path") or not path.is_file():
        raise ProbekitError(f"{cache.path}: the data file it was extracted from ({path}) is not there")
    if data.get("sha256") and sha256_file(path) != data["sha256"]:
        raise ProbekitError(f"{cache.path}: the data file {path} changed since the extraction; re-extract")
    options = data.get("reader_options") or {}
    td = read_senteval(get_task(str(path)), path, unseen_labels=options.get("unseen_labels", "error"))
    texts = {s: list(td.splits[s].texts) for s in SPLITS}
    for s in SPLITS:
        if len(texts[s]) != cache.manifest["splits"][s]["n"]:
            raise ProbekitError(
                f"{cache.path}: {path} has {len(texts[s])} {s} rows, the cache {cache.manifest['splits'][s]['n']}"
            )
    return texts


def cache_order(cache: LayerCache) -> np.ndarray:
    """SentEval's training order of a cache's train rows."""
    return senteval_order(cache_sentences(cache)["train"], np.asarray(cache.labels("train")))
