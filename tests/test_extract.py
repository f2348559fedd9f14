"""Extraction: shapes, pooling against a per-sentence computation, order, cache reuse,
invalidation, resume after a crash, and the cache object."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from probekit import LayerCache, extract, find_caches, load_backbone, load_task
from probekit.cache import read_manifest
from probekit.errors import CacheError, ProbekitError
from probekit.extraction import plan_batches, tokenize
from tests.helpers import make_tiny_bert, toy_senteval
from tests.helpers_floors import as_cli


def manual_features(model_dir: Path, texts: list[str], pool: str, include_special: bool = True) -> list:
    """One sentence at a time, no padding: the straightforward computation."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=128, return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask")[0].bool()
        with torch.no_grad():
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states)[:, 0]  # [L+1, T, D]
        if pool == "cls":
            out.append(hs[:, 0])
        elif pool == "tokens":
            out.append(hs.transpose(0, 1))  # [T, L+1, D]
        else:
            keep = torch.ones_like(special) if include_special else ~special
            out.append(hs[:, keep].mean(1))
    return out


def count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of BertModel.forward made through extraction."""
    from transformers.models.bert import modeling_bert

    calls = [0]
    original = modeling_bert.BertModel.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertModel, "forward", forward)
    return calls


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_pooled_features_equal_per_sentence_computation(
    tiny_model: Path, toy_task: Path, tmp_path: Path, pool: str
) -> None:
    [cache] = extract(
        tiny_model, [toy_task], tmp_path, pool=pool, storage_dtype="float32", batch_size=8, progress=False
    )
    data = load_task(toy_task)
    assert cache.n_layers == 3 and cache.hidden_size == 32  # 2 blocks + embeddings
    for split in ("train", "dev", "test"):
        feats = cache[split]
        assert feats.shape == (len(data.splits[split]), 3, 32)
        np.testing.assert_array_equal(cache.labels(split), data.splits[split].labels)
        expected = torch.stack(manual_features(tiny_model, data.splits[split].texts, pool)).numpy()
        np.testing.assert_allclose(feats, expected, atol=2e-5, rtol=1e-4)
    # lengths vary, so the length-sorted batches really were put back in order
    lengths = tokenize(load_backbone(tiny_model).tokenizer, data.splits["train"].texts).lengths
    order = np.concatenate(plan_batches(lengths, batch_size=8))
    assert not np.array_equal(order, np.arange(len(order)))
    assert read_manifest(cache.path)["mean_includes_special_tokens"] == (True if pool == "mean" else None)


def test_mean_can_exclude_special_tokens(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [cache] = extract(tiny_model, [toy_task], tmp_path, include_special=False, storage_dtype="float32", progress=False)
    texts = load_task(toy_task).splits["dev"].texts
    expected = torch.stack(manual_features(tiny_model, texts, "mean", include_special=False)).numpy()
    np.testing.assert_allclose(cache["dev"], expected, atol=2e-5, rtol=1e-4)
    assert cache.manifest["mean_includes_special_tokens"] is False


def test_token_level_cache(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [cache] = extract(
        tiny_model, [toy_task], tmp_path, pool="tokens", storage_dtype="float32", batch_size=5, progress=False
    )
    texts = load_task(toy_task).splits["test"].texts
    expected = manual_features(tiny_model, texts, "tokens")
    offsets = cache.offsets("test")
    assert offsets[-1] == cache["test"].shape[0] == sum(len(e) for e in expected)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for i, (text, exp) in enumerate(zip(texts, expected, strict=True)):
        rows = slice(offsets[i], offsets[i + 1])
        np.testing.assert_allclose(cache["test"][rows], exp.numpy(), atol=2e-5, rtol=1e-4)
        assert cache.arrays["test"]["token_ids"][rows].tolist() == tok(text)["input_ids"]


def test_float16_storage_is_close_to_float32(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [c16] = extract(tiny_model, [toy_task], tmp_path, progress=False)
    [c32] = extract(tiny_model, [toy_task], tmp_path, storage_dtype="float32", progress=False)
    assert c16.path != c32.path and c16["train"].dtype == np.float16
    np.testing.assert_allclose(c16["train"].astype(np.float32), c32["train"], atol=5e-3, rtol=5e-3)


def test_cache_is_reused_and_invalidated(
    tiny_model: Path, toy_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_forwards(monkeypatch)
    [first] = extract(tiny_model, [toy_task], tmp_path / "c", progress=False)
    n_first = calls[0]
    assert n_first > 0
    [again] = extract(tiny_model, [toy_task], tmp_path / "c", progress=False)
    assert calls[0] == n_first and again.path == first.path  # reused: no forward pass

    variants = {}
    [variants["pool"]] = extract(tiny_model, [toy_task], tmp_path / "c", pool="cls", progress=False)
    [variants["max_length"]] = extract(tiny_model, [toy_task], tmp_path / "c", max_length=8, progress=False)
    changed = toy_senteval(tmp_path / "toy.txt", seed=1)  # same name, other content
    [variants["data"]] = extract(tiny_model, [changed], tmp_path / "c", progress=False)
    other_weights = make_tiny_bert(tmp_path / "tiny-bert", seed=1)  # same name, other weights
    [variants["weights"]] = extract(other_weights, [toy_task], tmp_path / "c", name=first.model, progress=False)
    for what, cache in variants.items():
        assert cache.path != first.path, what
        assert cache.manifest["key"] != first.manifest["key"], what
    assert variants["weights"].manifest["model"]["fingerprint"] != first.manifest["model"]["fingerprint"]
    assert len(find_caches(tmp_path / "c")) == 5


class Crash(Exception):
    pass


def test_resume_after_crash_gives_identical_cache(
    tiny_model: Path, toy_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import probekit.extraction as ex

    monkeypatch.setattr(ex, "CHECKPOINT_SECONDS", 0.0)  # checkpoint after every batch
    backbone = load_backbone(tiny_model)
    data = load_task(toy_task)
    [reference] = extract(backbone, [toy_task], tmp_path / "ref", batch_size=4, progress=False)

    def crash_after(n: int):  # type: ignore[no-untyped-def]
        seen = [0]

        def on_batch(split: str, b: int) -> None:
            seen[0] += 1
            if seen[0] == n:
                raise Crash

        return on_batch

    with pytest.raises(Crash):
        ex.extract_task(backbone, data, tmp_path / "c", batch_size=4, progress=False, on_batch=crash_after(12))
    partial = next((tmp_path / "c").glob("*/*.partial"))
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert not final.exists()
    with pytest.raises(CacheError, match="interrupted"):
        find_caches(tmp_path / "c")
    with pytest.raises(CacheError, match="incomplete"):
        LayerCache.open(final)

    calls = count_forwards(monkeypatch)
    resumed = ex.extract_task(backbone, data, tmp_path / "c", batch_size=4, progress=False)
    total_batches = sum(
        len(plan_batches(tokenize(backbone.tokenizer, s.texts).lengths, 4)) for s in data.splits.values()
    )
    assert calls[0] == total_batches - 12  # only the batches not yet written
    assert resumed.path == final and not partial.exists()
    for name in reference.manifest["checksums"]:
        assert (final / name).read_bytes() == (reference.path / name).read_bytes(), name
    assert resumed.manifest["checksums"] == reference.manifest["checksums"]


def test_layer_cache_object(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [cache] = extract(tiny_model, [toy_task], tmp_path, progress=False)
    assert cache.splits == ["train", "dev", "test"]
    np.testing.assert_array_equal(cache["train", 1], cache["train"][:, 1])
    np.testing.assert_array_equal(cache.layer(-1, "dev"), cache["dev"][:, 2])
    with pytest.raises(IndexError, match="layers 0..2"):
        cache.layer(3)
    moved = cache.to("cpu")
    assert isinstance(moved["train"], torch.Tensor) and moved["train"].dtype == torch.float32
    assert moved["train"].shape == cache["train"].shape
    torch.testing.assert_close(moved["test", 2], torch.from_numpy(cache["test"][:, 2].astype(np.float32)))
    assert "layers=3" in repr(cache) and "train=40" in repr(cache)
    LayerCache.open(cache.path, verify=True)


def test_corrupt_and_incompatible_caches_are_refused(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [cache] = extract(tiny_model, [toy_task], tmp_path, progress=False)
    feats = cache.path / "dev.features.npy"
    data = bytearray(feats.read_bytes())
    data[-1] ^= 0xFF
    feats.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match its checksum"):
        LayerCache.open(cache.path, verify=True)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["version"] = 0
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="incompatible probekit"):
        LayerCache.open(cache.path)
    with pytest.raises(CacheError, match="does not exist"):
        LayerCache.open(tmp_path / "nowhere")


def test_fp16_overflow_is_reported(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(tiny_model)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.fill_(1e6)  # layer 0 overflows float16
    model.save_pretrained(tmp_path / "big")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "big")
    with pytest.warns(UserWarning, match=r"non-finite features \(inf/NaN\) at layers \[0\]"):
        [cache] = extract(tmp_path / "big", [toy_task], tmp_path / "c", progress=False)
    assert cache.manifest["splits"]["train"]["nonfinite_rows_per_layer"][0] == 40


@pytest.mark.parametrize("family", ["roberta", "distilbert", "albert", "electra", "deberta-v2"])
def test_other_encoder_families(family: str, toy_task: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from tests.helpers import tiny_tokenizer, tiny_vocab

    kw = {"vocab_size": len(tiny_vocab()), "max_position_embeddings": 130, "num_attention_heads": 4}
    if family == "distilbert":
        kw.update(dim=32, n_layers=3, n_heads=4, hidden_dim=64)
        kw.pop("num_attention_heads")
    else:
        kw.update(hidden_size=32, num_hidden_layers=3, intermediate_size=64)
    if family in ("albert", "electra"):
        kw["embedding_size"] = 16
    config = AutoConfig.for_model(family, **kw)
    AutoModel.from_config(config).save_pretrained(tmp_path / family)
    tiny_tokenizer().save_pretrained(tmp_path / family)
    [cache] = extract(tmp_path / family, [toy_task], tmp_path / "c", storage_dtype="float32", progress=False)
    assert cache["train"].shape == (40, 4, 32)
    expected = torch.stack(manual_features(tmp_path / family, load_task(toy_task).splits["dev"].texts, "mean"))
    np.testing.assert_allclose(cache["dev"], expected.numpy(), atol=5e-5, rtol=1e-4)


def test_unreachable_hub_model_is_a_clear_error() -> None:
    with pytest.raises(ProbekitError, match="not a local folder.*--model DIR"), as_cli():
        load_backbone("no-such-org/no-such-model")


def test_bad_options(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    with pytest.raises(ProbekitError, match="--batch-size"), as_cli():
        extract(tiny_model, [toy_task], tmp_path, batch_size="many", progress=False)
    with pytest.raises(ProbekitError, match="unknown pooling"):
        extract(tiny_model, [toy_task], tmp_path, pool="max", progress=False)
    with pytest.raises(ProbekitError, match="no CUDA GPU"):
        load_backbone(tiny_model, device="cuda") if not torch.cuda.is_available() else (_ for _ in ()).throw(
            ProbekitError("no CUDA GPU (skipped)")
        )
