"""End to end on the real encoder (all-MiniLM-L6-v2) and the shared SentEval sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from probekit import LayerCache, load_task
from tests.helpers import run_probekit


def test_extract_cli_on_minilm_and_shared_sample(minilm: Path, shared_data: Path, tmp_path: Path) -> None:
    proc = run_probekit(
        "extract", "--model", minilm, "--name", "minilm", "--task", "BShift", "--task", "subj_number",
        "--data-dir", shared_data, "--out", tmp_path / "caches", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    paths = sorted((tmp_path / "caches" / "minilm").iterdir())
    assert [p.name.split("-")[0] for p in paths] == ["bigram_shift", "subj_number"]
    cache = LayerCache.open(paths[0], verify=True)
    assert cache.n_layers == 7 and cache.hidden_size == 384  # embeddings + 6 blocks
    m = cache.manifest
    assert m["splits"]["train"]["n"] == 1125 and m["splits"]["test"]["n"] == 686
    assert m["model"]["model_type"] == "bert" and m["pool"] == "mean" and m["max_length"] == 128
    assert m["label_names"] == ["I", "O"] and m["storage_dtype"] == "float16"

    # independent check: plain transformers, one sentence at a time, mean over all real tokens
    data = load_task("bigram_shift", shared_data)
    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    picks = [0, 7, 500, 1124]
    for i in picks:
        enc = tok(data.splits["train"].texts[i], return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        expected = torch.stack([h[0].mean(0) for h in hs]).numpy()
        np.testing.assert_allclose(cache["train"][i].astype(np.float32), expected, atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(cache.labels("test"), data.splits["test"].labels)
