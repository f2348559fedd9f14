"""Reader and downloader for the GLUE tasks in their official TSV files.

Each task is a folder (``<data dir>/glue/<TASK>/``) of ``train.tsv`` and ``dev.tsv`` (MNLI:
``dev_matched.tsv`` and ``dev_mismatched.tsv``), laid out as the GLUE download script leaves
them. Which columns hold the text(s) and the label, and the allowed labels, come from the
task's entry in ``data/tasks/glue.toml``; files are split on tabs only (GLUE texts contain
quote characters, so no CSV quoting). Sentence pairs fill ``Split.text_pairs``; STS-B is a
regression task (float32 labels, no label names). As with the SentEval reader, anything
malformed is a :class:`~probekit.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probekit.data.fetch import SUMS, chosen_tasks, download, read_sums, write_sums
from probekit.data.senteval import decode_lines
from probekit.data.task import Split, Task, TaskData, check_unseen_labels, list_tasks, unseen_label_error
from probekit.errors import DataError, ProbekitError, ProbekitWarning
from probekit.io import remove_tree, replace_dir, sha256_file

DEFAULT_SPLITS = {"train": "train.tsv", "dev": "dev.tsv"}
BOM = "\ufeff"


@dataclass
class _Rows:
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    lines: list[int]
    sha256: str = ""
    """Of the file's bytes (read once for both)."""


def split_files(task: Task) -> dict[str, str]:
    """Split name -> file name inside the task's folder."""
    return dict(task.options.get("splits") or DEFAULT_SPLITS)


def _column(path: Path, header: list[str] | None, spec: Any, what: str) -> int:
    """Index of the column ``spec`` (a header name, or an index for header-less files)."""
    if header is None:
        return int(spec)
    if isinstance(spec, int):
        return spec
    if spec not in header:
        raise DataError(path, f"the header has no {what} column {spec!r} (found {header})", line=1)
    return header.index(spec)


def read_tsv(path: Path, task: Task) -> _Rows:
    """Read one GLUE TSV file into texts, second texts, label strings and line numbers."""
    opts = task.options
    if not path.is_file():
        raise DataError(path, f"missing file of task {task.name!r}; get the task with `probekit data fetch glue`")
    raw = path.read_bytes()
    lines = decode_lines(path, raw)
    if lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM) :]
    has_header = bool(opts.get("header", True))
    header: list[str] | None = None
    start = 0
    if has_header:
        if not lines:
            raise DataError(path, "empty file (expected a header line)")
        header = lines[0].split("\t")
        start = 1
    width = len(header) if header is not None else int(opts["columns"])
    i_text = _column(path, header, opts["text"], "text")
    i_pair = _column(path, header, opts["text_pair"], "second text") if "text_pair" in opts else None
    i_label = _column(path, header, opts["label"], "label")
    allowed = set(opts["labels"]) if opts.get("labels") else None
    regression = opts.get("type") == "regression"
    rows = _Rows([], [] if i_pair is not None else None, [], [], hashlib.sha256(raw).hexdigest())
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != width:
            what = "as the header" if header is not None else "(see the GLUE format)"
            raise DataError(path, f"expected {width} tab-separated columns {what}, found {len(cols)}", line=lineno)
        text = cols[i_text].strip()
        if not text:
            raise DataError(path, "empty sentence", line=lineno)
        if i_pair is not None:
            pair = cols[i_pair].strip()
            if not pair:
                raise DataError(path, "empty second sentence", line=lineno)
            rows.pairs.append(pair)  # type: ignore[union-attr]
        label = cols[i_label].strip()
        if not label:
            raise DataError(path, "empty label", line=lineno)
        if regression:
            try:
                value = float(label)
            except ValueError:
                raise DataError(path, f"label {label!r} is not a number (regression task)", line=lineno) from None
            if not np.isfinite(value):
                raise DataError(path, f"label {label!r} is not a finite number", line=lineno)
        elif allowed is not None and label not in allowed:
            raise DataError(path, f"label {label!r} is not one of {sorted(allowed)}", line=lineno)
        rows.texts.append(text)
        rows.labels.append(label)
        rows.lines.append(lineno)
    if not rows.texts:
        raise DataError(path, "no data rows")
    return rows


def read_glue(task: Task, path: Path, unseen_labels: str = "error") -> TaskData:
    """Read a GLUE task folder into its splits (``train``, ``dev`` and, for MNLI, ``dev_mismatched``).

    ``unseen_labels``: dev rows whose label never occurs in train: ``"error"`` or ``"drop"``.
    """
    check_unseen_labels(unseen_labels)
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, f"expected the folder of GLUE task {task.name!r} (with train.tsv and dev.tsv)")
    files = split_files(task)
    read = {split: read_tsv(path / fname, task) for split, fname in files.items()}
    digest = hashlib.sha256()
    for split, fname in sorted(files.items()):
        digest.update(f"{split}={fname}:{read[split].sha256}\n".encode())
    regression = task.options.get("type") == "regression"
    label_names: list[str] = [] if regression else sorted(set(read["train"].labels))
    ids = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, Split] = {}
    for split, rows in read.items():
        keep = list(range(len(rows.texts)))
        if not regression and split != "train":
            unseen = [i for i, y in enumerate(rows.labels) if y not in ids]
            if unseen and unseen_labels == "error":
                i = unseen[0]
                raise unseen_label_error(path / files[split], split, rows.labels[i], rows.lines[i])
            if unseen:
                warnings.warn(
                    f"{path / files[split]}: dropped {len(unseen)} {split} rows whose label never occurs in train",
                    ProbekitWarning,
                    stacklevel=2,
                )
                keep = [i for i in keep if rows.labels[i] in ids]
        if regression:
            labels = np.array([float(rows.labels[i]) for i in keep], dtype=np.float32)
        else:
            labels = np.array([ids[rows.labels[i]] for i in keep], dtype=np.int64)
        splits[split] = Split(
            texts=[rows.texts[i] for i in keep],
            labels=labels,
            text_pairs=[rows.pairs[i] for i in keep] if rows.pairs is not None else None,
        )
    return TaskData(task=task, path=path, sha256=digest.hexdigest(), splits=splits, label_names=label_names)


# ---------------------------------------------------------------- download


def fetch_glue(
    dest: Path,
    tasks: Sequence[str] | None,
    base_url: str | None,
    checksums: dict[str, str],
    force: bool,
    progress: bool,
) -> list[Path]:
    """Download the official GLUE files into ``dest/glue/<TASK>/`` (zips are extracted atomically)."""
    chosen = chosen_tasks("glue", tasks)
    done: dict[str, Path] = {}
    for t in chosen:
        if t.relpath in done:  # mnli and mnli_mm share one folder
            continue
        target = dest / t.relpath
        if not force and _complete(target, t):
            done[t.relpath] = target
            continue
        fetcher = _fetch_mrpc if "dev_ids_url" in t.options else _fetch_zip
        done[t.relpath] = fetcher(t, dest, base_url, checksums, progress)
    return list(done.values())


def _complete(folder: Path, task: Task) -> bool:
    """Whether ``folder`` holds every split file of ``task`` (and those of tasks sharing it)."""
    names = {f for t in list_tasks("glue") if t.relpath == task.relpath for f in split_files(t).values()}
    return all((folder / f).is_file() for f in names)


def _url(base_url: str | None, official: str | None, fname: str) -> str:
    if base_url:
        return base_url.rstrip("/") + "/" + fname
    if not official:
        raise ProbekitError(f"no download URL recorded for {fname}")
    return official


def _get(url: str, target: Path, expected: str | None, progress: bool) -> None:
    """Download ``url`` to ``target`` unless a copy with the expected checksum is there; pin its checksum."""
    sums_path = target.parent / SUMS
    expected = expected or read_sums(sums_path).get(target.name)
    if target.is_file() and expected and sha256_file(target) == expected.lower():
        return
    digest = download(url, target, expected, progress)
    sums = read_sums(sums_path)
    if sums.get(target.name) != digest:
        sums[target.name] = digest
        write_sums(sums_path, sums)


def _install(src: Path, target: Path, task: Task) -> Path:
    """Move the prepared folder ``src`` to ``target`` in one rename, once it has every split file."""
    missing = [
        f
        for t in list_tasks("glue")
        if t.relpath == task.relpath
        for f in split_files(t).values()
        if not (src / f).is_file()
    ]
    if missing:
        raise ProbekitError(
            f"the download of GLUE task {task.name!r} lacks {sorted(set(missing))}; "
            "the source has changed or the mirror is incomplete"
        )
    return replace_dir(src, target)


def _fetch_zip(task: Task, dest: Path, base_url: str | None, checksums: Mapping[str, str], progress: bool) -> Path:
    folder = Path(task.relpath).name
    zname = str(task.options.get("zip") or f"{folder}.zip")
    glue_dir = dest / Path(task.relpath).parent
    archive = glue_dir / zname
    _get(_url(base_url, task.url, zname), archive, checksums.get(zname) or task.sha256, progress)
    tmp = glue_dir / f".{folder}.partial"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                parts = Path(member).parts
                if member.startswith("/") or ".." in parts:
                    raise ProbekitError(f"{archive}: unsafe path {member!r} in the archive; refusing to extract it")
            z.extractall(tmp)
    except zipfile.BadZipFile as e:
        remove_tree(tmp)
        raise ProbekitError(f"{archive} is not a readable zip ({e}); delete it and re-run") from None
    src = tmp / folder
    if not src.is_dir():
        tops = [p for p in tmp.iterdir() if p.is_dir() and not p.name.startswith("__MACOSX")]
        src = tops[0] if len(tops) == 1 else tmp
    try:
        _install(src, glue_dir / folder, task)
    finally:
        remove_tree(tmp)
    archive.unlink(missing_ok=True)  # its checksum stays pinned in SHA256SUMS
    return glue_dir / folder


def _fetch_mrpc(task: Task, dest: Path, base_url: str | None, checksums: Mapping[str, str], progress: bool) -> Path:
    """MRPC as the GLUE script builds it: the MSR train file split into train/dev by the GLUE dev ids."""
    glue_dir = dest / Path(task.relpath).parent
    folder = Path(task.relpath).name
    downloads = glue_dir / f".{folder}.download"
    train_url = _url(base_url, task.url, "msr_paraphrase_train.txt")
    ids_url = _url(base_url, task.options["dev_ids_url"], "mrpc_dev_ids.tsv")
    train_src, ids_src = downloads / "msr_paraphrase_train.txt", downloads / "mrpc_dev_ids.tsv"
    _get(train_url, train_src, checksums.get(train_src.name) or task.sha256, progress)
    _get(ids_url, ids_src, checksums.get(ids_src.name) or task.options.get("dev_ids_sha256"), progress)
    dev_ids = {tuple(line.strip().split("\t")) for line in decode_lines(ids_src, ids_src.read_bytes()) if line.strip()}
    lines = decode_lines(train_src, train_src.read_bytes())
    if not lines:
        raise DataError(train_src, "empty file")
    header = lines[0].removeprefix(BOM)
    train, dev = [header], [header]
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.strip().split("\t")
        if len(cols) != 5:
            raise DataError(train_src, f"expected 5 tab-separated columns, found {len(cols)}", line=lineno)
        (dev if (cols[1], cols[2]) in dev_ids else train).append("\t".join(cols))
    tmp = glue_dir / f".{folder}.partial"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "train.tsv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (tmp / "dev.tsv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    try:
        _install(tmp, glue_dir / folder, task)
    finally:
        remove_tree(tmp)
    remove_tree(downloads)
    return glue_dir / folder
