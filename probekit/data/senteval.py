"""Reader for the SentEval probing format: ``split<TAB>label<TAB>sentence``.

Follows SentEval's own ``PROBINGEval.loadFile`` (``line.rstrip().split('\t')``: the split tag
is field 0, the label field 1, the sentence the LAST field, so extra middle fields are
ignored as SentEval ignores them): tr/va/te become train/dev/test, the sentence is
whitespace-tokenised and re-joined, and labels are mapped to ids by sorting the train
split's distinct labels. Files as editors save them read the same: a UTF-8 byte-order
mark, CRLF line endings, blank lines and a last line without a newline change nothing.
Unlike SentEval, anything malformed is an error naming the file and line instead of a
silent skip or a KeyError.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from probekit.data.task import SPLITS, Split, Task, TaskData, check_unseen_labels, unseen_label_error
from probekit.errors import DataError, ProbekitWarning

SPLIT_TAGS = {"tr": "train", "va": "dev", "te": "test"}
BOM = b"\xef\xbb\xbf"
BINARY_PROBE = 8192
"""Bytes looked at for NULs: text never holds one, binary formats (safetensors, numpy, zip) do early on."""


def check_text(path: Path, raw: bytes) -> None:
    """A :class:`DataError` when ``raw`` is a binary file (a NUL byte near its start), not text."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # what Windows editors call "Unicode"
        raise DataError(path, "UTF-16 text (it starts with a UTF-16 byte-order mark); re-encode the file as UTF-8")
    if b"\x00" in raw[:BINARY_PROBE]:
        raise DataError(path, "a binary file, not text (it holds NUL bytes); expected a UTF-8 text file")


def decode_lines(path: Path, raw: bytes) -> list[str]:
    """Split ``raw`` into lines and decode each as UTF-8, naming the first bad line.

    A leading byte-order mark and the ``\\r`` of CRLF endings are dropped; a binary file is refused."""
    check_text(path, raw)
    lines = raw.removeprefix(BOM).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(
                path,
                f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8",
                line=i,
            ) from None
    return out


def read_senteval(task: Task, path: Path, unseen_labels: str = "error") -> TaskData:
    """Read a SentEval probing file into train/dev/test splits.

    ``unseen_labels``: what to do with dev/test rows whose label never occurs in
    train: ``"error"`` (SentEval would crash on them) or ``"drop"`` them with a warning.
    """
    check_unseen_labels(unseen_labels)
    raw = Path(path).read_bytes()
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, list[str]] = {s: [] for s in SPLITS}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(decode_lines(path, raw), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        while len(cols) > 3 and not cols[-1].strip():  # trailing tabs: SentEval's rstrip() drops them
            cols.pop()
        if len(cols) < 3:
            raise DataError(
                path,
                f"expected 3 tab-separated columns (split, label, sentence; any more are ignored), found {len(cols)}",
                line=lineno,
            )
        tag, label, sentence = cols[0], cols[1], cols[-1]
        if tag not in SPLIT_TAGS:
            raise DataError(path, f"unknown split tag {tag!r} (expected tr, va or te)", line=lineno)
        words = sentence.split()
        if not words:
            raise DataError(path, "empty sentence", line=lineno)
        label = label.strip()
        if not label:
            raise DataError(path, "empty label", line=lineno)
        split = SPLIT_TAGS[tag]
        texts[split].append(" ".join(words))
        labels[split].append(label)
        first_line.setdefault((split, label), lineno)

    for split, tag in zip(SPLITS, SPLIT_TAGS, strict=True):
        if not texts[split]:
            raise DataError(path, f"the {split} split ({tag}) has no rows")
    label_names = sorted(set(labels["train"]))
    ids = {name: i for i, name in enumerate(label_names)}
    for split in ("dev", "test"):
        unseen = sorted({y for y in labels[split] if y not in ids}, key=lambda y: first_line[(split, y)])
        if not unseen:
            continue
        if unseen_labels == "error":
            y = unseen[0]
            raise unseen_label_error(path, split, y, first_line[(split, y)])
        keep = [i for i, y in enumerate(labels[split]) if y in ids]
        warnings.warn(
            f"{path}: dropped {len(labels[split]) - len(keep)} {split} rows whose label never occurs "
            f"in train ({len(unseen)} labels, e.g. {unseen[0]!r})",
            ProbekitWarning,
            stacklevel=2,
        )
        texts[split] = [texts[split][i] for i in keep]
        labels[split] = [labels[split][i] for i in keep]
        if not keep:
            raise DataError(path, f"the {split} split has no rows left after dropping unseen labels")
    splits = {s: Split(texts=texts[s], labels=np.array([ids[y] for y in labels[s]], dtype=np.int64)) for s in SPLITS}
    return TaskData(
        task=task,
        path=Path(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        splits=splits,
        label_names=label_names,
    )
