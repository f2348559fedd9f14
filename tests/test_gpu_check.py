"""``make gpu-check`` on a machine without CUDA, and the ``gpu`` marker's skip (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import conftest, test_gpu

REPO = Path(__file__).resolve().parents[1]


def no_cuda_env() -> dict[str, str]:
    """This process's environment with every GPU hidden (the test means the same on a GPU machine)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}


def test_gpu_check_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path / "reports")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=no_cuda_env(), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU"), done.stderr
    assert "make gpu-check" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "reports").exists()  # no half report either


def test_gpu_check_help() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--help"],
        capture_output=True,
        text=True,
        env=no_cuda_env(),
    )
    assert done.returncode == 0
    assert "reports/gpu" in done.stdout and "--skip-tests" in done.stdout


class FakeItem:
    def __init__(self, *markers: str) -> None:
        self.keywords = dict.fromkeys(markers, True)
        self.added: list[pytest.MarkDecorator] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.added.append(marker)


def test_gpu_marker_is_registered_and_skips_with_its_reason(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert any(m.startswith("gpu:") for m in request.config.getini("markers"))
    assert test_gpu.pytestmark.name == "gpu"  # every test there carries it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu, cpu = FakeItem("gpu", "test_x"), FakeItem("test_y")
    conftest.pytest_collection_modifyitems(request.config, [gpu, cpu])  # type: ignore[list-item]
    assert cpu.added == []
    [mark] = gpu.added
    assert mark.name == "skip" and mark.kwargs["reason"] == conftest.GPU_SKIP_REASON
    assert "needs a CUDA GPU" in mark.kwargs["reason"] and "make gpu-check" in mark.kwargs["reason"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    again = FakeItem("gpu")
    conftest.pytest_collection_modifyitems(request.config, [again])  # type: ignore[list-item]
    assert again.added == []  # with CUDA they run
