"""Downloading the official datasets, verified against recorded checksums.

Downloads go to ``<file>.part`` and resume from where they stopped (HTTP range
requests); a file is renamed into place only once its SHA-256 matches. Files whose
checksum is not recorded in the registry are pinned on first download in
``SHA256SUMS`` next to them, and verified against that pin afterwards. A task table may
also record ``git_blob``: the git blob id of the file in its source repository
(``sha1(b"blob <size>\0" + bytes)``, what a raw download of that commit must hash to), checked
on every download and on a file already there (unless the caller overrides its SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from probekit.data.locate import default_data_dir
from probekit.data.task import FETCHERS, Fetcher, Task, get_task, list_tasks
from probekit.errors import ProbekitError
from probekit.io import atomic_open, sha256_file

SUMS = "SHA256SUMS"
USER_AGENT = "probekit (https://github.com/probekit/probekit)"
TIMEOUT = 60


def register_fetcher(collection: str) -> Callable[[Fetcher], Fetcher]:
    """Decorator: register the function that downloads a collection's files (for plugins)."""
    return FETCHERS.register(collection)


def fetch(
    collection: str,
    dest: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
    git_blobs: dict[str, str] | None = None,
) -> list[Path]:
    """Download a collection (``senteval``, ...) into ``dest`` (default: the user cache dir).

    ``base_url`` replaces the official location (a mirror); ``checksums`` maps file names
    to SHA-256 values that override the recorded ones (and the recorded git blob ids);
    ``git_blobs`` file names to git blob ids that override the recorded ones.
    """
    blobs = {"git_blobs": git_blobs} if git_blobs else {}
    return FETCHERS.get(collection)(
        dest=Path(dest) if dest else default_data_dir(),
        tasks=tasks,
        base_url=base_url,
        checksums=checksums or {},
        force=force,
        progress=progress,
        **blobs,
    )


def git_blob_id(path: Path) -> str:
    """The git blob id of a file: ``sha1(b"blob <size>\0" + bytes)``."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style file (``<hex>  <name>`` per line)."""
    sums: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def write_sums(path: Path, sums: dict[str, str]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for name in sorted(sums):
            f.write(f"{sums[name]}  {name}\n")


def download(
    url: str, target: Path, sha256: str | None = None, progress: bool = True, git_blob: str | None = None
) -> str:
    """Download ``url`` to ``target`` (resuming ``target.part``), check it (SHA-256, git blob id), return its
    SHA-256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            resumed = resp.status == 206
            total = resp.headers.get("Content-Length")
            total = int(total) + (have if resumed else 0) if total else None
            with (
                open(part, "ab" if resumed else "wb") as f,
                tqdm(
                    total=total,
                    initial=have if resumed else 0,
                    unit="B",
                    unit_scale=True,
                    desc=target.name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                for block in iter(lambda: resp.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the .part file is already complete
            raise ProbekitError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise ProbekitError(
            f"could not download {url} ({reason}); check the internet connection and re-run "
            f"(the download resumes), or put the file at {target} by hand"
        ) from None
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise ProbekitError(
            f"{url}: checksum mismatch (got sha256 {digest}, expected {sha256}); the file was deleted. "
            "Re-run to download it again; if it keeps failing the source has changed"
        )
    if git_blob:
        blob = git_blob_id(part)
        if blob != git_blob.lower():
            part.unlink()
            raise ProbekitError(
                f"{target.name}: git blob id mismatch (expected {git_blob}, received {blob}); the download from "
                f"{url} was deleted (the source changed, or a mirror serves other bytes)"
            )
    os.replace(part, target)
    return digest


def fetch_senteval(
    dest: Path,
    tasks: Sequence[str] | None,
    base_url: str | None,
    checksums: dict[str, str],
    force: bool,
    progress: bool,
    git_blobs: dict[str, str] | None = None,
) -> list[Path]:
    """Download the SentEval probing files into ``dest/senteval/probing/``."""
    blobs = git_blobs or {}
    return [_fetch_file(t, dest, base_url, checksums, force, progress, blobs) for t in chosen_tasks("senteval", tasks)]


def chosen_tasks(collection: str, tasks: Sequence[str] | None) -> list[Task]:
    """The named tasks (all of the collection by default), refusing tasks of another collection."""
    chosen = [get_task(t) for t in tasks] if tasks else list_tasks(collection)
    for t in chosen:
        if t.collection != collection:
            raise ProbekitError(f"task {t.name!r} is not in the {collection} collection")
    return chosen


def _fetch_file(
    task: Task,
    dest: Path,
    base_url: str | None,
    checksums: dict[str, str],
    force: bool,
    progress: bool,
    git_blobs: dict[str, str] | None = None,
) -> Path:
    target = dest / task.relpath
    fname = target.name
    url = (base_url.rstrip("/") + "/" + fname) if base_url else task.url
    if not url:
        raise ProbekitError(f"task {task.name!r} has no download URL")
    sums_path = target.parent / SUMS
    pinned = read_sums(sums_path)
    expected = checksums.get(fname) or task.sha256 or pinned.get(fname)
    blob = (git_blobs or {}).get(fname) or (None if fname in checksums else task.options.get("git_blob"))
    if target.exists() and not force:
        digest = sha256_file(target)
        if (expected is None or digest == expected) and (not blob or git_blob_id(target) == blob):
            _pin(sums_path, fname, digest)
            return target
        print(f"{target}: checksum does not match the recorded one; downloading it again")
    digest = download(url, target, expected, progress, git_blob=blob)
    _pin(sums_path, fname, digest)
    return target


def _pin(sums_path: Path, fname: str, digest: str) -> None:
    sums = read_sums(sums_path)
    if sums.get(fname) != digest:
        sums[fname] = digest
        write_sums(sums_path, sums)
