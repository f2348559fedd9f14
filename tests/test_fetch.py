"""`probekit data fetch`: downloads from a local HTTP server, checksums, resume, atomicity."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.data import fetch, list_tasks, load_task
from probekit.data.fetch import read_sums
from probekit.errors import ProbekitError
from tests.helpers import serve, toy_senteval

FILES = [t.relpath.split("/")[-1] for t in list_tasks("senteval")]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, str, list]]:
    """A local server with one toy file per SentEval task."""
    root = tmp_path / "mirror"
    for i, name in enumerate(FILES):
        toy_senteval(root / name, seed=i)
    log: list = []
    server, url = serve(root, log)
    yield root, url, log
    server.shutdown()


def test_fetch_all_then_nothing_to_do(mirror: tuple[Path, str, list], tmp_path: Path) -> None:
    root, url, log = mirror
    paths = fetch("senteval", dest=tmp_path / "d", base_url=url, progress=False)
    assert len(paths) == 10 and len(log) == 10
    for p in paths:
        assert p.read_bytes() == (root / p.name).read_bytes()
        assert p.parent == tmp_path / "d" / "senteval" / "probing"
    sums = read_sums(paths[0].parent / "SHA256SUMS")  # pinned on first download
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert load_task("BShift", tmp_path / "d").counts() == {"train": 40, "dev": 12, "test": 16}
    fetch("senteval", dest=tmp_path / "d", base_url=url, progress=False)
    assert len(log) == 10  # everything present and verified: no request


def test_checksum_mismatch_keeps_nothing(mirror: tuple[Path, str, list], tmp_path: Path) -> None:
    root, url, _ = mirror
    dest = tmp_path / "d"
    fetch("senteval", dest=dest, tasks=["Tense"], base_url=url, progress=False)
    good = (dest / "senteval/probing/past_present.txt").read_bytes()
    (root / "past_present.txt").write_text("tr\tPAST\ttampered\n", encoding="utf-8")
    with pytest.raises(ProbekitError, match="checksum mismatch"):
        fetch("senteval", dest=dest, tasks=["Tense"], base_url=url, force=True, progress=False)
    assert (dest / "senteval/probing/past_present.txt").read_bytes() == good  # old file kept
    assert not list(dest.glob("**/*.part"))
    with pytest.raises(ProbekitError, match="checksum mismatch"):
        fetch(
            "senteval",
            dest=tmp_path / "other",
            tasks=["SOMO"],
            base_url=url,
            progress=False,
            checksums={"odd_man_out.txt": "0" * 64},
        )
    assert not (tmp_path / "other/senteval/probing/odd_man_out.txt").exists()


def test_interrupted_download_resumes_with_a_range_request(mirror: tuple[Path, str, list], tmp_path: Path) -> None:
    root, url, log = mirror
    source = (root / "bigram_shift.txt").read_bytes()
    target = tmp_path / "d" / "senteval" / "probing" / "bigram_shift.txt"
    target.parent.mkdir(parents=True)
    Path(str(target) + ".part").write_bytes(source[:100])  # what a killed download leaves
    fetch("senteval", dest=tmp_path / "d", tasks=["bigram_shift"], base_url=url, progress=False)
    assert log == [("/bigram_shift.txt", "bytes=100-")]
    assert target.read_bytes() == source


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProbekitError, match="could not download http://127.0.0.1:9/bigram_shift.txt"):
        fetch("senteval", dest=tmp_path, tasks=["BShift"], base_url="http://127.0.0.1:9/", progress=False)
    with pytest.raises(ProbekitError, match="unknown collection"):
        fetch("nope", dest=tmp_path)


def test_cli_fetch_serves_the_shared_sample(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    shutil.copytree(shared_data / "senteval" / "probing", root)  # a temporary copy, served locally
    log: list = []
    server, url = serve(root, log)
    try:
        result = CliRunner().invoke(
            app, ["data", "fetch", "senteval", "--dest", str(tmp_path / "d"), "--base-url", url, "--quiet"]
        )
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert (tmp_path / "d/senteval/probing" / name).read_bytes() == (root / name).read_bytes()
    assert load_task("SubjNum", tmp_path / "d").counts() == load_task("SubjNum", shared_data).counts()
