"""Extraction and probing memory does not grow with the number of texts (issue 16, small scale).

Measured without timing: the pages of the cache's memory map resident in this process (``/proc/self/pagemap``,
the kernel's own page table) after every batch, and the writer's own record of what it held; plus the compact
tokenised form, checked against the tokenizer's own output.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import probekit.cache as cache_mod
import probekit.encoding as encoding_mod
from probekit.backbone import load_backbone
from probekit.cache import LayerCache, count_nonfinite, release_pages
from probekit.cpu import _glibc
from probekit.data import load_task
from probekit.extraction import extract_task
from probekit.probes.layerwise import layer_major
from tests.helpers import WORDS, make_tiny_bert, tiny_tokenizer, write_senteval

linux_only = pytest.mark.skipif(not Path("/proc/self/pagemap").is_file(), reason="needs Linux's /proc/self/pagemap")
BUFFER = 1024 * 1024


def mapped_rss(suffix: str) -> int:
    """Bytes of this process's memory maps of files ending in ``suffix`` that are resident: the pages present
    in its page table (``/proc/self/pagemap`` bit 63), what RSS counts."""
    spans = [ln.split()[0] for ln in Path("/proc/self/maps").read_text().splitlines() if ln.rstrip().endswith(suffix)]
    total = 0
    with open("/proc/self/pagemap", "rb") as f:
        for span in spans:
            lo, hi = (int(x, 16) for x in span.split("-"))
            f.seek(lo // cache_mod.PAGE * 8)
            entries = np.frombuffer(f.read((hi - lo) // cache_mod.PAGE * 8), dtype=np.uint64)
            total += int((entries >> np.uint64(63)).sum()) * cache_mod.PAGE
    return total


def big_task(path: Path, n: int) -> Path:
    """``n`` lines split 10:1:1, random sentences of 2..14 words."""
    rng = random.Random(n)
    rows = []
    for tag, share in (("tr", 10), ("va", 1), ("te", 1)):
        k = n * share // 12
        rows += [(tag, "AB"[i % 2], " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))) for i in range(k)]
    return write_senteval(path, rows)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("wide-bert"), layers=2, hidden=128)


@linux_only
@pytest.mark.parametrize("n", [2000, 8000])
def test_extraction_never_holds_all_features(
    wide_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """2k and 8k lines: the train features' resident pages stay under the writer's buffer (+ one batch), while
    the features themselves are several times larger; the writer's record agrees."""
    monkeypatch.setattr(cache_mod, "WRITE_BUFFER_BYTES", BUFFER)
    backbone = load_backbone(wide_model, device="cpu", dtype="float32")
    data = load_task(big_task(tmp_path / "big.txt", n))
    seen: list[int] = []
    cache = extract_task(
        backbone,
        data,
        tmp_path / "c",
        batch_size=16,
        storage_dtype="float32",
        progress=False,
        on_batch=lambda split, b: seen.append(mapped_rss("train.features.npy")) if split == "train" else None,
    )
    row_bytes = cache.n_layers * cache.hidden_size * 4
    feature_bytes = len(cache.labels("train")) * row_bytes
    one_batch = 16 * (row_bytes + 2 * cache_mod.PAGE)
    assert len(seen) == -(-len(cache.labels("train")) // 16)  # one sample per train batch
    assert max(seen) > 0  # the measurement sees the writer's pages at all
    assert max(seen) <= BUFFER + one_batch, (max(seen), feature_bytes)
    if n == 8000:
        assert feature_bytes > 4 * (BUFFER + one_batch)  # holding all features would have shown
    memory = cache.manifest["memory"]
    assert memory["write_buffer_bytes"] == BUFFER
    assert 0 < memory["peak_pending_bytes"] <= BUFFER + one_batch
    # the features written through released pages are all there: the same as computing them in memory
    ref = encoding_mod.encode(backbone, data.splits["dev"].texts, batch_size=64)
    np.testing.assert_allclose(cache.features("dev"), ref, atol=1e-5)


@linux_only
def test_reading_a_cache_releases_its_pages(wide_model: Path, tmp_path: Path) -> None:
    """The NaN/inf scan and the probes' float32 copy read a cache's map block by block and keep none of it
    resident (the copy is all the memory probing needs), and the values read are the file's."""
    backbone = load_backbone(wide_model, device="cpu", dtype="float32")
    cache = extract_task(
        backbone,
        load_task(big_task(tmp_path / "big.txt", 3000)),
        tmp_path / "c",
        storage_dtype="float32",
        progress=False,
    )
    reopened = LayerCache.open(cache.path)
    feats = reopened.features("train")
    assert count_nonfinite(feats).tolist() == [0] * reopened.n_layers
    assert mapped_rss("train.features.npy") == 0
    x = layer_major(feats, None, backbone.device)
    assert mapped_rss("train.features.npy") == 0
    on_disk = np.load(cache.path / "train.features.npy")  # an independent read of the file
    np.testing.assert_array_equal(x.numpy(), on_disk.transpose(1, 0, 2))
    np.asarray(feats[:100]).sum()
    assert mapped_rss("train.features.npy") > 0  # without the release the pages read do stay
    assert release_pages(feats)
    assert mapped_rss("train.features.npy") == 0
    assert not release_pages(np.zeros(3))  # not a memory map: nothing to release


def test_tokenize_in_chunks_matches_the_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked, compact tokenising gives, text by text, what the tokenizer gives one text at a time."""
    monkeypatch.setattr(encoding_mod, "TOKENIZE_CHUNK", 7)
    tok = tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(30)]
    got = encoding_mod.tokenize(tok, texts, max_length=12)
    assert len(got.input_ids) == len(texts) == len(got.lengths)
    for i, text in enumerate(texts):
        want = tok(text, truncation=True, max_length=12, return_special_tokens_mask=True)
        assert got.input_ids[i].tolist() == want["input_ids"]
        assert got.special[i].tolist() == want["special_tokens_mask"]
        assert got.token_type_ids is not None and got.token_type_ids[i].tolist() == want["token_type_ids"]
        assert got.lengths[i] == len(want["input_ids"])
    assert [r.tolist() for r in got.input_ids[-2:]] == [got.input_ids[28].tolist(), got.input_ids[29].tolist()]
    with pytest.raises(IndexError):
        got.input_ids[30]
    assert encoding_mod.tokenize(tok, [], max_length=12).lengths.tolist() == []


HEAP_PROBE = """
import ctypes, os, sys
sys.path.insert(0, {repo!r})
from probekit.cpu import bound_heap

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if {bound}:
    assert bound_heap()
big = ctypes.create_string_buffer(16 << 20)      # mmapped; freeing it makes glibc raise its mmap threshold
del big
buf = ctypes.create_string_buffer(8 << 20)       # under the raised threshold: from the heap
keep = ctypes.create_string_buffer(64 << 10)     # a live block above it, so the heap top cannot shrink
before = rss()
del buf
print(before - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux's /proc")
def test_a_freed_batch_buffer_goes_back_to_the_system_only_with_the_bounded_heap() -> None:
    """The extraction writer bounds the heap (:func:`probekit.cpu.bound_heap`): a large buffer freed after
    glibc raised its memory-map threshold is returned to the system, where by default it stays resident."""
    if _glibc() is None:
        pytest.skip("needs glibc (mallopt)")
    repo = str(Path(__file__).resolve().parents[1])

    def returned(bound: bool) -> int:
        code = HEAP_PROBE.format(repo=repo, bound=bound)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(done.stdout.strip())

    assert returned(bound=True) >= 7 << 20
    assert returned(bound=False) < 1 << 20
