"""Unlabelled text corpora for the MLM-head probes: passages, windows and a held-out split.

A corpus is a list of passages read from a SQuAD v1.1 JSON file (the ``context`` of every
paragraph), a plain-text file (one passage per line), or the texts of any task probekit
reads (``load_task``: SentEval, GLUE, ...; every split, both sides of sentence pairs).
Passages are de-duplicated (first occurrence kept) so that no text lands on both sides
of the train/held-out split, which is made by passage, deterministically from a seed.
Passages longer than ``max_length`` tokens are cut into consecutive windows.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probekit.data.readers import load_task
from probekit.data.senteval import check_text, decode_lines
from probekit.data.task import get_task
from probekit.data.tokens import Tokenized
from probekit.errors import DataError, ParamError, ProbekitError, ProbekitWarning
from probekit.registry import Registry

CorpusReader = Callable[[str | Path, str | Path | None], tuple[str, str, list[str]]]
"""Reads one corpus source (a path or task name, and the data dir): ``(name, sha256, passages)``."""
CORPUS_FORMATS: Registry[CorpusReader] = Registry("corpus format", "corpus_format")
"""How a corpus source is read (``squad``, ``text``, ``task``); ``auto`` picks one from the source."""


@dataclass
class Corpus:
    """Passages (unique, in reading order) and where they came from."""

    name: str
    passages: list[str]
    sha256: str
    """Hash of the source bytes (combined over sources): recorded with results."""
    sources: list[str]

    def __len__(self) -> int:
        return len(self.passages)


def read_corpus(
    sources: str | Path | Sequence[str | Path], data_dir: str | Path | None = None, format: str = "auto"
) -> Corpus:
    """Read one or more corpora into one list of unique passages.

    ``format``: ``squad`` (SQuAD v1.1 JSON), ``text`` (one passage per line), ``task``
    (a task name or SentEval-format file, read with ``load_task``), or ``auto``: a
    ``.json`` file is SQuAD, any other existing file is plain text, anything else a task.
    """
    if format != "auto":
        format = CORPUS_FORMATS.canonical(format)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ProbekitError(
            "no corpus given; pass {corpus} PATH_OR_TASK (a SQuAD JSON, a text file or a task)", params=("corpus",)
        )
    names, hashes, passages = [], [], []
    for source in sources:
        name, digest, texts = _read_one(source, data_dir, format)
        names.append(name)
        hashes.append(digest)
        passages.extend(texts)
    unique = list(dict.fromkeys(p for p in (" ".join(t.split()) for t in passages) if p))
    combined = hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
    return Corpus(name="+".join(names), passages=unique, sha256=combined, sources=[str(s) for s in sources])


def _read_one(source: str | Path, data_dir: str | Path | None, format: str) -> tuple[str, str, list[str]]:
    fmt = format
    if fmt == "auto":
        path = Path(source).expanduser()
        fmt = ("squad" if path.suffix.lower() == ".json" else "text") if path.is_file() else "task"
    return CORPUS_FORMATS.get(fmt)(source, data_dir)


def _file_reader(parse: Callable[[Path, bytes], list[str]]) -> CorpusReader:
    """A corpus reader for one file parsed by ``parse(path, raw)``."""

    def read(source: str | Path, data_dir: str | Path | None) -> tuple[str, str, list[str]]:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ProbekitError(f"corpus {source}: no such file")
        raw = path.read_bytes()
        return path.stem, hashlib.sha256(raw).hexdigest(), parse(path, raw)

    read.__doc__ = parse.__doc__
    return read


def read_task_texts(source: str | Path, data_dir: str | Path | None) -> tuple[str, str, list[str]]:
    """Every text of a task (every split, both sides of sentence pairs), read with ``load_task``."""
    task = get_task(source)
    options: dict[str, Any] = {}
    if task.format == "senteval":  # labels do not matter here: keep rows whose label is unseen in train
        options["unseen_labels"] = "drop"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbekitWarning)
        data = load_task(task, data_dir, **options)
    texts: list[str] = []
    for split in data.splits.values():
        texts.extend(split.texts)
        texts.extend(split.text_pairs or [])
    return data.name, data.sha256, texts


def read_text(path: Path, raw: bytes) -> list[str]:
    """One passage per non-blank line of a UTF-8 file."""
    passages = [line.strip() for line in decode_lines(path, raw) if line.strip()]
    if not passages:
        raise DataError(path, "empty file: expected one passage per line")
    return passages


def read_squad(path: Path, raw: bytes) -> list[str]:
    """The ``context`` of every paragraph of a SQuAD v1.1 file (``data[*].paragraphs[*].context``)."""
    if not raw.strip():
        raise DataError(path, "empty file: expected SQuAD v1.1 JSON")
    check_text(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8", line=line
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list):
        raise DataError(path, 'not a SQuAD v1.1 file: expected an object with a "data" list of articles')
    passages = []
    for i, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(path, f'not a SQuAD v1.1 file: data[{i}] has no "paragraphs" list')
        for j, para in enumerate(paragraphs):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                raise DataError(path, f'not a SQuAD v1.1 file: data[{i}].paragraphs[{j}] has no "context" string')
            if context.strip():
                passages.append(context)
    if not passages:
        raise DataError(path, "the SQuAD file has no paragraphs")
    return passages


def split_passages(passages: Sequence[str], heldout: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split passages into (train, held-out), keeping the reading order within each part.

    ``heldout`` below 1 is a fraction of the passages, from 1 up a number of passages.
    The same passages, ``heldout`` and ``seed`` always give the same split.
    """
    n = len(passages)
    if heldout <= 0:
        raise ParamError("heldout", f"must be positive (a fraction below 1 or a number of passages), got {heldout}")
    k = round(heldout * n) if heldout < 1 else int(heldout)
    k = max(1, k)
    if k >= n:
        raise ProbekitError(f"the corpus has {n} passages: too few to hold out {k} and train on the rest")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:k]] = True
    return [p for p, c in zip(passages, chosen, strict=True) if not c], [
        p for p, c in zip(passages, chosen, strict=True) if c
    ]


def window_passages(tokenizer: Any, passages: Sequence[str], max_length: int = 128) -> Tokenized:
    """Tokenise passages into windows of at most ``max_length`` tokens, special tokens included.

    A passage longer than one window continues in the next (no overlap, no token lost).
    """
    if max_length < 3:
        raise ParamError("max_length", f"must be at least 3, got {max_length}")
    if not passages:
        return Tokenized([], None, [], np.zeros(0, dtype=np.int64))
    enc = tokenizer(
        list(passages),
        truncation=True,
        max_length=max_length,
        stride=0,
        padding=False,
        return_overflowing_tokens=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
    )
    if "overflow_to_sample_mapping" not in enc:
        raise ProbekitError(
            f"the tokenizer {type(tokenizer).__name__} cannot split long passages into windows "
            "(a fast tokenizer is needed)"
        )
    ids = enc["input_ids"]
    types = enc.get("token_type_ids") if "token_type_ids" in tokenizer.model_input_names else None
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return Tokenized(ids, types, enc["special_tokens_mask"], lengths)


CORPUS_FORMATS.register("squad", _file_reader(read_squad), help="SQuAD v1.1 JSON: the context of every paragraph.")
CORPUS_FORMATS.register("text", _file_reader(read_text), help="A UTF-8 text file, one passage per line.")
CORPUS_FORMATS.register("task", read_task_texts, help="The texts of a task probekit reads (a name or a file).")
