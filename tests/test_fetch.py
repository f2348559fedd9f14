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


def blob_id(data: bytes) -> str:
    """git's object id of a file's bytes, computed here as git does (``git hash-object``)."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def blobs_of(root: Path) -> dict[str, str]:
    return {name: blob_id((root / name).read_bytes()) for name in FILES}


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
    paths = fetch("senteval", dest=tmp_path / "d", base_url=url, progress=False, git_blobs=blobs_of(root))
    assert len(paths) == 10 and len(log) == 10
    for p in paths:
        assert p.read_bytes() == (root / p.name).read_bytes()
        assert p.parent == tmp_path / "d" / "senteval" / "probing"
    sums = read_sums(paths[0].parent / "SHA256SUMS")  # pinned on first download
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert load_task("BShift", tmp_path / "d").counts() == {"train": 40, "dev": 12, "test": 16}
    fetch("senteval", dest=tmp_path / "d", base_url=url, progress=False, git_blobs=blobs_of(root))
    assert len(log) == 10  # everything present and verified: no request


def test_checksum_mismatch_keeps_nothing(mirror: tuple[Path, str, list], tmp_path: Path) -> None:
    root, url, _ = mirror
    dest = tmp_path / "d"
    fetch("senteval", dest=dest, tasks=["Tense"], base_url=url, progress=False, git_blobs=blobs_of(root))
    good = (dest / "senteval/probing/past_present.txt").read_bytes()
    (root / "past_present.txt").write_text("tr\tPAST\ttampered\n", encoding="utf-8")
    with pytest.raises(ProbekitError, match="checksum mismatch"):
        fetch("senteval", dest=dest, tasks=["Tense"], base_url=url, force=True, progress=False, git_blobs={})
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
    fetch(
        "senteval", dest=tmp_path / "d", tasks=["bigram_shift"], base_url=url, progress=False, git_blobs=blobs_of(root)
    )
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
    sums = tmp_path / "SHA256SUMS"  # the sample is not the official files: the user vouches for its checksums
    sums.write_text("".join(f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n" for n in FILES))
    log: list = []
    server, url = serve(root, log)
    try:
        args = ["data", "fetch", "senteval", "--dest", str(tmp_path / "d"), "--base-url", url, "--quiet"]
        result = CliRunner().invoke(app, [*args, "--checksums", str(sums)])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert (tmp_path / "d/senteval/probing" / name).read_bytes() == (root / name).read_bytes()
    assert load_task("SubjNum", tmp_path / "d").counts() == load_task("SubjNum", shared_data).counts()


def test_recorded_git_blob_ids_are_the_issue_s_and_verify_every_download(
    mirror: tuple[Path, str, list], tmp_path: Path
) -> None:
    """Without an override the recorded blob id is checked: the toy file is not SentEval's, so it is refused in one
    line naming the file, the expected id and the received one, and nothing is kept; with the id the test computes
    itself it passes."""
    root, url, _ = mirror
    recorded = {t.name: t.options.get("git_blob") for t in list_tasks("senteval")}
    assert recorded["bigram_shift"] == "1226c0467bd342c92132dd2fd26e54b7bd066bd7"
    assert recorded["word_content"] == "596d6fc7c624a989342f5aef2fa035d0d84f65b7"
    assert all(len(b or "") == 40 for b in recorded.values())
    got = blob_id((root / "bigram_shift.txt").read_bytes())
    with pytest.raises(ProbekitError) as info:
        fetch("senteval", dest=tmp_path / "d", tasks=["BShift"], base_url=url, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "bigram_shift.txt" in msg
    assert "expected 1226c0467bd342c92132dd2fd26e54b7bd066bd7" in msg and f"received {got}" in msg
    assert not list((tmp_path / "d").glob("**/bigram_shift.txt*"))
    wrong = {"bigram_shift.txt": "0" * 40}
    with pytest.raises(ProbekitError, match="git blob id mismatch"):
        fetch("senteval", dest=tmp_path / "d", tasks=["BShift"], base_url=url, progress=False, git_blobs=wrong)
    ok = fetch(
        "senteval",
        dest=tmp_path / "d",
        tasks=["BShift"],
        base_url=url,
        progress=False,
        git_blobs={"bigram_shift.txt": got},
    )
    assert ok[0].read_bytes() == (root / "bigram_shift.txt").read_bytes()
    result = CliRunner().invoke(
        app, ["data", "fetch", "senteval", "--dest", str(tmp_path / "c"), "--base-url", url, "-q"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "git blob id mismatch" in result.output
