"""reports/example.ipynb runs top to bottom on results made here, so it never goes stale."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_analysis import study

NOTEBOOK = Path(__file__).resolve().parents[1] / "reports" / "example.ipynb"
KERNEL = "probekit-test"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec for this very interpreter, found before any user or system one (JUPYTER_PATH comes first)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return KERNEL


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_fresh_results(tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = study(tmp_path, layers=4, tasks=("sentence_length", "bigram_shift", "odd_man_out"), extras=False)
    monkeypatch.setenv("PROBEKIT_RESULTS", os.pathsep.join(str(paths[m]) for m in ("bert-cola", "bert-sst2")))
    monkeypatch.setenv("PROBEKIT_BASELINE", str(paths["bert"]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=180, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # heatmap, curves, delta heatmap, fine-tuning grid: each shown once
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    convexity = next(t for t in tables if "peak_layer" in t)
    assert "bert-cola" in convexity and "odd_man_out" in convexity
